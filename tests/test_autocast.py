"""torch.autocast (mixed precision). The rule (rnnkernels.functional.autocast_dtype): under autocast a layer
runs as the same layer would in the autocast dtype, so its outputs equal, bit for bit, those of a copy of the
layer in that dtype, and its gradients those of the copy cast back to the float32 parameters and inputs.
Where torch.nn itself runs a layer in the autocast dtype, ours matches it by the correctness rule of
tests/helpers.py. The operators themselves ignore autocast, forward and backward, so that a kernel's own
GEMMs keep the dtype it was given."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch._dynamo.testing
from torch.utils._python_dispatch import TorchDispatchMode

import cuda_emulation
from helpers import (CELL_KINDS, assert_meta_equal, assert_results, cell_inputs, cotangent, leaf, rnn_inputs, run,
                     to_dtype, torch_module, twin)
from rnnkernels import backends, ops
from rnnkernels.reference import GATES
from test_modules import I, H, build_case

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")

AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]
# (device, backend) for every backend of each device; the triton backend runs on the CPU in Triton's
# interpreter only (TRITON_INTERPRET=1), and is skipped elsewhere with the reason. "emulated": the CUDA
# backend's code on CPU tensors, in the host emulation of tests/cuda_emulation.
ON_DEVICE_PAIRS = [("cpu", "cpu"), ("cpu", "reference"), ("cpu", "triton"), ("emulated", "cuda"), ("cuda", "cuda"),
                   ("cuda", "triton"), ("cuda", "reference")]


def on_devices(backends_wanted=("cpu", "reference", "triton", "cuda")) -> list:
    return [pytest.param((device, backend), id=f"{device}-{backend}",
                         marks=[pytest.mark.cuda] if device == "cuda" else [])
            for device, backend in ON_DEVICE_PAIRS if backend in backends_wanted]


@pytest.fixture
def on(request):
    """(device, backend) where the test's tensors and layers are, the emulation installed for "emulated"."""
    device, backend = request.param
    if device != "emulated":
        yield device, backend
        return
    if cuda_emulation.UNSUPPORTED is not None:
        pytest.skip(cuda_emulation.UNSUPPORTED)
    with cuda_emulation.Installation(seed=zlib.crc32(request.node.nodeid.encode())):
        yield "cpu", "cpu"  # the cpu backend's operators, whose CPU kernels are now the emulated CUDA ones


SEQUENCE_CASES = [("LSTM", "proj_packed_unsorted_hx_bidir"), ("LSTM", "dropout_train_three_layers_bidir_hx"),
                  ("GRU", "packed_unsorted_hx_bidir_two_layers"), ("GRU", "unbatched_hx_batch_first_bidir_two_layers"),
                  ("RNN_tanh", "no_bias_bidirectional_hx"), ("RNN_relu", "batch_first_two_layers_hx")]
STATES = ("output", "h_n", "c_n", "h", "c")


def skip_unless_runs(backend: str, device: str, dtype: torch.dtype) -> None:
    why_not = backends.unsupported(backend, torch.device(device), dtype)
    if why_not is not None:
        pytest.skip(why_not)


def module_with_inputs(kind: str, device: str):
    """A float32 torch.nn module of `kind` (two bidirectional layers for a sequence kind), input and state."""
    is_cell = kind in CELL_KINDS
    m = torch_module(kind, device=device, input_size=I, hidden_size=H,
                     **({} if is_cell else dict(num_layers=2, bidirectional=True)))
    x, hx = cell_inputs(m, hx=True) if is_cell else rnn_inputs(m, hx=True)
    return m, x, hx


def in_dtype(m: torch.nn.Module, dtype: torch.dtype, backend: str) -> torch.nn.Module:
    """A twin of m with its parameters in dtype, each its own fresh tensor as autocast's casts are: not the
    views into one flat buffer that torch.nn's .to() makes on CUDA, whose offsets could lead cuBLAS or
    Triton to another kernel (by alignment) and so to other last bits."""
    copied = copy.deepcopy(m)
    for parameter in copied.parameters():
        parameter.data = parameter.data.to(dtype)
    return twin(copied, backend)


def assert_is_the_layer_in(dtype: torch.dtype, under_autocast: dict, in_dtype: dict) -> None:
    """under_autocast: results of a float32 layer under autocast to dtype; in_dtype: of its copy in dtype."""
    assert set(under_autocast) == set(in_dtype)
    for name, expected in in_dtype.items():
        got = under_autocast[name]
        if expected is None:
            assert got is None, name
            continue
        # The outputs in the autocast dtype; gradients in that of their float32 leaf, through the cast.
        assert got.dtype == (dtype if name in STATES else torch.float32), f"{name}: {got.dtype}"
        assert torch.equal(got, expected.to(got.dtype)), f"{name}: differs from the layer in {dtype}"


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("on", on_devices(), indirect=True)
@pytest.mark.parametrize("kind,case,T", [(k, c, 5) for k, c in SEQUENCE_CASES] + [("LSTM", "two_layers_hx", 1)],
                         ids=[f"{k}-{c}" for k, c in SEQUENCE_CASES] + ["LSTM-one_step"])
def test_layer_under_autocast_is_the_layer_in_that_dtype(kind, case, T, on, dtype):
    device, backend = on
    skip_unless_runs(backend, device, dtype)
    m, ours, x, hx = build_case(kind, case, torch.float32, backend, device=device, T=T)
    expected, expected_meta = run(in_dtype(m, dtype, backend), to_dtype(x, dtype), to_dtype(hx, dtype), seed=5)
    got, meta = run(ours, x, hx, seed=5, autocast=dtype)
    assert_is_the_layer_in(dtype, got, expected)
    assert_meta_equal(meta, expected_meta)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("on", on_devices(), indirect=True)
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_steps_under_autocast_are_the_cell_in_that_dtype(kind, on, dtype):
    """A generation loop: each step's state, in the autocast dtype, goes back into the float32 cell."""
    device, backend = on
    skip_unless_runs(backend, device, dtype)
    m = torch_module(kind, device=device, input_size=I, hidden_size=H)
    ours, copy_in_dtype = twin(m, backend), in_dtype(m, dtype, backend)
    x, hx = cell_inputs(m, hx=True)
    expected, _ = run(copy_in_dtype, to_dtype(x, dtype), to_dtype(hx, dtype))
    got, _ = run(ours, x, hx, autocast=dtype)
    assert_is_the_layer_in(dtype, got, expected)
    with torch.no_grad():
        state, state_in_dtype = None, None
        for step in range(3):
            with torch.autocast(device, dtype=dtype):
                state = ours(x, state)
            state_in_dtype = copy_in_dtype(x.to(dtype), state_in_dtype)
            for a, b in zip(state if isinstance(state, tuple) else (state,),
                            state_in_dtype if isinstance(state_in_dtype, tuple) else (state_in_dtype,)):
                assert a.dtype == dtype and torch.equal(a, b), f"step {step}"


# Where torch.nn runs a layer in the autocast dtype itself: on the CPU its oneDNN LSTM and its RNN and
# RNNCell under bfloat16 (its GRU and other cells stay in float32 there); on the GPU every layer through
# cuDNN under float16 (cuDNN layers take float16 under bfloat16 autocast too) and the cells under either.
# ReLU cells on the GPU are left out at this size: where a pre-activation lies within rounding of zero,
# the two sums of the projections (ours fused) fall on either side of the kink (tests/test_cuda.py).
TORCH_AUTOCASTS = [
    *(("cpu", torch.bfloat16, kind) for kind in ("LSTM", "RNN_tanh", "RNN_relu", "RNNCell_tanh", "RNNCell_relu")),
    *(("cuda", torch.float16, kind) for kind in ("LSTM", "GRU", "RNN_tanh", "LSTMCell", "GRUCell", "RNNCell_tanh")),
    *(("cuda", torch.bfloat16, kind) for kind in ("LSTMCell", "GRUCell", "RNNCell_tanh")),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("device,dtype,kind", [
    pytest.param(device, dtype, kind, id=f"{device}-{str(dtype)[6:]}-{kind}",
                 marks=[pytest.mark.cuda] if device == "cuda" else []) for device, dtype, kind in TORCH_AUTOCASTS])
def test_matches_torch_nn_under_autocast(device, dtype, kind, backend):
    is_cell = kind in CELL_KINDS
    m, x, hx = module_with_inputs(kind, device)
    ours, _ = run(twin(m, backend), x, hx, autocast=dtype)
    try:
        theirs, _ = run(m, x, hx, autocast=dtype)
    except RuntimeError as error:
        # Under CPU autocast torch.nn's LSTM takes oneDNN's bfloat16 LSTM primitive, which a CPU without
        # AVX-512 refuses; torch.nn's layer in dtype, which autocast stands for, is the baseline there.
        if "could not create a primitive descriptor for the LSTM" not in str(error):
            raise
        theirs, _ = run(copy.deepcopy(m).to(dtype), to_dtype(x, dtype), to_dtype(hx, dtype))
        for name in set(STATES) & set(ours):
            assert ours[name].dtype == dtype, name
    else:
        for name, value in theirs.items():
            assert ours[name].dtype == value.dtype, name
    state = theirs["h" if is_cell else "output"]
    if state.dtype != dtype:
        pytest.skip(f"this torch runs {kind} in {state.dtype} under autocast to {dtype}")
    reference, _ = run(copy.deepcopy(m).double(), to_dtype(x, torch.float64), to_dtype(hx, torch.float64))
    # Gradients of float32 leaves through a cast hold values of dtype: compared in it.
    lowered = lambda results: {name: t.to(dtype) for name, t in results.items()}  # noqa: E731
    assert_results(lowered(ours), lowered(theirs), reference, dtype)


# ------------------------------------------------------------------------------------------ operators
def operator_calls(cell: str, prefix: str, device: str) -> dict:
    """Each operator of `cell` with float32 arguments: name -> a call."""
    g = torch.Generator().manual_seed(3)
    T, B, In, Hd = 4, 3, 5, 6
    G = GATES[cell]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    gx, h0, w_hh, b_hh = rand(T, B, G * Hd), rand(B, Hd), rand(G * Hd, Hd), rand(G * Hd)
    x, w_ih = rand(B, In), rand(G * Hd, In)
    c0 = rand(B, Hd) if cell == "lstm" else None
    forward = ops.forward_op(cell, prefix)
    output, _, _, workspace = forward(gx, h0, c0, w_hh, b_hh, None, None, False, True)
    grad_output, grad_h_n, grad_c_n = rand(T, B, Hd), rand(B, Hd), rand(B, Hd) if cell == "lstm" else None
    backward = getattr(torch.ops.rnnkernels, f"{prefix}{cell}_backward")
    calls = {
        "forward": lambda: forward(gx, h0, c0, w_hh, b_hh, None, None, True, True),
        "backward": lambda: backward(grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, None, None, False, output,
                                     workspace),
    }
    if not prefix:  # the compiled operators alone have a projection and a step
        calls["linear"] = lambda: torch.ops.rnnkernels.linear(x, w_ih, b_hh)
        calls["step"] = lambda: getattr(torch.ops.rnnkernels, f"{cell}_step")(x, h0, c0, w_ih, w_hh, b_hh, b_hh, None,
                                                                               True)
    return calls


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("on", on_devices(("cpu", "triton", "cuda")), indirect=True)
@pytest.mark.parametrize("cell", list(GATES))
def test_operators_ignore_autocast(cell, on, dtype):
    device, backend = on
    skip_unless_runs(backend, device, torch.float32)
    for name, call in operator_calls(cell, "triton_" if backend == "triton" else "", device).items():
        outside = call()
        with torch.autocast(device, dtype=dtype):
            inside = call()
        outside, inside = (outside,) if isinstance(outside, torch.Tensor) else outside, (
            (inside,) if isinstance(inside, torch.Tensor) else inside)
        for index, (a, b) in enumerate(zip(outside, inside, strict=True)):
            assert b.dtype == a.dtype == torch.float32 and torch.equal(a, b), f"{name} result {index}"


@pytest.mark.parametrize("on", on_devices(("cpu", "cuda")), indirect=True)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_tanh", "LSTMCell"])
def test_backward_inside_an_autocast_region(kind, on):
    """A float32 forward whose backward runs inside autocast (the engine carries the region to it) has the
    gradients of the same backward run outside, on the backends made of rnnkernels operators alone. (The
    reference and triton backends take the input projection's backward from torch's autograd of F.linear,
    which autocast reaches as it does anywhere; the triton operators' own backward is checked above.)"""
    device, backend = on
    skip_unless_runs(backend, device, torch.float32)
    m, x, hx = module_with_inputs(kind, device)
    ours = twin(m, backend)
    gradients = []
    for region in (False, True):
        ours.zero_grad(set_to_none=True)
        xi, hi = leaf(x), leaf(hx)
        out = ours(xi, hi)
        first = out[0] if isinstance(out, tuple) else out
        loss = (first.double() * cotangent("output", first)).sum()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=region):
            loss.backward()
        gradients.append([xi.grad] + [p.grad for p in ours.parameters()])
    for index, (a, b) in enumerate(zip(*gradients, strict=True)):
        assert b.dtype == torch.float32 and torch.equal(a, b), f"gradient {index}"


class CastCounter(TorchDispatchMode):
    """Counts the casts (aten._to_copy) of each of `tensors`, by data pointer."""

    def __init__(self, tensors):
        super().__init__()
        self.casts = {t.data_ptr(): 0 for t in tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.casts:
            self.casts[args[0].data_ptr()] += 1
        return func(*args, **(kwargs or {}))


def bfloat16_twin_with_inputs(kind: str, on: tuple):
    """(device, a twin on the backend of a float32 module of kind, its input, state and parameters), for
    a backend that runs bfloat16 there."""
    device, backend = on
    skip_unless_runs(backend, device, torch.bfloat16)
    m, x, hx = module_with_inputs(kind, device)
    ours = twin(m, backend)
    return device, ours, x, hx, list(ours.parameters())


@pytest.mark.parametrize("on", on_devices(("cpu", "reference", "cuda")), indirect=True)
@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_parameters_are_cast_once_per_autocast_region_without_grad(kind, on):
    """Where autograd records nothing (generation), each float32 parameter is cast once per autocast region
    through autocast's cache, as by torch.nn's layers, however often the layer runs there; again in a new
    region; and once per call where the cache is off (cache_enabled=False). The outputs are the same."""
    device, ours, x, hx, parameters = bfloat16_twin_with_inputs(kind, on)
    casts, outputs = [], []
    for cache_enabled in (True, False):
        counter = CastCounter(parameters)
        with counter, torch.no_grad():
            for region in range(2):
                with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=cache_enabled):
                    ours(x, hx)
                    out = ours(x, hx)
        casts.append(counter.casts)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    assert set(casts[0].values()) == {2}, "cached: one cast per parameter per region"
    assert set(casts[1].values()) == {4}, "uncached: one cast per parameter per call"
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("on", on_devices(("cpu", "reference", "cuda")), indirect=True)
@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_gradients_of_many_calls_in_an_autocast_region_add_up_in_float32(kind, on):
    """Where autograd records, each call casts the parameters afresh, so that the gradients of two calls
    in one region (an unrolled cell) add up in float32: exactly those with autocast's cache off. (Through
    one cached cast they add up in bfloat16 first, and differ in their last bits.)"""
    device, ours, x, hx, parameters = bfloat16_twin_with_inputs(kind, on)
    casts, gradients = [], []
    for cache_enabled in (True, False):
        ours.zero_grad(set_to_none=True)
        counter = CastCounter(parameters)
        with counter, torch.autocast(device, dtype=torch.bfloat16, cache_enabled=cache_enabled):
            first, second = ours(x, hx), ours(x, hx)
        loss = sum((out[0] if isinstance(out, tuple) else out).float().sum() for out in (first, second))
        loss.backward()
        casts.append(counter.casts)
        gradients.append([p.grad for p in parameters])
    assert casts[0] == casts[1] and set(casts[0].values()) == {2}, "one cast per parameter per call"
    for index, (a, b) in enumerate(zip(*gradients, strict=True)):
        assert a.dtype == torch.float32 and torch.equal(a, b), f"gradient {index}"


@pytest.mark.parametrize("kind", ["LSTMCell", "GRU"])
def test_vmap_under_autocast(kind):
    """torch.func.vmap over a layer under autocast (without grad, where the casts would otherwise go
    through the caching operator, which vmap has no rule for) matches a loop over the batch."""
    m, x, hx = module_with_inputs(kind, "cpu")
    ours = twin(m)
    batch = torch.stack([x, 2 * x])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # [0]: the cell's h, the layer's output
        mapped = torch.func.vmap(lambda xi: ours(xi, hx)[0])(batch)
        looped = torch.stack([ours(xi, hx)[0] for xi in batch])
    assert mapped.dtype == torch.bfloat16
    torch.testing.assert_close(mapped, looped, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64_layer_ignores_autocast(backend):
    """autocast leaves float64 alone, and so does the layer."""
    m = torch_module("GRU", dtype=torch.float64, input_size=I, hidden_size=H, num_layers=2)
    ours = twin(m, backend)
    x, hx = rnn_inputs(m, hx=True)
    expected, _ = run(ours, x, hx)
    got, _ = run(ours, x, hx, autocast=torch.bfloat16)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == torch.float64 and torch.equal(got[name], value), name


def test_meta_layer_under_autocast():
    """Meta tensors, for which autocast has no rule, run as outside it (as torch.nn's do)."""
    m = torch_module("LSTM", input_size=I, hidden_size=H).to("meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, (h, c) = twin(m)(torch.randn(5, 4, I, device="meta"))
    assert output.device.type == "meta" and output.dtype == torch.float32 and output.shape == (5, 4, H)


def test_compiled_layer_compiles_once_per_autocast_state():
    """Each autocast state is one compiled frame, reused: the backend choice made while compiling leaves no
    cache write behind that would fail the frame's own guards."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    m = torch_module("GRU", input_size=I, hidden_size=H)
    ours = twin(m, "cpu")
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    x, _ = rnn_inputs(m)
    for autocast in (torch.bfloat16, None, torch.bfloat16, None, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            assert compiled(x)[0].dtype == (autocast or torch.float32)
    assert counter.frame_count == 2


@pytest.mark.slow
def test_compiled_layer_under_autocast():
    """torch.compile traces the autocast rule in one graph, inside autocast and outside it alike."""
    torch._dynamo.reset()
    m = torch_module("LSTM", input_size=I, hidden_size=H, num_layers=2, proj_size=3)
    eager, compiled = twin(m, "cpu"), twin(m, "cpu")
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, backend="inductor")
    x, hx = rnn_inputs(m, hx=True)
    for autocast in (torch.bfloat16, None):
        expected, _ = run(eager, x, hx, autocast=autocast)
        got, _ = run(compiled, x, hx, autocast=autocast)
        assert set(got) == set(expected)
        for name, value in expected.items():
            assert got[name].dtype == value.dtype, name
            # The bias gradients' sums are inductor's, in its order: float32 rounding apart.
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
