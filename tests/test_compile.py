"""torch.compile of rnnkernels layers on the cpu backend: no graph breaks (fullgraph=True), same values and
gradients as eager. Compilation is slow on small machines, so only three cases: two sequence layers, and a
cell, whose step operator has its autograd in C++ rather than registered from Python. And torch.export."""

from __future__ import annotations

import pytest
import torch

import rnnkernels
from helpers import cell_inputs, leaf, rnn_inputs, run, torch_module, twin
from rnnkernels import ops

pytestmark = [pytest.mark.slow, pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")]


@pytest.mark.parametrize("kind,module_kw,input_kw", [
    ("LSTM", dict(num_layers=2, proj_size=3, batch_first=True), dict(hx=True)),
    ("GRU", dict(bidirectional=True), dict(hx=True)),
    ("LSTMCell", dict(), dict(hx=True)),
], ids=["lstm_proj_two_layers", "gru_bidir", "lstm_cell"])
def test_compile_fullgraph_matches_eager(kind, module_kw, input_kw):
    # PackedSequence input is not compiled: torch's pad_packed_sequence is on Dynamo's skip list (a graph
    # break, as for torch.nn).
    torch._dynamo.reset()
    m = torch_module(kind, dtype=torch.float32, input_size=4, hidden_size=6, **module_kw)
    eager = twin(m, "cpu")
    compiled = twin(m, "cpu")
    # The forward compiled in place: the module stays a cell or a layer, as helpers.run expects.
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, backend="inductor")
    inputs = (lambda seed=1: cell_inputs(m, B=3, seed=seed, **input_kw)) if kind.endswith("Cell") else (
        lambda seed=1: rnn_inputs(m, T=5, B=3, seed=seed, **input_kw))
    x, hx = inputs()
    expected, _ = run(eager, x, hx)
    # same outputs and every gradient (input, hx, parameters)
    got, _ = run(compiled, x, hx)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)
    # the ops really are in the graph: no fallback to eager on a second call with new values
    x2, hx2 = inputs(seed=7)
    out_c = compiled(leaf(x2), hx2)[0]
    out_e = eager(leaf(x2), hx2)[0]
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)


def test_compile_counts_no_graph_breaks():
    """The same through torch._dynamo.explain: one graph, no breaks, rnnkernels ops inside."""
    torch._dynamo.reset()
    m = rnnkernels.LSTM(3, 4, backend="cpu")
    x = torch.randn(4, 2, 3)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = "\n".join(str(g.graph) for g in explanation.graphs)
    assert "rnnkernels" in code


def test_compile_fullgraph_with_default_config():
    torch._dynamo.reset()
    m = rnnkernels.LSTM(3, 4, backend="cpu")
    x = torch.randn(4, 2, 3)
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)[0]
    torch.testing.assert_close(out, m(x)[0])


@pytest.mark.parametrize("kind,module_kw", [("LSTM", dict(num_layers=2, proj_size=3)), ("GRUCell", dict())],
                         ids=["lstm_proj_two_layers", "gru_cell"])
def test_export_matches_eager(kind, module_kw):
    """torch.export's program holds the operators, and runs a new input of the same shape as eager does."""
    m = torch_module(kind, dtype=torch.float32, input_size=4, hidden_size=6, **module_kw)
    ours = twin(m, "cpu").eval()
    make = (lambda seed: cell_inputs(m, B=3, seed=seed, hx=True)) if kind.endswith("Cell") else (
        lambda seed: rnn_inputs(m, T=5, B=3, seed=seed, hx=True))
    x, hx = make(1)
    program = torch.export.export(ours, (x, hx))
    assert "rnnkernels" in str(program.graph)
    x2, hx2 = make(7)
    torch.testing.assert_close(program.module()(x2, hx2), ours(x2, hx2), atol=0, rtol=0)
