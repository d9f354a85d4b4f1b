"""torch.compile of rnnkernels layers on the cpu backend: no graph breaks (fullgraph=True), same values and
gradients as eager. Compilation is slow on small machines, so only two cases."""

from __future__ import annotations

import pytest
import torch

import rnnkernels
from helpers import leaf, rnn_inputs, run, torch_module, twin
from rnnkernels import ops

pytestmark = [pytest.mark.slow, pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")]


@pytest.mark.parametrize("kind,module_kw,input_kw", [
    ("LSTM", dict(num_layers=2, proj_size=3, batch_first=True), dict(hx=True)),
    ("GRU", dict(bidirectional=True), dict(hx=True)),
], ids=["lstm_proj_two_layers", "gru_bidir"])
def test_compile_fullgraph_matches_eager(kind, module_kw, input_kw):
    # PackedSequence input is not compiled: torch's pad_packed_sequence is on Dynamo's skip list (a graph
    # break, as for torch.nn).
    torch._dynamo.reset()
    m = torch_module(kind, dtype=torch.float32, input_size=4, hidden_size=6, **module_kw)
    eager = twin(m, "cpu")
    compiled_module = twin(m, "cpu")
    compiled = torch.compile(compiled_module, fullgraph=True, backend="inductor")
    x, hx = rnn_inputs(m, T=5, B=3, **input_kw)
    expected, _ = run(eager, x, hx)
    # same outputs and every gradient (input, hx, parameters)
    got, _ = run(_CallAs(compiled, compiled_module), x, hx)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)
    # the ops really are in the graph: no fallback to eager on a second call with new values
    x2, hx2 = rnn_inputs(m, T=5, B=3, seed=7, **input_kw)
    out_c = compiled(leaf(x2), hx2)[0]
    out_e = eager(leaf(x2), hx2)[0]
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)


class _CallAs(torch.nn.Module):
    """Calls `fn` but exposes `module`'s parameters under their own names (for helpers.run)."""

    def __init__(self, fn, module):
        super().__init__()
        self._fn = fn
        self.m = module

    def named_parameters(self, *args, **kwargs):
        return self.m.named_parameters(*args, **kwargs)

    def parameters(self, *args, **kwargs):
        return self.m.parameters(*args, **kwargs)

    def forward(self, *args):
        return self._fn(*args)


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
