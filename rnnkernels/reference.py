"""The reference backend: the recurrence of one layer and direction in plain PyTorch, written to be read.

This is the specification every kernel is tested against (csrc/cell_math.h holds the same gate math for
the compiled kernels). It runs anywhere torch runs, differentiates through torch autograd, and needs no
compiled code. Shapes are those of the operators (csrc/recurrence_args.h): time-major gx = x W_ih^T + b_ih.
"""

from __future__ import annotations

import torch
from torch import Tensor

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def lstm_step(gx: Tensor, gh: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step from the two halves of the pre-activations; returns (o * tanh(c'), c')."""
    i, f, g, o = (gx + gh).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_step(gx: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """One GRU step; the reset gate scales the recurrent part of the candidate, bias included."""
    x_r, x_z, x_n = gx.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_step(gx: Tensor, gh: Tensor, relu: bool) -> Tensor:
    return torch.relu(gx + gh) if relu else torch.tanh(gx + gh)


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
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Runs one layer and direction over the sequence; returns (output, h_n, c_n), c_n None but for LSTM.

    A step t >= lengths[b] leaves sequence b's state as it is and writes zeros to its output; reverse
    walks t from T-1 down to 0, so each sequence starts at its own last element.
    """
    steps = range(gx.size(0) - 1, -1, -1) if reverse else range(gx.size(0))
    active = None if lengths is None else lengths.to(gx.device)
    h, c = h0, c0
    outputs: list[Tensor] = [None] * gx.size(0)  # type: ignore[list-item]
    for t in steps:
        gh = torch.nn.functional.linear(h, w_hh, b_hh)
        if cell == "lstm":
            h_new, c_new = lstm_step(gx[t], gh, c)
            if w_hr is not None:
                h_new = h_new @ w_hr.t()
        elif cell == "gru":
            h_new = gru_step(gx[t], gh, h)
        else:
            h_new = rnn_step(gx[t], gh, relu=cell == "rnn_relu")
        if active is None:
            h = h_new
            c = c_new if cell == "lstm" else None
            outputs[t] = h_new
        else:
            mask = (t < active).unsqueeze(1)
            h = torch.where(mask, h_new, h)
            if cell == "lstm":
                c = torch.where(mask, c_new, c)
            outputs[t] = torch.where(mask, h_new, torch.zeros_like(h_new))
    output = torch.stack(outputs) if outputs else gx.new_zeros(0, h0.size(0), h0.size(1))
    return output, h, c
