"""A whole multi-layer, possibly bidirectional recurrent network over a time-major padded batch.

Per layer and direction: the input projection of all time steps as one GEMM, then the recurrence, both
on the chosen backend (a single time step goes to the backend's step instead); dropout between layers as
torch.nn applies it. Where nothing records gradients on the CPU and the projection of the whole sequence
would be large, both go in chunks of time steps instead (_layer_in_chunks).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backends, ops


class LayerWeights:
    """The parameters of one layer and direction, as torch.nn names them (w_hr only with proj_size)."""

    __slots__ = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")

    def __init__(self, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
        self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr = w_ih, w_hh, b_ih, b_hh, w_hr

    def tensors(self) -> tuple:
        return self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype a layer on `device` runs in under torch.autocast, None outside it.

    The rule, for the sequence modules and the cells alike: under torch.autocast for the input's device
    type, the input, the states and the weights are cast to the autocast dtype where they are floating
    point but float64 (which autocast leaves as it is), and the layer runs in that dtype with autocast off
    (autocast_off); its outputs come in that dtype, and gradients flow back through the casts to the
    float32 parameters. torch.nn is not consistent here: on the GPU its cuDNN layers run in float16 even
    where autocast asks for bfloat16, and on the CPU its GRU and its LSTM and GRU cells ignore autocast."""
    if not torch._C._is_any_autocast_enabled():  # the quick answer a cell's step needs (torch.nn's own check)
        return None
    device_type = device.type
    if not torch.amp.is_autocast_available(device_type):  # meta tensors, say
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_target(dtype: torch.dtype, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype autocast_dtype's rule gives a tensor of `dtype` where autocast runs in `autocast` (None: off)."""
    return autocast if autocast is not None and dtype.is_floating_point and dtype != torch.float64 else dtype


def autocast_cast(tensors, autocast: torch.dtype) -> list:
    """The tensors (or None) as autocast_dtype's rule casts them. Where autograd records nothing (generation,
    inference), through autocast's cache, as torch.nn's layers cast: a float32 parameter that requires grad
    is cast once per autocast region, not once per call. Where it records, each call casts afresh, so that
    the gradients of many calls (an unrolled cell) add up in float32, not in the autocast dtype as through
    one cached cast. Not under torch.compile, which traces the casts into its graph, nor under torch.func's
    transforms, which have no rule for the caching operator."""
    if (ops.LOAD_ERROR is not None or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return [t if t is None else t.to(autocast_target(t.dtype, autocast)) for t in tensors]
    cast = iter(torch.ops.rnnkernels.autocast_cast([t for t in tensors if t is not None], autocast))
    return [t if t is None else next(cast) for t in tensors]


_UNCHANGED = contextlib.nullcontext()


def autocast_off(device: torch.device, dtype: torch.dtype | None):
    """The context a layer runs in once autocast_cast has cast its tensors to dtype (None: no autocast)."""
    return _UNCHANGED if dtype is None else torch.autocast(device.type, enabled=False)


def _dropout(x: Tensor, p: float, lengths: Tensor | None) -> Tensor:
    """Dropout between layers drawn as torch.nn draws it: over the packed data when sequences have lengths."""
    if lengths is None:
        return F.dropout(x, p, training=True)
    packed = pack_padded_sequence(x, lengths)
    dropped = PackedSequence(F.dropout(packed.data, p, training=True), packed.batch_sizes)
    return pad_packed_sequence(dropped, total_length=x.size(0))[0]


# The CPU projection of a whole sequence above _CHUNKED_FROM_BYTES (long-seq's is 65 MB) comes from fresh
# pages at every call, whose faults cost about a third of the forward pass; in chunks of about
# _CHUNK_BYTES it stays in cache and its memory is reused.
_CHUNKED_FROM_BYTES = 16 << 20
_CHUNK_BYTES = 4 << 20


def _chunk_steps(x: Tensor, h0: Tensor, c0: Tensor | None, w: LayerWeights) -> int | None:
    """Time steps per chunk for the layer's projection, or None to take the whole sequence at once:
    chunks only on the CPU, and only where autograd records nothing (a chunked backward would pack W_hh
    once per chunk). Each chunk's recurrence packs W_hh (G*H x P) anew, so a chunk has at least P rows
    of x, which keeps the packing below the chunk's own projection (rows x G*H)."""
    step_bytes = x.size(1) * w.w_ih.size(0) * x.element_size()
    if x.device.type != "cpu" or x.size(0) * step_bytes <= _CHUNKED_FROM_BYTES:
        return None
    if ops.needs_workspace((x, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr)):
        return None
    steps = max(_CHUNK_BYTES // step_bytes, -(-w.w_hh.size(1) // x.size(1)))
    return steps if steps < x.size(0) else None


def _layer_in_chunks(cell, x, h0, c0, w: LayerWeights, lengths, reverse, backend, steps: int):
    """backend.recurrence over backend.linear(x) as the whole sequence would give it, chunk by chunk of
    `steps` time steps, the state carried from chunk to chunk (reverse: from the last chunk to the first).
    Within chunk [t0, t1) sequence b has lengths[b] - t0 steps, clamped to the chunk: after its end none,
    and in reverse it starts where it ends, from the state no later chunk has touched."""
    T = x.size(0)
    starts = range(0, T, steps)
    outputs: list[Tensor] = [None] * len(starts)  # type: ignore[list-item]
    h, c = h0, c0
    for index in reversed(range(len(starts))) if reverse else range(len(starts)):
        t0 = starts[index]
        t1 = min(T, t0 + steps)
        chunk_lengths = None if lengths is None else (lengths - t0).clamp(0, t1 - t0)
        gx = backend.linear(x[t0:t1], w.w_ih, w.b_ih)
        outputs[index], h, c = backend.recurrence(cell, gx, h, c, w.w_hh, w.b_hh, w.w_hr, chunk_lengths, reverse)
    return torch.cat(outputs), h, c


def rnn(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[LayerWeights],
    num_layers: int,
    bidirectional: bool,
    dropout: float,
    training: bool,
    lengths: Tensor | None,
    backend: backends.Backend,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """x (T, B, input), h0 (layers*dirs, B, P), c0 (layers*dirs, B, H) for LSTM; lengths (B) int64 on the
    CPU or None. Returns (output (T, B, dirs*P), h_n, c_n); c_n is None but for LSTM."""
    packed_on_gpu = lengths is not None and x.is_cuda and not torch.compiler.is_compiling()
    if packed_on_gpu and torch.cuda.is_current_stream_capturing():
        # Every call copies the lengths from the CPU: a graph would replay the copy of a freed host buffer.
        raise RuntimeError("rnnkernels: PackedSequence input cannot be captured in a CUDA graph (its lengths are "
                           "copied from the CPU on every call); capture padded input, or run this call eagerly")
    directions = 2 if bidirectional else 1
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w = weights[index]
            c_start = None if c0 is None else c0[index]
            if x.size(0) == 1 and lengths is None:  # one step, as in generation: one fused call
                h, c = backend.step(cell, x[0], h0[index], c_start, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr)
                out = h.unsqueeze(0)
            elif (steps := _chunk_steps(x, h0[index], c_start, w)) is not None:
                out, h, c = _layer_in_chunks(cell, x, h0[index], c_start, w, lengths, direction == 1, backend, steps)
            else:
                gx = backend.linear(x, w.w_ih, w.b_ih)
                out, h, c = backend.recurrence(
                    cell, gx, h0[index], c_start, w.w_hh, w.b_hh, w.w_hr, lengths, direction == 1
                )
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and training and layer < num_layers - 1:
            x = _dropout(x, dropout, lengths)
    return x, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)
