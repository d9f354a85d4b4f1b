"""The torch.library operators directly: gradcheck, opcheck, and argument checking."""

from __future__ import annotations

import itertools

import pytest
import torch

import rnnkernels

from rnnkernels import ops, reference

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason=f"compiled extension not loaded: {ops.LOAD_ERROR}")

# (cell, projected)
OP_CELLS = [("lstm", False), ("lstm", True), ("gru", False), ("rnn_tanh", False), ("rnn_relu", False)]
OP_IDS = ["lstm", "lstm_w_hr", "gru", "rnn_tanh", "rnn_relu"]


def op_args(cell, projected=False, T=3, B=3, H=2, P=1, lengths=None, reverse=False, bias=True,
            dtype=torch.float64, requires_grad=True, seed=0):
    """(gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse) for one layer and direction."""
    g = torch.Generator().manual_seed(seed)
    G = reference.GATES[cell]
    P = P if projected else H

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, dtype=torch.float64, generator=g) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    gx = rand(T, B, G * H)
    h0 = rand(B, P)
    c0 = rand(B, H) if cell == "lstm" else None
    w_hh = rand(G * H, P, scale=0.7)
    b_hh = rand(G * H) if bias else None
    w_hr = rand(P, H) if projected else None
    if cell == "rnn_relu":  # keep pre-activations away from the kink at 0, where finite differences are off
        with torch.no_grad():
            gx.add_(torch.sign(gx) * 0.3)
    lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    return [gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse]


def differentiable_outputs(cell):
    op = ops.forward_op(cell)

    def f(*args):
        output, h_n, c_n, _workspace = op(*args)
        return (output, h_n, c_n) if cell == "lstm" else (output, h_n)

    return f


LENGTHS = {None: None, "lengths": [3, 1, 2], "with_zero": [2, 0, 3]}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=["full", "lengths", "zero_length"])
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_gradcheck_forward_op(cell, projected, lengths, reverse):
    args = op_args(cell, projected, lengths=LENGTHS[lengths], reverse=reverse)
    assert torch.autograd.gradcheck(differentiable_outputs(cell), args, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_gradcheck_forward_op_no_bias_only_h_n(cell, projected):
    """Without b_hh; and only h_n used (the output's gradient arrives as None)."""
    args = op_args(cell, projected, bias=False, lengths=[3, 2, 3])
    op = ops.forward_op(cell)
    assert torch.autograd.gradcheck(lambda *a: op(*a)[1], args, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16_bit_linear_op_sums_in_float32_and_rounds_once(dtype):
    """Large enough that a CPU without 16-bit GEMM instructions widens the operands into cached buffers
    (over 2 MB), in each layout the weight gradients and input gradients pass: plain, transposed, both."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2100, 300, dtype=torch.float64, generator=g).to(dtype)
    w = torch.randn(1030, 300, dtype=torch.float64, generator=g).to(dtype)
    b = torch.randn(1030, dtype=torch.float64, generator=g).to(dtype)
    for xx, ww in [(x, w), (x.t().contiguous().t(), w), (x, w.t().contiguous().t()),
                   (x.t().contiguous().t(), w.t().contiguous().t())]:
        for bias in (b, None):
            exact = torch.nn.functional.linear(xx.double(), ww.double(), None if bias is None else bias.double())
            ours = torch.ops.rnnkernels.linear(xx, ww, bias)
            assert ours.dtype == dtype and ours.shape == exact.shape
            # float32 sums of exact products over 300 inputs, then one rounding to 16 bits
            rounding = torch.finfo(dtype).eps
            torch.testing.assert_close(ours.double(), exact, rtol=rounding, atol=1e-4 * exact.abs().max().item())

def test_gradcheck_linear_op():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.rnnkernels.linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: torch.ops.rnnkernels.linear(x, w, None), (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_linear_op_matches_f_linear(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 12, dtype=torch.float64, generator=g).to(dtype)
    w = torch.randn(9, 12, dtype=torch.float64, generator=g).to(dtype)
    b = torch.randn(9, dtype=torch.float64, generator=g).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for xx, ww in [(x, w), (x.t().contiguous().t(), w), (x, w.t().contiguous().t()), (x[:, ::2], w[:, ::2]),
                   (x[::2], w[::3])]:
        expected = torch.nn.functional.linear(xx.double(), ww.double(), b[: ww.shape[0]].double())
        torch.testing.assert_close(torch.ops.rnnkernels.linear(xx, ww, b[: ww.shape[0]]).double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [None, [2, 0, 3]], ids=["full", "lengths"])
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_forward_op_matches_reference(cell, projected, lengths, reverse):
    """Values (and zeros past each length) as the reference recurrence, float64."""
    args = op_args(cell, projected, lengths=lengths, reverse=reverse, requires_grad=False)
    output, h_n, c_n, workspace = ops.forward_op(cell)(*args)
    ref_output, ref_h, ref_c = reference.recurrence(cell, *args)
    torch.testing.assert_close(output, ref_output, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n, ref_h, atol=1e-12, rtol=0)
    if cell == "lstm":
        torch.testing.assert_close(c_n, ref_c, atol=1e-12, rtol=0)
    else:
        assert c_n.numel() == 0
    assert tuple(workspace.shape) == (3, 3, ops.workspace_width(cell, 2))
    if lengths is not None:
        for b, n in enumerate(lengths):
            if n < 3:  # past its length a sequence's output is zeros
                assert output[n:, b].abs().max().item() == 0


# ------------------------------------------------------------------------------------------- opcheck
OPCHECK_ARGS = {
    "full": dict(),
    "full_lengths_reverse": dict(lengths=[3, 3, 3], reverse=True),
    "no_bias": dict(bias=False),
    "float32_wider": dict(T=4, B=2, H=5, P=3, dtype=torch.float32),
}
# Lengths shorter than T: the forward leaves the workspace rows of the skipped (t, b) uninitialised (see
# test_workspace_is_deterministic_with_lengths), which opcheck's AOT comparison of all outputs flags.
PARTIAL_LENGTHS = {"lengths_reverse": dict(lengths=[3, 1, 2], reverse=True), "no_bias_lengths": dict(bias=False, lengths=[2, 0, 3])}
ALL_BUT_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("variant", list(OPCHECK_ARGS))
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_opcheck_forward(cell, projected, variant):
    args = op_args(cell, projected, **OPCHECK_ARGS[variant])
    torch.library.opcheck(ops.forward_op(cell), tuple(args))


@pytest.mark.parametrize("variant", list(PARTIAL_LENGTHS))
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_opcheck_forward_partial_lengths(cell, projected, variant):
    args = op_args(cell, projected, **PARTIAL_LENGTHS[variant])
    has_workspace = cell in ("lstm", "gru")
    torch.library.opcheck(ops.forward_op(cell), tuple(args), test_utils=ALL_BUT_AOT if has_workspace else "ALL")
    if has_workspace:  # the AOT check on the outputs that matter: output, h_n, c_n and their gradients
        f = torch.compile(differentiable_outputs(cell), backend="aot_eager", fullgraph=True, dynamic=True)
        ours = f(*args)
        eager = differentiable_outputs(cell)(*args)
        for a, b in zip(ours, eager):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        inputs = [a for a in args[:6] if a is not None]
        cot = [torch.ones_like(t) for t in ours]
        for a, b in zip(torch.autograd.grad(ours, inputs, cot), torch.autograd.grad(eager, inputs, cot)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_workspace_is_deterministic_with_lengths(cell):
    args = op_args(cell, lengths=[3, 1, 0], requires_grad=False, T=3, B=3, H=4)
    shape = (3, 3, ops.workspace_width(cell, 4))
    results = []
    for attempt in range(6):  # junk in the allocator's free block of that size, then the op
        junk = torch.full(shape, float(attempt) + 0.5, dtype=torch.float64)
        del junk
        results.append(ops.forward_op(cell)(*args)[3].clone())
    for other in results[1:]:
        assert torch.equal(results[0], other)


@pytest.mark.parametrize("variant", ["full", "lengths_reverse", "float32_wider"])
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_opcheck_backward(cell, projected, variant):
    args = op_args(cell, projected, requires_grad=False, **{**OPCHECK_ARGS, **PARTIAL_LENGTHS}[variant])
    gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse = args
    output, h_n, c_n, workspace = ops.forward_op(cell)(*args)
    g = torch.Generator().manual_seed(7)
    grad_output = torch.randn(output.shape, generator=g, dtype=torch.float64).to(output.dtype)
    grad_h_n = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(output.dtype)
    grad_c_n = torch.randn(c_n.shape, generator=g, dtype=torch.float64).to(output.dtype) if cell == "lstm" else None
    backward = getattr(torch.ops.rnnkernels, f"{cell}_backward")
    backward_args = (grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse, output, workspace)
    torch.library.opcheck(backward, backward_args)
    if cell == "lstm":  # grad_c_n may be None
        torch.library.opcheck(backward, (grad_output, grad_h_n, None) + backward_args[3:])


def test_opcheck_linear():
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.rnnkernels.linear, (x, w, torch.randn(3, requires_grad=True)))
    torch.library.opcheck(torch.ops.rnnkernels.linear, (x, w, None))


@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_backward_op_matches_autograd_of_reference(cell, projected):
    """The backward operator's six gradients against torch autograd through the reference recurrence."""
    args = op_args(cell, projected, lengths=[3, 1, 2], reverse=True, T=3, B=3, H=3, P=2)
    ours = differentiable_outputs(cell)(*args)
    ref = reference.recurrence(cell, *args)
    cot = [torch.randn_like(t) for t in ours]
    inputs = [a for a in args[:6] if a is not None]
    g_ours = torch.autograd.grad(ours, inputs, cot)
    g_ref = torch.autograd.grad([r for r in ref if r is not None], inputs, cot)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------- one-step op
def step_args(cell, projected=False, B=3, I=4, H=2, P=1, bias=True, dtype=torch.float64, requires_grad=True, seed=0):
    """(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr) of one time step."""
    gx, h0, c0, w_hh, b_hh, w_hr, _, _ = op_args(cell, projected, T=1, B=B, H=H, P=P, bias=bias, dtype=dtype,
                                                 requires_grad=requires_grad, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, I, dtype=torch.float64, generator=g).to(dtype).requires_grad_(requires_grad)
    w_ih = (torch.randn(w_hh.shape[0], I, dtype=torch.float64, generator=g) * 0.5).to(dtype).requires_grad_(requires_grad)
    b_ih = gx[0, 0].detach().clone().requires_grad_(requires_grad) if bias else None
    return [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]


def step_outputs(cell):
    op = getattr(torch.ops.rnnkernels, f"{cell}_step")

    def f(*args):
        h_next, c_next, _workspace = op(*args)
        return (h_next, c_next) if cell == "lstm" else h_next

    return f


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_gradcheck_step_op(cell, projected, bias):
    args = step_args(cell, projected, bias=bias)
    if cell == "rnn_relu":  # away from the kink at 0
        with torch.no_grad():
            args[0].mul_(3)
    assert torch.autograd.gradcheck(step_outputs(cell), args, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_step_op_matches_reference_and_sequence_workspace(cell, projected):
    """The fused step against the reference backend's step (projection, then the recurrence at T = 1), and
    its workspace against one step of the sequence operator's."""
    args = step_args(cell, projected, requires_grad=False)
    h_next, c_next, workspace = getattr(torch.ops.rnnkernels, f"{cell}_step")(*args)
    ref_h, ref_c = rnnkernels.backends.select("reference", args[0].device, args[0].dtype).step(cell, *args)
    torch.testing.assert_close(h_next, ref_h, atol=1e-12, rtol=0)
    if cell == "lstm":
        torch.testing.assert_close(c_next, ref_c, atol=1e-12, rtol=0)
    else:
        assert c_next.numel() == 0
    x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr = args
    gx = torch.nn.functional.linear(x, w_ih, b_ih).unsqueeze(0)
    sequence_workspace = ops.forward_op(cell)(gx, h, c, w_hh, b_hh, w_hr, None, False)[3]
    torch.testing.assert_close(workspace, sequence_workspace[0], atol=1e-12, rtol=0)
    skipped = getattr(torch.ops.rnnkernels, f"{cell}_step")(*args, keep_workspace=False)[2]
    assert tuple(skipped.shape) == (3, 0)


@pytest.mark.parametrize("variant", ["full", "no_bias", "float32_wider"])
@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_opcheck_step(cell, projected, variant):
    kwargs = {"full": {}, "no_bias": {"bias": False}, "float32_wider": dict(B=2, I=3, H=5, P=3, dtype=torch.float32)}
    args = step_args(cell, projected, **kwargs[variant])
    torch.library.opcheck(getattr(torch.ops.rnnkernels, f"{cell}_step"), tuple(args))


BAD_STEP = {
    "x_width": {"x": lambda v: v["x"][:, :-1]},
    "x_3d": {"x": lambda v: v["x"][None]},
    "x_batch": {"x": lambda v: v["x"][:-1]},
    "w_ih_rows": {"w_ih": lambda v: v["w_ih"][:-1]},
    "b_ih_shape": {"b_ih": lambda v: v["b_ih"][:-1]},
    "x_dtype": {"x": lambda v: v["x"].float()},
    "w_ih_dtype": {"w_ih": lambda v: v["w_ih"].float()},
    "h_width": {"h": lambda v: v["h"][:, :-1]},
    "c_missing": {"c": lambda v: None},
}


@pytest.mark.parametrize("case", list(BAD_STEP))
def test_step_op_rejects_bad_arguments(case):
    names = ["x", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    values = dict(zip(names, step_args("lstm", requires_grad=False)))
    for key, fn in BAD_STEP[case].items():
        values[key] = fn(values)
    with pytest.raises(RuntimeError, match="rnnkernels"):
        torch.ops.rnnkernels.lstm_step(*[values[n] for n in names])


# ------------------------------------------------------------------------------------ argument errors
def _forward_case(change):
    cell = change.get("cell", "lstm")
    args = op_args(cell, change.get("projected", False), requires_grad=False)
    names = ["gx", "h0", "c0", "w_hh", "b_hh", "w_hr", "lengths", "reverse"]
    values = dict(zip(names, args))
    for key, fn in change.items():
        if key in values:
            values[key] = fn(values)
    return cell, [values[n] for n in names]


BAD_FORWARD = {
    "gx_2d": {"gx": lambda v: v["gx"][0]},
    "gx_4d": {"gx": lambda v: v["gx"][None]},
    "gx_last_dim": {"gx": lambda v: v["gx"][..., :-1]},
    "w_hh_rows_not_multiple": {"w_hh": lambda v: v["w_hh"][:-1], "gx": lambda v: v["gx"][..., :-1]},
    "w_hh_cols": {"w_hh": lambda v: torch.cat([v["w_hh"], v["w_hh"]], 1)},
    "w_hh_1d": {"w_hh": lambda v: v["w_hh"].flatten()},
    "h0_batch": {"h0": lambda v: v["h0"][:-1]},
    "h0_width": {"h0": lambda v: v["h0"][:, :-1]},
    "h0_3d": {"h0": lambda v: v["h0"][None]},
    "c0_missing": {"c0": lambda v: None},
    "c0_shape": {"c0": lambda v: v["c0"][:, :1]},
    "b_hh_shape": {"b_hh": lambda v: v["b_hh"][:-1]},
    "b_hh_2d": {"b_hh": lambda v: v["b_hh"][None]},
    "h0_dtype": {"h0": lambda v: v["h0"].float()},
    "w_hh_dtype": {"w_hh": lambda v: v["w_hh"].float()},
    "c0_dtype": {"c0": lambda v: v["c0"].float()},
    "b_hh_dtype": {"b_hh": lambda v: v["b_hh"].float()},
    "lengths_dtype": {"lengths": lambda v: torch.tensor([3, 2, 1], dtype=torch.int32)},
    "lengths_shape": {"lengths": lambda v: torch.tensor([3, 2])},
    "lengths_too_long": {"lengths": lambda v: torch.tensor([3, 4, 1])},
    "lengths_negative": {"lengths": lambda v: torch.tensor([3, -1, 1])},
    "w_hr_shape": {"projected": True, "w_hr": lambda v: v["w_hr"][:, :-1]},
    "w_hr_dtype": {"projected": True, "w_hr": lambda v: v["w_hr"].float()},
    "w_hr_missing_with_projection": {"projected": True, "w_hr": lambda v: None},
    "gru_w_hh_gates": {"cell": "gru", "w_hh": lambda v: v["w_hh"][:4], "gx": lambda v: v["gx"][..., :4]},
    "rnn_h0_width": {"cell": "rnn_tanh", "h0": lambda v: v["h0"][:, :1]},
    "gru_with_w_hr": {"cell": "gru", "h0": lambda v: v["h0"][:, :1], "w_hh": lambda v: v["w_hh"][:, :1],
                      "w_hr": lambda v: torch.randn(1, v["w_hh"].shape[0] // 3, dtype=v["w_hh"].dtype)},
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_forward_op_rejects_bad_arguments(case):
    cell, args = _forward_case(BAD_FORWARD[case])
    with pytest.raises(RuntimeError, match="rnnkernels"):
        ops.forward_op(cell)(*args)


def _backward_args(cell="lstm"):
    args = op_args(cell, requires_grad=False)
    gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse = args
    output, h_n, c_n, workspace = ops.forward_op(cell)(*args)
    return dict(grad_output=torch.ones_like(output), grad_h_n=torch.ones_like(h_n),
                grad_c_n=torch.ones_like(c_n) if cell == "lstm" else None, h0=h0, c0=c0, w_hh=w_hh, w_hr=w_hr,
                lengths=lengths, reverse=reverse, output=output, workspace=workspace)


BAD_BACKWARD = {
    "grad_output_shape": ("lstm", {"grad_output": lambda a: a["grad_output"][:-1]}),
    "grad_h_n_shape": ("gru", {"grad_h_n": lambda a: a["grad_h_n"][:, :1]}),
    "workspace_shape": ("lstm", {"workspace": lambda a: a["workspace"][..., :-1]}),
    "workspace_time": ("gru", {"workspace": lambda a: a["workspace"][:-1]}),
    "output_2d": ("rnn_tanh", {"output": lambda a: a["output"][0]}),
    "h0_shape": ("rnn_relu", {"h0": lambda a: a["h0"][:-1]}),
    "c0_missing": ("lstm", {"c0": lambda a: None}),
    "w_hh_dtype": ("gru", {"w_hh": lambda a: a["w_hh"].float()}),
    "lengths_too_long": ("lstm", {"lengths": lambda a: torch.tensor([9, 1, 1])}),
    "grad_c_n_shape": ("lstm", {"grad_c_n": lambda a: a["grad_c_n"][:1, :1]}),
    "grad_c_n_dtype": ("lstm", {"grad_c_n": lambda a: a["grad_c_n"].float()}),
    "output_last_dim": ("lstm", {"output": lambda a: a["output"][..., :1].contiguous(),
                                 "grad_output": lambda a: a["grad_output"][..., :1].contiguous()}),
    "grad_output_dtype": ("gru", {"grad_output": lambda a: a["grad_output"].float()}),
    "workspace_dtype": ("gru", {"workspace": lambda a: a["workspace"].float()}),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_backward_op_rejects_bad_arguments(case):
    cell, change = BAD_BACKWARD[case]
    a = _backward_args(cell)
    for key, fn in change.items():
        a[key] = fn(a)
    with pytest.raises(RuntimeError, match="rnnkernels"):
        getattr(torch.ops.rnnkernels, f"{cell}_backward")(**a)


@pytest.mark.parametrize("x_shape,w_shape,b_shape,dtypes", [
    ((4, 3), (5, 2), (5,), None), ((4, 3, 1), (5, 3), (5,), None), ((4, 3), (5, 3), (4,), None),
    ((4, 3), (5, 3), (5,), (torch.float32, torch.float64)),
])
def test_linear_op_rejects_bad_arguments(x_shape, w_shape, b_shape, dtypes):
    dx, dw = dtypes or (torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="rnnkernels"):
        torch.ops.rnnkernels.linear(torch.randn(x_shape, dtype=dx), torch.randn(w_shape, dtype=dw), torch.randn(b_shape, dtype=dw))


def test_linear_op_with_strided_bias_matches_f_linear():
    x, w, b = torch.randn(7, 300), torch.randn(5, 300), torch.randn(10)[::2]
    torch.testing.assert_close(torch.ops.rnnkernels.linear(x, w, b), torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("hidden", [20, 37], ids=["even", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_weights_at_an_odd_address_give_the_same_bits(cell, dtype, hidden):
    """W_hh packs as 32-bit words (float32, or pairs of bfloat16 inputs: panels.h's transpose_words) where
    its rows allow, else element by element. A bfloat16 W_hh at an odd address takes the latter where the
    CPU has bfloat16 panels (an even hidden size; an odd one, like float32 at any address, runs on the
    float32 panels, which pack words either way). Forward and backward must not tell the two apart, and
    both must match the reference."""
    args = op_args(cell, T=6, B=3, H=hidden, dtype=dtype, requires_grad=False)
    w_hh = args[3]
    shifted = torch.empty(w_hh.numel() + 1, dtype=dtype)[1:].view_as(w_hh).copy_(w_hh)
    assert shifted.is_contiguous() and shifted.data_ptr() % 4 == (2 if dtype == torch.bfloat16 else 0)

    def run(w):
        gx, h0, c0, _, b_hh, w_hr, lengths, reverse = args
        output, h_n, c_n, workspace = ops.forward_op(cell)(gx, h0, c0, w, b_hh, w_hr, lengths, reverse)
        g = torch.Generator().manual_seed(3)
        grads = [torch.randn(t.shape, generator=g).to(dtype) for t in (output, h_n, c_n)]
        backward = getattr(torch.ops.rnnkernels, f"{cell}_backward")
        grads_in = backward(grads[0], grads[1], grads[2] if cell == "lstm" else None, h0, c0, w, w_hr, lengths,
                            reverse, output, workspace)
        return [output, h_n, c_n, *grads_in]

    aligned, odd = run(w_hh), run(shifted)
    for a, b in zip(aligned, odd):
        assert torch.equal(a, b)
    wide = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    torch.testing.assert_close(odd[0].double(), reference.recurrence(cell, *wide)[0],
                               atol=3e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_linear_op_packs_a_strided_weight_as_a_contiguous_one():
    """A weight of general strides packs element by element, a contiguous one in 32-bit words (panels.h):
    the same product, bit for bit, over more than one chunk of inputs and a partial block of outputs."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(70, 300, generator=g), torch.randn(40, 600, generator=g)[:, ::2]
    assert w.stride() == (600, 2)
    y = torch.ops.rnnkernels.linear(x, w, None)
    assert torch.equal(y, torch.ops.rnnkernels.linear(x, w.contiguous(), None))
    expected = x.double() @ w.double().t()
    assert (y.double() - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()


def test_double_backward_raises_on_compiled_backend():
    """The fused backward is not differentiable: create_graph=True must fail loudly, not give zeros."""
    m = rnnkernels.GRU.from_torch(torch.nn.GRU(3, 4), backend="cpu")
    x = torch.randn(5, 2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)


def test_ops_accept_empty_sequence_and_batch():
    """T = 0 and B = 0 are legal shapes: empty outputs, states passed through, no crash."""
    for T, B in [(0, 2), (3, 0)]:
        args = op_args("lstm", T=T, B=B, requires_grad=False)
        output, h_n, c_n, _ = ops.forward_op("lstm")(*args)
        assert tuple(output.shape) == (T, B, 2)
        torch.testing.assert_close(h_n, args[1])
        torch.testing.assert_close(c_n, args[2])


@pytest.mark.parametrize("cell,projected", OP_CELLS, ids=OP_IDS)
def test_ops_accept_zero_hidden_size(cell, projected):
    """H = 0 is a legal shape too: states pass through, a projected LSTM outputs zeros on active steps
    (tests/test_cuda.py holds the CUDA operators to these results)."""
    args = op_args(cell, projected, H=0, P=2, lengths=[2, 0, 3], requires_grad=False)
    output, h_n, c_n, workspace = ops.forward_op(cell)(*args)
    _, h0, c0, w_hh, _, w_hr, lengths, reverse = args
    assert tuple(output.shape) == (3, 3, 2 if projected else 0)
    if projected:
        torch.testing.assert_close(output, torch.zeros_like(output))
        torch.testing.assert_close(h_n[1], h0[1])  # length 0: h0 passes through
    grads = getattr(torch.ops.rnnkernels, f"{cell}_backward")(
        torch.ones_like(output), torch.ones_like(h_n), torch.ones_like(c_n) if cell == "lstm" else None, h0, c0,
        w_hh, w_hr, lengths, reverse, output, workspace)
    assert [tuple(g.shape) for g in grads[:2]] == [(3, 3, 0), tuple(h0.shape)]


def test_all_operators_registered():
    names = {f"{c}_{d}" for c, d in itertools.product(ops.CELLS, ("forward", "backward", "step"))} | {"linear"}
    for name in names:
        assert hasattr(torch.ops.rnnkernels, name), name
    assert set(ops.CELLS) == {"lstm", "gru", "rnn_tanh", "rnn_relu"}
