"""torch.func's transforms and forward-mode AD: the layers give torch.nn's derivatives (float64, tight), by
the backend rule's answer there (rnnkernels.backends: only the reference backend runs under them), and an
explicitly named compiled backend says why it cannot instead of answering zero tangents."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

from helpers import CELL_KINDS, RNN_KINDS, cell_inputs, rnn_inputs, torch_module, twin
from rnnkernels import backends, ops

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")

KINDS = list(RNN_KINDS) + list(CELL_KINDS)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def pair(kind: str, **kwargs):
    """torch.nn's module of `kind` in float64 and its twin on "auto", with an input and, for a cell, a state
    (without one, a cell's W_hh has no gradient)."""
    m = torch_module(kind, dtype=torch.float64, input_size=4, hidden_size=5, **kwargs)
    x, hx = cell_inputs(m, B=2, hx=True) if kind in CELL_KINDS else rnn_inputs(m, T=3, B=2)
    return m, twin(m), x, hx


def derivatives(m, x, hx) -> list[torch.Tensor]:
    """With respect to the input: grad, jacrev, jacfwd, jvp; with respect to each parameter: grad."""
    state = () if hx is None else (hx,)
    f = lambda xx: first(m(xx, *state))  # noqa: E731
    parameters = dict(m.named_parameters())
    by_parameter = grad(lambda p: first(functional_call(m, p, (x, *state))).sum())(parameters)
    return [grad(lambda xx: f(xx).sum())(x), jacrev(f)(x), jacfwd(f)(x), jvp(f, (x,), (torch.ones_like(x),))[1],
            *(by_parameter[name] for name in sorted(by_parameter))]


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_derivatives_match_torch_nn(kind):
    m, ours, x, hx = pair(kind, **({} if kind in CELL_KINDS else dict(num_layers=2)))
    for index, (a, b) in enumerate(zip(derivatives(ours, x, hx), derivatives(m, x, hx), strict=True)):
        assert b.abs().max() > 0, f"derivative {index} is zero in torch.nn: the case says nothing"
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"derivative {index}")


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_ad_matches_torch_nn(kind):
    m, ours, x, _ = pair(kind, **({} if kind in CELL_KINDS else dict(bidirectional=True)))
    tangents = []
    for module in (ours, m):
        with forward_ad.dual_level():
            out = first(module(forward_ad.make_dual(x, torch.ones_like(x))))
            tangents.append(forward_ad.unpack_dual(out).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_vmap_matches_a_loop(kind):
    """vmap over unbatched samples, against torch.nn one sample at a time (torch.nn's sequence modules have
    no batching rule of their own)."""
    m, ours, _, _ = pair(kind)
    samples = torch.randn(3, 2 if kind in CELL_KINDS else 5, 4, dtype=torch.float64)
    expected = torch.stack([first(m(sample)) for sample in samples])
    torch.testing.assert_close(vmap(lambda sample: first(ours(sample)))(samples), expected, atol=1e-12, rtol=1e-12)


def test_the_rule_under_transforms():
    cpu, f64 = torch.device("cpu"), torch.float64
    chosen = []
    grad(lambda x: (chosen.append(backends.select("auto", cpu, f64).name), x.sum())[1])(torch.ones(2, dtype=f64))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(torch.ones(2, dtype=f64), torch.ones(2, dtype=f64))
        chosen.append(backends.select("auto", cpu, f64, lambda: (None, dual)).name)
        chosen.append(backends.select("auto", cpu, f64, lambda: (torch.ones(2, dtype=f64),)).name)
    assert chosen == ["reference", "reference", "cpu"]  # the last: a dual level, but no tangent
    assert backends.select("auto", cpu, f64).name == "cpu"  # outside them, the cached answer is not theirs


def test_a_named_compiled_backend_under_transforms_says_why():
    m = torch_module("GRU", dtype=torch.float64, input_size=4, hidden_size=5)
    ours = twin(m, "cpu")
    x, _ = rnn_inputs(m)
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run this input: torch.func transforms"):
        jvp(lambda xx: ours(xx)[0], (x,), (torch.ones_like(x),))


def test_a_dual_level_elsewhere_leaves_other_layers_compiled():
    """forward-mode AD's dual level is the process's: a layer none of whose tensors has a tangent, in this
    thread or another, stays on its compiled backend (and one named so does not raise)."""
    m = torch_module("GRU", input_size=4, hidden_size=5)
    ours, x = twin(m, "cpu"), rnn_inputs(m)[0]
    entered, done = threading.Event(), threading.Event()

    def hold_a_dual_level():
        with forward_ad.dual_level():
            entered.set()
            done.wait(30)

    holder = threading.Thread(target=hold_a_dual_level)
    holder.start()
    try:
        entered.wait(30)
        assert backends.select("auto", torch.device("cpu"), torch.float32).name == "cpu"
        torch.testing.assert_close(ours(x)[0], m(x)[0], atol=1e-5, rtol=1e-5)
    finally:
        done.set()
        holder.join()
    with forward_ad.dual_level():
        torch.testing.assert_close(ours(x)[0], m(x)[0], atol=1e-5, rtol=1e-5)
