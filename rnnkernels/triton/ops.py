"""The Triton backend's operators, rnnkernels::triton_{cell}_forward and rnnkernels::triton_{cell}_backward:
launch.forward and launch.backward behind the schemas, fake implementations and autograd of the compiled
operators (rnnkernels/ops.py), so that layers run and torch.compile traces them the same way. And the
backend's inference step, which calls its launcher directly.

On the GPU they are torch.library.triton_op operators, whose kernels (launched through wrap_triton)
torch.compile sees. In Triton's interpreter they are plain custom operators: torch.compile cannot trace
into an interpreted kernel, and treats an opaque operator with a fake implementation as it treats the
compiled ones. Both call the same launchers.
"""

# No `from __future__ import annotations`: the operators' schemas are inferred from these annotations.
import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import functional, ops
from ..reference import GATES
from . import launch

PREFIX = "triton_"
_define = torch.library.custom_op if launch.INTERPRETED else torch.library.triton_op


@contextlib.contextmanager
def _launching(t: Tensor):
    """Where a launcher runs: on t's CUDA device, as Triton launches on the current one; and with autocast
    off, so that its own torch calls (the weight gradients' matmuls) keep the dtype they are given, as
    the compiled operators do (csrc/ops.cpp)."""
    on_device = torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
    with on_device, functional.autocast_off(t.device, functional.autocast_dtype(t.device)):
        yield


def _define_ops(cell: str) -> None:
    @_define(f"rnnkernels::{PREFIX}{cell}_forward", mutates_args=())
    def forward(gx: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
                w_hr: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
                keep_workspace: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with _launching(gx):
            return launch.forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, keep_workspace)

    @_define(f"rnnkernels::{PREFIX}{cell}_backward", mutates_args=())
    def backward(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Optional[Tensor], h0: Tensor,
                 c0: Optional[Tensor], w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor],
                 reverse: bool, output: Tensor,
                 workspace: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with _launching(output):
            return launch.backward(cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse,
                                   output, workspace)


for _cell in GATES:
    _define_ops(_cell)
ops.register_recurrence_ops(PREFIX)


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse):
    """One layer and direction through the Triton operators; same contract as reference.recurrence."""
    return ops.recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, prefix=PREFIX)


def step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr):
    """One time step of inference in one launch (launch.step); same contract as backends.Backend.step.
    Generation, the case this serves, pays the host time of every token, and dispatching a Python custom
    operator costs more of it than launch.step does (27 us against 25 us on the 2-core CPU machine, the
    launch itself left out), so this launches without an operator. Hence None (the step then runs as the
    input projection and a one-step recurrence through the operators above) wherever something would
    intercept an operator: autograd recording, torch.compile, a dispatch mode (fake tensors, make_fx) or a
    tensor subclass; and with a projection, which step_kernel does not have."""
    inputs = (x, h, c, w_ih, w_hh, b_ih, b_hh)
    if (w_hr is not None or type(x) is not torch.Tensor or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0 or ops.needs_workspace(inputs)):
        return None
    with _launching(x):
        return launch.step(cell, *inputs)
