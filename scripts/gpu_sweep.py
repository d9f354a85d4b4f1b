"""Time per step of the CUDA persistent path's forward and backward operators, one layer, over the hidden
units each block owns (RNNKERNELS_CUDA_UNITS), on the benchmark's shapes: the data to choose the planner's
default (the fewest units per block, so every multiprocessor gets a block) by measurement. More units per
block means fewer blocks at each step's grid barrier and less of h read from L2 per step, but more work
per block. Median over repeats, CUDA events. Run by scripts/gpu_check.sh; alone:

    python scripts/gpu_sweep.py --json sweep.json [--workloads long-seq,fastrnns] [--dtypes float32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from pathlib import Path

import torch

from rnnkernels import ops
from rnnkernels.bench import save, seconds_per_call
from rnnkernels.reference import GATES
from rnnkernels.workloads import Workload, lookup

# The benchmark's shapes of one layer each (ptb-large fits on chip in 16-bit types only; its float32 rows say
# why not).
WORKLOADS = "timemachine-char,fastrnns,ptb-medium,ptb-large,deepbench-1024,long-seq"
UNITS = ("default", 1, 2, 4, 8, 16, 32)


def operator_args(cell: str, workload: Workload, dtype: torch.dtype, device: torch.device):
    """Forward operator arguments of one layer of the workload, and the gradients its backward takes."""
    g = torch.Generator().manual_seed(0)
    T, B, H, G = workload.seq, workload.batch, workload.hidden, GATES[cell]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    forward = (rand(T, B, G * H), rand(B, H), rand(B, H) if cell == "lstm" else None, rand(G * H, H, scale=H**-0.5),
               rand(G * H), None, None, False)
    grads = (rand(T, B, H), rand(B, H), rand(B, H) if cell == "lstm" else None)
    return forward, grads


def time_one(cell: str, forward_args, grads, repeats: int, device: torch.device) -> dict:
    """Milliseconds per call of the forward and the backward operator (medians over repeats)."""
    gx, h0, c0, w_hh, _, w_hr, lengths, reverse = forward_args
    output, _, _, workspace = ops.forward_op(cell)(*forward_args)
    backward_op = getattr(torch.ops.rnnkernels, f"{cell}_backward")

    def forward():
        ops.forward_op(cell)(*forward_args)

    def backward():
        backward_op(*grads, h0, c0, w_hh, w_hr, lengths, reverse, output, workspace)

    result = {}
    for name, fn in (("forward", forward), ("backward", backward)):
        fn()  # warm-up
        result[name] = statistics.median(seconds_per_call(fn, 3, device) * 1e3 for _ in range(repeats))
    return result


@contextlib.contextmanager
def environment(name: str, value: str | None):
    """os.environ[name] set to value (unset for None) inside the block, restored after."""
    previous = os.environ.get(name)
    _set_environment(name, value)
    try:
        yield
    finally:
        _set_environment(name, previous)


def _set_environment(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def sweep(workloads, cells, dtypes, units, device: torch.device, repeats: int = 5, report=print) -> list[dict]:
    """One row per (workload, cell, dtype, units): microseconds per step of each operator, or why the
    persistent path cannot run that many units per block."""
    rows = []
    for workload in workloads:
        for cell in [c for c in cells if c in workload.cells]:
            cell_op = "rnn_tanh" if cell == "rnn" else cell
            for dtype in dtypes:
                forward_args, grads = operator_args(cell_op, workload, dtype, device)
                for count in units:
                    row = {"workload": workload.name, "cell": cell, "dtype": str(dtype).removeprefix("torch."),
                           "hidden": workload.hidden, "batch": workload.batch, "seq": workload.seq, "units": count}
                    setting = None if count == "default" else str(count)
                    with environment("RNNKERNELS_CUDA_PATH", "persistent"), \
                            environment("RNNKERNELS_CUDA_UNITS", setting):
                        try:
                            ms = time_one(cell_op, forward_args, grads, repeats, device)
                            row.update({f"{k}_us_per_step": v * 1e3 / workload.seq for k, v in ms.items()})
                        except RuntimeError as error:
                            row["why_not"] = str(error).splitlines()[0]
                    rows.append(row)
                    report(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=WORKLOADS)
    parser.add_argument("--cells", default="lstm,gru")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []

    def report(row: dict) -> None:  # the file rewritten after every row: a run cut short keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            save({"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows}, args.json)

    sweep(lookup(args.workloads), args.cells.split(","), [getattr(torch, d) for d in args.dtypes.split(",")], UNITS,
          device, args.repeats, report)


if __name__ == "__main__":
    main()
