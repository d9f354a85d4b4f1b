"""A whole multi-layer, possibly bidirectional recurrent network over a time-major padded batch.

Per layer and direction: the input projection of all time steps as one GEMM, then the recurrence, both
on the chosen backend (a single time step goes to the backend's step instead); dropout between layers as
torch.nn applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backends


class LayerWeights:
    """The parameters of one layer and direction, as torch.nn names them (w_hr only with proj_size)."""

    __slots__ = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")

    def __init__(self, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
        self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr = w_ih, w_hh, b_ih, b_hh, w_hr


def _dropout(x: Tensor, p: float, lengths: Tensor | None) -> Tensor:
    """Dropout between layers drawn as torch.nn draws it: over the packed data when sequences have lengths."""
    if lengths is None:
        return F.dropout(x, p, training=True)
    packed = pack_padded_sequence(x, lengths)
    dropped = PackedSequence(F.dropout(packed.data, p, training=True), packed.batch_sizes)
    return pad_packed_sequence(dropped, total_length=x.size(0))[0]


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
