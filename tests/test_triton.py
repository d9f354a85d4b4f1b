"""The triton backend: every module option against torch.nn with the same weights (outputs, final states and
all gradients, by the rule of tests/helpers.py), on both paths of rnnkernels/triton/launch.py; the
operators against the compiled ones; the host-side checks; torch.compile.

Where they run: on the CPU in Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before
pytest starts (Triton reads it when rnnkernels.triton defines its kernels); without it, and without a GPU,
every test here is skipped with the reason. On a GPU (TRITON_INTERPRET unset) the same tests run on CUDA
tensors at larger sizes, marked cuda.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import rnnkernels
import triton_threads
from helpers import (CELL_KINDS, RNN_KINDS, assert_graph_replays_match_eager, assert_packed_input_refuses_capture,
                     assert_rule, cell_inputs, check_twin, operator_results, rnn_inputs, torch_module, twin)
from rnnkernels import backends, ops, reference
from test_modules import BF16_CASES, LSTM_CASES, RNN_CASES

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
WHY_NOT = backends.unsupported("triton", torch.device(DEVICE), torch.float32)
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=f"the triton backend cannot run here: {WHY_NOT}")]
if DEVICE == "cuda":
    pytestmark.append(pytest.mark.cuda)

# The interpreter is slow: small shapes there. H=96 on the GPU spans two column tiles, B=40 three batch tiles.
SIZES = {"cpu": dict(I=5, H=6, T=5, B=4), "cuda": dict(I=32, H=96, T=20, B=40)}[DEVICE]
PATHS = ("persistent", "per_step")
ALL_CASES = [(kind, case) for kind in RNN_KINDS for case in RNN_CASES] + [("LSTM", case) for case in LSTM_CASES]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Forces one path of the Triton launchers (launch.choose_path) for the test."""
    from rnnkernels import triton as rk_triton

    monkeypatch.setenv(rk_triton.PATH_ENV, request.param)
    return request.param


def build(kind, case, dtype, I=SIZES["I"], H=SIZES["H"], T=SIZES["T"], B=SIZES["B"]):
    module_kw, input_kw = {**RNN_CASES, **LSTM_CASES}[case]
    input_kw = dict(input_kw)
    m = torch_module(kind, dtype=dtype, device=DEVICE, input_size=I, hidden_size=H, **module_kw)
    m.train(input_kw.pop("train", False))
    x, hx = rnn_inputs(m, T, B, **input_kw)
    return m, twin(m, "triton"), x, hx


def torch_nn_context(case):
    # cuDNN draws dropout masks its own way; torch.nn's native path draws them as rnnkernels does.
    train = {**RNN_CASES, **LSTM_CASES}[case][1].get("train", False)
    return torch.backends.cudnn.flags(enabled=False) if train and DEVICE == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------- modules vs torch.nn
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=[f"{k}-{c}" for k, c in ALL_CASES])
def test_rnn_matches_torch(kind, case, path):
    m, t, x, hx = build(kind, case, torch.float32)
    with torch_nn_context(case):
        check_twin(m, t, x, hx, seed=1234)


# relu's gradient jumps at 0. In bfloat16 a pre-activation within rounding of 0 lands on either side by
# chance, and one that lands on the other side than in float64 costs a whole gradient element: the cpu
# backend, bit for bit torch.nn, shares torch.nn's chances; these kernels keep float32 states, round less
# and land elsewhere (in the relu case of test_modules, closer to float64 in value, on the other side of 0).
# relu in low precision is checked on the operators below instead, away from the kink.
BF16_MODULE_CASES = [(kind, case) for kind, case in BF16_CASES if kind != "RNN_relu"]


@pytest.mark.parametrize("kind,case", BF16_MODULE_CASES, ids=[f"{k}-{c}" for k, c in BF16_MODULE_CASES])
def test_rnn_matches_torch_bfloat16(kind, case, path):
    m, t, x, hx = build(kind, case, torch.bfloat16)
    with torch_nn_context(case):
        check_twin(m, t, x, hx, seed=99)


@pytest.mark.parametrize("kind", [kind for kind in RNN_KINDS if kind != "RNN_relu"])
def test_rnn_matches_torch_float16(kind, path):
    m, t, x, hx = build(kind, "two_layers_bidirectional_hx", torch.float16)
    check_twin(m, t, x, hx)


@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_rnn_several_tiles(kind, path):
    """More hidden units than one column tile (16) and than one step of K (32), more rows than one batch
    tile (64): on the GPU's persistent path two batch tiles, each with its own barrier among five programs."""
    module_kw = {"bidirectional": True, **({"proj_size": 13} if kind == "LSTM" else {})}
    m = torch_module(kind, dtype=torch.float32, device=DEVICE, input_size=7, hidden_size=70, **module_kw)
    x, hx = rnn_inputs(m, T=4, B=70, hx=True, packed="unsorted")
    check_twin(m, twin(m, "triton"), x, hx)


@pytest.fixture
def fused_steps(monkeypatch):
    """The cells of the fused inference steps (launch.step) the test runs, in order."""
    from rnnkernels.triton import launch

    cells, step = [], launch.step

    def counted(cell, *args):
        cells.append(cell)
        return step(cell, *args)

    monkeypatch.setattr(launch, "step", counted)
    return cells


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_matches_torch(kind, unbatched, fused_steps):
    """With autograd, a step runs as the input projection and a one-step recurrence through the operators."""
    m = torch_module(kind, dtype=torch.float32, device=DEVICE, input_size=SIZES["I"], hidden_size=SIZES["H"])
    x, h = cell_inputs(m, hx=True, unbatched=unbatched)
    check_twin(m, twin(m, "triton"), x, h)
    assert fused_steps == []


# The fused step's tiles: on both devices more than one column tile (16 units), batch tile (64) and K step
# (64) in both matmuls; I != H.
STEP_SIZES = dict(input_size=80, hidden_size=70, B=70)
STEP_CASES = {"hx": ({}, dict(hx=True)), "no_bias_hx": ({"bias": False}, dict(hx=True)),
              "no_hx_unbatched": ({}, dict(unbatched=True))}


def step_module(kind, dtype=torch.float32, **module_kw):
    return torch_module(kind, dtype=dtype, device=DEVICE, input_size=STEP_SIZES["input_size"],
                        hidden_size=STEP_SIZES["hidden_size"], **module_kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", list(STEP_CASES))
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_inference_runs_the_fused_step(kind, case, dtype, fused_steps):
    """Without autograd (generation), a step is one launch of step_kernel, both matmuls fused."""
    module_kw, input_kw = STEP_CASES[case]
    m = step_module(kind, dtype, **module_kw)
    x, h = cell_inputs(m, B=STEP_SIZES["B"], **input_kw)
    check_twin(m, twin(m, "triton"), x, h, backward=False)
    assert fused_steps == [kind.replace("Cell", "").lower()]


SINGLE_STEP_CASES = [("LSTM", "two_layers_bidirectional_hx"), ("GRU", "basic"), ("RNN_relu", "unbatched"),
                     ("LSTM", "proj_two_layers_bidir_hx")]


@pytest.mark.parametrize("kind,case", SINGLE_STEP_CASES, ids=[f"{k}-{c}" for k, c in SINGLE_STEP_CASES])
def test_rnn_single_step_inference(kind, case, fused_steps):
    """A sequence module at T = 1 without autograd: each layer and direction a fused step, but for the
    projected LSTM, which has no fused step here and runs through the operators."""
    m, t, x, hx = build(kind, case, torch.float32, T=1)
    check_twin(m, t, x, hx, backward=False)
    steps = m.num_layers * (2 if m.bidirectional else 1)
    assert fused_steps == ([] if m.proj_size else [kind.lower()] * steps)


def test_inference_steps_that_something_intercepts_run_the_operators(fused_steps):
    """The fused step launches without an operator, so it declines wherever an operator would be seen:
    under torch.compile (whose graph then holds the operators), a dispatch mode, fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Operators(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    torch._dynamo.reset()
    m = step_module("GRUCell")
    x, h = cell_inputs(m, B=3, hx=True)
    ours = twin(m, "triton")
    with torch.no_grad():
        expected = ours(x, h)
        assert fused_steps == ["gru"]
        compiled = torch.compile(twin(m, "triton"), fullgraph=True, backend="eager")(x, h)
        torch.testing.assert_close(compiled, expected, atol=1e-6, rtol=1e-6)
        with Operators() as seen:
            torch.testing.assert_close(ours(x, h), expected, atol=1e-6, rtol=1e-6)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = ours(torch.empty_like(x), torch.empty_like(h))
    assert fused_steps == ["gru"]
    assert "rnnkernels::triton_gru_forward" in seen.names
    assert fake.shape == expected.shape and type(fake) is not torch.Tensor


def test_step_host_checks_say_what_is_wrong():
    from rnnkernels.triton import launch

    m = step_module("LSTMCell")
    x, (h, c) = cell_inputs(m, B=3, hx=True)
    weights = (m.weight_ih.detach(), m.weight_hh.detach(), m.bias_ih.detach(), m.bias_hh.detach())
    with pytest.raises(RuntimeError, match=r"a lstm step takes .* got .* c None"):
        launch.step("lstm", x, h, None, *weights)
    with pytest.raises(RuntimeError, match=r"a lstm step takes .* h \[3, 69\]"):
        launch.step("lstm", x, h[:, 1:], c, *weights)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        launch.step("lstm", x[0], h, c, *weights)
    with pytest.raises(RuntimeError, match="share the input's dtype"):
        launch.step("lstm", x, h.half(), c, *weights)
    with pytest.raises(RuntimeError, match="runs torch.float32"):
        launch.step("lstm", x.double(), h.double(), c.double(), *(w.double() for w in weights))
    h_next, c_next = launch.step("lstm", x[:0], h[:0], c[:0], *weights)
    assert h_next.shape == c_next.shape == (0, STEP_SIZES["hidden_size"])


def test_layers_run_the_triton_operators(monkeypatch):
    """backend="triton" runs rnnkernels::triton_* and nothing else for the recurrence."""
    from rnnkernels.triton import launch

    calls = []
    for name in ("forward", "backward"):
        original = getattr(launch, name)
        monkeypatch.setattr(launch, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    m = rnnkernels.GRU(3, 4, bidirectional=True, backend="triton").to(DEVICE)
    x = torch.randn(5, 2, 3, device=DEVICE, requires_grad=True)
    m(x)[0].sum().backward()
    assert calls == ["forward", "forward", "backward", "backward"]


# ------------------------------------------------------------------------------------------- operators
def op_args(cell, projected=False, T=4, B=3, H=5, P=2, lengths=None, reverse=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    G = reference.GATES[cell]
    P = P if projected else H

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    gx = rand(T, B, G * H)
    if cell == "rnn_relu":  # keep pre-activations away from relu's kink at 0 (see BF16_MODULE_CASES)
        gx += torch.sign(gx) * 4
    return [gx, rand(B, P), rand(B, H) if cell == "lstm" else None, rand(G * H, P) * 0.5,
            rand(G * H), rand(P, H) if projected else None,
            None if lengths is None else torch.tensor(lengths, dtype=torch.int64), reverse]


OP_CELLS = [("lstm", False), ("lstm", True), ("gru", False), ("rnn_tanh", False), ("rnn_relu", False)]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=["lstm", "lstm_w_hr", "gru", "rnn_tanh", "rnn_relu"])
def test_operators_match_the_compiled_ones(cell, projected, reverse, path):
    """Same outputs, workspace layout and gradients as rnnkernels::{cell}_forward/_backward (the CPU
    kernels, float64 where they run), with a sequence of length 0 and one of full length."""
    if ops.LOAD_ERROR is not None:
        pytest.skip(f"compiled extension not loaded: {ops.LOAD_ERROR}")
    args = op_args(cell, projected, lengths=[2, 0, 4], reverse=reverse)
    ours = getattr(torch.ops.rnnkernels, f"triton_{cell}_forward")(*args)
    theirs = ops.forward_op(cell)(*[a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                    else a for a in args])
    for name, a, b in zip(("output", "h_n", "c_n", "workspace"), ours, theirs):
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-6, rtol=1e-5, msg=name)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(ours[0].shape, generator=g), torch.randn(ours[1].shape, generator=g),
             torch.randn(ours[2].shape, generator=g) if cell == "lstm" else None]
    gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse = args
    ours_back = getattr(torch.ops.rnnkernels, f"triton_{cell}_backward")(
        *[None if t is None else t.to(DEVICE) for t in grads], h0, c0, w_hh, w_hr, lengths, reverse, ours[0], ours[3])
    theirs_back = getattr(torch.ops.rnnkernels, f"{cell}_backward")(
        *[None if t is None else t.double() for t in grads], h0.cpu().double(),
        None if c0 is None else c0.cpu().double(), w_hh.cpu().double(), None if w_hr is None else w_hr.cpu().double(),
        lengths, reverse, ours[0].cpu().double(), ours[3].cpu().double())
    names = ("grad_gx", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh", "grad_w_hr")
    for name, a, b in zip(names, ours_back, theirs_back):
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=["lstm", "lstm_w_hr", "gru", "rnn_tanh", "rnn_relu"])
def test_operators_low_precision(cell, projected, dtype, path):
    """Outputs and gradients in bfloat16 and float16 against float64, by the rule of tests/helpers.py with
    the compiled CPU operators (torch.nn's rounding, step by step) in the place of torch.nn."""
    if ops.LOAD_ERROR is not None:
        pytest.skip(f"compiled extension not loaded: {ops.LOAD_ERROR}")
    args = op_args(cell, projected, T=5, B=4, H=6, lengths=[5, 2, 0, 4], reverse=True, dtype=dtype)
    outputs, cotangents = 3 if cell == "lstm" else 2, []
    exact = operator_results(ops.forward_op(cell), args, outputs, "cpu", torch.float64, cotangents)
    baseline = operator_results(ops.forward_op(cell), args, outputs, "cpu", dtype, cotangents)
    ours = operator_results(ops.forward_op(cell, "triton_"), args, outputs, DEVICE, dtype, cotangents)
    for i, (a, b, reference) in enumerate(zip(ours, baseline, exact, strict=True)):
        assert_rule(f"result {i}", a, b, reference, dtype)


def force_column_programs(monkeypatch, programs: int):
    """The persistent path with this many programs per batch tile, whatever the device holds."""
    from rnnkernels.triton import launch

    monkeypatch.delenv(launch.PATH_ENV, raising=False)
    monkeypatch.setattr(launch, "_column_programs", lambda *args: programs)


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter cannot run two programs that meet at a barrier")
@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_programs_that_own_several_column_tiles(kind, monkeypatch):
    """Fewer programs per batch tile than column tiles, as when the batch tiles fill the device: each
    program loops over several tiles of a phase between the barriers (three of the six of H = 96)."""
    force_column_programs(monkeypatch, 2)
    module_kw = {"proj_size": 40} if kind == "LSTM" else {}
    m = torch_module(kind, dtype=torch.float32, device=DEVICE, input_size=8, hidden_size=96, **module_kw)
    x, hx = rnn_inputs(m, T=6, B=20, hx=True, packed="unsorted")
    check_twin(m, twin(m, "triton"), x, hx)


@pytest.mark.skipif(DEVICE == "cuda", reason="on the GPU two programs are resident at once and meet")
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=["lstm", "lstm_w_hr", "gru", "rnn_tanh", "rnn_relu"])
def test_a_barrier_that_cannot_be_met_gives_up_with_nan(cell, projected, monkeypatch):
    """Programs that are not resident together (here: the interpreter, one after another) never meet: the
    first one's barrier gives up instead of hanging, its results from then on are NaN, and the NaN spreads
    through the recurrence to the last step's output and the final state, forward and backward alike."""
    args = op_args(cell, projected, H=40, P=20)
    gx, h0, c0, w_hh, _, w_hr, lengths, reverse = args
    forward = getattr(torch.ops.rnnkernels, f"triton_{cell}_forward")
    backward = getattr(torch.ops.rnnkernels, f"triton_{cell}_backward")
    output, h_n, c_n, workspace = forward(*args)
    grads = (torch.ones_like(output), torch.ones_like(h_n), torch.ones_like(c_n) if cell == "lstm" else None)
    grad_gx, grad_h0 = backward(*grads, h0, c0, w_hh, w_hr, lengths, reverse, output, workspace)[:2]
    assert not any(t.isnan().any() for t in (output, h_n, grad_gx, grad_h0))  # one program a tile: no NaN
    force_column_programs(monkeypatch, 2)
    stuck_output, stuck_h_n = forward(*args)[:2]
    assert stuck_output[-1].isnan().all() and stuck_h_n.isnan().all()
    stuck_grad_gx, stuck_grad_h0 = backward(*grads, h0, c0, w_hh, w_hr, lengths, reverse, output, workspace)[:2]
    # (relu's gradient is 0 wherever h <= 0, NaN or not)
    assert stuck_grad_gx[0].isnan().any() and stuck_grad_h0.isnan().all()


@pytest.mark.skipif(DEVICE == "cuda", reason="on the GPU the programs run at once anyway")
@pytest.mark.skipif(triton_threads.UNSUPPORTED is not None, reason=f"{triton_threads.UNSUPPORTED}")
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=["lstm", "lstm_w_hr", "gru", "rnn_tanh", "rnn_relu"])
def test_programs_that_meet_at_barriers(cell, projected, monkeypatch):
    """The persistent path as the GPU runs it: two batch tiles of three programs, each program in a thread
    of its own (tests/triton_threads.py) meeting the others at the barriers, with sequences of every length.
    Forward and backward give bit for bit what one program per tile gives. (Checked by hand: without any
    one of the barriers the cells that need it give results off by whole units.)"""
    from rnnkernels.triton import launch

    args = op_args(cell, projected, T=4, B=70, H=40, P=20, lengths=[4, 2, 0, 3] * 17 + [1, 4])
    gx, h0, c0, w_hh, _, w_hr, lengths, reverse = args
    forward = getattr(torch.ops.rnnkernels, f"triton_{cell}_forward")
    backward = getattr(torch.ops.rnnkernels, f"triton_{cell}_backward")
    g = torch.Generator().manual_seed(1)
    output, h_n, c_n, _ = forward(*args)
    grads = [torch.randn(t.shape, generator=g) for t in (output, h_n)] + [
        torch.randn(c_n.shape, generator=g) if cell == "lstm" else None]

    def results():
        output, h_n, c_n, workspace = forward(*args)
        return (output, h_n, c_n, workspace,
                *backward(*grads, h0, c0, w_hh, w_hr, lengths, reverse, output, workspace))

    one_program = results()
    force_column_programs(monkeypatch, 3)
    monkeypatch.setattr(launch, "MAX_POLLS", 1 << 20)
    with triton_threads.concurrent_programs() as launches:
        three_programs = results()
    assert launches == [6, 6]
    for a, b in zip(three_programs, one_program, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("T,B", [(0, 3), (3, 0)], ids=["no_steps", "no_sequences"])
def test_empty_sizes(T, B):
    args = op_args("lstm", T=T, B=B, lengths=None)
    output, h_n, c_n, workspace = torch.ops.rnnkernels.triton_lstm_forward(*args)
    assert output.shape == (T, B, 5) and workspace.shape == (T, B, 25)
    torch.testing.assert_close(h_n, args[1])
    torch.testing.assert_close(c_n, args[2])


def test_host_checks_say_what_is_wrong():
    args = op_args("gru")
    forward = torch.ops.rnnkernels.triton_gru_forward
    with pytest.raises(RuntimeError, match=r"h0 must have shape \[3, 5\]"):
        forward(args[0], args[1][:, :4], *args[2:])
    with pytest.raises(RuntimeError, match="lengths must lie in"):
        forward(*args[:6], torch.tensor([1, 9, 2]), False)
    with pytest.raises(RuntimeError, match="lengths must be a CPU int64 tensor"):
        forward(*args[:6], torch.tensor([1, 2, 2], dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="share the input's dtype"):
        forward(args[0], args[1].half(), *args[2:])
    with pytest.raises(RuntimeError, match="runs torch.float32"):
        forward(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    with pytest.raises(RuntimeError, match="w_hr .* belongs to the LSTM only"):
        forward(*args[:5], torch.randn(5, 5, device=DEVICE), None, False)


def test_backend_declines_what_it_cannot_run():
    assert "float64" in backends.unsupported("triton", torch.device(DEVICE), torch.float64)
    assert "CUDA tensors" in backends.unsupported("triton", torch.device("meta"), torch.float32)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this input"):
        rnnkernels.LSTM(3, 4, backend="triton").double().to(DEVICE)(torch.randn(2, 1, 3, dtype=torch.float64,
                                                                                  device=DEVICE))
    # "auto" on the CPU never picks the interpreter; on CUDA triton comes before the reference.
    assert "triton" not in backends.AUTO_ORDER["cpu"]
    assert backends.AUTO_ORDER["cuda"][-2:] == ("triton", "reference")


def test_path_rule(monkeypatch):
    from rnnkernels.triton import launch

    monkeypatch.delenv(launch.PATH_ENV, raising=False)
    assert launch.choose_path() == "persistent"
    monkeypatch.setenv(launch.PATH_ENV, "per_step")
    assert launch.choose_path() == "per_step"
    monkeypatch.setenv(launch.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="RNNKERNELS_TRITON_PATH"):
        launch.choose_path()


# --------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    m = torch_module("LSTM", dtype=torch.float32, device=DEVICE, input_size=4, hidden_size=6, num_layers=2,
                     proj_size=3)
    eager, compiled_module = twin(m, "triton"), twin(m, "triton")
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    x, hx = rnn_inputs(m, T=5, B=3, hx=True)
    results = []
    for module in (eager, compiled):
        xs = x.detach().clone().requires_grad_(True)
        out, (h, c) = module(xs, hx)
        (out.sum() + h.sum() + c.sum()).backward()
        results.append([out, h, c, xs.grad])
    for name, a, b in zip(("output", "h_n", "c_n", "grad_input"), *results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_kernels_compile_for_the_gpu():
    """Every kernel variant through Triton's compiler and ptxas for sm_90, which the interpreter skips
    (tests/triton_compile.py, in a process without TRITON_INTERPRET)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile.py")
    result = subprocess.run([sys.executable, script, "90"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")


@GPU_ONLY
@pytest.mark.parametrize("steps", [10, 1], ids=["sequence", "one-step"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_tanh"])
def test_cuda_graph_capture_matches_eager(kind, steps, path):
    """Both paths captured: the persistent one's barrier counters are zeroed inside the graph on replay."""
    assert_graph_replays_match_eager(kind, "triton", steps)


@GPU_ONLY
def test_packed_input_refuses_cuda_graph_capture():
    assert_packed_input_refuses_capture("triton")
