"""The rnnkernels operators from Python: loading the compiled extension, fake implementations for
torch.compile, and autograd (the hand-written backward operator of each cell).

The schemas live in csrc/ops.cpp: per cell c in CELLS, rnnkernels::{c}_forward and rnnkernels::{c}_backward,
over one layer and direction of a whole sequence, and rnnkernels::{c}_step, one time step with its input
projection, whose backward is the sequence backward at T = 1.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .reference import GATES

CELLS = tuple(GATES)

try:
    from . import _C  # importing it registers the operators

    LOAD_ERROR: str | None = None
    # float32 units per vector of the CPU kernels as built: 16 (AVX-512), 8 (AVX2 with FMA), 4 (NEON) or 1
    CPU_FLOAT_LANES: int | None = getattr(_C, "CPU_FLOAT_LANES", None)  # None: a build older than this file
    # what runs the per-step products of bfloat16 recurrences on the CPU: "amx" (Intel Xeons from Sapphire
    # Rapids on), "avx512_bf16" (AMD Zen 4 and 5), "float32" (the float32 panels, rows widened: other
    # AVX-512, AVX2 and NEON builds; float16 recurrences run there too) or None (a oneDNN or BLAS GEMM a
    # step); RNNKERNELS_CPU_BFLOAT16 caps it
    CPU_BFLOAT16_PANELS: str | None = getattr(_C, "CPU_BFLOAT16_PANELS", "") or None
except ImportError as error:  # a source checkout that was not built, or a torch ABI mismatch
    LOAD_ERROR = f"{type(error).__name__}: {error}"
    CPU_FLOAT_LANES = None
    CPU_BFLOAT16_PANELS = None
    warnings.warn(
        f"rnnkernels: the compiled extension could not be loaded ({LOAD_ERROR}); only the reference "
        "backend is available. Build it with: pip install --no-build-isolation -e .",
        stacklevel=2,
    )


def workspace_width(cell: str, hidden_size: int) -> int:
    """Columns per (t, b) that the forward keeps for the backward (csrc/cpu/recurrence.cpp)."""
    return {"lstm": 5, "gru": 4}.get(cell, 0) * hidden_size


def _fake_forward(cell: str):
    def fake(gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, keep_workspace=True):
        T, B = gx.shape[0], gx.shape[1]
        H = w_hh.shape[0] // GATES[cell]
        c_n = c0.new_empty(c0.shape) if cell == "lstm" else gx.new_empty(0)
        return (
            gx.new_empty(T, B, h0.shape[1]),
            h0.new_empty(h0.shape),
            c_n,
            gx.new_empty(T, B, workspace_width(cell, H) if keep_workspace else 0),
        )

    return fake


def _fake_backward(cell: str):
    def fake(grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse, output, workspace):
        T, B = output.shape[0], output.shape[1]
        return (
            output.new_empty(T, B, w_hh.shape[0]),
            h0.new_empty(h0.shape),
            c0.new_empty(c0.shape) if cell == "lstm" else output.new_empty(0),
            w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]),
            w_hr.new_empty(w_hr.shape) if w_hr is not None else output.new_empty(0),
        )

    return fake


def _fake_step(cell: str):
    def fake(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, keep_workspace=True):
        H = w_hh.shape[0] // GATES[cell]
        c_next = c.new_empty(c.shape) if cell == "lstm" else x.new_empty(0)
        return h.new_empty(h.shape), c_next, x.new_empty(x.shape[0], workspace_width(cell, H) if keep_workspace else 0)

    return fake


def _check_not_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "rnnkernels: the compiled backward is not differentiable (create_graph=True); "
            "run double backward on backend='reference'"
        )


def _setup_context(ctx, inputs, output):
    _, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, *_ = inputs
    out, _, _, workspace = output
    ctx.save_for_backward(h0, c0, w_hh, w_hr, lengths, out, workspace)
    # Unused outputs (the workspace, often h_n) get no zero-filled gradient; backward handles None.
    ctx.set_materialize_grads(False)
    ctx.reverse = reverse
    ctx.has_bias = b_hh is not None


def _autograd_backward(cell: str, prefix: str):
    backward_op = getattr(torch.ops.rnnkernels, f"{prefix}{cell}_backward")

    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
        _check_not_double_backward()
        h0, c0, w_hh, w_hr, lengths, output, workspace = ctx.saved_tensors
        grad_output = torch.zeros_like(output) if grad_output is None else grad_output
        grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
        if cell != "lstm":
            grad_c_n = None
        grads = backward_op(
            grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, ctx.reverse, output, workspace
        )
        grad_gx, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr = grads
        return (
            grad_gx,
            grad_h0,
            grad_c0 if cell == "lstm" else None,
            grad_w_hh,
            grad_b_hh if ctx.has_bias else None,
            grad_w_hr if w_hr is not None else None,
            None,
            None,
            None,
        )

    return backward


def _linear_setup_context(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None


def _linear_backward(ctx, grad):
    """(grad_x, grad_w, grad_b) of x w^T + b; None where not needed."""
    x, w = ctx.saved_tensors
    grad = grad.contiguous()  # one copy of a broadcast gradient, not one per slice of the GEMMs
    needs = ctx.needs_input_grad
    linear = torch.ops.rnnkernels.linear
    grad_x = linear(grad, w.t(), None) if needs[0] else None
    grad_w = linear(grad.t(), x.t(), None) if needs[1] else None
    return grad_x, grad_w, (grad.sum(0) if ctx.has_bias and needs[2] else None)


def register_recurrence_ops(prefix: str) -> None:
    """Fake implementations and autograd of rnnkernels::{prefix}{cell}_forward and _backward, every cell:
    the same for every backend's operators (prefix "" the compiled ones, "triton_" rnnkernels/triton)."""
    for cell in CELLS:
        forward_name, backward_name = f"rnnkernels::{prefix}{cell}_forward", f"rnnkernels::{prefix}{cell}_backward"
        torch.library.register_fake(forward_name)(_fake_forward(cell))
        torch.library.register_fake(backward_name)(_fake_backward(cell))
        torch.library.register_autograd(forward_name, _autograd_backward(cell, prefix), setup_context=_setup_context)


def _register() -> None:
    torch.library.register_fake("rnnkernels::linear")(lambda x, w, b: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_autograd("rnnkernels::linear", _linear_backward, setup_context=_linear_setup_context)
    register_recurrence_ops("")
    for cell in CELLS:  # the step operators' autograd is C++ (csrc/step_autograd.cpp): called per token
        torch.library.register_fake(f"rnnkernels::{cell}_step")(_fake_step(cell))


if LOAD_ERROR is None:
    _register()
    # Resolved once: generation calls a step operator per token, and each lookup costs about a microsecond.
    _STEP_OPS = {cell: getattr(torch.ops.rnnkernels, f"{cell}_step").default for cell in CELLS}


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """F.linear for x of any rank through the compiled operator (oneDNN on the CPU)."""
    rows = torch.ops.rnnkernels.linear(x.reshape(-1, x.shape[-1]), w, b)
    return rows.view(*x.shape[:-1], w.shape[0])


def forward_op(cell: str, prefix: str = ""):
    """The forward operator of a cell, compiled (prefix "") or another backend's: (gx, h0, c0, w_hh, b_hh,
    w_hr, lengths, reverse, keep_workspace=True) -> (output, h_n, c_n, workspace)."""
    return getattr(torch.ops.rnnkernels, f"{prefix}{cell}_forward")


def recurrence(
    cell: str,
    gx: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    prefix: str = "",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction through the compiled operator (or that of `prefix`, as forward_op); same
    contract as reference.recurrence."""
    inputs = (gx, h0, c0, w_hh, b_hh, w_hr)
    output, h_n, c_n, _ = forward_op(cell, prefix)(*inputs, lengths, reverse, needs_workspace(inputs))
    return output, h_n, (c_n if cell == "lstm" else None)


def step(
    cell: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """One time step of one layer through the fused step operator; same contract as backends.Backend.step."""
    inputs = (x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
    h_next, c_next, _ = _STEP_OPS[cell](*inputs, needs_workspace(inputs))
    return h_next, (c_next if cell == "lstm" else None)


def needs_workspace(inputs) -> bool:
    """Whether autograd will call the backward, which reads the forward's workspace."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
