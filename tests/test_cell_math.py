"""The gate math of csrc/cell_math.h (the fast branch-free float exp/tanh included) against the reference
recurrence: float32 (and bfloat16) results of the compiled cpu operators against float64, under the
correctness rule, with pre-activations from small to saturating (gx scaled by up to 50)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import assert_results, operator_results
from rnnkernels import backends, ops, reference

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")

F32_EPS = 2.0**-24  # half an ulp of 1.0


def special_points() -> torch.Tensor:
    grid = torch.linspace(-100, 100, 200001)
    edges = torch.tensor([0.0, 1e-30, -1e-20, 1e-7, 0.625, -0.625, 0.6249999, 0.6250001, 9.0, -9.0, 15.9, -15.9,
                          43.6, 87.3, -87.3, 88.3, -88.3, 88.72, -88.72, 89.0, -104.0, 1e4, -1e4, 3e38, -3e38])
    return torch.cat([grid, edges, edges.nextafter(torch.tensor(float("inf")))]).float()


@pytest.mark.parametrize("hidden", [1, 19], ids=["one-unit", "vector-and-tail"])
def test_sigmoid_and_tanh_within_two_ulps(hidden):
    """One LSTM step with w_hh = 0, c0 = 0 stores sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) of the raw
    pre-activations in its workspace; the rnn_tanh output is tanh of them. All within 2 float ulps. The
    points lie along rows of `hidden` units: 19 takes the kernels through a whole vector of 16 units and
    a masked tail of 3 (csrc/cpu/float_lanes.h)."""
    points = special_points()
    rows = -(-points.numel() // hidden)
    x = torch.cat([points, points[: rows * hidden - points.numel()]])
    n = x.numel()
    gx = x.view(1, rows, hidden, 1).expand(1, rows, hidden, 4).transpose(2, 3).reshape(1, rows, 4 * hidden)
    zeros = torch.zeros(rows, hidden)
    _, _, _, ws = ops.forward_op("lstm")(gx.contiguous(), zeros, zeros, torch.zeros(4 * hidden, hidden), None, None, None, False)
    gates = ws.view(rows, 5, hidden).transpose(0, 1).reshape(5, n)
    rnn = [ops.forward_op(cell)(x.view(1, rows, hidden), zeros, None, torch.zeros(hidden, hidden), None, None, None, False)[0].reshape(n)
           for cell in ("rnn_tanh", "rnn_relu")]
    exact = {"sigmoid": torch.sigmoid(x.double()), "tanh": torch.tanh(x.double())}
    for name, got in [("sigmoid", gates[0]), ("sigmoid", gates[1]), ("tanh", gates[2]), ("sigmoid", gates[3]),
                      ("tanh", rnn[0])]:
        err = (got.double() - exact[name]).abs()
        assert err.max().item() <= 2 * F32_EPS, (name, err.max().item(), x[err.argmax()].item())
        big = exact[name].abs() > 1e-30
        rel = (err[big] / exact[name][big].abs()).max().item()
        assert rel <= 4 * F32_EPS, (name, rel)
        assert bool(((got >= -1) & (got <= 1)).all()), name
    assert torch.equal(rnn[1], x.clamp_min(0))
    # saturation is exact where float rounds to it
    assert gates[0, x > 20].eq(1).all() and gates[0, x < -90].lt(1e-38).all()
    assert gates[2, x > 10].eq(1).all() and gates[2, x < -10].eq(-1).all()


CASES = [("lstm", False), ("lstm", True), ("gru", False), ("rnn_tanh", False), ("rnn_relu", False)]


def make_args(cell, projected, scale, T, B, H, P, lengths, reverse, seed):
    g = torch.Generator().manual_seed(seed)
    G = reference.GATES[cell]
    P = P if projected else H

    def rand(*shape, s=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=g) * s

    return [rand(T, B, G * H, s=scale), rand(B, P), rand(B, H) if cell == "lstm" else None,
            rand(G * H, P, s=1.0 / P**0.5), rand(G * H), rand(P, H, s=1.0 / H**0.5) if projected else None,
            None if lengths is None else torch.tensor(lengths), reverse]


def away_from_relu_kinks(cell, args, dtype):
    """args with every relu pre-activation of the float64 recurrence moved out of the band around 0 that
    rounding to a 16-bit dtype can cross: there the gradient is a coin toss for any kernel whose rounding
    differs from the reference's (the cpu kernels sum a step's product in float32 and round it nowhere,
    torch.nn rounds it), and a flip at one unit spreads through all earlier steps' gradients. Step by step,
    since a step's pre-activations depend on the states before it."""
    if cell != "rnn_relu" or dtype not in (torch.bfloat16, torch.float16):
        return args
    gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse = args
    gx = gx.clone()
    T, B = gx.shape[:2]
    length = lengths if lengths is not None else torch.full((B,), T)
    for step in range(T):
        t = T - 1 - step if reverse else step
        output = reference.recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse)[0]
        first = (length - 1 == t) if reverse else torch.full((B,), t == 0)
        neighbour = min(max(t + 1 if reverse else t - 1, 0), T - 1)
        h_prev = torch.where(first[:, None], h0, output[neighbour])
        pre = gx[t] + h_prev @ w_hh.T + b_hh
        band = 4 * torch.finfo(dtype).eps * (gx[t].abs() + h_prev.abs() @ w_hh.abs().T + b_hh.abs())
        near = (pre.abs() < band) & (t < length)[:, None]
        gx[t] = torch.where(near, gx[t] - pre + torch.where(pre < 0, -2.0, 2.0) * band, gx[t])
    return [gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse]


def run_op(fn, cell, args, dtype):
    """Forward and backward of a fixed functional of (output, h_n, c_n); inputs cast to dtype first."""
    inputs = [a.to(dtype).requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    output, h_n, c_n = fn(cell, *inputs)
    outs = {"output": output, "h_n": h_n, "c_n": c_n if cell == "lstm" else None}
    g = torch.Generator().manual_seed(123)
    loss = sum((v.double() * torch.randn(v.shape, dtype=torch.float64, generator=g)).sum() for v in outs.values() if v is not None)
    names = ["gx", "h0", "c0", "w_hh", "b_hh", "w_hr"]
    wrt = [(n, a) for n, a in zip(names, inputs) if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(loss, [a for _, a in wrt])
    outs.update({f"grad_{n}": gr for (n, _), gr in zip(wrt, grads)})
    return {k: (v.detach() if v is not None else None) for k, v in outs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scale", [0.5, 3.0, 50.0])
@pytest.mark.parametrize("cell,projected", CASES, ids=["lstm", "lstm_w_hr", "gru", "rnn_tanh", "rnn_relu"])
def test_compiled_ops_vs_reference(cell, projected, scale, dtype):
    """Random recurrences, gx scaled by `scale` (50: deep in the saturated regions), lengths and reverse."""
    for seed, (lengths, reverse) in enumerate([(None, False), ([7, 3, 0, 7, 5], True), ([1, 7, 6, 2, 7], False)]):
        args = make_args(cell, projected, scale, T=7, B=5, H=19, P=6, lengths=lengths, reverse=reverse, seed=seed)
        args = away_from_relu_kinks(cell, args, dtype)
        ours = run_op(ops.recurrence, cell, args, dtype)
        baseline = run_op(reference.recurrence, cell, args, dtype)
        exact = run_op(reference.recurrence, cell, args, torch.float64)
        assert_results(ours, baseline, exact, dtype)


def onednn_takes(dtype: torch.dtype) -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 16)
    except (AttributeError, RuntimeError):  # a torch without oneDNN's operators, or a CPU without the dtype
        return False
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


STEP_PRODUCTS = {"mkldnn::_linear_pointwise", "aten::addmm", "aten::mm"}


def on_panels(projected: bool) -> bool:
    """Whether a 16-bit recurrence's per-step products run on the panel kernels (bfloat16 on AMX or
    AVX512-BF16, csrc/cpu/bfloat16_panels.h; else, and float16, on the float32 ones, its rows widened), not
    on per-step GEMMs."""
    return ops.CPU_BFLOAT16_PANELS is not None and not projected


SIXTEEN_BITS = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]
NO_PANELS = "no panel kernels in this build (neither AVX-512, AVX2 with FMA nor NEON)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell,projected", CASES, ids=["lstm", "lstm_w_hr", "gru", "rnn_tanh", "rnn_relu"])
def test_reduced_precision_ops_vs_reference_at_size(cell, projected, dtype):
    """16-bit recurrences large enough for the paths small ones skip: the per-step products on the panels
    where this build has them, else through oneDNN where this CPU's oneDNN takes the dtype (32 rows x 192
    units: over a million multiply-adds), and weight gradients over more than 256 rows
    (12 x 32), which float32 sums in slices and 16 bits do not."""
    args = away_from_relu_kinks(cell, make_args(cell, projected, 3.0, T=12, B=32, H=192, P=48, lengths=None,
                                                reverse=False, seed=11), dtype)
    with torch.profiler.profile() as profile:
        ours = run_op(ops.recurrence, cell, args, dtype)
    if not on_panels(projected) and onednn_takes(dtype):
        assert "mkldnn::_linear_pointwise" in {event.name for event in profile.events()}
    baseline = run_op(reference.recurrence, cell, args, dtype)
    exact = run_op(reference.recurrence, cell, args, torch.float64)
    assert_results(ours, baseline, exact, dtype)


@pytest.mark.skipif(ops.CPU_BFLOAT16_PANELS is None, reason=NO_PANELS)
@pytest.mark.parametrize("dtype", SIXTEEN_BITS)
@pytest.mark.parametrize("scale", [0.5, 3.0, 50.0])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_16_bit_recurrences_on_panels(cell, scale, dtype):
    """16-bit recurrences on the panels at their edges: 38 units (on AMX a last step of 6 inputs past whole
    steps of 32; a last block of 6 units, of 16 with AVX-512, of 8 with AVX2, whose 16-bit rows convert
    through a register's image in memory), 21 rows (two AMX tiles of 10 and 11, or register tiles), 5 rows with lengths forward (finished sequences)
    and reversed (sequences that start late, at even and odd steps: their widened states carry over in two
    buffers), and an empty batch. The forward leaves no product to
    torch."""
    cases = [(21, None, False), (5, [7, 4, 0, 6, 5], True), (5, [1, 7, 6, 2, 7], False), (0, None, False)]
    for seed, (B, lengths, reverse) in enumerate(cases):
        args = away_from_relu_kinks(cell, make_args(cell, False, scale, T=7, B=B, H=38, P=38, lengths=lengths,
                                                    reverse=reverse, seed=seed), dtype)
        with torch.profiler.profile() as profile:
            ops.recurrence(cell, *[a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                   for a in args])
        assert not STEP_PRODUCTS & {event.name for event in profile.events()}
        ours = run_op(ops.recurrence, cell, args, dtype)
        baseline = run_op(reference.recurrence, cell, args, dtype)
        exact = run_op(reference.recurrence, cell, args, torch.float64)
        assert_results(ours, baseline, exact, dtype)


@pytest.mark.skipif(ops.CPU_BFLOAT16_PANELS is None, reason=NO_PANELS)
@pytest.mark.parametrize("dtype", SIXTEEN_BITS)
@pytest.mark.parametrize("scale", [0.5, 3.0, 50.0])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_16_bit_steps_of_small_batches_on_dots(cell, scale, dtype):
    """A 16-bit step of 1 to 4 sequences (generation) on the dot products (panels.h; bfloat16's own on
    AVX512-BF16), against the reference step: 37 and 70 inputs (a masked tail of 5 or 6 inputs after none
    or two whole loads of 32), 38 units (a last block of 6, its rows taken four, then two at a time) and 19,
    biases or none; outputs and every gradient (through the workspace the step keeps). The forward leaves
    no product to torch."""
    op = getattr(torch.ops.rnnkernels, f"{cell}_step")
    G, outputs = reference.GATES[cell], 2 if cell == "lstm" else 1
    for seed, (B, I, H, bias) in enumerate([(1, 37, 38, True), (2, 70, 19, False), (3, 37, 19, True),
                                            (4, 70, 38, True), (4, 37, 38, False)]):
        g = torch.Generator().manual_seed(seed)

        def rand(*shape, s=1.0):
            return torch.randn(*shape, dtype=torch.float64, generator=g) * s

        args = [rand(B, I, s=scale), rand(B, H), rand(B, H) if cell == "lstm" else None, rand(G * H, I, s=I**-0.5),
                rand(G * H, H, s=H**-0.5), rand(G * H) if bias else None, rand(G * H) if bias else None, None]
        with torch.no_grad(), torch.profiler.profile() as profile:
            op(*[a.to(dtype) if a is not None else None for a in args])
        assert not STEP_PRODUCTS & {event.name for event in profile.events()}
        names = ["h_next", "c_next"][:outputs]
        cotangents: list = []

        def results(step, in_dtype):
            values = operator_results(lambda *a: step(*a)[:outputs], args, outputs, "cpu", in_dtype, cotangents)
            return dict(zip(names + [f"grad_{i}" for i in range(len(values) - outputs)], values))

        def reference_step(*a):
            return backends.select("reference", a[0].device, a[0].dtype).step(cell, *a)

        ours = results(op, dtype)
        baseline, exact = results(reference_step, dtype), results(reference_step, torch.float64)
        assert_results(ours, baseline, exact, dtype)


BFLOAT16_PANELS = ["float32", "avx512_bf16", "amx"]  # least to most (csrc/cpu/bfloat16_panels.h)


@pytest.mark.parametrize("kind", ["float32", "avx512_bf16"])
def test_bfloat16_recurrences_on_lesser_panels(kind):
    """A CPU with AMX also has AVX512-BF16, the bfloat16 panels of AMD's CPUs, and every one has the float32
    panels that AVX2 laptops run bfloat16 on: with RNNKERNELS_CPU_BFLOAT16 set to either, the bfloat16
    recurrence tests run again on it (not the generation steps', whose dot products the setting leaves)."""
    here = ops.CPU_BFLOAT16_PANELS
    if here not in BFLOAT16_PANELS or BFLOAT16_PANELS.index(here) <= BFLOAT16_PANELS.index(kind):
        pytest.skip(f"{kind} runs here anyway, or is not built" if here else NO_PANELS)
    env = {**os.environ, "RNNKERNELS_CPU_BFLOAT16": kind}
    ran = subprocess.run([sys.executable, "-c", "import rnnkernels.ops as o; print(o.CPU_BFLOAT16_PANELS)"],
                         env=env, capture_output=True, text=True)
    assert ran.stdout.strip() == kind, ran.stdout + ran.stderr
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                            "bf16 and (on_panels or at_size)"], env=env, capture_output=True, text=True)
    passed = re.search(r"(\d+) passed", tests.stdout)
    assert tests.returncode == 0 and passed and int(passed.group(1)) >= 17, tests.stdout[-3000:]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_float64_ops_match_reference_tightly(cell):
    args = make_args(cell, False, 50.0, T=6, B=4, H=9, P=3, lengths=[6, 2, 0, 5], reverse=True, seed=3)
    ours = run_op(ops.recurrence, cell, args, torch.float64)
    exact = run_op(reference.recurrence, cell, args, torch.float64)
    assert_results(ours, exact, exact, torch.float64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_non_finite_pre_activations_like_torch(cell):
    """+-inf saturate as torch's sigmoid/tanh do, NaN propagates to the same places (float32)."""
    args = make_args(cell, False, 1.0, T=3, B=4, H=5, P=5, lengths=None, reverse=False, seed=9)
    gx = args[0].float()
    gx[0, 0, :] = float("inf")
    gx[1, 1, :] = -float("inf")
    gx[0, 2, 0] = float("nan")
    gx[2, 3, 1] = 1e30
    gx[2, 3, 2] = -1e30
    args = [gx] + [a.float() if isinstance(a, torch.Tensor) else a for a in args[1:]]
    ours = ops.recurrence(cell, *args)
    theirs = reference.recurrence(cell, *args)
    for a, b in zip(ours, theirs):
        if b is None:
            continue
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("kind", ["RNN", "RNNCell"])
def test_relu_rnn_propagates_nan_like_torch(kind):
    """Minimal module-level reproduction: a NaN in the input must give NaN outputs, as in torch.nn."""
    import rnnkernels

    torch.manual_seed(0)
    m = getattr(torch.nn, kind)(2, 3, nonlinearity="relu")
    t = getattr(rnnkernels, kind).from_torch(m, backend="cpu")
    x = torch.zeros(2, 1, 2) if kind == "RNN" else torch.zeros(1, 2)
    x.view(-1)[0] = float("nan")
    theirs = m(x)[0] if kind == "RNN" else m(x)
    ours = t(x)[0] if kind == "RNN" else t(x)
    assert theirs.isnan().all()
    assert torch.equal(ours.isnan(), theirs.isnan())
