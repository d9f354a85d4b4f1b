"""Property-based shape fuzzing against torch.nn on the cpu backend, float64 (hypothesis)."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import CELL_KINDS, RNN_KINDS, cell_inputs, check_twin, rnn_inputs, torch_module, twin  # noqa: E402
from rnnkernels import ops  # noqa: E402

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def rnn_cases(draw):
    kind = draw(st.sampled_from(sorted(RNN_KINDS)))
    hidden = draw(st.integers(1, 6))
    module_kw = dict(
        input_size=draw(st.integers(1, 5)), hidden_size=hidden, num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()), bias=draw(st.booleans()),
    )
    if kind == "LSTM" and hidden > 1 and draw(st.booleans()):
        module_kw["proj_size"] = draw(st.integers(1, hidden - 1))
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["batched", "unbatched", "sorted", "unsorted"]))
    lengths = None
    if layout in ("sorted", "unsorted"):
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        lengths[draw(st.integers(0, B - 1))] = T  # pad_packed_sequence pads to the longest
        if layout == "sorted":
            lengths.sort(reverse=True)
    input_kw = dict(T=T, B=B, hx=draw(st.booleans()), unbatched=layout == "unbatched",
                    packed=layout if lengths else None, lengths=lengths, seed=draw(st.integers(0, 10**6)))
    return kind, module_kw, input_kw


@SETTINGS
@given(rnn_cases())
def test_fuzz_rnn_vs_torch(case):
    kind, module_kw, input_kw = case
    m = torch_module(kind, dtype=torch.float64, **module_kw)
    t = twin(m, "cpu")
    x, hx = rnn_inputs(m, **input_kw)
    check_twin(m, t, x, hx)


@SETTINGS
@given(kind=st.sampled_from(sorted(CELL_KINDS)), input_size=st.integers(1, 6), hidden_size=st.integers(1, 7),
       batch=st.integers(1, 5), unbatched=st.booleans(), hx=st.booleans(), bias=st.booleans(), seed=st.integers(0, 10**6))
def test_fuzz_cell_vs_torch(kind, input_size, hidden_size, batch, unbatched, hx, bias, seed):
    m = torch_module(kind, dtype=torch.float64, input_size=input_size, hidden_size=hidden_size, bias=bias)
    t = twin(m, "cpu")
    x, h = cell_inputs(m, B=batch, hx=hx, unbatched=unbatched, seed=seed)
    check_twin(m, t, x, h)
