"""The GPU issues' bars, checked against saved runs of `python -m rnnkernels.bench --json`: one row per bar
and case with the figure measured, the figure needed and whether it is met; a case that a run set out to
measure but did not reach, that ran wrong, or that lacks the figure does not meet its bar.
scripts/gpu_check.sh prints it after the benchmark.

    python scripts/bars.py gpu-out/bench-bfloat16.json gpu-out/bench-float32.json [--unmet]

BARS below are those of issue 4 (the CUDA backend) and issue 5 (the Triton backend), against torch.nn on
cuDNN in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from rnnkernels.bench import TORCH


@dataclasses.dataclass(frozen=True)
class Bar:
    issue: int
    backend: str
    figure: str  # a key of FIGURES
    workloads: tuple[str, ...]
    bound: float
    at_least: bool  # met when figure >= bound (else figure <= bound)

    def text(self) -> str:
        return f"{self.figure} {'>=' if self.at_least else '<='} {self.bound:g}"


def _result(case: dict, name: str) -> dict | None:
    return next((r for r in case["results"] if r["candidate"] == name and "skipped" not in r), None)


def _median(result: dict, kind: str) -> float | None:
    return result[kind]["median"] if result.get(kind) else None


def _peak_ratio(case: dict, result: dict) -> float | None:
    baseline = _result(case, TORCH)
    if not baseline or not baseline.get("train_peak_bytes") or not result.get("train_peak_bytes"):
        return None
    return result["train_peak_bytes"] / baseline["train_peak_bytes"]


def _fwd_us_per_step(case: dict, result: dict) -> float | None:
    """The forward's microseconds per time step: per call over the workload's steps (generate workloads
    are timed per step already)."""
    median = _median(result, "fwd")
    if median is None:
        return None
    steps = 1 if case["fwd_unit"] == "ms per step" else case["seq"]
    return median * 1e3 / steps


# figure -> (case, the backend's result) -> value
FIGURES: dict[str, Callable[[dict, dict], float | None]] = {
    "train x": lambda case, r: r.get("train_speedup"),
    "fwd x": lambda case, r: r.get("fwd_speedup"),
    "graphed train x": lambda case, r: r.get("train_graphed_speedup"),
    "fwd us/step": _fwd_us_per_step,
    "train peak / torch.nn": _peak_ratio,
    "first call ms": lambda case, r: r.get("first_call_ms"),
}

CHAR_AND_LONG = ("timemachine-char", "lyrics-char", "mnist-rows", "long-seq")
SEQUENCE = (*CHAR_AND_LONG, "fastrnns", "ptb-medium", "ptb-large", "deepbench-1024")
GENERATE = ("generate-256", "generate-1024")
BARS = (
    Bar(4, "cuda", "train x", ("timemachine-char", "lyrics-char", "mnist-rows", "fastrnns", "long-seq"), 3.0, True),
    Bar(4, "cuda", "train x", ("ptb-medium", "ptb-large", "deepbench-1024"), 1.5, True),
    Bar(4, "cuda", "graphed train x", ("timemachine-char", "fastrnns", "ptb-medium", "long-seq"), 1.5, True),
    Bar(4, "cuda", "graphed train x", ("deepbench-1024", "ptb-large"), 1.0, True),
    Bar(4, "cuda", "fwd us/step", ("long-seq",), 2.0, False),
    Bar(4, "cuda", "fwd us/step", GENERATE, 15.0, False),
    Bar(4, "cuda", "train peak / torch.nn", SEQUENCE, 1.0, False),
    Bar(4, "cuda", "first call ms", (*SEQUENCE, *GENERATE), 1000.0, False),
    Bar(5, "triton", "train x", CHAR_AND_LONG, 2.0, True),
    Bar(5, "triton", "train x", ("fastrnns", "ptb-medium", "ptb-large", "deepbench-1024"), 1.0, True),
    Bar(5, "triton", "fwd x", GENERATE, 1.0, True),  # "never slower than cuDNN": generation too
)


def rows(cases: list[dict], bars=BARS, planned=()) -> list[dict]:
    """Per bar, per case of its workloads in the runs or planned by them, (workload, cell, dtype): the value,
    and 'met', 'unmet', 'wrong', 'missing' (the backend or the figure) or 'not run' (a run cut short)."""
    out = []
    ran = {(case["workload"], case["cell"], case["dtype"]) for case in cases}
    not_run = [{"workload": w, "cell": cell, "dtype": dtype, "results": []}
               for w, cell, dtype in sorted(set(planned) - ran)]
    for bar in bars:
        for case in cases + not_run:
            if case["workload"] not in bar.workloads:
                continue
            row = {"issue": bar.issue, "bar": bar.text(), "backend": bar.backend, "workload": case["workload"],
                   "cell": case["cell"], "dtype": case["dtype"], "value": None}
            result = _result(case, bar.backend)
            if not case["results"]:
                row["verdict"] = "not run"
            elif result is None:
                row["verdict"] = "missing"
            elif not result["correct"]:
                row["verdict"] = "wrong"
            else:
                row["value"] = FIGURES[bar.figure](case, result)
                if row["value"] is None:
                    row["verdict"] = "missing"
                else:
                    met = row["value"] >= bar.bound if bar.at_least else row["value"] <= bar.bound
                    row["verdict"] = "met" if met else "unmet"
            out.append(row)
    return out


def cases_of(paths: list[Path]) -> tuple[list[dict], set[tuple[str, str, str]]]:
    """The cases of saved runs, each with its workload's seq (for figures per time step), and the (workload,
    cell, dtype) the runs set out to measure (runs saved before settings named their dtypes: those run)."""
    cases, planned = [], set()
    for path in paths:
        saved = json.loads(path.read_text())
        settings = saved["settings"]
        dtypes = settings.get("dtypes") or sorted({case["dtype"] for case in saved["cases"]})
        cells = settings.get("cells")
        planned |= {(w["name"], cell, dtype) for w in settings["workloads"] for cell in w["cells"]
                    if cells is None or cell in cells for dtype in dtypes}
        seq = {w["name"]: w["seq"] for w in settings["workloads"]}
        cases += [{**case, "seq": seq.get(case["workload"])} for case in saved["cases"]]
    return cases, planned


def report(found: list[dict], unmet_only: bool = False) -> str:
    shown = [r for r in found if not unmet_only or r["verdict"] != "met"]
    header = ["issue", "backend", "bar", "workload", "cell", "dtype", "value", "verdict"]
    table = [header] + [[f"#{r['issue']}", r["backend"], r["bar"], r["workload"], r["cell"], r["dtype"],
                         "-" if r["value"] is None else f"{r['value']:.3g}", r["verdict"]] for r in shown]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    counts = [f"issue {issue} {sum(r['verdict'] == 'met' for r in found if r['issue'] == issue)} of "
              f"{sum(r['issue'] == issue for r in found)}" for issue in sorted({r["issue"] for r in found})]
    lines.append("bars met: " + (", ".join(counts) or "no case of any bar in these runs"))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of python -m rnnkernels.bench --json")
    parser.add_argument("--unmet", action="store_true", help="show only the rows not met")
    args = parser.parse_args(argv)
    cases, planned = cases_of(args.runs)
    print(report(rows(cases, planned=planned), args.unmet))


if __name__ == "__main__":
    main()
