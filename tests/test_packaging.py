"""What a non-editable install ships: every package of the source tree is listed in pyproject.toml (a
subpackage left out installs without error and fails at import on the user's machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "rnnkernels").rglob("__init__.py")}
    assert listed == found
