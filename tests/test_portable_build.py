"""The CPU kernels as built for machines without AVX-512, which a build on an AVX-512 machine, like CI's, never
exercises: x86-64-v3 (AVX2 with FMA, most laptops), where the float32 gate math runs on 8 lanes
(csrc/cpu/float_lanes.h), and x86-64-v2, where it runs one unit at a time as on CPUs with neither (the
float32 path of ARM builds). The first runs the panel kernels of csrc/cpu/panels.h on 8-lane panels; in
the second they compile out and the per-step GEMM path runs instead. A copy of the tree is built each way
and runs the CPU tests of the gate math and the modules against torch.nn."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86-64 build option")
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.parametrize(("arch", "lanes"), [("x86-64-v3", 8), ("x86-64-v2", 1)])
def test_build_without_avx512_matches_torch(tmp_path, arch, lanes):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "__pycache__", "*.egg-info", "benchmarks", "examples", "docs"))
    env = {**os.environ, "RNNKERNELS_CPU_ARCH": arch, "RNNKERNELS_CUDA": "0", "PYTHONPATH": str(src)}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    where = subprocess.run(
        [sys.executable, "-c", "import rnnkernels.ops as o; print(o.__file__, o.LOAD_ERROR, o.CPU_FLOAT_LANES)"],
        cwd=src, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(src)) and where.stdout.split()[1:] == ["None", str(lanes)], (
        where.stdout + where.stderr)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cell_math.py",
         "tests/test_threads.py", "tests/test_modules.py", "-k", "not cuda and not triton and not reference"],
        cwd=src, env=env, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    passed = re.search(r"(\d+) passed", tests.stdout)
    assert passed and int(passed.group(1)) >= 200, tests.stdout[-2000:]  # the selection did not run dry
