"""A tiny forward and backward of every cell on both CUDA paths, in float32 and bfloat16, with variable
lengths, at a hidden size that fills whole 16-byte vectors and at one that does not (the persistent
kernels' padded rows), plus the one-step operators (fused kernel and GEMM path): the workload
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck). Exits non-zero on any error it
sees itself."""

from __future__ import annotations

import os

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkernels

MODULES = {
    "lstm": lambda: rnnkernels.LSTM(8, 16, num_layers=2, bidirectional=True, backend="cuda"),
    "gru": lambda: rnnkernels.GRU(8, 16, bidirectional=True, backend="cuda"),
    "rnn_tanh": lambda: rnnkernels.RNN(8, 16, nonlinearity="tanh", backend="cuda"),
    "rnn_relu": lambda: rnnkernels.RNN(8, 16, nonlinearity="relu", bidirectional=True, backend="cuda"),
    "lstm_proj": lambda: rnnkernels.LSTM(8, 16, proj_size=8, backend="cuda"),
    "gru_h6": lambda: rnnkernels.GRU(8, 6, bidirectional=True, backend="cuda"),
    "rnn_relu_h6": lambda: rnnkernels.RNN(8, 6, nonlinearity="relu", backend="cuda"),
}


def sequence_case(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    module = MODULES[name]().to(device="cuda", dtype=dtype)
    x = torch.randn(6, 3, 8, device="cuda", dtype=dtype, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor([4, 6, 1]), enforce_sorted=False)
    output, _ = module(packed)
    output.data.float().square().sum().backward()
    assert torch.isfinite(x.grad).all(), name
    plain, _ = module(x)  # without lengths
    plain.float().sum().backward()


def step_case(cell: str, batch: int, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    gates, hidden, inputs = {"lstm": 4, "gru": 3}.get(cell, 1), 16, 8

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

    c = rand(batch, hidden) if cell == "lstm" else None
    op = getattr(torch.ops.rnnkernels, f"{cell}_step")
    h_next, c_next, _ = op(rand(batch, inputs), rand(batch, hidden), c, rand(gates * hidden, inputs),
                           rand(gates * hidden, hidden), rand(gates * hidden), rand(gates * hidden), None)
    (h_next.float().sum() + c_next.float().sum()).backward()


def main() -> None:
    for path in ("persistent", "stepwise"):
        os.environ["RNNKERNELS_CUDA_PATH"] = path
        for dtype in (torch.float32, torch.bfloat16):
            for name in MODULES:
                if path == "persistent" and name == "lstm_proj":
                    continue  # runs stepwise only
                sequence_case(name, dtype)
    os.environ.pop("RNNKERNELS_CUDA_PATH")
    for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        for batch in (2, 11):  # the fused kernel, the GEMM path
            step_case(cell, batch, torch.float32)
    torch.cuda.synchronize()
    print("sanitize_case: ok")


if __name__ == "__main__":
    main()
