"""scripts/bars.py, which checks the GPU issues' bars against saved benchmark runs: on a real tiny CPU run,
each verdict (met, unmet, wrong, missing) where it belongs and the figure per time step computed from it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from rnnkernels import bench
from rnnkernels.workloads import Workload

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bars.py"
spec = importlib.util.spec_from_file_location("bars", SCRIPT)
bars = sys.modules["bars"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bars)

# A tiny layer under a bar workload's name, so the bars apply to it.
LONG_SEQ = Workload("long-seq", ("lstm",), 1, 5, 8, 4, 3, "test")


def saved_run(tmp_path, case: dict, dtypes=("float32",)) -> Path:
    path = tmp_path / "run.json"
    workload = {"name": LONG_SEQ.name, "seq": LONG_SEQ.seq, "cells": list(LONG_SEQ.cells)}
    path.write_text(json.dumps({"metadata": bench.metadata(torch.device("cpu")),
                                "settings": {"workloads": [workload], "cells": ["lstm", "gru"], "dtypes": list(dtypes)},
                                "cases": [case]}))
    return path


def tiny_case() -> dict:
    # The cpu backend alone: under TRITON_INTERPRET=1 the triton backend would run on the CPU too.
    args = bench.parse_args(["--repeats", "2", "--warmup", "1", "--min-sample-ms", "0.1", "--device", "cpu",
                             "--backends", "cpu"])
    return bench.run_case(LONG_SEQ, "lstm", torch.float32, torch.device("cpu"), args)


def test_verdicts_on_a_real_run(tmp_path):
    case = tiny_case()
    cases, _ = bars.cases_of([saved_run(tmp_path, case)])
    ours = next(r for r in case["results"] if r["candidate"] == "cpu")
    checked = bars.rows(cases, [
        bars.Bar(0, "cpu", "fwd us/step", ("long-seq",), 1e9, False),
        bars.Bar(0, "cpu", "train x", ("long-seq",), 1e9, True),
        bars.Bar(0, "cuda", "train x", ("long-seq",), 1.0, True),
        bars.Bar(0, "cpu", "train peak / torch.nn", ("long-seq",), 1.0, False),  # not measured on the CPU
        bars.Bar(0, "cpu", "train x", ("ptb-medium",), 1.0, True),  # no such case: no row
    ])
    assert [r["verdict"] for r in checked] == ["met", "unmet", "missing", "missing"]
    assert checked[0]["value"] == ours["fwd"]["median"] * 1e3 / LONG_SEQ.seq
    assert checked[1]["value"] == ours["train_speedup"]


def test_a_wrong_result_meets_no_bar(tmp_path):
    case = tiny_case()
    for result in case["results"]:
        if result["candidate"] == "cpu":
            result["correct"] = False
    cases, _ = bars.cases_of([saved_run(tmp_path, case)])
    (row,) = bars.rows(cases, [bars.Bar(0, "cpu", "train x", ("long-seq",), 0.0, True)])
    assert row["verdict"] == "wrong" and row["value"] is None


def test_a_case_the_run_did_not_reach_meets_no_bar(tmp_path):
    """A run that set out to measure float32 and bfloat16 but stopped after the float32 case (--time-limit)."""
    cases, planned = bars.cases_of([saved_run(tmp_path, tiny_case(), dtypes=("float32", "bfloat16"))])
    assert planned == {("long-seq", "lstm", "float32"), ("long-seq", "lstm", "bfloat16")}
    checked = bars.rows(cases, [bars.Bar(0, "cpu", "train x", ("long-seq",), 0.0, True)], planned)
    assert [(r["dtype"], r["verdict"]) for r in checked] == [("float32", "met"), ("bfloat16", "not run")]


def test_report_of_the_issue_bars(tmp_path, capsys):
    bars.main([str(saved_run(tmp_path, tiny_case()))])
    text = capsys.readouterr().out
    # long-seq has bars in both issues; this run has neither GPU backend
    lines = text.strip().splitlines()
    verdicts = {line.split()[-1] for line in lines[1:-1]}
    assert verdicts == {"missing"} and any("long-seq" in line for line in lines)
    assert lines[-1].startswith("bars met: issue 4 0 of ")
