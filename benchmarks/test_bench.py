"""pytest-benchmark cases over the workloads of rnnkernels.workloads, built by rnnkernels.bench.

    pip install -e ".[bench]"
    pytest benchmarks --benchmark-only [-k timemachine] [--benchmark-autosave] [--benchmark-compare]

One benchmark per QUICK workload x cell x backend ("torch": torch.nn itself; "cpu": the rnnkernels twin on
the cpu backend), float32 on the CPU: the forward (under no_grad, eval mode; generate workloads step a
cell over the sequence) and, for sequence workloads, the training step of rnnkernels.bench. Correctness
is the business of tests/ and of `python -m rnnkernels.bench`, not of these timings.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from rnnkernels import backends, bench  # noqa: E402
from rnnkernels.workloads import QUICK  # noqa: E402

DEVICE = torch.device("cpu")
DTYPE = torch.float32
BACKENDS = ("torch", "cpu")
CASES = [pytest.param(w, cell, id=f"{w.name}-{cell}") for w in QUICK for cell in w.cells]
TRAIN_CASES = [case for case in CASES if not case.values[0].generate]


def candidate(workload, cell: str, backend: str):
    """(the candidate of bench for `backend`, the input, the projection of the loss)."""
    reason = None if backend == "torch" else backends.unsupported(backend, DEVICE, DTYPE)
    if reason:
        pytest.skip(reason)
    module, x, projection = bench.build(workload, cell, DTYPE, DEVICE)
    candidates = bench.make_candidates(module, workload, cell, DEVICE, [] if backend == "torch" else [backend])
    return candidates[-1], x, projection


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload, cell", CASES)
def test_forward(benchmark, workload, cell, backend):
    subject, x, _ = candidate(workload, cell, backend)
    benchmark.group = f"{workload.name} {cell} forward"
    benchmark(bench.forward_fn(subject, x, workload.generate))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload, cell", TRAIN_CASES)
def test_train_step(benchmark, workload, cell, backend):
    subject, x, projection = candidate(workload, cell, backend)
    benchmark.group = f"{workload.name} {cell} training step"
    benchmark(bench.train_step_fn(subject, x, projection))
