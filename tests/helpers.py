"""The test suite's shared machinery: the correctness rule, twin pairs, and forward+backward runs.

The correctness rule (used by every numerical comparison against torch.nn):
    compute a float64 reference (torch.nn in float64 with the very same weights and inputs, the values
    of dtype d upcast); a result in dtype d passes when its max error against that reference is at most
    twice torch.nn's own error in dtype d against it, plus a small floor, FLOORS[d] * max(1, max |reference|)
    (relative to the size of the values, since weight gradients sum over time and batch).
In float64 torch.nn *is* the reference, so the bound is the floor alone: 1e-10 relative.
"""

from __future__ import annotations

import contextlib
import copy
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkernels

FLOORS = {torch.float64: 1e-10, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
BACKENDS = ("cpu", "reference")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]

# Kind names used in parametrisations: the torch.nn class and constructor keywords.
RNN_KINDS = {
    "LSTM": (nn.LSTM, {}),
    "GRU": (nn.GRU, {}),
    "RNN_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_relu": (nn.RNN, {"nonlinearity": "relu"}),
}
CELL_KINDS = {
    "LSTMCell": (nn.LSTMCell, {}),
    "GRUCell": (nn.GRUCell, {}),
    "RNNCell_tanh": (nn.RNNCell, {"nonlinearity": "tanh"}),
    "RNNCell_relu": (nn.RNNCell, {"nonlinearity": "relu"}),
}
TWIN_OF = {
    nn.LSTM: rnnkernels.LSTM,
    nn.GRU: rnnkernels.GRU,
    nn.RNN: rnnkernels.RNN,
    nn.LSTMCell: rnnkernels.LSTMCell,
    nn.GRUCell: rnnkernels.GRUCell,
    nn.RNNCell: rnnkernels.RNNCell,
}


# ----------------------------------------------------------------------------------------- the rule
def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double().cpu() - reference.detach().double().cpu()).abs().max().item()


def assert_rule(name: str, actual, baseline, reference, dtype: torch.dtype) -> None:
    """`actual`: ours in dtype d; `baseline`: torch.nn in dtype d; `reference`: torch.nn in float64."""
    if reference is None:
        assert actual is None and baseline is None, f"{name}: expected None, got a tensor"
        return
    assert actual is not None, f"{name}: missing (torch.nn has it)"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert tuple(actual.shape) == tuple(reference.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert actual.device == baseline.device, f"{name}: device {actual.device} != {baseline.device}"
    scale = max(1.0, reference.detach().abs().max().item()) if reference.numel() else 1.0
    ours, theirs = max_error(actual, reference), max_error(baseline, reference)
    bound = 2.0 * theirs + FLOORS[dtype] * scale
    assert ours <= bound, (
        f"{name}: max error {ours:.3e} vs float64 torch.nn exceeds {bound:.3e} "
        f"(torch.nn's own error in {dtype}: {theirs:.3e})"
    )


def assert_results(ours: dict, baseline: dict, reference: dict, dtype: torch.dtype) -> None:
    assert set(ours) == set(reference), f"result keys differ: {sorted(set(ours) ^ set(reference))}"
    for name in reference:
        assert_rule(name, ours[name], baseline[name], reference[name], dtype)


# ---------------------------------------------------------------------------------------- building
def operator_results(forward_op, args: list, outputs: int, device, dtype: torch.dtype, cotangents: list) -> list:
    """For a sequence forward operator: its first `outputs` results with every floating-point argument
    moved to device and dtype, then the gradients of those arguments under the loss sum(result *
    cotangent), all on the CPU, for assert_rule. The float64 cotangents are drawn on the first call into
    the list given, so the runs compared share them."""
    inputs = [a.detach().to(device=device, dtype=dtype).requires_grad_() if isinstance(a, torch.Tensor) and
              a.is_floating_point() else a for a in args]
    results = forward_op(*inputs)[:outputs]
    if not cotangents:
        g = torch.Generator().manual_seed(2)
        cotangents.extend(torch.randn(r.shape, dtype=torch.float64, generator=g) for r in results)
    loss = sum((r.double() * c.to(r.device)).sum() for r, c in zip(results, cotangents, strict=True))
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    return [t.detach().cpu() for t in (*results, *torch.autograd.grad(loss, leaves))]


def torch_module(kind: str, dtype=torch.float32, device="cpu", seed: int = 0, **kwargs) -> nn.Module:
    """A torch.nn module of `kind` (a key of RNN_KINDS or CELL_KINDS) with seeded default initialisation."""
    cls, extra = {**RNN_KINDS, **CELL_KINDS}[kind]
    torch.manual_seed(seed)
    module = cls(**{**extra, **kwargs})
    module._test_kwargs = {**extra, **kwargs}  # the constructor call, for twins built by load_state_dict
    return module.to(device=device, dtype=dtype)


def twin(module: nn.Module, backend: str = "auto", construct: str = "from_torch") -> nn.Module:
    """An rnnkernels twin of `module` with equal but separate parameters (so gradients do not mix)."""
    twin_cls = TWIN_OF[type(module)]
    param = next(module.parameters())
    if construct == "from_torch":
        result = twin_cls.from_torch(copy.deepcopy(module), backend=backend)
    elif construct == "load_state_dict":
        result = twin_cls(**module._test_kwargs, backend=backend).to(device=param.device, dtype=param.dtype)
        result.load_state_dict(module.state_dict(), strict=True)
    else:
        raise ValueError(construct)
    assert type(result) is twin_cls and result.backend == backend
    result.train(module.training)
    return result


def backend_on(device: str, backend: str) -> str:
    """The cpu backend runs CPU tensors only; elsewhere the same test runs on "auto"."""
    return "auto" if backend == "cpu" and device != "cpu" else backend


# ------------------------------------------------------------------------------------------ inputs
def randn(*shape, dtype, device, generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)


def rnn_inputs(module: nn.Module, T=5, B=4, *, hx=False, unbatched=False, packed=None, lengths=None, seed=1):
    """(input, hx or None) for an RNN/GRU/LSTM module, in the module's dtype and device.
    packed: None, "sorted" or "unsorted" (a PackedSequence built with enforce_sorted accordingly)."""
    param = next(module.parameters())
    dtype, device = param.dtype, param.device
    g = torch.Generator().manual_seed(seed)
    directions = 2 if module.bidirectional else 1
    states = module.num_layers * directions
    out_size = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    if unbatched:
        x = randn(T, module.input_size, dtype=dtype, device=device, generator=g)
        state_shapes = [(states, out_size), (states, module.hidden_size)]
    else:
        x = randn(T, B, module.input_size, dtype=dtype, device=device, generator=g)
        if module.batch_first:
            x = x.transpose(0, 1).contiguous()
        state_shapes = [(states, B, out_size), (states, B, module.hidden_size)]
    if packed is not None:
        if lengths is None:
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            lengths[int(torch.randint(0, B, (1,), generator=g))] = T
            if packed == "sorted":
                lengths = lengths.sort(descending=True).values
            elif bool((lengths[:-1] >= lengths[1:]).all()):  # make sure unsorted really is unsorted
                lengths = lengths.flip(0)
        x = pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=module.batch_first,
                                 enforce_sorted=packed == "sorted")
    h = None
    if hx:
        h = [randn(*shape, dtype=dtype, device=device, generator=g) for shape in state_shapes]
        h = tuple(h) if isinstance(module, nn.LSTM) else h[0]
    return x, h


def cell_inputs(module: nn.Module, B=4, *, hx=False, unbatched=False, seed=1):
    param = next(module.parameters())
    dtype, device = param.dtype, param.device
    g = torch.Generator().manual_seed(seed)
    batch = () if unbatched else (B,)
    x = randn(*batch, module.input_size, dtype=dtype, device=device, generator=g)
    h = None
    if hx:
        h = [randn(*batch, module.hidden_size, dtype=dtype, device=device, generator=g) for _ in range(2)]
        h = tuple(h) if isinstance(module, nn.LSTMCell) else h[0]
    return x, h


def to_dtype(value, dtype):
    if value is None:
        return None
    if isinstance(value, PackedSequence):
        return value.to(dtype=dtype)
    if isinstance(value, tuple):
        return tuple(to_dtype(v, dtype) for v in value)
    return value.to(dtype=dtype)


def leaf(value):
    """A fresh copy of an input that requires grad (a PackedSequence: its data)."""
    if value is None:
        return None
    if isinstance(value, PackedSequence):
        return PackedSequence(leaf(value.data), value.batch_sizes, value.sorted_indices, value.unsorted_indices)
    if isinstance(value, tuple):
        return tuple(leaf(v) for v in value)
    return value.detach().clone().requires_grad_(True)


def cotangent(name: str, like: torch.Tensor) -> torch.Tensor:
    """A fixed random float64 weighting of one output, the same for every dtype, backend and run."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(like.shape, dtype=torch.float64, generator=g).to(like.device)


# --------------------------------------------------------------------------------------------- runs
def run(module: nn.Module, x, hx=None, *, seed: int = 0, backward: bool = True, autocast: torch.dtype | None = None):
    """Forward (after torch.manual_seed(seed), for dropout) and backward of a random linear functional of
    every output; without backward, the forward alone under torch.no_grad (inference, as in generation).
    autocast: the forward (not the backward) under torch.autocast to that dtype, on the module's device.
    Returns (results, meta): results maps names to tensors (outputs, final states, the gradients of input,
    hx and every parameter); meta holds the PackedSequence index fields."""
    for p in module.parameters():
        p.grad = None
    x, hx = leaf(x), leaf(hx)
    torch.manual_seed(seed)
    device_type = next(module.parameters()).device.type
    with (contextlib.nullcontext() if backward else torch.no_grad(),
          contextlib.nullcontext() if autocast is None else torch.autocast(device_type, dtype=autocast)):
        out = module(x) if hx is None else module(x, hx)
    results, meta = {}, {}
    if isinstance(module, (nn.RNNCellBase,)):
        states = out if isinstance(out, tuple) else (out,)
        results.update(zip(("h", "c"), states))
    else:
        output, states = out
        if isinstance(output, PackedSequence):
            assert isinstance(x, PackedSequence), "packed output for unpacked input"
            meta = {"batch_sizes": output.batch_sizes, "sorted_indices": output.sorted_indices,
                    "unsorted_indices": output.unsorted_indices}
            output = output.data
        results["output"] = output
        states = states if isinstance(states, tuple) else (states,)
        results.update(zip(("h_n", "c_n"), states))
    if backward:
        loss = sum((value.double() * cotangent(name, value)).sum() for name, value in results.items())
        loss.backward()
        results["grad_input"] = (x.data if isinstance(x, PackedSequence) else x).grad
        if hx is not None:
            for name, state in zip(("grad_h0", "grad_c0"), hx if isinstance(hx, tuple) else (hx,)):
                results[name] = state.grad
        for name, p in module.named_parameters():
            results[f"grad_{name}"] = p.grad
    results = {k: (v.detach() if v is not None else None) for k, v in results.items()}
    return results, meta


def assert_meta_equal(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name in theirs:
        if theirs[name] is None:
            assert ours[name] is None, f"{name}: expected None"
        else:
            assert ours[name] is not None, f"{name}: missing"
            assert torch.equal(ours[name].cpu(), theirs[name].cpu()), f"{name}: {ours[name]} != {theirs[name]}"


def check_twin(torch_mod: nn.Module, twin_mod: nn.Module, x, hx=None, *, seed: int = 0, backward: bool = True) -> dict:
    """Runs `twin_mod` (ours) and `torch_mod` (torch.nn, same weights, dtype d) on (x, hx) and torch.nn in
    float64 on the same values; asserts the rule on every output and gradient (without backward: every
    output of an inference run, as `run`) and equal packing fields."""
    param = next(torch_mod.parameters())
    dtype = param.dtype
    reference_mod = copy.deepcopy(torch_mod).double()
    ours, ours_meta = run(twin_mod, x, hx, seed=seed, backward=backward)
    reference, reference_meta = run(reference_mod, to_dtype(x, torch.float64), to_dtype(hx, torch.float64), seed=seed,
                                    backward=backward)
    baseline = reference if dtype == torch.float64 else run(torch_mod, x, hx, seed=seed, backward=backward)[0]
    assert_results(ours, baseline, reference, dtype)
    assert_meta_equal(ours_meta, reference_meta)
    return ours


# ---------------------------------------------------------------------------------------- CUDA graphs
class OutputsAndStates(nn.Module):
    """A sequence module's output and final states as plain tensors, as make_graphed_callables wants them."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        output, state = self.rnn(x)
        return (output, *state) if isinstance(state, tuple) else (output, state)


def assert_graph_replays_match_eager(kind: str, backend: str, steps: int) -> None:
    """A 2-layer bidirectional module of `kind` on `backend`, captured for training and for inference."""
    m = torch_module(kind, dtype=torch.float32, device="cuda", input_size=8, hidden_size=32, num_layers=2,
                     bidirectional=True)
    assert_training_replays_match_eager(m, backend, (steps, 4, 8))
    assert_inference_replays_match_eager(m, backend, (steps, 4, 8))


def assert_training_replays_match_eager(m: nn.Module, backend: str, shape: tuple[int, int, int]) -> None:
    """A twin's forward and backward captured by make_graphed_callables, replayed on new inputs: outputs,
    final states and every gradient as an eager twin's. shape: (T, B, input)."""
    eager, graphed = OutputsAndStates(twin(m, backend)), OutputsAndStates(twin(m, backend))
    graphed = torch.cuda.make_graphed_callables(graphed, (torch.randn(shape, device="cuda", requires_grad=True),))
    for seed in (0, 1):  # a replay with new values, not only the captured ones
        torch.manual_seed(seed)
        x_new = torch.randn(shape, device="cuda")
        results = []
        for layer in (eager, graphed):
            xi = leaf(x_new)
            layer.zero_grad(set_to_none=True)
            outs = layer(xi)
            sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
            results.append([o.detach().clone() for o in outs] + [xi.grad.clone()] +
                           [p.grad.clone() for p in layer.parameters()])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_inference_replays_match_eager(m: nn.Module, backend: str, shape: tuple[int, int, int]) -> None:
    """A twin's inference forward captured by torch.cuda.graph after a warm-up on a side stream (where
    first calls compile and load kernels), replayed on new values of its static input, as an eager twin's."""
    eager, captured = OutputsAndStates(twin(m, backend).eval()), OutputsAndStates(twin(m, backend).eval())
    static_x = torch.randn(shape, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                captured(static_x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            static_outs = captured(static_x)
        for seed in (0, 1):
            torch.manual_seed(seed)
            static_x.copy_(torch.randn(shape, device="cuda"))
            graph.replay()
            for a, b in zip(static_outs, eager(static_x), strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_packed_input_refuses_capture(backend: str) -> None:
    """PackedSequence input under capture raises rnnkernels' error, not a CUDA one or a stale replay."""
    layer = twin(torch_module("LSTM", device="cuda", input_size=8, hidden_size=32), backend)
    x = torch.randn(5, 4, 8, device="cuda")
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 2, 1]))
    layer(packed)  # eager first: kernels loaded and compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.no_grad(), torch.cuda.graph(graph):
            layer(packed)
