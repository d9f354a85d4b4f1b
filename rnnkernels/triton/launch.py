"""The host side of the Triton backend for one layer and direction: the checks of what kernels.py
assumes, the choice between the persistent and the per-step path, the buffers, the launches, and the
whole-sequence weight gradients.

forward() and backward() take and return what the compiled operators rnnkernels::{cell}_forward and
{cell}_backward do (csrc/ops.cpp) and are plain functions: the interpreter tests call them on CPU
tensors, and rnnkernels/triton/ops.py registers them as torch.library operators.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from ..ops import workspace_width
from ..reference import GATES
from . import kernels

# TRITON_INTERPRET=1 when kernels.py was imported makes @triton.jit build interpreted functions, which
# run on CPU tensors (and which torch.library.wrap_triton cannot wrap on every torch).
INTERPRETED = bool(kernels.INTERPRETED.value)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The path, chosen here and nowhere else. "persistent": one launch per sequence over all time steps; each
# batch tile's hidden units split across as many programs as the multiprocessors allow, which meet at a
# grid barrier wherever a phase reads what the others wrote, so each program reads a small slice of W_hh
# per step (32 KB in bfloat16 at H 256). "per_step": per time step one launch per phase and no barrier,
# so no assumption that the grid is resident at once (it may not be where other work holds
# multiprocessors, as under MPS limits), at a launch's host cost per step and phase.
# RNNKERNELS_TRITON_PATH=persistent|per_step forces one.
PATH_ENV = "RNNKERNELS_TRITON_PATH"
PATHS = ("persistent", "per_step")
# Ten seconds or more of polling (a poll is a round trip to L2) before a barrier gives up (kernels.py):
# far longer than kernels of other streams (NCCL's, under DDP) hold multiprocessors our grid waits for.
# In the interpreter, which runs programs one after another, a barrier's one program never polls, so one
# poll already means a miscount.
MAX_POLLS = 1 if INTERPRETED else 1 << 25


def choose_path() -> str:
    forced = os.environ.get(PATH_ENV, "") or "auto"
    if forced == "auto":
        return "persistent"
    if forced not in PATHS:
        raise ValueError(f"rnnkernels: {PATH_ENV} must be one of auto, {', '.join(PATHS)}; got {forced!r}")
    return forced


def _error(message: str) -> RuntimeError:
    return RuntimeError(f"rnnkernels (triton): {message}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise _error(message)


def _check(cell: str, gx_shape, like: Tensor, h0, c0, w_hh, b_hh, w_hr, lengths) -> tuple[int, int, int, int]:
    """csrc/recurrence_args.h's checks plus what the kernels assume; returns (T, B, H, P)."""
    G = GATES[cell]
    _require(len(gx_shape) == 3, f"the input projection must be 3-D (T, B, gates*H), got {len(gx_shape)}-D")
    T, B = gx_shape[0], gx_shape[1]
    _require(w_hh.dim() == 2 and w_hh.shape[0] % G == 0 and w_hh.shape[0] == gx_shape[2],
             f"w_hh must be [{G}*hidden_size, P] matching the input projection's last dimension {gx_shape[2]}, "
             f"got {list(w_hh.shape)}")
    H, P = w_hh.shape[0] // G, w_hh.shape[1]
    _require(h0.shape == (B, P), f"h0 must have shape [{B}, {P}], got {list(h0.shape)}")
    if w_hr is not None:
        _require(cell == "lstm", "w_hr (proj_size) belongs to the LSTM only")
        _require(w_hr.shape == (P, H), f"w_hr must have shape [{P}, {H}], got {list(w_hr.shape)}")
    else:
        _require(P == H, f"w_hh must be [{G}*H, H] without a projection, got {list(w_hh.shape)}")
    if cell == "lstm":
        _require(c0 is not None and c0.shape == (B, H), f"the LSTM needs c0 of shape [{B}, {H}]")
    if b_hh is not None:
        _require(b_hh.shape == (G * H,), f"b_hh must have shape [{G * H}], got {list(b_hh.shape)}")
    _check_dtype_and_device(like, (h0, c0, w_hh, b_hh, w_hr))
    # The kernels index time x batch rows and one gate's weight in int32.
    _require(T * B < 2**31 and G * H * max(H, P) < 2**31, "sizes out of range")
    if lengths is not None:
        _require(lengths.shape == (B,) and lengths.dtype == torch.int64 and lengths.device.type == "cpu",
                 f"lengths must be a CPU int64 tensor of shape [{B}], got {lengths.dtype} "
                 f"{list(lengths.shape)} on {lengths.device}")
        # Values are checked on real tensors only: under torch.compile's tracing they are unknown.
        if type(lengths) is Tensor and B > 0:
            _require(0 <= int(lengths.min()) and int(lengths.max()) <= T, f"lengths must lie in [0, {T}]")
    return T, B, H, P


def _check_dtype_and_device(like: Tensor, others: tuple) -> None:
    """like's dtype and device are ones the kernels run, and every other tensor (or None) shares them. The
    messages are built only where a check fails: a generated token pays for every call (step)."""
    dtype, device = like.dtype, like.device
    if dtype not in DTYPES:
        raise _error(f"runs {', '.join(map(str, DTYPES))}, got {dtype}")
    if not (device.type == "cuda" or (INTERPRETED and device.type == "cpu")):
        raise _error(f"runs CUDA tensors (CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1), got {device}")
    for t in others:
        if t is not None and (t.dtype != dtype or t.device != device):
            raise _error(f"all tensors must share the input's dtype and device ({dtype}, {device})")


def _shape(t: Tensor | None) -> list | None:
    return None if t is None else list(t.shape)


def _lengths_on(device: torch.device, lengths: Tensor | None, T: int, B: int) -> Tensor:
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int32, device=device)
    return lengths.to(device=device, dtype=torch.int32)


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv (nor triton.next_power_of_2 below): Triton's constexpr functions, they cost several
    # microseconds a call on the host, which every generated token pays.
    return -(-a // b)


def _meta(dtype: torch.dtype, B: int, H: int, P: int) -> dict:
    """Tile sizes (kernels.py's assumption: powers of two >= 16), warps and the precision of float32 dots."""
    # float32 dots as torch.nn's recurrence computes them on cuDNN: in TF32 where cuDNN may use it.
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return dict(
        PRECISION="tf32" if tf32 else "ieee",
        # With 4 warps the LSTM's four gate tiles and their pointers spill registers on sm_90 (ptxas -v,
        # tests/triton_compile.py); 8 warps hold them.
        num_warps=8,
        # Up to 64 sequences a tile: every batch tile reads all of W_hh at every step.
        BLOCK_B=min(64, max(16, 1 << (B - 1).bit_length())),
        # Narrow column tiles: as many programs as the multiprocessors take share each step's work.
        BLOCK_N=16,
        BLOCK_K=16 if max(H, P) <= 16 else 32,
    )


def _step_meta(dtype: torch.dtype, B: int, I: int, H: int) -> dict:
    """_meta for step_kernel. Its float32 dots as torch.nn's cells compute theirs, with cuBLAS, in TF32 only
    where matmuls may use it (cuDNN's flag, which _meta follows for the sweeps, is not theirs). Its K loops
    stream each weight once a step: up to 64 columns an iteration (twice the sweeps' 32), so that each
    iteration, of which the software pipeline overlaps only a few, moves more bytes. At 128 the LSTM's
    16-bit step takes all 255 registers (ptxas, sm_90); at 64, 173."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dict(_meta(dtype, B, H, H), PRECISION="tf32" if tf32 else "ieee",
                BLOCK_K=min(64, max(16, 1 << (max(I, H) - 1).bit_length())))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _column_programs(device: torch.device, batch_tiles: int, widest: int, block_n: int) -> int:
    """Programs per batch tile on the persistent path: a column tile each of the widest phase, as far as
    the multiprocessors go, so that on an otherwise idle GPU the whole grid is resident for its barriers
    (any launchable kernel fits one program per multiprocessor). One in the interpreter, which runs
    programs one after another."""
    if INTERPRETED:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(_cdiv(widest, block_n), _multiprocessors(index) // batch_tiles))


def _launch(kernel, grid, *args, **meta) -> None:
    # wrap_triton lets torch.compile trace the launch; eager calls inside a triton_op skip it.
    (kernel if INTERPRETED else torch.library.wrap_triton(kernel))[grid](*args, **meta)


def _sweep(kernel, pointers: tuple, sizes: tuple, phases: list[tuple[int, dict]], meta: dict,
           device: torch.device) -> None:
    """All steps of a sweep on the chosen path. sizes: (T, B, H, P, reverse); phases: (columns, the
    kernel's phase flags) of each phase of a step, in order."""
    T, B = sizes[0], sizes[1]
    batch_tiles = _cdiv(B, meta["BLOCK_B"])
    sync = torch.zeros(batch_tiles, dtype=torch.int32, device=device)
    if choose_path() == "persistent":
        programs = _column_programs(device, batch_tiles, max(columns for columns, _ in phases), meta["BLOCK_N"])
        _require(T * len(phases) * programs < 2**31, f"{T} steps overflow the persistent path's barrier counter; "
                 f"{PATH_ENV}=per_step runs them")
        every_phase = {name: any(flags[name] for _, flags in phases) for name in phases[0][1]}
        _launch(kernel, (batch_tiles, programs), *pointers, sync, *sizes, 0, T, MAX_POLLS, GRID_SYNC=True,
                **every_phase, **meta)
    else:
        for s in range(T):
            for columns, flags in phases:
                _launch(kernel, (batch_tiles, _cdiv(columns, meta["BLOCK_N"])), *pointers, sync, *sizes,
                        s, s + 1, 0, GRID_SYNC=False, **flags, **meta)


def _states(first: Tensor) -> Tensor:
    """The float32 (2, B, width) buffer the sweep carries a state in, starting from `first`."""
    buffer = torch.empty((2, *first.shape), dtype=torch.float32, device=first.device)
    buffer[0].copy_(first)
    return buffer


def forward(cell: str, gx: Tensor, h0: Tensor, c0: Tensor | None, w_hh: Tensor, b_hh: Tensor | None,
            w_hr: Tensor | None, lengths: Tensor | None, reverse: bool, keep_workspace: bool = True):
    """(output, h_n, c_n, workspace) as rnnkernels::{cell}_forward."""
    T, B, H, P = _check(cell, gx.shape, gx, h0, c0, w_hh, b_hh, w_hr, lengths)
    G, lstm, projected = GATES[cell], cell == "lstm", w_hr is not None
    gx, w_hh = gx.contiguous(), w_hh.contiguous()
    h = _states(h0)
    c = _states(c0) if lstm else h
    m = torch.empty((B, H), dtype=torch.float32, device=gx.device) if projected else h
    output = gx.new_empty((T, B, P))
    workspace = gx.new_empty((T, B, workspace_width(cell, H) if keep_workspace else 0))
    if T > 0 and B > 0:
        pointers = (gx, w_hh, w_hh if b_hh is None else b_hh.contiguous(), w_hh if w_hr is None else w_hr.contiguous(),
                    _lengths_on(gx.device, lengths, T, B), h, c, m, output, workspace if keep_workspace else output)
        phases = [(H, dict(GATE_PHASE=True, PROJECTION_PHASE=False))]
        if projected:
            phases.append((P, dict(GATE_PHASE=False, PROJECTION_PHASE=True)))
        meta = dict(_meta(gx.dtype, B, H, P), CELL=cell, GATES=G, HAS_BIAS=b_hh is not None, PROJECTED=projected,
                    KEEP_WORKSPACE=keep_workspace)
        _sweep(kernels.forward_kernel, pointers, (T, B, H, P, int(reverse)), phases, meta, gx.device)
    h_n = h[T % 2].to(gx.dtype, copy=True)
    c_n = c[T % 2].to(gx.dtype, copy=True) if lstm else gx.new_empty(0)
    return output, h_n, c_n, workspace


def step(cell: str, x: Tensor, h: Tensor, c: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
         b_hh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(h', c') of one inference step without projection (c' None but for the LSTM): step_kernel, one launch.
    Called per generated token, so its checks are comparisons of whole shapes."""
    G, lstm = GATES[cell], cell == "lstm"
    # The messages are built only where a check fails: formatting them costs more host time than the rest.
    if x.dim() != 2:
        raise _error(f"a step's input must be 2-D (B, I), got {x.dim()}-D")
    B, I = x.shape
    H = w_hh.shape[1]
    if not (h.shape == (B, H) and w_ih.shape == (G * H, I) and w_hh.shape == (G * H, H)
            and ((c is not None and c.shape == (B, H)) if lstm else c is None)
            and (b_ih is None or b_ih.shape == (G * H,)) and (b_hh is None or b_hh.shape == (G * H,))):
        raise _error(f"a {cell} step takes x [B, I], h [B, H], {'c [B, H]' if lstm else 'no c'}, w_ih [{G}*H, I], "
                     f"w_hh [{G}*H, H] and biases [{G}*H] or None; got x {_shape(x)}, h {_shape(h)}, "
                     f"c {_shape(c)}, w_ih {_shape(w_ih)}, w_hh {_shape(w_hh)}, b_ih {_shape(b_ih)}, "
                     f"b_hh {_shape(b_hh)}")
    _check_dtype_and_device(x, (h, c, w_ih, w_hh, b_ih, b_hh))
    _require(G * H * max(I, H) < 2**31, "sizes out of range")
    h_next = x.new_empty((B, H))
    c_next = x.new_empty((B, H)) if lstm else None
    if B > 0 and H > 0:
        meta = _step_meta(x.dtype, B, I, H)
        grid = (_cdiv(B, meta["BLOCK_B"]), _cdiv(H, meta["BLOCK_N"]))
        # Never under torch.compile (rnnkernels.triton.step declines there), so the kernel is launched as is,
        # without wrap_triton's wrapper.
        kernels.step_kernel[grid](x.contiguous(), h.contiguous(), c.contiguous() if lstm else h, w_ih.contiguous(),
                                  w_hh.contiguous(), w_ih if b_ih is None else b_ih.contiguous(),
                                  w_hh if b_hh is None else b_hh.contiguous(), h_next,
                                  c_next if lstm else h_next, B, I, H, CELL=cell, GATES=G,
                                  HAS_BIAS_IH=b_ih is not None, HAS_BIAS_HH=b_hh is not None, **meta)
    return h_next, c_next


def _previous_states(h0: Tensor, output: Tensor, lengths: Tensor, reverse: bool) -> Tensor:
    """The state each (t, b) started from: h0 at the sequence's first step, else the step before's output.
    (Rows past a sequence's end hold zeros; their gate gradients are zero.)"""
    T = output.shape[0]
    if not reverse:
        return torch.cat([h0[None], output[:-1]])[:T]
    after = torch.cat([output[1:], torch.zeros_like(output[:1])])
    first = torch.arange(T, device=output.device)[:, None] == (lengths - 1)[None, :]
    return torch.where(first[..., None], h0[None], after)


def backward(cell: str, grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor | None, h0: Tensor,
             c0: Tensor | None, w_hh: Tensor, w_hr: Tensor | None, lengths: Tensor | None, reverse: bool,
             output: Tensor, workspace: Tensor):
    """(grad_gx, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr) as rnnkernels::{cell}_backward."""
    G, lstm, projected = GATES[cell], cell == "lstm", w_hr is not None
    _require(output.dim() == 3, "output must be 3-D (T, B, P)")
    T, B, H, P = _check(cell, (output.shape[0], output.shape[1], w_hh.shape[0]), output, h0, c0, w_hh, None,
                        w_hr, lengths)
    _require(output.shape[2] == P, f"output must be [T, B, {P}], got {list(output.shape)}")
    _require(grad_output.shape == output.shape and grad_h_n.shape == h0.shape,
             "gradient shapes must match the forward's outputs")
    _require(workspace.shape == (T, B, workspace_width(cell, H)),
             "workspace does not come from this forward, or the forward ran with keep_workspace=False")
    _require(not lstm or grad_c_n is None or grad_c_n.shape == (B, H), f"grad_c_n must have shape [{B}, {H}]")
    for t in (grad_output, grad_h_n, grad_c_n, workspace):
        _require(t is None or (t.dtype == output.dtype and t.device == output.device),
                 "gradients and workspace must share the output's dtype and device")
    output, workspace, w_hh = output.contiguous(), workspace.contiguous(), w_hh.contiguous()
    lengths_dev = _lengths_on(output.device, lengths, T, B)
    dh = _states(grad_h_n)
    dc = (_states(grad_c_n) if grad_c_n is not None else torch.zeros((2, B, H), dtype=torch.float32,
                                                                         device=output.device)) if lstm else dh
    grad_gx = output.new_empty((T, B, G * H))
    grad_gh = output.new_empty((T, B, G * H)) if cell == "gru" else grad_gx
    g_all = output.new_empty((T, B, P)) if projected else grad_gx
    if T > 0 and B > 0:
        pointers = (grad_output.contiguous(), h0.contiguous(), (c0 if lstm else h0).contiguous(), w_hh,
                    w_hh if w_hr is None else w_hr.contiguous(), lengths_dev, output, workspace if G > 1 else output,
                    dh, dc, grad_gx, grad_gh, g_all)
        phases = [(H, dict(GATE_PHASE=True, STATE_PHASE=False)), (P, dict(GATE_PHASE=False, STATE_PHASE=True))]
        meta = dict(_meta(output.dtype, B, H, P), CELL=cell, GATES=G, PROJECTED=projected)
        _sweep(kernels.backward_kernel, pointers, (T, B, H, P, int(reverse)), phases, meta, output.device)
    grad_h0 = dh[T % 2].to(output.dtype, copy=True)
    grad_c0 = dc[T % 2].to(output.dtype, copy=True) if lstm else output.new_empty(0)
    # The weight gradients: sums over all time steps and sequences, one GEMM each.
    rows = grad_gh.reshape(T * B, G * H)
    grad_w_hh = rows.t() @ _previous_states(h0, output, lengths_dev, reverse).reshape(T * B, P)
    grad_b_hh = rows.sum(0)
    if projected:  # dL/dW_hr = sum over steps of (dL/dh)^T m, m = o * tanh(c) from the workspace
        m = (workspace[..., 3 * H:4 * H].float() * workspace[..., 4 * H:].float().tanh()).to(output.dtype)
        grad_w_hr = g_all.reshape(T * B, P).t() @ m.reshape(T * B, H)
    else:
        grad_w_hr = output.new_empty(0)
    return grad_gx, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr
