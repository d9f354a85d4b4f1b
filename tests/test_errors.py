"""Bad input and bad arguments: what torch.nn raises, rnnkernels raises, with the same exception type."""

from __future__ import annotations

import pytest
import torch

import rnnkernels
from helpers import BACKENDS, CELL_KINDS, RNN_KINDS, torch_module, twin

I, H = 5, 7


def outcome(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return None


def states(kind, *shape, dtype=torch.float32):
    is_lstm = kind.startswith("LSTM")
    return (torch.zeros(*shape, dtype=dtype), torch.zeros(*shape, dtype=dtype)) if is_lstm else torch.zeros(*shape, dtype=dtype)


RNN_BAD_CALLS = {
    "wrong_input_size": lambda k: (torch.randn(4, 3, I + 1), None),
    "wrong_hidden_size": lambda k: (torch.randn(4, 3, I), states(k, 1, 3, H + 1)),
    "wrong_hidden_layers": lambda k: (torch.randn(4, 3, I), states(k, 2, 3, H)),
    "hx_batch_mismatch": lambda k: (torch.randn(4, 3, I), states(k, 1, 2, H)),
    "hx_4d": lambda k: (torch.randn(4, 3, I), states(k, 1, 1, 3, H)),
    "hx_2d_for_batched": lambda k: (torch.randn(4, 3, I), states(k, 3, H)),
    "hx_3d_for_unbatched": lambda k: (torch.randn(4, I), states(k, 1, 1, H)),
    "unbatched_hx_wrong_size": lambda k: (torch.randn(4, I), states(k, 1, H + 2)),
    "no_time_steps": lambda k: (torch.randn(0, 3, I), None),
    "unbatched_no_time_steps": lambda k: (torch.randn(0, I), None),
    "input_1d": lambda k: (torch.randn(I), None),
    "input_4d": lambda k: (torch.randn(2, 4, 3, I), None),
    "input_float64": lambda k: (torch.randn(4, 3, I, dtype=torch.float64), None),
    "input_int": lambda k: (torch.ones(4, 3, I, dtype=torch.int32), None),
    "hx_float64": lambda k: (torch.randn(4, 3, I), states(k, 1, 3, H, dtype=torch.float64)),
    "lstm_cell_state_wrong": lambda k: (torch.randn(4, 3, I), (torch.zeros(1, 3, H), torch.zeros(1, 3, H + 1))) if k == "LSTM" else None,
    "lstm_hx_not_a_tuple": lambda k: (torch.randn(4, 3, I), torch.zeros(1, 3, H)) if k == "LSTM" else None,
    "lstm_hx_of_three": lambda k: (torch.randn(4, 3, I), (torch.zeros(1, 3, H),) * 3) if k == "LSTM" else None,
    "lstm_hx_of_one": lambda k: (torch.randn(4, 3, I), (torch.zeros(1, 3, H),)) if k == "LSTM" else None,
    "packed_hx_batch_mismatch": lambda k: (
        torch.nn.utils.rnn.pack_padded_sequence(torch.randn(4, 3, I), torch.tensor([4, 2, 3]), enforce_sorted=False),
        states(k, 1, 2, H)),
}


def assert_raises_like_torch(kind, call, backend):
    """The twin raises exactly the exception type torch.nn raises for the arguments call() makes (made anew
    for each module: a generator is spent by the first)."""
    m = torch_module(kind, input_size=I, hidden_size=H)
    t = twin(m, backend)

    def raised_by(module):
        x, hx = call()
        return outcome(lambda: module(x) if hx is None else module(x, hx))

    expected = raised_by(m)
    assert expected is not None, "torch.nn accepts this; the case is wrong"
    assert raised_by(t) is expected


RNN_BAD = [(kind, case) for kind in RNN_KINDS for case in RNN_BAD_CALLS if RNN_BAD_CALLS[case](kind) is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,case", RNN_BAD, ids=[f"{k}-{c}" for k, c in RNN_BAD])
def test_rnn_bad_input_raises_like_torch(kind, case, backend):
    assert_raises_like_torch(kind, lambda: RNN_BAD_CALLS[case](kind), backend)


CELL_BAD_CALLS = {
    "wrong_input_size": lambda k: (torch.randn(3, I + 1), None),
    "wrong_hidden_size": lambda k: (torch.randn(3, I), states(k, 3, H + 1)),
    "hx_batch_mismatch": lambda k: (torch.randn(3, I), states(k, 2, H)),
    "hx_3d": lambda k: (torch.randn(3, I), states(k, 1, 3, H)),
    "unbatched_input_batched_hx": lambda k: (torch.randn(I), states(k, 3, H)),
    "batched_input_unbatched_hx": lambda k: (torch.randn(3, I), states(k, H)),
    "input_3d": lambda k: (torch.randn(2, 3, I), None),
    "input_0d": lambda k: (torch.randn(()), None),
    "input_float64": lambda k: (torch.randn(3, I, dtype=torch.float64), None),
    "input_int": lambda k: (torch.ones(3, I, dtype=torch.int32), None),
    "hx_float64": lambda k: (torch.randn(3, I), states(k, 3, H, dtype=torch.float64)),
    # An LSTM cell's state pair: torch.nn's kernel wants a tuple or list of two tensors, where unbatched
    # input has it indexed first.
    "lstm_hx_of_three": lambda k: (torch.randn(3, I), (torch.zeros(3, H),) * 3) if k == "LSTMCell" else None,
    "lstm_hx_of_one": lambda k: (torch.randn(3, I), (torch.zeros(3, H),)) if k == "LSTMCell" else None,
    "lstm_hx_stacked": lambda k: (torch.randn(3, I), torch.zeros(2, 3, H)) if k == "LSTMCell" else None,
    "lstm_hx_generator": lambda k: (torch.randn(3, I), (h for h in states(k, 3, H))) if k == "LSTMCell" else None,
    "unbatched_lstm_hx_of_one": lambda k: (torch.randn(I), (torch.zeros(H),)) if k == "LSTMCell" else None,
    "unbatched_lstm_hx_generator": lambda k: (torch.randn(I), (h for h in states(k, H))) if k == "LSTMCell" else None,
}
CELL_BAD = [(kind, case) for kind in CELL_KINDS for case in CELL_BAD_CALLS if CELL_BAD_CALLS[case](kind) is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,case", CELL_BAD, ids=[f"{k}-{c}" for k, c in CELL_BAD])
def test_cell_bad_input_raises_like_torch(kind, case, backend):
    assert_raises_like_torch(kind, lambda: CELL_BAD_CALLS[case](kind), backend)


BAD_CONSTRUCTORS = [
    ("LSTM", dict(dropout=1.5)), ("GRU", dict(dropout=-0.1)), ("RNN", dict(dropout=True)),
    ("LSTM", dict(proj_size=H)), ("LSTM", dict(proj_size=H + 3)), ("LSTM", dict(proj_size=-1)),
    ("GRU", dict(proj_size=2)), ("RNN", dict(nonlinearity="foo")), ("LSTM", dict(nonlinearity="tanh")),
    ("RNN", dict(num_layers=0)), ("GRU", dict(hidden_size=0)), ("LSTM", dict(hidden_size=-2)),
    ("RNN", dict(hidden_size=2.5)), ("GRUCell", dict(hidden_size=-1)),
]


@pytest.mark.parametrize("kind,kwargs", BAD_CONSTRUCTORS, ids=[f"{k}-{list(kw.items())[0]}" for k, kw in BAD_CONSTRUCTORS])
def test_bad_constructor_arguments_raise_like_torch(kind, kwargs):
    full = {"input_size": I, "hidden_size": H, **kwargs}
    expected = outcome(lambda: getattr(torch.nn, kind)(**full))
    assert expected is not None
    for backend in ("auto",) + BACKENDS:
        assert outcome(lambda: getattr(rnnkernels, kind)(**full, backend=backend)) is expected


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_unknown_backend_name(kind):
    with pytest.raises(ValueError, match="unknown backend"):
        getattr(rnnkernels, kind)(I, H, backend="cuda_please")
    with pytest.raises(ValueError, match="unknown backend"):
        getattr(rnnkernels, kind).from_torch(getattr(torch.nn, kind)(I, H), backend="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        rnnkernels.convert(torch.nn.Sequential(getattr(torch.nn, kind)(I, H)), backend="nope")


def test_unknown_backend_in_use_backend_and_env(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        with rnnkernels.use_backend("fast"):
            pass
    m = rnnkernels.GRU(I, H)
    monkeypatch.setenv("RNNKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        m(torch.randn(2, 1, I))


def test_from_torch_rejects_other_types():
    with pytest.raises(TypeError):
        rnnkernels.LSTM.from_torch(torch.nn.GRU(I, H))

    class MyLSTM(torch.nn.LSTM):
        pass

    with pytest.raises(TypeError):
        rnnkernels.LSTM.from_torch(MyLSTM(I, H))


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_explicit_cpu_backend_that_cannot_run_raises(kind):
    """backend="cpu" on inputs it cannot run: a RuntimeError that says why (dtype; device)."""
    module = getattr(rnnkernels, kind)(I, H, backend="cpu")
    x = torch.randn(3, 2, I) if kind == "LSTM" else torch.randn(2, I)
    module = module.to(torch.complex64)
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run.*complex64"):
        module(x.to(torch.complex64))
    meta = getattr(rnnkernels, kind)(I, H, backend="cpu").to("meta")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run.*meta"):
        meta(x.to("meta"))
    # The same through use_backend on an "auto" module.
    auto = getattr(rnnkernels, kind)(I, H).to("meta")
    with rnnkernels.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="cannot run"):
            auto(x.to("meta"))


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_auto_and_reference_run_what_cpu_cannot():
    """"auto" falls back to the reference backend (complex: no compiled kernels) instead of raising."""
    m = rnnkernels.RNN(I, H).to(torch.complex128)
    x = torch.randn(3, 2, I, dtype=torch.complex128)
    out, h = m(x)
    assert out.dtype == torch.complex128 and out.shape == (3, 2, H)
    meta = rnnkernels.GRU(I, H).to("meta")
    out, h = meta(torch.randn(3, 2, I, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 2, H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_cell_unknown_nonlinearity_raises_like_torch(backend):
    m = torch.nn.RNNCell(I, H, nonlinearity="foo")  # torch.nn checks this only in forward
    t = rnnkernels.RNNCell.from_torch(m, backend=backend)
    x = torch.randn(2, I)
    expected = outcome(lambda: m(x))
    assert expected is RuntimeError
    assert outcome(lambda: t(x)) is expected
