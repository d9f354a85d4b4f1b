"""rnnkernels.bench on tiny cases: the correctness gate flags a wrong candidate, timings and the report hold
what the JSON promises, and on CUDA the graphed training step runs. The real figures come from
`python -m rnnkernels.bench`; these tests keep the suite itself working."""

from __future__ import annotations

import json

import pytest
import torch

import rnnkernels
from helpers import DEVICES
from rnnkernels import bench, ops
from rnnkernels.workloads import Workload

TINY = Workload("tiny", ("lstm", "gru", "rnn"), 2, 5, 8, 4, 3, "test")
TINY_GENERATE = Workload("tiny-generate", ("lstm", "gru", "rnn"), 1, 8, 8, 4, 1, "test", generate=True)


def settings(**overrides):
    args = bench.parse_args(["--repeats", "2", "--warmup", "1", "--min-sample-ms", "0.1", "--device", "cpu"])
    vars(args).update(overrides)
    return args


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("workload", [TINY, TINY_GENERATE], ids=["sequence", "generate"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_run_case_checks_and_times_every_candidate(cell, workload, device):
    case = bench.run_case(workload, cell, torch.float32, torch.device(device), settings(device=device))
    by_name = {r["candidate"]: r for r in case["results"]}
    assert bench.TORCH in by_name and len(by_name) >= 2
    kinds = ["fwd"] if workload.generate else ["fwd", "train"] + (["train_graphed"] if device == "cuda" else [])
    for result in by_name.values():
        if "skipped" in result:
            continue
        assert result["correct"], result
        for kind in kinds:
            assert result[kind]["median"] > 0 and len(result[kind]["samples"]) == 2
        assert result["fwd_speedup"] > 0
    assert by_name[bench.TORCH]["fwd_speedup"] == pytest.approx(1.0)


def test_wrong_candidate_is_flagged_and_not_timed():
    module, x, projection = bench.build(TINY, "gru", torch.float32, torch.device("cpu"))
    wrong = rnnkernels.GRU.from_torch(module, backend="cpu")
    wrong.weight_hh_l0 = torch.nn.Parameter(module.weight_hh_l0.detach() * 1.001)
    candidates = [bench.Candidate(bench.TORCH, module), bench.Candidate("cpu", wrong)]
    verdicts = bench.check(candidates, bench.exact_results(module, x, projection, False), x, projection, False)
    assert verdicts[bench.TORCH]["correct"]
    assert not verdicts["cpu"]["correct"] and "output" in verdicts["cpu"]["failing"]


def test_graphed_step_is_checked_before_it_is_timed():
    """A replayed training step is judged by the eager rule (CUDA graphs need a GPU: here eager stand-ins
    for the graphed forward: one right, one off by a constant, one NaN, one that keeps its first input as
    a graph that baked in a host value would)."""
    module, x, projection = bench.build(TINY, "lstm", torch.float32, torch.device("cpu"))
    exact = bench.exact_results(module, x, projection, False)
    eager = bench.check([bench.Candidate(bench.TORCH, module)], exact, x, projection, False)
    torch_errors = eager[bench.TORCH]["errors"]
    candidate = bench.Candidate("cpu", rnnkernels.LSTM.from_torch(module, backend="cpu"))
    forward = bench._OutputOnly(candidate.module)
    assert bench.check_graphed(forward, candidate, exact, torch_errors, x, projection)["correct"]
    stale = bench.check_graphed(lambda inputs: forward(inputs) + 1e-3, candidate, exact, torch_errors, x, projection)
    assert not stale["correct"] and stale["failing"] == ["train output"]
    nan = bench.check_graphed(lambda inputs: forward(inputs) * float("nan"), candidate, exact, torch_errors, x,
                              projection)
    assert not nan["correct"] and set(nan["failing"]) == set(nan["errors"])
    seen = []

    def first_input_kept(inputs):
        seen.append(inputs.detach())
        return forward(inputs * 0 + seen[0])

    kept = bench.check_graphed(first_input_kept, candidate, exact, torch_errors, x, projection)
    assert not kept["correct"] and {"train output", "grad input"} <= set(kept["failing"])


def test_report_round_trip(tmp_path, capsys, monkeypatch):
    """The report names what the figures depend on beyond the device: the CPU kernels' vector width and
    the settings that change what either side runs (an AVX2 machine emulated on an AVX-512 one)."""
    case = bench.run_case(TINY, "lstm", torch.float32, torch.device("cpu"), settings())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # after the run: oneDNN reads it once, at its first call
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"metadata": bench.metadata(torch.device("cpu")), "cases": [case]}))
    bench.main(["--report", str(path)])
    text = capsys.readouterr().out
    assert "tiny" in text and "torch.nn" in text and "cpu" in text
    assert f"CPU kernels: {ops.CPU_FLOAT_LANES} float lanes" in text and "ONEDNN_MAX_CPU_ISA=AVX2" in text


def test_run_cut_short_keeps_its_finished_cases(tmp_path, monkeypatch, capsys):
    """The JSON is rewritten after every case: a run killed in its second case leaves the first, and the
    report says the run is partial."""
    calls, real_run_case = [], bench.run_case

    def run_case(workload, cell, dtype, device, args):
        calls.append(cell)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as a kill in the middle of the second case
        return real_run_case(TINY, cell, dtype, device, args)

    monkeypatch.setattr(bench, "run_case", run_case)
    path = tmp_path / "run.json"
    argv = ["--device", "cpu", "--workloads", "timemachine-char", "--cells", "lstm,gru", "--repeats", "2",
            "--warmup", "1", "--min-sample-ms", "0.1", "--json", str(path)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    saved = json.loads(path.read_text())
    assert [(case["workload"], case["cell"]) for case in saved["cases"]] == [("tiny", "lstm")]
    assert saved["metadata"]["cases_planned"] == 2
    capsys.readouterr()
    bench.main(["--report", str(path)])
    assert "partial run: 1 of 2 cases" in capsys.readouterr().out


def test_time_limit_starts_no_case_past_it(tmp_path, capsys):
    path = tmp_path / "run.json"
    bench.main(["--device", "cpu", "--workloads", "timemachine-char", "--cells", "rnn", "--time-limit", "0",
                "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["cases"] == [] and saved["metadata"]["time_limit_reached"]
    assert "partial run: 0 of 1 cases (--time-limit 0 s reached)" in capsys.readouterr().out
