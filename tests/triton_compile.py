"""Compiles every variant of the Triton kernels for an NVIDIA GPU without one: Triton's front end, its
MLIR passes and ptxas, all of which the interpreter skips. Prints registers and spills per variant.

    python tests/triton_compile.py [arch ...]      e.g. 90 (H100, the default), 80 (A100)

Needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled); tests/test_triton.py runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rnnkernels.triton import kernels, launch  # noqa: E402

POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
STATE_BUFFERS = {"h_ptr", "c_ptr", "m_ptr", "dh_ptr", "dc_ptr"}  # float32 whatever the dtype

# (cell, projected) and the phase flags as launch.py launches them: all of a step's phases in one program
# with the grid barrier (the persistent path), or one phase at a time without (the per-step path).
CELLS = [("lstm", False), ("lstm", True), ("gru", False), ("rnn_tanh", False), ("rnn_relu", False)]


def variants(cell: str, projected: bool, dtype: torch.dtype):
    """(kernel, constexprs) of every launch of one cell."""
    forward_phases = [(True, projected, True), (True, False, False)] + ([(False, True, False)] if projected else [])
    for gates, projection, grid_sync in forward_phases:
        yield kernels.forward_kernel, dict(HAS_BIAS=True, KEEP_WORKSPACE=True, GATE_PHASE=gates,
                                           PROJECTION_PHASE=projection, GRID_SYNC=grid_sync)
    for gate, state, grid_sync in ((True, True, True), (True, False, False), (False, True, False)):
        yield kernels.backward_kernel, dict(GATE_PHASE=gate, STATE_PHASE=state, GRID_SYNC=grid_sync)
    if not projected:  # the inference step, at generation's batch of one
        meta = launch._step_meta(dtype, 1, 256, 256)
        yield kernels.step_kernel, dict(HAS_BIAS_IH=True, HAS_BIAS_HH=True,
                                        **{name: meta[name] for name in ("PRECISION", "BLOCK_B", "BLOCK_K")})


def signature(fn, dtype: torch.dtype, constants: dict) -> dict:
    def kind(name):
        if name in constants:
            return "constexpr"
        if name in ("lengths_ptr", "sync_ptr"):
            return "*i32"
        if name.endswith("_ptr"):
            return "*fp32" if name in STATE_BUFFERS else POINTER[dtype]
        return "i32"

    return {name: kind(name) for name in fn.arg_names}


def ptxas_report(ptx: str, arch: int) -> str:
    # The ptxas Triton compiles with: Triton 3.9 ships two, and only one reads the PTX version it writes.
    ptxas = get_ptxas(arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    try:
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    finally:
        os.unlink(f.name)
    registers = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    if registers is None or spills is None:
        raise RuntimeError(f"{ptxas} -v printed no register count:\n{out}")
    return f"registers {registers.group(1)}, spill stores {spills.group(1)} bytes"


def compile_all(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    for dtype in launch.DTYPES:
        for cell, projected in CELLS:
            meta = launch._meta(dtype, 64, 256, 256)
            options = {"num_warps": meta.pop("num_warps")}
            for fn, flags in variants(cell, projected, dtype):
                assert set(flags) <= set(fn.arg_names), f"{fn.__name__} has no {set(flags) - set(fn.arg_names)}"
                shared = dict(meta, CELL=cell, GATES=launch.GATES[cell], PROJECTED=projected)
                constants = {name: value for name, value in shared.items() if name in fn.arg_names} | flags
                compiled = triton.compile(ASTSource(fn, signature(fn, dtype, constants), constants),
                                          target=target, options=options)
                on = ",".join(k for k, v in flags.items() if v and (k.endswith("PHASE") or k == "GRID_SYNC"))
                print(f"sm_{arch} {fn.__name__} {cell}{' w_hr' if projected else ''} {dtype} {on}: "
                      f"{ptxas_report(compiled.asm['ptx'], arch)}")


if __name__ == "__main__":
    if launch.INTERPRETED:
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    for arch in [int(a) for a in sys.argv[1:]] or [90]:
        compile_all(arch)
