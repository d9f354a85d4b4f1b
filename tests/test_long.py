"""Long sequences on the cpu backend: T = 5000 forward and backward in a loop (no recursion), fast,
matching torch.nn."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from helpers import check_twin, rnn_inputs, torch_module, twin
from rnnkernels import ops

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")


@pytest.fixture
def low_recursion_limit():
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)  # far below T: a per-step recursion anywhere would fail
    yield
    sys.setrecursionlimit(limit)


@pytest.mark.parametrize("kind,dtype", [("LSTM", torch.float64), ("GRU", torch.float64), ("RNN_tanh", torch.float64),
                                        ("LSTM", torch.float32)], ids=["lstm_f64", "gru_f64", "rnn_f64", "lstm_f32"])
def test_t5000_matches_torch(kind, dtype, low_recursion_limit):
    m = torch_module(kind, dtype=dtype, input_size=4, hidden_size=8, bidirectional=kind == "GRU")
    t = twin(m, "cpu")
    x, hx = rnn_inputs(m, T=5000, B=2, hx=True)
    start = time.perf_counter()
    out, state = t(x, hx)
    (out.sum() + (state[0] if isinstance(state, tuple) else state).sum()).backward()
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"T=5000 forward+backward took {elapsed:.1f} s"
    assert out.shape[0] == 5000 and torch.isfinite(out).all()
    check_twin(m, t, x, hx)


def test_t5000_with_lengths_reverse(low_recursion_limit):
    m = torch_module("LSTM", dtype=torch.float64, input_size=3, hidden_size=5, bidirectional=True, proj_size=2)
    t = twin(m, "cpu")
    x, hx = rnn_inputs(m, T=5000, B=3, hx=True, packed="unsorted", lengths=[1200, 5000, 3])
    check_twin(m, t, x, hx)
