"""Which backend runs a recurrence: the one rule, in one place.

Each backend answers ``unsupported(device, dtype)`` with None or the reason in words. ``backend="auto"``
takes the first backend of its device's order that supports the case. An explicit choice comes, from
the strongest to the weakest: the ``rnnkernels.use_backend(...)`` context manager (per call, this
thread), the module's ``backend=`` argument, the ``RNNKERNELS_BACKEND`` environment variable (the
process default where a module says "auto"). An explicit choice that cannot run the case raises a
``RuntimeError`` carrying the reason.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from . import ops, reference

BACKENDS = ("cpu", "reference")
AUTO_ORDER = {"cpu": ("cpu", "reference")}
FALLBACK_ORDER = ("reference",)
COMPILED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_local = threading.local()


def check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"rnnkernels: unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return name


def unsupported(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend `name` can run a recurrence on (device, dtype), else why not."""
    if name == "reference":
        return None
    if name == "cpu":
        if ops.LOAD_ERROR is not None:
            return f"the compiled extension could not be loaded ({ops.LOAD_ERROR})"
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors, got a tensor on {device}"
        if dtype not in COMPILED_DTYPES:
            return f"the cpu backend runs {COMPILED_DTYPES}, got {dtype}"
        return None
    raise ValueError(f"rnnkernels: unknown backend {name!r}")


@contextlib.contextmanager
def use_backend(name: str):
    """Runs every rnnkernels layer in this thread on backend `name` (or "auto") inside the block."""
    check_name(name)
    previous = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = previous


def select(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a layer whose module asked for `requested`, on (device, dtype)."""
    override = getattr(_local, "override", None)
    if override is not None and override != "auto":
        choice = override
    elif requested != "auto":
        choice = requested
    else:
        choice = check_name(os.environ.get("RNNKERNELS_BACKEND", "auto") or "auto")
    if choice == "auto":
        for name in AUTO_ORDER.get(device.type, FALLBACK_ORDER):
            if unsupported(name, device, dtype) is None:
                return name
        return "reference"
    reason = unsupported(choice, device, dtype)
    if reason is not None:
        raise RuntimeError(f"rnnkernels: backend {choice!r} cannot run this input: {reason}")
    return choice


def recurrence_fn(name: str):
    """The function that runs one layer and direction on backend `name` (contract: reference.recurrence)."""
    return reference.recurrence if name == "reference" else ops.recurrence


def linear_fn(name: str):
    """The input projection F.linear(x, w, b) on backend `name`."""
    return ops.linear if name == "cpu" else torch.nn.functional.linear
