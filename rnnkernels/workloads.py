"""The benchmark workloads: the one table of shapes that rnnkernels is measured on (see rnnkernels.bench).

Sequence workloads run a whole torch.nn.LSTM/GRU/RNN over a time-major (seq, batch, input_size) batch.
Generate workloads run the matching cell (LSTMCell/GRUCell/RNNCell) one step at a time, `seq` steps at
batch 1 with the state carried, as autoregressive sampling does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    cells: tuple[str, ...]  # among "lstm", "gru", "rnn" (tanh)
    layers: int
    input_size: int
    hidden: int
    seq: int  # time steps; for generate workloads, single steps taken one at a time
    batch: int
    origin: str
    generate: bool = False


def _generate(hidden: int) -> Workload:
    return Workload(
        f"generate-{hidden}", ("lstm", "gru", "rnn"), 1, hidden, hidden, 200, 1, "autoregressive sampling", True
    )


WORKLOADS: tuple[Workload, ...] = (
    Workload("timemachine-char", ("lstm", "gru", "rnn"), 1, 28, 256, 35, 32, "d2l char LM (Time Machine)"),
    Workload("lyrics-char", ("lstm", "gru", "rnn"), 1, 1027, 256, 35, 32, "char LM on a lyrics corpus"),
    Workload("mnist-rows", ("lstm", "gru"), 2, 28, 128, 28, 64, "image rows as a sequence"),
    Workload("ptb-medium", ("lstm", "gru"), 2, 650, 650, 35, 20, "Zaremba et al. medium word LM"),
    Workload("ptb-large", ("lstm",), 2, 1500, 1500, 35, 20, "Zaremba et al. large word LM"),
    Workload("fastrnns", ("lstm",), 1, 512, 512, 100, 64, "PyTorch's fastrnns benchmark default"),
    Workload("deepbench-1024", ("lstm", "gru"), 1, 1024, 1024, 50, 64, "DeepBench-style training shape"),
    Workload("long-seq", ("lstm", "gru"), 1, 256, 256, 1000, 16, "long sequences, latency-bound"),
    _generate(256),
    _generate(1024),
)

_BY_NAME = {workload.name: workload for workload in WORKLOADS}

# What `--quick` runs: the workloads a 2-core CPU gets through in a few minutes.
QUICK: tuple[Workload, ...] = tuple(
    _BY_NAME[name]
    for name in ("timemachine-char", "lyrics-char", "mnist-rows", "ptb-medium", "long-seq", "generate-256")
)


def lookup(names: list[str] | tuple[str, ...] | str) -> tuple[Workload, ...]:
    """The workloads named (a list or a comma-separated string), in the order given."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in names if name not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {sorted(_BY_NAME)}")
    return tuple(_BY_NAME[name] for name in names)

