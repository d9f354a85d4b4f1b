"""Benchmark of rnnkernels against torch.nn on the workloads of rnnkernels.workloads.

    python -m rnnkernels.bench [--device cpu|cuda] [--workloads a,b] [--cells lstm,gru,rnn]
        [--dtypes float32,bfloat16] [--backends cpu,reference] [--quick] [--repeats N] [--json PATH]
        [--word-lm] [--plot PATH] [--report PATH] [--time-limit SECONDS]

Per case (workload x cell x dtype) it first checks every candidate against a float64 torch.nn
computation (forward output, final state, gradients of a training step); a wrong result is reported
and not timed. It then times, round-robin within each repeat so that drift hits every candidate alike:
the forward under no_grad (eval mode) and a training step (zero grads, forward, a fixed random
projection of the output as loss, backward). Generate workloads time single cell steps at batch 1.
Each sample runs back-to-back calls for at least --min-sample-ms; figures are per call (per step for
generate workloads), median and spread over the repeats, warm-up excluded.

--word-lm adds an end-to-end case: a training step of a word-level language model (embedding, 2-layer
LSTM 650, linear decoder, cross-entropy) with torch.nn and with rnnkernels.convert of the same model,
checked the same way (loss, gradient of the embedding) and reported in tokens per second.
--plot draws the speed-ups over torch.nn as a bar chart (needs matplotlib). The JSON is rewritten after
every case, so a run cut short keeps what it measured; --time-limit starts no new case after that many
seconds (how scripts/gpu_check.sh fits a GPU lease).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import rnnkernels
from rnnkernels import backends, ops
from rnnkernels.workloads import QUICK, WORKLOADS, Workload, lookup

CELLS = ("lstm", "gru", "rnn")
SEQUENCE_MODULES = {"lstm": (nn.LSTM, rnnkernels.LSTM), "gru": (nn.GRU, rnnkernels.GRU), "rnn": (nn.RNN, rnnkernels.RNN)}
CELL_MODULES = {
    "lstm": (nn.LSTMCell, rnnkernels.LSTMCell),
    "gru": (nn.GRUCell, rnnkernels.GRUCell),
    "rnn": (nn.RNNCell, rnnkernels.RNNCell),
}
TORCH = "torch.nn"
TORCH_NO_CUDNN = "torch.nn-nocudnn"
# What is timed: the forward under no_grad, a training step, and on CUDA the training step captured in
# CUDA graphs (device time, with launch overhead gone on both sides).
KINDS = ("fwd", "train", "train_graphed")


@dataclasses.dataclass
class Candidate:
    """One implementation under test: torch.nn itself, or an rnnkernels twin on one backend."""

    name: str
    module: nn.Module
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # wraps every call


# --- running a workload --------------------------------------------------------------------------


def run_sequence(module: nn.Module, x: torch.Tensor, generate: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(output of every time step, final state as a tuple) of a whole module or of a cell stepped over x."""
    if not generate:
        output, state = module(x)
        return output, (state if isinstance(state, tuple) else (state,))
    state, outputs = None, []
    for step in x:
        state = module(step, state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs), (state if isinstance(state, tuple) else (state,))


def forward_fn(candidate: Candidate, x: torch.Tensor, generate: bool):
    def forward():
        candidate.module.eval()
        with candidate.context(), torch.no_grad():
            run_sequence(candidate.module, x, generate)

    return forward


class _OutputOnly(nn.Module):
    """A sequence module's output alone: what torch.cuda.make_graphed_callables can capture."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[0]


def graphed_forward(candidate: Candidate, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's training forward and its backward captured in CUDA graphs by
    torch.cuda.make_graphed_callables, the same way for every candidate: what remains is device time."""
    candidate.module.train()
    with candidate.context():
        return torch.cuda.make_graphed_callables(_OutputOnly(candidate.module), (x,))


def graphed_train_step_fn(candidate: Candidate, graphed, x: torch.Tensor, projection: torch.Tensor):
    def train_step():
        candidate.module.zero_grad(set_to_none=True)
        x.grad = None
        (graphed(x) * projection).sum().backward()

    return train_step


def train_step_fn(candidate: Candidate, x: torch.Tensor, projection: torch.Tensor):
    def train_step():
        candidate.module.train()
        candidate.module.zero_grad(set_to_none=True)
        x.grad = None
        with candidate.context():
            output, _ = run_sequence(candidate.module, x, False)
            (output * projection).sum().backward()

    return train_step


# --- correctness ---------------------------------------------------------------------------------


def results_for_check(module: nn.Module, x: torch.Tensor, projection: torch.Tensor, generate: bool) -> dict:
    """Every figure a candidate must get right: inference output and state, training output and gradients."""
    module.eval()
    with torch.no_grad():
        output, state = run_sequence(module, x, generate)
    results = {"output": output, **{f"state[{i}]": s for i, s in enumerate(state)}}
    module.train()
    results.update(training_results(lambda inputs: run_sequence(module, inputs, generate)[0], module, x, projection))
    return results


def training_results(forward: Callable, module: nn.Module, x: torch.Tensor, projection: torch.Tensor) -> dict:
    """The training output of forward(x) (the module's own, or its graphed twin) and the gradients of the
    loss with respect to the input and every parameter."""
    x = x.detach().requires_grad_()
    output = forward(x)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad((output * projection).sum(), (x, *params))
    return {"train output": output.detach(), **{f"grad {name}": grad for name, grad in zip(("input", *names), grads)}}


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute deviation from the float64 result, relative to that result's largest magnitude."""
    deviation = (value.double() - exact).abs().max().item()
    return deviation / max(exact.abs().max().item(), 1e-30)


def exact_results(module: nn.Module, x, projection, generate: bool) -> dict:
    """The figures of results_for_check in float64: what every candidate's are measured against."""
    return results_for_check(copy.deepcopy(module).double(), x.double(), projection.double(), generate)


def check(candidates: list[Candidate], exact: dict, x, projection, generate: bool) -> dict[str, dict]:
    """check_against the float64 figures, on those of results_for_check."""
    return check_against(exact, candidates, lambda m: results_for_check(m, x, projection, generate), x.dtype)


def check_against(exact: dict, candidates: list[Candidate], results_of: Callable, dtype) -> dict[str, dict]:
    """Per candidate: the verdict on the errors of results_of(its module) against `exact`, with torch.nn's
    own errors in this dtype as the reference."""
    verdicts, errors = {}, {}
    for candidate in candidates:
        try:
            with candidate.context():
                results = results_of(candidate.module)
            errors[candidate.name] = {key: relative_error(value, exact[key]) for key, value in results.items()}
        except RuntimeError as error:
            verdicts[candidate.name] = {"correct": False, "error": str(error)}
    for name, own in errors.items():
        verdicts[name] = verdict(own, errors[TORCH], dtype)
    return verdicts


def verdict(errors: dict, torch_errors: dict, dtype) -> dict:
    """Whether each error is within 2x torch.nn's own error in this dtype plus a floor of a few units of
    roundoff."""
    floor = 4 * torch.finfo(dtype).eps
    bounds = {key: 2 * torch_errors[key] + floor for key in errors}
    failing = [key for key in errors if not errors[key] <= bounds[key]]  # NaN fails too
    return {"correct": not failing, "failing": failing, "errors": errors, "bounds": bounds}


def check_graphed(graphed, candidate: Candidate, exact: dict, torch_errors: dict, x, projection) -> dict:
    """The verdict on a graphed training step's output and gradients, by the rule of check_against: a
    replay must be as right as the eager call, or its timing is not reported. It is judged on its second
    replay, the first on other values, so that a graph that kept values of the capture or of an earlier
    replay fails."""
    with candidate.context():
        training_results(graphed, candidate.module, torch.randn_like(x), projection)
        results = training_results(graphed, candidate.module, x.clone(), projection)
    errors = {key: relative_error(value, exact[key]) for key, value in results.items()}
    return verdict(errors, torch_errors, x.dtype)


# --- timing --------------------------------------------------------------------------------------


def seconds_per_call(fn, number: int, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    start_time = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start_time) / number


def first_call_ms(candidate: Candidate, x: torch.Tensor, generate: bool, device: torch.device) -> float:
    """Wall time of the first forward on this shape (one step for generate workloads), setup included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    forward_fn(candidate, x[:1] if generate else x, generate)()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def summary(samples_ms: list[float], calls_per_sample: int) -> dict:
    q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(samples_ms), "max": max(samples_ms),
            "calls_per_sample": calls_per_sample, "samples": samples_ms}


def time_tasks(tasks: dict, settings, device: torch.device, per_call: float) -> dict:
    """tasks: (candidate, kind) -> fn. Warms each up, sizes its samples, then times round-robin.
    Returns (candidate, kind) -> summary of milliseconds per call divided by per_call."""
    numbers = {}
    for key, fn in tasks.items():
        for _ in range(settings.warmup):
            seconds = seconds_per_call(fn, 1, device)
        numbers[key] = max(1, math.ceil(settings.min_sample_ms / 1e3 / max(seconds, 1e-9)))
    samples = {key: [] for key in tasks}
    for _ in range(settings.repeats):
        for key, fn in tasks.items():
            samples[key].append(seconds_per_call(fn, numbers[key], device) * 1e3 / per_call)
    return {key: summary(samples[key], numbers[key]) for key in tasks}


def speedup(timings: dict, name: str, kind: str) -> float | None:
    """torch.nn's median time / candidate `name`'s, from time_tasks' timings; None if either is missing."""
    timing, baseline = timings.get((name, kind)), timings.get((TORCH, kind))
    return baseline["median"] / timing["median"] if timing and baseline else None


def train_peak_bytes(fn, device: torch.device) -> int | None:
    """Peak CUDA memory allocated during one training step; None on the CPU (not measurable there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# --- one case ------------------------------------------------------------------------------------


def build(workload: Workload, cell: str, dtype: torch.dtype, device: torch.device):
    """The seeded torch.nn module, its input (time-major) and the fixed projection of the loss."""
    torch.manual_seed(0)
    if workload.generate:
        module = CELL_MODULES[cell][0](workload.input_size, workload.hidden)
    else:
        module = SEQUENCE_MODULES[cell][0](workload.input_size, workload.hidden, workload.layers)
    module = module.to(device=device, dtype=dtype)
    x = torch.randn(workload.seq, workload.batch, workload.input_size, device=device, dtype=dtype)
    projection = torch.randn(workload.seq, workload.batch, workload.hidden, device=device, dtype=dtype)
    return module, x.requires_grad_(), projection


def make_candidates(module, workload, cell, device, backend_names) -> list[Candidate]:
    twin_class = (CELL_MODULES if workload.generate else SEQUENCE_MODULES)[cell][1]
    candidates = [Candidate(TORCH, module)]
    if device.type == "cuda":
        candidates.append(Candidate(TORCH_NO_CUDNN, module, lambda: torch.backends.cudnn.flags(enabled=False)))
    candidates += [Candidate(name, twin_class.from_torch(module, backend=name)) for name in backend_names]
    return candidates


def backends_to_run(settings, device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """(the backends to run, {backend asked for by name: why it cannot run this device and dtype})."""
    if settings.backends is None:
        names = [name for name in backends.BACKENDS if name != "reference"]
        return [name for name in names if backends.unsupported(name, device, dtype) is None], {}
    reasons = {name: backends.unsupported(name, device, dtype) for name in settings.backends}
    return [name for name in settings.backends if reasons[name] is None], {n: r for n, r in reasons.items() if r}


def warm_up_process(device: torch.device, settings) -> None:
    """A tiny case through every candidate, so that one-time setup stays out of the first-call times."""
    for dtype in settings.dtypes:
        for generate in (False, True):
            tiny = Workload("warm-up", ("lstm",), 1, 8, 8, 2, 2, "", generate)
            module, x, projection = build(tiny, "lstm", dtype, device)
            for candidate in make_candidates(module, tiny, "lstm", device, backends_to_run(settings, device, dtype)[0]):
                forward_fn(candidate, x, generate)()
                if not generate:
                    train_step_fn(candidate, x, projection)()


def run_case(workload: Workload, cell: str, dtype: torch.dtype, device: torch.device, settings) -> dict:
    names, skipped = backends_to_run(settings, device, dtype)
    module, x, projection = build(workload, cell, dtype, device)
    candidates = make_candidates(module, workload, cell, device, names)

    first_calls = {c.name: first_call_ms(c, x, workload.generate, device) for c in candidates}
    exact = exact_results(module, x, projection, workload.generate)
    verdicts = check(candidates, exact, x, projection, workload.generate)
    correct = [c for c in candidates if verdicts[c.name]["correct"]]
    tasks = {(c.name, "fwd"): forward_fn(c, x, workload.generate) for c in correct}
    if not workload.generate:
        tasks.update({(c.name, "train"): train_step_fn(c, x, projection) for c in correct})
    graph_errors = {}
    if device.type == "cuda" and not workload.generate:
        for c in correct:
            if c.name == TORCH_NO_CUDNN:  # the graphed comparison is against cuDNN
                continue
            stage = "capture"
            try:  # failures are reported, not fatal: the plain figures stand
                graphed = graphed_forward(c, x)
                stage = "replay"
                replayed = check_graphed(graphed, c, exact, verdicts[TORCH]["errors"], x, projection)
            except (RuntimeError, TypeError) as error:
                graph_errors[c.name] = f"{stage} failed: {type(error).__name__}: {error}"
                continue
            if replayed["correct"]:
                tasks[c.name, "train_graphed"] = graphed_train_step_fn(c, graphed, x, projection)
            else:
                graph_errors[c.name] = f"wrong under graph replay: {', '.join(replayed['failing'])}"
    timings = time_tasks(tasks, settings, device, per_call=workload.seq if workload.generate else 1)
    peaks = {c.name: train_peak_bytes(tasks[c.name, "train"], device) for c in correct if not workload.generate}

    results = []
    for candidate in candidates:
        result = {"candidate": candidate.name, "first_call_ms": first_calls[candidate.name], **verdicts[candidate.name]}
        for kind in KINDS:
            result[kind] = timings.get((candidate.name, kind))
            result[f"{kind}_speedup"] = speedup(timings, candidate.name, kind)
        result["train_peak_bytes"] = peaks.get(candidate.name)
        if candidate.name in graph_errors:
            result["graph_error"] = graph_errors[candidate.name]
        results.append(result)
    results += [{"candidate": name, "skipped": reason} for name, reason in skipped.items()]
    return {"workload": workload.name, "cell": cell, "dtype": str(dtype).removeprefix("torch."),
            "fwd_unit": "ms per step" if workload.generate else "ms per call", "results": results}


# --- end to end: a word-level language model ----------------------------------------------------


class WordLM(nn.Module):
    """Zaremba et al.'s medium word LM without dropout: embedding, 2-layer LSTM, linear decoder."""

    def __init__(self, vocab: int, size: int = 650, layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, size)
        self.lstm = nn.LSTM(size, size, layers)
        self.decoder = nn.Linear(size, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.embedding(tokens))
        return self.decoder(output)


def word_lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def word_lm_results(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> dict:
    """The figures a candidate must get right: the loss and the gradient of the embedding."""
    model.train()
    loss = word_lm_loss(model, tokens, targets)
    (grad,) = torch.autograd.grad(loss, model.embedding.weight)
    return {"loss": loss.detach(), "grad embedding.weight": grad}


def word_lm_step_fn(candidate: Candidate, tokens: torch.Tensor, targets: torch.Tensor):
    def train_step():
        candidate.module.train()
        candidate.module.zero_grad(set_to_none=True)
        with candidate.context():
            word_lm_loss(candidate.module, tokens, targets).backward()

    return train_step


def run_word_lm(device: torch.device, settings, seq: int = 35, batch: int = 20) -> dict:
    """A case in run_case's format (training step only) with tokens per second added to each result."""
    dtype = torch.float32
    vocab = 2000 if settings.quick else 10000
    names, skipped = backends_to_run(settings, device, dtype)
    torch.manual_seed(0)
    model = WordLM(vocab).to(device)
    tokens, targets = torch.randint(vocab, (2, seq, batch), device=device)
    candidates = [Candidate(TORCH, model)]
    candidates += [Candidate(name, rnnkernels.convert(copy.deepcopy(model), backend=name)) for name in names]

    exact = word_lm_results(copy.deepcopy(model).double(), tokens, targets)
    verdicts = check_against(exact, candidates, lambda m: word_lm_results(m, tokens, targets), dtype)
    tasks = {(c.name, "train"): word_lm_step_fn(c, tokens, targets) for c in candidates if verdicts[c.name]["correct"]}
    timings = time_tasks(tasks, settings, device, per_call=1)

    results = []
    for candidate in candidates:
        timing = timings.get((candidate.name, "train"))
        results.append({"candidate": candidate.name, "first_call_ms": None, **verdicts[candidate.name],
                        "fwd": None, "fwd_speedup": None, "train": timing,
                        "train_speedup": speedup(timings, candidate.name, "train"), "train_peak_bytes": None,
                        "tokens_per_s": seq * batch / timing["median"] * 1e3 if timing else None})
    results += [{"candidate": name, "skipped": reason} for name, reason in skipped.items()]
    return {"workload": f"word-lm-{vocab}", "cell": "lstm", "dtype": str(dtype).removeprefix("torch."),
            "fwd_unit": "ms per call", "word_lm": {"vocab": vocab, "size": 650, "layers": 2, "seq": seq,
                                                   "batch": batch}, "results": results}


# --- reporting -----------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def times_text(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def timing_text(timing: dict | None) -> str:
    """Median, with half the interquartile range as a percentage of it."""
    if timing is None:
        return "-"
    return f"{ms(timing['median'])} ±{50 * (timing['q3'] - timing['q1']) / timing['median']:.0f}%"


def progress_bar(index: int, total: int, width: int = 10) -> str:
    done = width * index // total
    return f"[{'#' * done}{'.' * (width - done)}] {index}/{total}"


def progress_line(case: dict, index: int, total: int, seconds: float) -> str:
    parts = []
    for result in case["results"]:
        if "skipped" in result:
            parts.append(f"{result['candidate']} skipped ({result['skipped']})")
        elif not result["correct"]:
            parts.append(f"{result['candidate']} WRONG ({result.get('error') or ', '.join(result['failing'])})")
        else:
            fwd = f" fwd {ms(result['fwd']['median'])}" if result["fwd"] else ""
            train = f" train {ms(result['train']['median'])}" if result["train"] else ""
            parts.append(f"{result['candidate']}{fwd}{train}")
    return f"{progress_bar(index, total)} {case['workload']} {case['cell']} {case['dtype']}: {' | '.join(parts)} ms ({seconds:.1f} s)"


def table(cases: list[dict], device: torch.device) -> str:
    cuda = device.type == "cuda"
    header = ["workload", "cell", "dtype", "backend", "fwd ms", "train ms", "fwd x", "train x"]
    header += ["graphed ms", "graphed x", "first ms", "peak MiB"] if cuda else ["first ms"]
    rows = [header + ["correct"]]
    for case in cases:
        for r in case["results"]:
            if "skipped" in r:
                continue
            speedups = [times_text(r.get(key)) for key in ("fwd_speedup", "train_speedup")]
            row = [case["workload"], case["cell"], case["dtype"], r["candidate"], timing_text(r["fwd"]),
                   timing_text(r["train"]), *speedups]
            if cuda:
                row += [timing_text(r.get("train_graphed")), times_text(r.get("train_graphed_speedup"))]
            row.append(ms(r["first_call_ms"]))
            if cuda:
                row.append(f"{r['train_peak_bytes'] / 2**20:.0f}" if r["train_peak_bytes"] else "-")
            rows.append(row + ["yes" if r["correct"] else "NO"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) + 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    notes = ("generate-* fwd: ms per single step at batch 1. ±: half the interquartile range over repeats, "
             "as % of the median. x: torch.nn time / this time."
             + (" graphed: the training step captured in CUDA graphs (make_graphed_callables), against "
                "torch.nn's captured the same way." if cuda else ""))
    graph_errors = [f"{case['workload']} {case['cell']} {case['dtype']} {r['candidate']}, graphed: {r['graph_error']}"
                    for case in cases for r in case["results"] if r.get("graph_error")]
    word_lm_lines = [word_lm_line(case) for case in cases if "word_lm" in case]
    return "\n".join(lines + ["", notes, *graph_errors, *word_lm_lines])


def word_lm_line(case: dict) -> str:
    lm = case["word_lm"]
    parts = [f"{r['candidate']} {r['tokens_per_s']:,.0f} tokens/s ({r['train_speedup']:.2f}x)"
             for r in case["results"] if r.get("tokens_per_s")]
    return (f"{case['workload']}: training step of embedding {lm['vocab']}x{lm['size']}, {lm['layers']}-layer LSTM "
            f"{lm['size']}, linear to {lm['vocab']}, cross-entropy; seq {lm['seq']} batch {lm['batch']}: "
            + " | ".join(parts))


def load_pyplot():
    """matplotlib.pyplot on the Agg backend, or exit saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("rnnkernels.bench: --plot needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot(cases: list[dict], path: Path, device: str) -> None:
    """A bar chart of the speed-up over torch.nn of every correct candidate, per case: the training step
    where the case has one, else the forward."""
    pyplot = load_pyplot()
    names = list(dict.fromkeys(r["candidate"] for case in cases for r in case["results"] if r["candidate"] != TORCH))
    several_dtypes = len({case["dtype"] for case in cases}) > 1
    labels, speedups = [], {name: [] for name in names}
    for case in cases:
        kind = "train" if any(r.get("train") for r in case["results"]) else "fwd"
        dtype = f" {case['dtype']}" if several_dtypes else ""
        labels.append(f"{case['workload']} {case['cell']}{dtype}" + ("" if kind == "train" else " (fwd)"))
        by_name = {r["candidate"]: r.get(f"{kind}_speedup") for r in case["results"]}
        for name in names:
            speedups[name].append(by_name.get(name) or math.nan)  # skipped or wrong: no bar

    figure, axes = pyplot.subplots(figsize=(max(6.0, 0.6 * len(cases) * max(1, len(names)) + 2), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cases))]
        bars = axes.bar(positions, speedups[name], width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(cases)), labels, rotation=35, ha="right", fontsize=8)
    axes.set_ylabel("speed-up over torch.nn (x)")
    axes.set_title(f"rnnkernels on {device}: speed-up over torch.nn\n(training step; (fwd): forward only)",
                   fontsize=10)
    axes.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_SETTINGS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "RNNKERNELS_CPU_CACHE_MB",
                "RNNKERNELS_CPU_BFLOAT16")


def metadata(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "rnnkernels.bench", *sys.argv[1:]]),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_float_lanes": ops.CPU_FLOAT_LANES,  # 16: AVX-512; 8: AVX2 with FMA; 4: NEON; 1: none
        "cpu_bfloat16_panels": ops.CPU_BFLOAT16_PANELS,  # amx, avx512_bf16, float32 or None
        # settings that change what either side runs: oneDNN's and MKL's instruction sets (an AVX2 machine
        # is ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 on an AVX-512 one), threads, our cache
        "environment": {name: os.environ[name] for name in CPU_SETTINGS if name in os.environ},
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "rnnkernels": rnnkernels.__version__,
        "git_commit": git_commit(),
        "load_average_at_start": os.getloadavg(),  # 1, 5, 15 min: other work skews the figures
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --- command line --------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rnnkernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", help=f"comma-separated, from: {', '.join(w.name for w in WORKLOADS)}")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated, from: lstm, gru, rnn")
    parser.add_argument("--dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--backends", help="comma-separated rnnkernels backends (default: every one that "
                        "supports the device and dtype, but the slow 'reference')")
    parser.add_argument("--quick", action="store_true", help="the QUICK workloads, fewer repeats")
    parser.add_argument("--repeats", type=int, help="timed samples per figure (default 10 with --quick, else 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    parser.add_argument("--min-sample-ms", type=float, default=20.0, help="back-to-back calls per sample "
                        "last at least this long (default 20)")
    parser.add_argument("--json", type=Path, help="write every figure and the run's metadata here")
    parser.add_argument("--report", type=Path, help="print the table of a run saved with --json, and run nothing")
    parser.add_argument("--word-lm", action="store_true", help="add a training step of a whole word-level LM "
                        "(vocab 10000, or 2000 with --quick), in tokens per second")
    parser.add_argument("--plot", type=Path, help="save a PNG bar chart of the speed-ups here (needs matplotlib)")
    parser.add_argument("--time-limit", type=float, help="start no new case after this many seconds; the table "
                        "and the JSON hold the cases done and say how many were left out")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    try:
        args.workloads = lookup(args.workloads) if args.workloads else QUICK if args.quick else WORKLOADS
    except ValueError as error:
        parser.error(str(error))
    args.cells = [cell.strip() for cell in args.cells.split(",")]
    args.dtypes = [getattr(torch, name.strip(), None) for name in args.dtypes.split(",")]
    args.backends = [name.strip() for name in args.backends.split(",")] if args.backends else None
    if any(cell not in CELLS for cell in args.cells):
        parser.error(f"--cells: choose from {CELLS}")
    if any(not isinstance(dtype, torch.dtype) or not dtype.is_floating_point for dtype in args.dtypes):
        parser.error("--dtypes: floating-point torch dtypes, e.g. float32,bfloat16")
    if args.backends and any(name not in backends.BACKENDS for name in args.backends):
        parser.error(f"--backends: choose from {backends.BACKENDS}")
    args.repeats = args.repeats or (10 if args.quick else 20)
    if args.repeats < 2 or args.warmup < 1:
        parser.error("--repeats must be at least 2 and --warmup at least 1")
    return args


def save(report: dict, path: Path) -> None:
    """Written after every case, by replacing the file whole: a run cut short keeps every case it finished."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=1))
    partial.replace(path)


def print_report(report: dict) -> None:
    """The table of a run, run now or saved, and a line saying so where it stopped before its last case
    (--time-limit, or killed)."""
    metadata, cases = report["metadata"], report["cases"]
    about = [metadata["date_utc"], metadata.get("gpu") or metadata["cpu"], f"torch {metadata['torch']}",
             f"commit {metadata['git_commit']}"]
    if metadata.get("cpu_float_lanes"):
        bfloat16 = metadata.get("cpu_bfloat16_panels")
        about.append(f"CPU kernels: {metadata['cpu_float_lanes']} float lanes"
                     + (f", bfloat16 on {bfloat16}" if bfloat16 else ""))
    about += [f"{name}={value}" for name, value in metadata.get("environment", {}).items()]
    print(", ".join(about))
    print(table(cases, torch.device(metadata["device"])))
    planned = metadata.get("cases_planned")
    if planned is not None and len(cases) < planned:
        print(f"partial run: {len(cases)} of {planned} cases" + (
            f" (--time-limit {metadata['time_limit_s']:g} s reached)" if metadata.get("time_limit_reached") else ""))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:
        load_pyplot()  # fail now, not after the run
    if args.report:
        saved = json.loads(args.report.read_text())
        print_report(saved)
        if args.plot:
            plot(saved["cases"], args.plot, saved["metadata"]["device"])
            print(f"wrote {args.plot}", file=sys.stderr)
        return
    device = torch.device(args.device)
    # The word LM first: one case, and the end-to-end figure, so a run cut short by --time-limit keeps it.
    cases = [functools.partial(run_word_lm, device, args)] if args.word_lm else []
    cases += [functools.partial(run_case, w, cell, dtype, device, args)
              for w in args.workloads for cell in w.cells if cell in args.cells for dtype in args.dtypes]
    report = {"metadata": {**metadata(device), "cases_planned": len(cases), "time_limit_s": args.time_limit},
              "settings": {"repeats": args.repeats, "warmup": args.warmup, "min_sample_ms": args.min_sample_ms,
                           "backends": args.backends, "word_lm": args.word_lm, "cells": args.cells,
                           "dtypes": [str(d).removeprefix("torch.") for d in args.dtypes],
                           "workloads": [dataclasses.asdict(w) for w in args.workloads]}, "cases": []}
    print(f"rnnkernels.bench on {device} ({report['metadata']['gpu'] or report['metadata']['cpu']}), "
          f"{len(cases)} cases, {args.repeats} repeats", file=sys.stderr)
    started = time.perf_counter()
    warm_up_process(device, args)
    for index, run in enumerate(cases, 1):
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            report["metadata"]["time_limit_reached"] = True
            break
        start = time.perf_counter()
        case = run()
        report["cases"].append(case)
        print(progress_line(case, index, len(cases), time.perf_counter() - start), file=sys.stderr, flush=True)
        if args.json:
            save(report, args.json)
    report["metadata"]["load_average_at_end"] = os.getloadavg()
    print_report(report)
    if args.json:
        save(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(report["cases"], args.plot, str(device))
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
