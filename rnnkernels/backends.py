"""Which backend runs a recurrence: the one rule, in one place.

Each backend is one record: what it runs (the recurrence of one layer and direction, the input
projection, and optionally a fused single time step) and ``unsupported(device, dtype)``, which answers
None or the reason in words.
``backend="auto"`` takes the first backend of its device's order that supports the case. An explicit
choice comes, from the strongest to the weakest: the ``rnnkernels.use_backend(...)`` context manager
(per call, this thread), the module's ``backend=`` argument, the ``RNNKERNELS_BACKEND`` environment
variable (the process default where a module says "auto"). An explicit choice that cannot run the case
raises a ``RuntimeError`` carrying the reason. Under torch.func's transforms (grad, jvp, vmap, ...) and
forward-mode AD only the reference backend runs: they see through plain torch operations, not through
custom operators. So it does for an LSTM cell whose cell state has another dtype than its weights, which
torch.nn's LSTMCell type-promotes and the compiled steps do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Iterable

import torch
import torch.autograd.forward_ad as forward_ad

from . import ops, reference

COMPILED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    recurrence: Callable  # contract: reference.recurrence
    linear: Callable  # contract: torch.nn.functional.linear
    unsupported: Callable[[torch.device, torch.dtype], str | None]
    fused_step: Callable | None = None  # contract: Backend.step, or None where it declines the case

    def step(self, cell, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr):
        """One time step of one layer, input projection included: x (B, I), h (B, P), c (B, H) for the
        LSTM else None. Returns (h', c'), c' None but for the LSTM. Without a fused step (or where it
        declines), the projection and the recurrence at T = 1, which is also the fused step's specification."""
        if self.fused_step is not None:
            fused = self.fused_step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
            if fused is not None:
                return fused
        gx = self.linear(x, w_ih, b_ih).unsqueeze(0)
        _, h, c = self.recurrence(cell, gx, h, c, w_hh, b_hh, w_hr, None, False)
        return h, c


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


_triton: list = []  # [rnnkernels.triton or None, why not], filled on first use


def _triton_backend() -> list:
    # Imported on first use, not with rnnkernels: it needs triton, and TRITON_INTERPRET is read then.
    if not _triton:
        try:
            from . import triton as module

            _triton[:] = [module, None]
        except Exception as error:  # no triton, or one that fails to initialise
            _triton[:] = [None, f"{type(error).__name__}: {error}"]
    return _triton


def _triton_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    module, error = _triton_backend()
    if module is None:
        return f"Triton could not be imported ({error})"
    if device.type != "cuda" and not (device.type == "cpu" and module.INTERPRETED):
        return (f"the triton backend runs CUDA tensors (CPU tensors in Triton's interpreter, TRITON_INTERPRET=1), "
                f"got a tensor on {device}")
    if dtype not in module.DTYPES:
        return f"the triton backend runs {module.DTYPES}, got {dtype}"
    return None


def _triton_recurrence(*args):
    return _triton_backend()[0].recurrence(*args)


def _triton_step(*args):
    return _triton_backend()[0].step(*args)


_BY_NAME = {
    backend.name: backend
    for backend in (
        Backend("cpu", ops.recurrence, ops.linear, _cpu_unsupported, ops.step),
        Backend("cuda", ops.recurrence, ops.linear, _cuda_unsupported, ops.step),
        Backend("triton", _triton_recurrence, torch.nn.functional.linear, _triton_unsupported, _triton_step),
        Backend("reference", reference.recurrence, torch.nn.functional.linear, lambda device, dtype: None),
    )
}
BACKENDS = tuple(_BY_NAME)
# "auto" tries these in order; the reference backend, last everywhere, runs anything.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
FALLBACK_ORDER = ("reference",)


class _Override(threading.local):
    name: str | None = None  # use_backend's choice in this thread, None outside it


_override = _Override()


def check_name(name: str) -> str:
    if name != "auto" and name not in _BY_NAME:
        raise ValueError(f"rnnkernels: unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return name


_TRANSFORMED = ("torch.func transforms or forward-mode AD are active, which see through plain torch operations "
                "only; the reference backend runs there")


def _transformed(tensors: Callable[[], Iterable]) -> bool:
    """Whether torch.func's transforms (grad, vjp, jvp, vmap, ...) are active in this thread, or forward-mode
    AD with a tangent on one of tensors(). Both see through plain torch operations only; the other
    backends' operators have no rule for them (torch.func's jvp through one answers zero tangents without a
    word). The dual level is the process's, not the thread's: so the tangents decide."""
    if torch._C._are_functorch_transforms_active():
        return True
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors())


def unsupported(name: str, device: torch.device, dtype: torch.dtype,
                reference_only: str | None = None) -> str | None:
    """None if backend `name` can run a recurrence on (device, dtype), else why not. reference_only: why the
    case is one for the reference backend alone, or None."""
    if reference_only is not None and name != "reference":
        return reference_only
    return _BY_NAME[check_name(name)].unsupported(device, dtype)


@contextlib.contextmanager
def use_backend(name: str):
    """Runs every rnnkernels layer in this thread on backend `name` (or "auto") inside the block."""
    check_name(name)
    previous = _override.name
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def select(requested: str, device: torch.device, dtype: torch.dtype,
           tensors: Callable[[], Iterable] = lambda: (), reference_only: str | None = None) -> Backend:
    """The backend that runs a layer whose module asked for `requested`, on (device, dtype); tensors(): the
    layer's input, states and weights, looked at under forward-mode AD only. reference_only: why the layer's
    case is one for the reference backend alone (as under torch.func's transforms), or None."""
    override = _override.name
    if override is not None and override != "auto":
        choice = override
    elif requested != "auto":
        choice = requested
    else:
        choice = os.environ.get("RNNKERNELS_BACKEND") or "auto"
    # A cell module asks once per generated token, so the answer is cached: what each backend supports is
    # fixed once the extension is loaded (its load error is in the key, so that a changed state is seen).
    # A plain dict, which torch.compile traces without the warning an lru_cache draws; but not written
    # while compiling, where the write would fail the guard of the frame it is compiled into.
    if reference_only is None and _transformed(tensors):
        reference_only = _TRANSFORMED
    key = (choice, device.type, dtype, ops.LOAD_ERROR, reference_only)
    selected = _SELECTED.get(key)
    if selected is None:
        selected = _selection(choice, key[1], dtype, reference_only)
        if not torch.compiler.is_compiling():
            _SELECTED[key] = selected
    name, reason = selected
    if reason is not None:  # in words again, for this very device (the cached reason names its type only)
        why = unsupported(choice, device, dtype, reference_only)
        raise RuntimeError(f"rnnkernels: backend {choice!r} cannot run this input: {why}")
    return _BY_NAME[name]


_SELECTED: dict = {}


def _selection(choice: str, device_type: str, dtype: torch.dtype,
               reference_only: str | None) -> tuple[str, str | None]:
    """(the backend `choice` names, None); "auto" names the first of the device type's order that supports
    dtype. Or (choice, why it cannot run (device_type, dtype)) where the named one cannot."""
    device = torch.device(device_type)
    if check_name(choice) == "auto":
        order = AUTO_ORDER.get(device_type, FALLBACK_ORDER)
        return next(name for name in order if unsupported(name, device, dtype, reference_only) is None), None
    return choice, unsupported(choice, device, dtype, reference_only)
