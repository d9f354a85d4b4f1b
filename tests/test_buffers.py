"""The CPU kernels' large buffers (csrc/cpu/buffers.h): blocks of 2 MB and more are kept when freed and
reused, and what is built on them behaves as any CPU tensor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import check_twin, rnn_inputs, torch_module, twin
from rnnkernels import ops, reference

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")

T, B, H = 64, 32, 256  # a sweep output of T * B * H floats: 2 MB, one block


def gru_sweep(steps: int) -> tuple[torch.Tensor, ...]:
    """A GRU forward of `steps` steps on the cpu operator: its inputs and its output."""
    gx = torch.randn(steps, B, 3 * H)
    h0 = torch.zeros(B, H)
    w_hh = torch.randn(3 * H, H) / H**0.5
    return gx, h0, w_hh, ops.forward_op("gru")(gx, h0, None, w_hh, None, None, None, False, False)[0]


def sweep_output() -> torch.Tensor:
    return gru_sweep(T)[-1]


def test_a_freed_block_is_reused():
    first = sweep_output()
    address = first.data_ptr()
    del first
    assert sweep_output().data_ptr() == address


def test_a_cached_output_resizes_like_any_tensor():
    out = sweep_output()
    before = out.clone()
    out.resize_(2 * T, B, H)
    assert torch.equal(out[:T], before)
    out[T:] = 1.0
    assert out.sum().isfinite()


def test_without_a_cache_results_stay_the_same():
    """RNNKERNELS_CPU_CACHE_MB=0 frees every block at once: a training step with buffers of several blocks
    still matches torch.nn."""
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]);"
        "from helpers import check_twin, rnn_inputs, torch_module, twin;"
        "m = torch_module('LSTM', dtype=torch.float32, input_size=300, hidden_size=256);"
        "t = twin(m, 'cpu'); x, hx = rnn_inputs(m, T=80, B=32, hx=True); check_twin(m, t, x, hx)"
    )
    env = {**os.environ, "RNNKERNELS_CPU_CACHE_MB": "0"}
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_training_with_cached_buffers_matches_torch():
    """Two training steps in a row (the second on the first's blocks) against torch.nn."""
    m = torch_module("LSTM", dtype=torch.float32, input_size=300, hidden_size=256)
    t = twin(m, "cpu")
    for seed in (1, 2):
        x, hx = rnn_inputs(m, T=80, B=32, hx=True, seed=seed)
        check_twin(m, t, x, hx)


def test_a_cached_output_clones_lazily():
    """Copy-on-write clones (torch's lazy clone) take only storages whose context is their data pointer."""
    out = sweep_output()
    before = out.clone()
    clone = out._lazy_clone()
    out.zero_()
    assert torch.equal(clone, before)


@pytest.mark.parametrize("steps", [T, 2 * T, T + 1], ids=["same", "twice", "one-step-more"])
def test_sizes_that_do_not_match_an_idle_block(steps):
    """After a freed block of T steps' output: a buffer of the same size reuses it, one twice as large or
    one a step longer (a block more once rounded up) gets a block of its own; every result is right."""
    first = sweep_output()
    address = first.data_ptr()
    del first
    gx, h0, w_hh, out = gru_sweep(steps)
    assert (out.data_ptr() == address) == (steps == T)  # the output is the call's one buffer of a block or more
    expected = reference.recurrence("gru", gx.double(), h0.double(), None, w_hh.double(), None, None, None, False)[0]
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
