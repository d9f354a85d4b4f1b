"""Every module and option against torch.nn with the same weights: outputs, final states and all gradients
(input, hx, every parameter), under the correctness rule of tests/helpers.py."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrizations, prune
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkernels
from rnnkernels import functional
from helpers import (
    BACKENDS,
    CELL_KINDS,
    DEVICES,
    RNN_KINDS,
    backend_on,
    cell_inputs,
    check_twin,
    rnn_inputs,
    run,
    torch_module,
    twin,
)

I, H, P = 5, 6, 3

# id -> (module keywords, input keywords). "train": module in training mode (dropout active), else eval.
RNN_CASES = {
    "basic": ({}, {}),
    "hx": ({}, {"hx": True}),
    "two_layers_hx": ({"num_layers": 2}, {"hx": True}),
    "bidirectional": ({"bidirectional": True}, {}),
    "two_layers_bidirectional_hx": ({"num_layers": 2, "bidirectional": True}, {"hx": True}),
    "batch_first_two_layers_hx": ({"batch_first": True, "num_layers": 2}, {"hx": True}),
    "no_bias_bidirectional_hx": ({"bias": False, "bidirectional": True}, {"hx": True}),
    "unbatched": ({}, {"unbatched": True}),
    "unbatched_hx_batch_first_bidir_two_layers": (
        {"batch_first": True, "bidirectional": True, "num_layers": 2}, {"unbatched": True, "hx": True}),
    "packed_sorted_hx_two_layers": ({"num_layers": 2}, {"packed": "sorted", "hx": True}),
    "packed_unsorted_hx_bidir_two_layers": ({"num_layers": 2, "bidirectional": True}, {"packed": "unsorted", "hx": True}),
    "packed_unsorted_batch_first_no_hx": ({"batch_first": True}, {"packed": "unsorted"}),
    "packed_unsorted_no_bias_bidir_hx": ({"bias": False, "bidirectional": True}, {"packed": "unsorted", "hx": True}),
    # Dropout between layers in training mode: torch.nn (CPU) applies F.dropout to each layer's padded
    # output, as rnnkernels does, so under the same torch.manual_seed the masks are the same and the
    # results must match exactly as without dropout (checked: the masks do not depend on the dtype).
    "dropout_train_three_layers_bidir_hx": ({"num_layers": 3, "dropout": 0.4, "bidirectional": True}, {"hx": True, "train": True}),
    "dropout_train_batch_first": ({"num_layers": 2, "dropout": 0.5, "batch_first": True}, {"train": True}),
    "dropout_eval": ({"num_layers": 2, "dropout": 0.5}, {"hx": True}),
}
LSTM_CASES = {
    "proj_hx": ({"proj_size": P}, {"hx": True}),
    "proj_two_layers_bidir_hx": ({"proj_size": P, "num_layers": 2, "bidirectional": True}, {"hx": True}),
    "proj_packed_unsorted_hx_bidir": ({"proj_size": P, "bidirectional": True, "num_layers": 2}, {"packed": "unsorted", "hx": True}),
    "proj_unbatched_no_bias": ({"proj_size": P, "bias": False}, {"unbatched": True, "hx": True}),
    "proj_batch_first_dropout_train": ({"proj_size": 2, "num_layers": 2, "dropout": 0.3, "batch_first": True}, {"train": True}),
}
ALL_CASES = [(kind, case) for kind in RNN_KINDS for case in RNN_CASES] + [("LSTM", case) for case in LSTM_CASES]


def build_case(kind, case, dtype, backend, construct="from_torch", device="cpu", T=5, B=4, hidden_size=H):
    module_kw, input_kw = {**RNN_CASES, **LSTM_CASES}[case]
    input_kw = dict(input_kw)
    train = input_kw.pop("train", False)
    m = torch_module(kind, dtype=dtype, device=device, input_size=I, hidden_size=hidden_size, **module_kw)
    m.train(train)
    t = twin(m, backend_on(device, backend), construct)
    x, hx = rnn_inputs(m, T, B, **input_kw)
    return m, t, x, hx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=[f"{k}-{c}" for k, c in ALL_CASES])
def test_rnn_matches_torch(kind, case, backend, dtype):
    construct = "load_state_dict" if len(case) % 2 else "from_torch"  # both ways of building a twin
    m, t, x, hx = build_case(kind, case, dtype, backend, construct)
    check_twin(m, t, x, hx, seed=1234)


# relu's derivative jumps at 0: where a bfloat16 pre-activation lands on the other side of 0 from float64's,
# the gradients there differ by whole terms, and a bound on the largest error no longer compares accuracy.
# Measured over 200 random two-layer packed RNN_relu cases of 6 units: float64 and bfloat16 disagree on 7
# of 16,914 outputs' signs with rnnkernels' bfloat16 panels (float32 sums), on 15 with torch.nn. So the relu
# case is another (packed_sorted_hx_two_layers has one such output for rnnkernels, none for torch.nn).
BF16_CASES = [("LSTM", "two_layers_bidirectional_hx"), ("LSTM", "proj_packed_unsorted_hx_bidir"),
              ("GRU", "packed_unsorted_hx_bidir_two_layers"), ("GRU", "batch_first_two_layers_hx"),
              ("RNN_tanh", "two_layers_bidirectional_hx"), ("RNN_relu", "packed_unsorted_hx_bidir_two_layers"),
              ("LSTM", "dropout_train_three_layers_bidir_hx")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,case", BF16_CASES, ids=[f"{k}-{c}" for k, c in BF16_CASES])
def test_rnn_matches_torch_bfloat16(kind, case, backend):
    m, t, x, hx = build_case(kind, case, torch.bfloat16, backend)
    check_twin(m, t, x, hx, seed=99)


SINGLE_STEP_CASES = [("LSTM", "proj_two_layers_bidir_hx"), ("GRU", "dropout_train_three_layers_bidir_hx"),
                     ("RNN_relu", "two_layers_bidirectional_hx"), ("LSTM", "unbatched_hx_batch_first_bidir_two_layers"),
                     ("RNN_tanh", "no_bias_bidirectional_hx"), ("GRU", "packed_unsorted_hx_bidir_two_layers")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,case", SINGLE_STEP_CASES, ids=[f"{k}-{c}" for k, c in SINGLE_STEP_CASES])
def test_rnn_single_step_matches_torch(kind, case, backend, dtype):
    """T = 1, as in generation: each layer goes through the backend's step, not the sequence operator."""
    m, t, x, hx = build_case(kind, case, dtype, backend, T=1)
    check_twin(m, t, x, hx, seed=7)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_tanh"])
def test_single_step_runs_the_fused_step_operator(kind):
    m, t, x, hx = build_case(kind, "two_layers_hx", torch.float32, "cpu", T=1)
    with torch.autograd.profiler.profile() as profile:
        t(x, hx)
    names = {event.name for event in profile.function_events}
    cell = {"LSTM": "lstm", "GRU": "gru", "RNN_tanh": "rnn_tanh"}[kind]
    assert f"rnnkernels::{cell}_step" in names
    assert f"rnnkernels::{cell}_forward" not in names


@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_rnn_matches_torch_float16(kind):
    m, t, x, hx = build_case(kind, "two_layers_bidirectional_hx", torch.float16, "cpu")
    check_twin(m, t, x, hx)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_rnn_longer_and_wider(kind, backend):
    """Sizes past the vector width and the threading grain of the CPU kernels."""
    module_kw = {"num_layers": 2, "bidirectional": True, **({"proj_size": 13} if kind == "LSTM" else {})}
    m = torch_module(kind, dtype=torch.float32, input_size=19, hidden_size=37, **module_kw)
    t = twin(m, backend)
    x, hx = rnn_inputs(m, T=23, B=9, hx=True, packed="unsorted")
    check_twin(m, t, x, hx)


CHUNKED_CASES = [("LSTM", "proj_packed_unsorted_hx_bidir"), ("LSTM", "two_layers_bidirectional_hx"),
                 ("GRU", "packed_unsorted_hx_bidir_two_layers"), ("GRU", "unbatched_hx_batch_first_bidir_two_layers"),
                 ("RNN_tanh", "packed_sorted_hx_two_layers"), ("RNN_relu", "batch_first_two_layers_hx")]


def chunks_of_three_steps(monkeypatch, module, batch) -> list:
    """Makes functional.rnn take every layer in chunks of 3 time steps (_layer_in_chunks), or of as many
    as W_hh has columns over the batch where that is more; returns the list that records (T, steps per
    chunk) of each chunked layer."""
    step_bytes = batch * module.weight_ih_l0.shape[0] * module.weight_ih_l0.element_size()
    monkeypatch.setattr(functional, "_CHUNKED_FROM_BYTES", 0)
    monkeypatch.setattr(functional, "_CHUNK_BYTES", 3 * step_bytes)
    calls, chunked = [], functional._layer_in_chunks

    def recording(cell, x, *args):
        calls.append((x.size(0), args[-1]))
        return chunked(cell, x, *args)

    monkeypatch.setattr(functional, "_layer_in_chunks", recording)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,case", CHUNKED_CASES, ids=[f"{k}-{c}" for k, c in CHUNKED_CASES])
def test_inference_in_chunks_of_time_steps(kind, case, backend, dtype, monkeypatch):
    """CPU inference whose input projection would be large runs in chunks of time steps, the state carried
    between them: here 10 steps in chunks of 3 (the last of 1; unbatched, of 6), sequences ending inside
    a chunk, at its end and at T, both directions."""
    module_kw, input_kw = {**RNN_CASES, **LSTM_CASES}[case]
    m = torch_module(kind, dtype=dtype, input_size=I, hidden_size=H, **module_kw).eval()
    t = twin(m, backend)
    lengths = [10, 7, 6, 3] if input_kw.get("packed") == "sorted" else [7, 10, 3, 6]
    x, hx = rnn_inputs(m, T=10, B=4, **input_kw, lengths=lengths if "packed" in input_kw else None)
    calls = chunks_of_three_steps(monkeypatch, m, batch=1 if input_kw.get("unbatched") else 4)
    check_twin(m, t, x, hx, backward=False)
    assert len(calls) == m.num_layers * (2 if m.bidirectional else 1)
    assert all(T == 10 and steps < 10 for T, steps in calls), calls


@pytest.mark.parametrize("frozen", [False, True], ids=["all_grads", "only_hx_grads"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_training_takes_the_whole_sequence_at_once(kind, frozen, monkeypatch):
    """Where autograd records (for the parameters, or for hx alone), the layer is one projection and one
    recurrence, however large."""
    m = torch_module(kind, dtype=torch.float32, input_size=I, hidden_size=H, num_layers=2, bidirectional=True)
    t = twin(m, "cpu")
    for p in [*m.parameters(), *t.parameters()] if frozen else []:
        p.requires_grad_(False)
    x, hx = rnn_inputs(m, T=10, B=4, hx=True)
    calls = chunks_of_three_steps(monkeypatch, m, batch=4)
    if frozen:
        states = hx if isinstance(hx, tuple) else (hx,)
        states = tuple(s.requires_grad_(True) for s in states)
        t(x.requires_grad_(False), states if kind == "LSTM" else states[0])[0].sum().backward()
        assert all(s.grad is not None for s in states)
    else:
        check_twin(m, t, x, hx)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_non_contiguous_input_and_state(kind, dtype):
    """Strided views (every other feature, transposed states) go through the kernels' own stride handling."""
    m = torch_module(kind, dtype=dtype, input_size=I, hidden_size=H, num_layers=2, batch_first=True)
    t = twin(m, "cpu")
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 6, 2 * I, dtype=torch.float64, generator=g).to(dtype)
    x = wide[:, :, ::2]  # (B, T, I), inner stride 2
    assert not x.is_contiguous()
    h = torch.randn(4, 2, H, dtype=torch.float64, generator=g).to(dtype).transpose(0, 1)  # (L, B, H) strided
    hx = (h, h.flip(-1)) if kind == "LSTM" else h
    check_twin(m, t, x, hx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_unsorted_permutation(backend):
    """hx given in the caller's batch order comes back in the caller's order: each sequence's final state
    equals that of running it alone, and the output PackedSequence carries torch.nn's index fields."""
    m = torch_module("LSTM", dtype=torch.float64, input_size=I, hidden_size=H, bidirectional=True)
    t = twin(m, backend)
    lengths = torch.tensor([2, 5, 1, 4])
    x, hx = rnn_inputs(m, T=5, B=4, hx=True, packed="unsorted", lengths=lengths)
    out, (h_n, c_n) = t(x, hx)
    ref_out, (ref_h, ref_c) = m(x, hx)
    assert torch.equal(out.sorted_indices, ref_out.sorted_indices)
    assert torch.equal(out.unsorted_indices, ref_out.unsorted_indices)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    torch.testing.assert_close(out.data, ref_out.data, atol=1e-10, rtol=0)
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(x)
    for b in range(4):
        alone, (h_b, c_b) = t(padded[: lengths[b], b], (hx[0][:, b], hx[1][:, b]))
        torch.testing.assert_close(h_n[:, b], h_b, atol=1e-10, rtol=0)
        torch.testing.assert_close(c_n[:, b], c_b, atol=1e-10, rtol=0)
    torch.testing.assert_close(h_n, ref_h, atol=1e-10, rtol=0)


def test_packed_dropout_same_rng_as_torch():
    m = torch_module("GRU", dtype=torch.float64, input_size=I, hidden_size=H, num_layers=2, dropout=0.5)
    t = twin(m, "cpu")
    x, _ = rnn_inputs(m, T=5, B=4, packed="unsorted")
    torch.manual_seed(0)
    ours = t(x)[0].data
    torch.manual_seed(0)
    theirs = m(x)[0].data
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_dropout_statistics(backend):
    """Where the RNG streams differ (packed input, above), dropout must still behave as dropout: p=0 in
    training equals eval mode; with p>0, outputs differ between seeds, are reproducible under one seed,
    and the second layer sees about a fraction p of its inputs zeroed (measured through RNN relu with
    identity-like weights, whose output is zero exactly where the dropped input was)."""
    m = torch_module("GRU", dtype=torch.float64, input_size=I, hidden_size=H, num_layers=2, dropout=0.5)
    t = twin(m, backend)
    x, _ = rnn_inputs(m, T=5, B=4, packed="unsorted")
    torch.manual_seed(0)
    a = t(x)[0].data
    torch.manual_seed(0)
    b = t(x)[0].data
    torch.manual_seed(1)
    c = t(x)[0].data
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    t.eval()
    m.eval()
    torch.testing.assert_close(t(x)[0].data, m(x)[0].data, atol=1e-10, rtol=0)

    # Fraction dropped: a 2-layer relu RNN whose second layer is the identity on positive inputs.
    p, n = 0.3, 64
    r = rnnkernels.RNN(n, n, num_layers=2, nonlinearity="relu", dropout=p, bias=False, backend=backend).double()
    with torch.no_grad():
        r.weight_ih_l0.copy_(torch.eye(n))
        r.weight_hh_l0.zero_()
        r.weight_ih_l1.copy_(torch.eye(n))
        r.weight_hh_l1.zero_()
    lengths = torch.randint(1, 40, (50,))
    lengths[0] = 40
    xs = pack_padded_sequence(torch.rand(40, 50, n, dtype=torch.float64) + 1.0, lengths, enforce_sorted=False)
    torch.manual_seed(3)
    out = r(xs)[0].data
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) < 0.02, dropped
    kept = out[out != 0]
    torch.testing.assert_close(kept, xs.data[out != 0] / (1 - p), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- cells
CELL_CASES = [(kind, unbatched, hx) for kind in CELL_KINDS for unbatched in (False, True) for hx in (False, True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,unbatched,hx", CELL_CASES,
                         ids=[f"{k}-{'unbatched' if u else 'batched'}-{'hx' if h else 'nohx'}" for k, u, h in CELL_CASES])
def test_cell_matches_torch(kind, unbatched, hx, backend, dtype):
    m = torch_module(kind, dtype=dtype, input_size=I, hidden_size=H)
    t = twin(m, backend, "load_state_dict" if hx else "from_torch")
    x, h = cell_inputs(m, hx=hx, unbatched=unbatched)
    check_twin(m, t, x, h)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_no_bias(kind, backend, dtype):
    m = torch_module(kind, dtype=dtype, input_size=I, hidden_size=H, bias=False)
    t = twin(m, backend)
    x, h = cell_inputs(m, B=7, hx=True)
    check_twin(m, t, x, h)


@pytest.mark.parametrize("c_dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_lstm_cell_promotes_a_cell_state_of_another_dtype(c_dtype, unbatched):
    """torch.nn's LSTMCell type-promotes a cell state in another dtype than its float32 weights (h' and c' in
    the promoted dtype, float64 or float32 here), and so does ours, on the reference backend; a compiled
    backend named explicitly says that it cannot."""
    m = torch_module("LSTMCell", input_size=I, hidden_size=H)
    x, (h, c) = cell_inputs(m, hx=True, unbatched=unbatched)
    hx = (h, c.to(c_dtype))
    ours, _ = run(twin(m), x, hx)
    theirs, _ = run(m, x, hx)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype, name
        torch.testing.assert_close(ours[name], value, atol=1e-6, rtol=1e-6, msg=lambda text: f"{name}: {text}")
    with pytest.raises(RuntimeError, match="type-promotes"):
        twin(m, "cpu")(x, hx)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_with_parametrized_and_pruned_weights(kind):
    """Weights that torch.nn.utils.parametrize and prune move out of _parameters are read as torch.nn reads
    them (computed on access), gradients reaching the underlying parameters."""
    m = torch_module(kind, input_size=I, hidden_size=H)
    t = twin(m, "cpu")
    for module in (m, t):
        parametrizations.weight_norm(module, "weight_hh")
        prune.l1_unstructured(module, "weight_ih", amount=0.3)
    x, hx = cell_inputs(m, B=3, hx=True)
    # check_twin's float64 copy cannot be made: a pruned module's weight is not a leaf, and deepcopy refuses.
    ours, _ = run(t, x, hx)
    theirs, _ = run(m, x, hx)
    assert set(ours) == set(theirs) and "grad_parametrizations.weight_hh.original0" in ours
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("T", [1, 5], ids=["one_step", "sequence"])
@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_rnn_with_parametrized_and_pruned_weights(kind, T):
    """The sequence modules read weights that parametrize and prune move out of _parameters as torch.nn
    does, at one step (generation's path) and over a sequence."""
    m = torch_module(kind, input_size=I, hidden_size=H, num_layers=2)
    t = twin(m, "cpu")
    for module in (m, t):
        parametrizations.weight_norm(module, "weight_hh_l0")
        prune.l1_unstructured(module, "weight_ih_l1", amount=0.3)
    x, hx = rnn_inputs(m, T=T, B=3, hx=True)
    ours, _ = run(t, x, hx)
    theirs, _ = run(m, x, hx)
    assert set(ours) == set(theirs) and "grad_parametrizations.weight_hh_l0.original0" in ours
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_rnn_subclass_checks_are_called(kind):
    """A subclass's own check_forward_args runs on every call, as torch.nn calls it, also where the shapes
    are the ones torch.nn's checks accept (which rnnkernels otherwise tests in one comparison)."""
    reference = torch_module(kind, input_size=I, hidden_size=H)
    base = type(twin(reference))
    calls = []

    class Checked(base):
        def check_forward_args(self, input, hidden, batch_sizes):
            calls.append(input.shape)
            super().check_forward_args(input, hidden, batch_sizes)

    m = Checked.from_torch(reference)
    x, hx = rnn_inputs(reference, T=1, B=3, hx=True)
    m(x, hx)
    m(x)
    assert calls == [x.shape, x.shape]


@pytest.mark.parametrize("packed", [None, "unsorted"], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_rnn_under_functional_call_with_other_weights(kind, packed):
    """torch.func.functional_call with float64 weights on a float32 module: torch.nn refreshes its flat
    weights and accepts float64 input, and so does the twin (packed input always takes torch.nn's checks)."""
    m = torch_module(kind, input_size=I, hidden_size=H)
    t = twin(m, "cpu")
    weights = {name: p.detach().double() for name, p in m.named_parameters()}
    x, hx = rnn_inputs(m, T=4, B=3, hx=True, packed=packed)
    x, hx = x.double(), tuple(h.double() for h in hx) if isinstance(hx, tuple) else hx.double()
    theirs = torch.func.functional_call(m, weights, (x, hx))
    ours = torch.func.functional_call(t, weights, (x, hx))
    if packed:
        theirs, ours = (theirs[0].data, theirs[1]), (ours[0].data, ours[1])
    torch.testing.assert_close(ours, theirs)


# -------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,case", [("LSTM", "proj_packed_unsorted_hx_bidir"), ("GRU", "two_layers_bidirectional_hx"),
                                       ("RNN_relu", "unbatched_hx_batch_first_bidir_two_layers")])
def test_rnn_on_device(kind, case, device, backend):
    m, t, x, hx = build_case(kind, case, torch.float32, backend, device=device)
    assert next(t.parameters()).device.type == device
    ours = check_twin(m, t, x, hx)
    assert ours["output"].device.type == device


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_on_device(kind, device, backend):
    m = torch_module(kind, dtype=torch.float32, device=device, input_size=I, hidden_size=H)
    t = twin(m, backend)
    x, h = cell_inputs(m, hx=True)
    check_twin(m, t, x, h)


# --------------------------------------------------------------------------------- fresh final states
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_final_states_are_fresh_tensors(kind, backend):
    """h_n / c_n can be detached in place (truncated BPTT) and do not share memory with the output."""
    m = torch_module(kind, dtype=torch.float32, input_size=I, hidden_size=H)  # 1 layer, 1 direction: h_n == output[-1]
    t = twin(m, backend)
    x = torch.randn(5, 3, I, requires_grad=True)
    output, state = t(x)
    states = state if isinstance(state, tuple) else (state,)
    saved = output.detach().clone()
    torch.testing.assert_close(states[0][0], output[-1])
    for s in states:
        assert s._base is None, "final state is a view"
        s.detach_()
        assert not s.requires_grad and s.grad_fn is None
        s.zero_()
    assert torch.equal(output.detach(), saved), "writing h_n changed the output"
    assert output.requires_grad
    output.sum().backward()  # the graph is intact after detaching the states
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_states_are_fresh_tensors(kind, backend):
    m = torch_module(kind, dtype=torch.float32, input_size=I, hidden_size=H)
    t = twin(m, backend)
    x = torch.randn(3, I)
    h0 = torch.randn(3, H)
    hx = (h0, torch.randn(3, H)) if kind == "LSTMCell" else h0
    saved = h0.clone()
    out = t(x, hx)
    states = out if isinstance(out, tuple) else (out,)
    for s in states:
        s.detach_()
        s.zero_()
    assert torch.equal(h0, saved), "the new state aliases the given one"


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_unbatched_states_detach_like_torch(kind):
    """Unbatched final states: rnnkernels behaves as torch.nn when detaching in place."""
    m = torch_module(kind, input_size=I, hidden_size=H)
    t = twin(m, "cpu")
    x = torch.randn(5, I, requires_grad=True)
    outcomes = []
    for module in (m, t):
        _, state = module(x)
        s = state[0] if isinstance(state, tuple) else state
        try:
            s.detach_()
            outcomes.append("ok")
        except RuntimeError:
            outcomes.append("RuntimeError")
    assert outcomes[0] == outcomes[1]


def test_cpu_backend_has_no_reference_fallback_inside_module(monkeypatch):
    """backend="cpu" really runs the compiled ops: the reference recurrence is not called."""
    import dataclasses

    from rnnkernels import backends

    m = torch_module("GRU", input_size=I, hidden_size=H)
    t = twin(m, "cpu")
    calls = []
    reference_backend = backends._BY_NAME["reference"]

    def spy(*args, **kwargs):
        calls.append(1)
        return reference_backend.recurrence(*args, **kwargs)

    monkeypatch.setitem(backends._BY_NAME, "reference", dataclasses.replace(reference_backend, recurrence=spy))
    t(torch.randn(3, 2, I))
    assert calls == []
    with rnnkernels.use_backend("reference"):
        t(torch.randn(3, 2, I))
    assert calls == [1]


def test_run_helper_catches_a_wrong_result():
    """The rule can fail: a module whose output is perturbed by 1e-6 relative fails in float64."""
    m = torch_module("GRU", dtype=torch.float64, input_size=I, hidden_size=H)
    t = twin(m, "cpu")
    with torch.no_grad():
        t.weight_hh_l0.mul_(1 + 1e-6)
    x, hx = rnn_inputs(m, hx=True)
    with pytest.raises(AssertionError, match="exceeds"):
        check_twin(m, t, x, hx)
    ours, _ = run(t, x, hx)
    assert set(ours) >= {"output", "h_n", "grad_input", "grad_h0", "grad_weight_hh_l0", "grad_bias_ih_l0"}


@pytest.mark.parametrize("kind,case", [("LSTM", "proj_two_layers_bidir_hx"), ("GRU", "packed_unsorted_hx_bidir_two_layers"),
                                       ("RNN_tanh", "batch_first_two_layers_hx")])
def test_float32_without_onednn(kind, case):
    """With oneDNN disabled the CPU kernels take their at::addmm path for float32."""
    with torch.backends.mkldnn.flags(enabled=False):
        m, t, x, hx = build_case(kind, case, torch.float32, "cpu")
        check_twin(m, t, x, hx)
