"""Which backend runs a recurrence: the one rule, in one place.

Each backend is one record: what it runs (the recurrence of one layer and direction, the input
projection and, where it has one, a fused single step for the cells) and ``unsupported(device, dtype)``,
which answers None or the reason in words.
``backend="auto"`` takes the first backend of its device's order that supports the case. An explicit
choice comes, from the strongest to the weakest: the ``rnnkernels.use_backend(...)`` context manager
(per call, this thread), the module's ``backend=`` argument, the ``RNNKERNELS_BACKEND`` environment
variable (the process default where a module says "auto"). An explicit choice that cannot run the case
raises a ``RuntimeError`` carrying the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable

import torch

from . import ops, reference

COMPILED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    recurrence: Callable  # contract: reference.recurrence
    linear: Callable  # contract: torch.nn.functional.linear
    unsupported: Callable[[torch.device, torch.dtype], str | None]
    step: Callable | None = None  # contract: ops.step; None: cells run recurrence over one step


def _cpu_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    if ops.LOAD_ERROR is not None:
        return f"the compiled extension could not be loaded ({ops.LOAD_ERROR})"
    if device.type != "cpu":
        return f"the cpu backend runs CPU tensors, got a tensor on {device}"
    if dtype not in COMPILED_DTYPES:
        return f"the cpu backend runs {COMPILED_DTYPES}, got {dtype}"
    return None


def _cuda_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    if ops.LOAD_ERROR is not None:
        return f"the compiled extension could not be loaded ({ops.LOAD_ERROR})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rnnkernels::lstm_forward", "CUDA"):
        return "the extension was built without its CUDA kernels (torch without CUDA, no nvcc, or RNNKERNELS_CUDA=0)"
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got a tensor on {device}"
    if dtype not in COMPILED_DTYPES:
        return f"the cuda backend runs {COMPILED_DTYPES}, got {dtype}"
    return None


_BY_NAME = {
    backend.name: backend
    for backend in (
        Backend("cpu", ops.recurrence, ops.linear, _cpu_unsupported),
        Backend("cuda", ops.recurrence, ops.linear, _cuda_unsupported, ops.step),
        Backend("reference", reference.recurrence, torch.nn.functional.linear, lambda device, dtype: None),
    )
}
BACKENDS = tuple(_BY_NAME)
# "auto" tries these in order; the reference backend, last everywhere, runs anything.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "reference")}
FALLBACK_ORDER = ("reference",)

_local = threading.local()


def check_name(name: str) -> str:
    if name != "auto" and name not in _BY_NAME:
        raise ValueError(f"rnnkernels: unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return name


def unsupported(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend `name` can run a recurrence on (device, dtype), else why not."""
    return _BY_NAME[check_name(name)].unsupported(device, dtype)


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


def select(requested: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs a layer whose module asked for `requested`, on (device, dtype)."""
    override = getattr(_local, "override", None)
    if override is not None and override != "auto":
        choice = override
    elif requested != "auto":
        choice = requested
    else:
        choice = check_name(os.environ.get("RNNKERNELS_BACKEND", "auto") or "auto")
    if choice == "auto":
        order = AUTO_ORDER.get(device.type, FALLBACK_ORDER)
        return next(_BY_NAME[name] for name in order if unsupported(name, device, dtype) is None)
    reason = unsupported(choice, device, dtype)
    if reason is not None:
        raise RuntimeError(f"rnnkernels: backend {choice!r} cannot run this input: {reason}")
    return _BY_NAME[choice]
