"""The host emulation that runs the CUDA backend's tests without a GPU (tests/cuda_emulation) reports the
mistakes it claims to: each rule-breaking kernel of its bindings fails as a GPU would not let it pass, and
the CUDA tests on the "emulated" target really run the emulated kernels, on the path they force. Built
with AddressSanitizer, it stands in for compute-sanitizer's memcheck: the CUDA tests of every path run
clean under it, and it does catch a kernel writing past its buffer."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emulation
from helpers import rnn_inputs, torch_module, twin
from rnnkernels import ops
from rnnkernels.workloads import Workload

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None or cuda_emulation.UNSUPPORTED is not None,
                                reason=cuda_emulation.UNSUPPORTED or "compiled extension not loaded")


TESTS = Path(__file__).resolve().parent
# Every path and option of the CUDA backend: both sequence paths at sizes that split the work (and with
# lengths, reverse, H = 0), the projected LSTM, float64, the fused and the GEMM one-step paths.
SANITIZED_TESTS = "emulated and (sizes or paths_agree or zero_hidden or one_step or proj_ or float64_runs)"


@pytest.fixture(scope="module")
def emulated():
    return cuda_emulation.module()


def test_a_missing_barrier_shows_in_the_results(emulated):
    expected = torch.roll(torch.arange(64, dtype=torch.int32), -1)
    for seed in range(3):
        emulated.configure(4, seed)
        assert torch.equal(emulated.probe("neighbour_with_barrier"), expected)
        # Without the barrier, threads that run before their neighbour read shared memory nobody wrote yet.
        assert not torch.equal(emulated.probe("neighbour"), expected)


def test_a_race_between_blocks_shows_in_the_results(emulated):
    """Blocks drift apart between grid barriers, as on a GPU: a value one block overwrites before another
    has read it changes the results for some seed; read and written in two slots by parity, it never does."""
    expected = torch.full((64,), 8.0)
    racy = []
    for seed in range(4):
        emulated.configure(4, seed)
        assert torch.equal(emulated.probe("exchange_two_slots"), expected)
        racy.append(not torch.equal(emulated.probe("exchange_one_slot"), expected))
    assert any(racy)


@pytest.mark.parametrize("name,message", [
    ("split_barrier", "deadlocks; threads wait at different barriers: block 0: 32 at __syncthreads; "
                      "block 0: 32 at grid.sync"),
    ("divergent_syncthreads", "meet at __syncthreads from different places"),
    ("shuffle_after_return", "shuffles with a full mask but its warp has 31 live lanes"),
    ("misaligned_load", "not 16-byte aligned"),
    ("past_shared", "wrote past the 256 bytes of its dynamic shared memory"),
    ("stale_read_only", "wrote memory it also read through the read-only path"),
])
def test_rule_breaking_kernels_raise(emulated, name, message):
    # Block order decides whether the stale read-only read is seen (a write before the first read is not):
    # some seed among a few runs the reading block first.
    for seed in range(4):
        emulated.configure(4, seed)
        try:
            emulated.probe(name)
        except RuntimeError as error:
            assert re.search(message, str(error)), str(error)
            return
    pytest.fail(f"{name}: no error in 4 seeds")


@pytest.mark.parametrize("path", ["persistent", "stepwise"])
def test_the_emulated_target_runs_the_cuda_kernels(path, monkeypatch):
    monkeypatch.setenv("RNNKERNELS_CUDA_PATH", path)
    m = torch_module("GRU", input_size=5, hidden_size=16, num_layers=2)
    x, _ = rnn_inputs(m, T=5, B=3)
    with cuda_emulation.Installation() as installation:
        plain, cooperative = installation.emulated.launches()
        twin(m, "cpu")(x)[0].sum().backward()
        plain_after, cooperative_after = installation.emulated.launches()
    # Two layers, a forward and a backward sweep each: one cooperative launch per sweep on the persistent
    # path; on the stepwise path one pointwise kernel per step and sweep, and none cooperative.
    if path == "persistent":
        assert cooperative_after - cooperative == 4
    else:
        assert cooperative_after == cooperative and plain_after - plain >= 2 * 2 * 5


def run_sanitized(log: Path, *args: str) -> subprocess.CompletedProcess:
    """python *args in a process that runs the emulation built with AddressSanitizer; its reports go to log.*
    (pytest would otherwise swallow them with the output it captures)."""
    env = cuda_emulation.sanitizer_environment()
    env["ASAN_OPTIONS"] += f":log_path={log}"
    return subprocess.run([sys.executable, *args], cwd=TESTS, env=env, capture_output=True, text=True)


def reports(log: Path) -> str:
    return "".join(p.read_text() for p in log.parent.glob(f"{log.name}.*"))


@pytest.mark.slow
def test_address_sanitizer_catches_a_write_past_a_buffer(tmp_path):
    result = run_sanitized(tmp_path / "asan", "-c", "import cuda_emulation; cuda_emulation.module().probe('past_global')")
    assert result.returncode != 0
    assert re.search(r"heap-buffer-overflow .*\n(.*\n)*.* in .*past_global", reports(tmp_path / "asan")), result.stderr


@pytest.mark.slow
def test_cuda_backend_is_clean_under_address_sanitizer(tmp_path):
    result = run_sanitized(tmp_path / "asan", "-m", "pytest", "test_cuda.py", "-q", "-p", "no:cacheprovider",
                           "-k", SANITIZED_TESTS)
    assert result.returncode == 0, result.stdout[-3000:] + reports(tmp_path / "asan")[-6000:]
    assert int(re.search(r"(\d+) passed", result.stdout).group(1)) >= 60, result.stdout[-3000:]


def test_gpu_sweep_script_runs_on_the_emulation():
    """scripts/gpu_sweep.py, which gpu_check.sh runs on a GPU, over a tiny layer here: a row per units
    setting with both operators timed (64 units: more than the layer has, so one block)."""
    spec = importlib.util.spec_from_file_location("gpu_sweep", TESTS.parent / "scripts" / "gpu_sweep.py")
    gpu_sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_sweep)
    tiny = Workload("tiny", ("lstm", "gru"), 1, 8, 16, 3, 2, "")
    with cuda_emulation.Installation():
        rows = gpu_sweep.sweep([tiny], ["lstm", "gru"], [torch.float32], ("default", 5, 64), torch.device("cpu"),
                               repeats=1, report=lambda row: None)
    assert [(row["cell"], row["units"]) for row in rows] == [
        (cell, units) for cell in ("lstm", "gru") for units in ("default", 5, 64)]
    assert all(row["forward_us_per_step"] > 0 and row["backward_us_per_step"] > 0 for row in rows), rows
