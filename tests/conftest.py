"""Test configuration: import path, threads, the cuda marker."""

from __future__ import annotations

import os
import sys

import pytest
import torch

try:  # an installed rnnkernels wins; otherwise the source checkout this file lives in
    import rnnkernels  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import rnnkernels  # noqa: F401

# The suite runs many tiny recurrences; with intra-op threads on a small shared machine every step's GEMM
# pays OpenMP synchronisation (and under load from other processes that costs seconds per test). One thread
# by default; tests/test_threads.py runs the multi-threaded paths explicitly. RNNKERNELS_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("RNNKERNELS_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped where there is none)")
    config.addinivalue_line("markers", "slow: long-running")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda") is not None:  # not keywords: they hold directory names
                item.add_marker(skip)
