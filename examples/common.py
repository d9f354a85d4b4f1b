"""What every example shares: the options --backend, --device, --compare, --threads, --seed and --out; the model and
its rnnkernels twin trained side by side on the same batches; progress bar, curves, plots, summary line;
and the text every machine has offline.

An example builds its model with torch.nn layers; `build_runs` makes the Runs that train it: torch.nn
itself (`--backend torch`), its `rnnkernels.convert`-ed copy, or both (`--compare`). `Runs.step` gives
every run the same batch in turn and times each, so noise from other work on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import rnnkernels
from rnnkernels import backends
from rnnkernels.bench import SEQUENCE_MODULES, TORCH, progress_bar


def torch_rnn(cell: str) -> type[nn.Module]:
    """nn.LSTM, nn.GRU or nn.RNN for "lstm", "gru", "rnn"."""
    return SEQUENCE_MODULES[cell][0]


def detach(state):
    """The hidden state cut from the graph of the batch that made it: truncated backpropagation."""
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


# --- command line --------------------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every example takes; the example adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=("torch", "auto", *rnnkernels.BACKENDS),
                        help="rnnkernels backend of the recurrent layers, or 'torch' for torch.nn alone (default: auto)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--compare", action="store_true",
                        help="also train torch.nn from the same seed on the same batches; print both curves and the speed-up")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the plots (default: .)")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.compare and args.backend == "torch":
        parser.error("--compare trains torch.nn beside an rnnkernels backend: give --backend auto or a backend name")
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


# --- training side by side -----------------------------------------------------------------------


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


@dataclasses.dataclass
class Run:
    """One model in training: torch.nn itself or its rnnkernels twin."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rng: tuple  # this run's random number state: every run draws the same dropout masks
    state: object = None  # what the example carries from one batch to the next (the hidden state)
    schedule: object = None  # a learning-rate schedule, where the example steps one
    seconds: float = 0.0  # in training steps
    items: int = 0  # tokens or samples trained on
    curves: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)


class Runs(list):
    """The Runs of one example, torch.nn first where it runs."""

    def __init__(self, runs: list[Run], device: torch.device):
        super().__init__(runs)
        self.device = device
        self.steps = 0

    def step(self, train_step: Callable[[Run], float], items: int) -> list[float]:
        """train_step(run) on every run in turn (it returns the loss as a float, which waits for the
        device); each timed and with its own random number state. Returns the losses."""
        losses = []
        for run in self:
            _set_rng_state(run.rng, self.device)
            start = time.perf_counter()
            losses.append(train_step(run))
            run.seconds += time.perf_counter() - start
            run.rng = _rng_state(self.device)
            run.items += items
        self.steps += 1
        return losses

    def epoch(self, label: str, batches: list[tuple], train_step: Callable[..., float],
              items: Callable[[tuple], int]) -> list[float]:
        """`step` over every batch, train_step(run, *batch), with a progress bar; each run's mean loss.
        items(batch): the tokens or samples in a batch."""
        totals = [0.0] * len(self)
        for i, batch in enumerate(batches, 1):
            losses = self.step(lambda run: train_step(run, *batch), items(batch))
            totals = [total + loss for total, loss in zip(totals, losses)]
            progress(label, i, len(batches))
        return [total / len(batches) for total in totals]

    def log(self, label: str, values: dict[str, list[float]], fmt: str = ".5g") -> None:
        """Records one point of each named curve per run (at the current step) and prints them, with the
        relative difference of the twin from torch.nn when both run."""
        parts = []
        for name, per_run in values.items():
            for run, value in zip(self, per_run):
                run.curves.setdefault(name, []).append((self.steps, value))
            text = " | ".join(f"{run.name} {value:{fmt}}" for run, value in zip(self, per_run))
            if len(per_run) == 2:
                text += f" ({100 * (per_run[1] - per_run[0]) / abs(per_run[0]):+.2f}%)"
            parts.append(f"{name}: {text}")
        print(f"{label}  " + "  ".join(parts), flush=True)

    def finish(self, plot: Path, title: str, unit: str, log_scale: tuple[str, ...] = ()) -> None:
        """The end of an example: the plot of the curves and the summary line."""
        plot_curves(self, plot, title, log_scale)
        self.summary(unit)

    def summary(self, unit: str) -> None:
        """The closing line: throughput of each run and the speed-up of the twin over torch.nn."""
        parts = [f"{run.name} {run.items / run.seconds:,.0f} {unit}/s ({run.seconds:.1f} s training)" for run in self]
        if len(self) == 2:
            parts.append(f"speed-up {self[0].seconds / self[1].seconds:.2f}x")
        print(f"summary: {self.steps} steps | " + " | ".join(parts), flush=True)


def build_runs(args: argparse.Namespace, make_model: Callable[[], nn.Module],
               make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> Runs:
    """The seeded torch.nn model and, per --backend / --compare, its rnnkernels twin (a converted deep copy,
    so both start from the very same weights)."""
    torch.manual_seed(args.seed)
    model = make_model().to(args.device)
    models = {}
    if args.backend == "torch" or args.compare:
        models[TORCH] = model
    if args.backend != "torch":
        chosen = backends.select(args.backend, args.device, torch.get_default_dtype()).name
        models[f"rnnkernels ({chosen})"] = rnnkernels.convert(copy.deepcopy(model), backend=args.backend)
    rng = _rng_state(args.device)
    return Runs([Run(name, m, make_optimizer(m), rng) for name, m in models.items()], args.device)


def progress(label: str, index: int, total: int) -> None:
    """A progress bar on a terminal, redrawn in place (nothing where the output goes to a file)."""
    if sys.stderr.isatty():
        end = "\n" if index == total else ""
        print(f"\r{label} {progress_bar(index, total, width=30)}", end=end, file=sys.stderr, flush=True)


# --- plots ---------------------------------------------------------------------------------------


def pyplot(path: Path):
    """matplotlib.pyplot (Agg), or None with a message that the plot `path` is skipped."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot_curves(runs: Runs, path: Path, title: str, log_scale: tuple[str, ...] = ()) -> None:
    """One panel per recorded curve, one line per run (nothing without matplotlib)."""
    plt = pyplot(path)
    if plt is None:
        return
    names = list(runs[0].curves)
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for axis, name in zip(axes[0], names):
        for run, style in zip(runs, ("-", "--")):
            steps, values = zip(*run.curves[name])
            axis.plot(steps, values, style, marker="." if len(steps) < 30 else None, label=run.name)
        axis.set_title(name)
        axis.set_xlabel("training step")
        if name in log_scale:
            axis.set_yscale("log")
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot: {path}")


# --- text ----------------------------------------------------------------------------------------


def clean_lines(text: str) -> list[str]:
    """d2l's preprocessing of the Time Machine: letters only, lower case, one space between words."""
    lines = (re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.splitlines())
    return [line for line in lines if line]


def offline_text() -> str:
    """English prose every Python installation carries: the language reference that pydoc shows
    (pydoc_data/topics.py in the standard library, about 460,000 characters)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        sys.exit("this Python has no pydoc_data (the standard library's documentation text): give a text file")
    return "\n".join(topics[name] for name in sorted(topics))


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))  # capped: a diverged run prints a huge number, not an overflow
