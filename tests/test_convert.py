"""rnnkernels.convert and from_torch: twins in place, the very same parameter tensors, state_dict parity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rnnkernels
from helpers import TWIN_OF


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 4, batch_first=True, bidirectional=True)
        self.cells = nn.ModuleList([nn.LSTMCell(8, 3), nn.RNNCell(3, 3, nonlinearity="relu")])
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.gru(x)
        h, _ = self.cells[0](y[:, -1])
        return self.out(self.cells[1](h))


class SubLSTM(nn.LSTM):
    """A subclass (own behaviour possible): convert leaves it alone."""


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
        self.lstm = nn.LSTM(5, 6, num_layers=2, proj_size=3, batch_first=True)
        self.stack = nn.Sequential(nn.Identity(), nn.RNN(3, 6, nonlinearity="tanh", batch_first=True, bias=False))
        self.head = Head()
        self.cell = nn.GRUCell(2, 2)
        self.sub = SubLSTM(2, 2)

    def forward(self, x):
        y, _ = self.lstm(self.encoder(x))
        y, _ = self.stack(y)
        return self.head(y).sum() + self.cell(x[:, 0, :2]).sum()


def recurrent_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))}


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_convert_replaces_every_exact_torch_module(backend):
    torch.manual_seed(0)
    model = Model()
    before = recurrent_modules(model)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict().keys())
    result = rnnkernels.convert(model, backend=backend)
    assert result is model
    after = recurrent_modules(model)
    assert set(after) == set(before)
    for name, module in after.items():
        if name == "sub":
            assert module is before[name] and type(module) is SubLSTM, "a subclass must not be converted"
            continue
        assert type(module) is TWIN_OF[type(before[name])], name
        assert module.backend == backend
        # cells stay instances of their torch.nn class; the sequence twins only of nn.RNNBase, since
        # torch.compile refuses to trace instances of nn.RNN/GRU/LSTM
        expected_base = nn.RNNBase if isinstance(before[name], nn.RNNBase) else type(before[name])
        assert isinstance(module, expected_base)
    params_after = dict(model.named_parameters())
    assert list(params_after) == list(params_before)
    for name, p in params_after.items():
        assert p is params_before[name], f"{name} is a new tensor"
    assert list(model.state_dict().keys()) == keys_before
    assert isinstance(model.head.cells, nn.ModuleList) and isinstance(model.stack, nn.Sequential)


def test_convert_of_a_bare_module_returns_its_twin():
    for cls, twin_cls in TWIN_OF.items():
        m = cls(3, 4)
        t = rnnkernels.convert(m, backend="reference")
        assert type(t) is twin_cls and t.backend == "reference"
        assert all(a is b for a, b in zip(t.parameters(), m.parameters()))
        assert type(m) is cls  # the original is left as it is
    already = rnnkernels.LSTM(3, 4)
    assert rnnkernels.convert(already) is already
    plain = nn.Linear(2, 2)
    assert rnnkernels.convert(plain) is plain


def test_converted_model_computes_the_same_and_trains_the_original_parameters():
    torch.manual_seed(0)
    original = Model().double()
    converted = rnnkernels.convert(copy.deepcopy(original), backend="cpu")
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), atol=1e-10, rtol=0)

    # an optimizer built on the torch.nn model before conversion updates the converted one
    torch.manual_seed(0)
    model = Model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = copy.deepcopy(model)
    lstm_weight = model.lstm.weight_hh_l1
    snapshot = lstm_weight.detach().clone()
    rnnkernels.convert(model, backend="cpu")
    assert model.lstm.weight_hh_l1 is lstm_weight
    loss = model(x)
    loss.backward()
    optimizer.step()
    assert not torch.equal(lstm_weight.detach(), snapshot)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(x).backward()
    ref_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("kind,kwargs", [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)), ("GRU", dict(bias=False)),
    ("RNN", dict(nonlinearity="relu", num_layers=3)), ("LSTMCell", {}), ("GRUCell", dict(bias=False)), ("RNNCell", {}),
])
def test_state_dict_round_trips_strictly(kind, kwargs):
    torch.manual_seed(1)
    theirs = getattr(nn, kind)(3, 5, **kwargs)
    ours = getattr(rnnkernels, kind)(3, 5, **kwargs, backend="cpu")
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    fresh = getattr(nn, kind)(3, 5, **kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(fresh.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)


def test_from_torch_shares_parameters_and_flat_weights():
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, num_layers=2)
    t = rnnkernels.LSTM.from_torch(m, backend="cpu")
    assert all(a is b for a, b in zip(t.parameters(), m.parameters()))
    with torch.no_grad():
        m.weight_hh_l1.mul_(2)  # an in-place update of the original is seen by the twin
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(t(x)[0], m(x)[0], atol=1e-5, rtol=1e-5)
    t.to(torch.float64)  # converts the shared Parameters in place: both modules now hold float64
    assert all(a is b for a, b in zip(t.parameters(), m.parameters()))
    assert m.weight_ih_l0.dtype == torch.float64
    torch.testing.assert_close(t(x.double())[0], m(x.double())[0], atol=1e-12, rtol=0)


def test_convert_makes_one_twin_of_a_module_found_under_several_names():
    lstm, gru = nn.LSTM(3, 4), nn.GRU(4, 4)
    model = nn.Sequential(lstm, lstm)
    model.extra = nn.ModuleList([gru, nn.Sequential(gru)])
    rnnkernels.convert(model)
    assert type(model[0]) is rnnkernels.LSTM and model[1] is model[0]
    assert type(model.extra[0]) is rnnkernels.GRU and model.extra[1][0] is model.extra[0]
    assert model[0].weight_ih_l0 is lstm.weight_ih_l0


def test_convert_takes_over_hooks_and_their_handles():
    m = nn.GRU(3, 4)
    calls = []
    kept = m.register_forward_hook(lambda *args: calls.append("kept"))
    removed = m.register_forward_pre_hook(lambda *args: calls.append("removed"))
    model = rnnkernels.convert(nn.Sequential(m))
    removed.remove()  # a handle taken before conversion
    model(torch.randn(2, 1, 3))
    assert calls == ["kept"]
    kept.remove()
    model(torch.randn(2, 1, 3))
    assert calls == ["kept"]


def test_from_torch_does_not_share_hooks():
    m = nn.GRU(3, 4)
    t = rnnkernels.GRU.from_torch(m)
    calls = []
    t.register_forward_hook(lambda *args: calls.append("twin hook"))
    m(torch.randn(2, 1, 3))
    assert calls == []


def test_from_torch_parameter_reassignment_does_not_leak_into_original():
    torch.manual_seed(0)
    m = nn.LSTM(3, 4)
    t = rnnkernels.LSTM.from_torch(m)
    x = torch.randn(2, 1, 3)
    before = m(x)[0].detach().clone()
    t.weight_hh_l0 = nn.Parameter(torch.zeros(16, 4))
    assert m.weight_hh_l0 is not t.weight_hh_l0
    torch.testing.assert_close(m(x)[0], before)


def test_init_matches_torch_under_the_same_seed():
    for kind in ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]:
        torch.manual_seed(5)
        theirs = getattr(nn, kind)(3, 4)
        torch.manual_seed(5)
        ours = getattr(rnnkernels, kind)(3, 4)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b), kind


def test_deepcopy_and_pickle_of_twins(tmp_path):
    t = rnnkernels.GRU(3, 4, backend="reference")
    c = copy.deepcopy(t)
    assert type(c) is rnnkernels.GRU and c.backend == "reference"
    path = tmp_path / "m.pt"
    torch.save(t, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(loaded(x)[0], t(x)[0])
