"""Which backend runs: rnnkernels.backends.select, use_backend, the module's backend=, RNNKERNELS_BACKEND."""

from __future__ import annotations

import threading

import pytest
import torch

import rnnkernels
from rnnkernels import backends, ops

CPU = torch.device("cpu")
HAS_EXTENSION = ops.LOAD_ERROR is None


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("RNNKERNELS_BACKEND", raising=False)


@pytest.fixture
def spy(monkeypatch):
    """Records the backend each rnnkernels layer call selected."""
    chosen = []
    original = backends.select

    def select(*args, **kwargs):
        backend = original(*args, **kwargs)
        chosen.append(backend.name)
        return backend

    monkeypatch.setattr(backends, "select", select)
    return chosen


def test_backend_names():
    assert rnnkernels.BACKENDS == ("cpu", "cuda", "triton", "reference")
    assert backends.check_name("auto") == "auto"
    for name in rnnkernels.BACKENDS:
        assert backends.check_name(name) == name
    with pytest.raises(ValueError):
        backends.check_name("CPU")
    with pytest.raises(ValueError):
        backends.unsupported("tpu", CPU, torch.float32)


@pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not loaded")
def test_auto_picks_cpu_on_cpu():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert backends.select("auto", CPU, dtype).name == "cpu"
    assert backends.unsupported("cpu", CPU, torch.float32) is None


def test_auto_falls_back_to_reference():
    assert backends.select("auto", CPU, torch.complex64).name == "reference"
    assert backends.select("auto", CPU, torch.int64).name == "reference"
    assert backends.select("auto", torch.device("meta"), torch.float32).name == "reference"
    assert backends.select("reference", torch.device("meta"), torch.float32).name == "reference"


def test_explicit_backend_that_cannot_run_raises_with_reason():
    for device, dtype, words in [(torch.device("meta"), torch.float32, "meta"), (CPU, torch.int32, "int32"),
                                 (CPU, torch.complex128, "complex128")]:
        reason = backends.unsupported("cpu", device, dtype)
        assert reason is not None and words in reason
        with pytest.raises(RuntimeError, match=f"backend 'cpu' cannot run this input: .*{words}"):
            backends.select("cpu", device, dtype)
    assert backends.unsupported("reference", torch.device("meta"), torch.complex64) is None


def test_missing_extension_reason(monkeypatch):
    monkeypatch.setattr(ops, "LOAD_ERROR", "ImportError: nope")
    assert "could not be loaded" in backends.unsupported("cpu", CPU, torch.float32)
    assert backends.select("auto", CPU, torch.float32).name == "reference"
    with pytest.raises(RuntimeError, match="could not be loaded"):
        backends.select("cpu", CPU, torch.float32)


@pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not loaded")
def test_precedence_context_over_module_over_env(monkeypatch):
    assert backends.select("reference", CPU, torch.float32).name == "reference"
    assert backends.select("cpu", CPU, torch.float32).name == "cpu"
    with rnnkernels.use_backend("reference"):
        assert backends.select("cpu", CPU, torch.float32).name == "reference"
        assert backends.select("auto", CPU, torch.float32).name == "reference"
        with rnnkernels.use_backend("cpu"):  # nested: innermost wins, restored on exit
            assert backends.select("reference", CPU, torch.float32).name == "cpu"
        assert backends.select("cpu", CPU, torch.float32).name == "reference"
        with rnnkernels.use_backend("auto"):  # "auto" in the context defers to the module
            assert backends.select("cpu", CPU, torch.float32).name == "cpu"
    assert backends.select("auto", CPU, torch.float32).name == "cpu"
    monkeypatch.setenv("RNNKERNELS_BACKEND", "reference")
    assert backends.select("auto", CPU, torch.float32).name == "reference"  # env applies where the module says auto
    assert backends.select("cpu", CPU, torch.float32).name == "cpu"  # not over an explicit module choice
    with rnnkernels.use_backend("cpu"):
        assert backends.select("auto", CPU, torch.float32).name == "cpu"  # the context beats the env
    monkeypatch.setenv("RNNKERNELS_BACKEND", "")
    assert backends.select("auto", CPU, torch.float32).name == "cpu"
    monkeypatch.setenv("RNNKERNELS_BACKEND", "auto")
    assert backends.select("auto", CPU, torch.float32).name == "cpu"


def test_env_cpu_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("RNNKERNELS_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="cannot run"):
        backends.select("auto", torch.device("meta"), torch.float32)


def test_use_backend_restores_on_exception():
    with pytest.raises(KeyError):
        with rnnkernels.use_backend("reference"):
            raise KeyError
    assert backends._override.name is None


@pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not loaded")
def test_use_backend_is_per_thread():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        entered.wait()
        seen["other"] = backends.select("auto", CPU, torch.float32).name
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with rnnkernels.use_backend("reference"):
        entered.set()
        release.wait(10)
        seen["main"] = backends.select("auto", CPU, torch.float32).name
    thread.join()
    assert seen == {"main": "reference", "other": "cpu"}


@pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not loaded")
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_modules_run_the_selected_backend(kind, spy, monkeypatch):
    x = torch.randn(3, 2, 4) if "Cell" not in kind else torch.randn(2, 4)
    auto = getattr(rnnkernels, kind)(4, 5)
    explicit = getattr(rnnkernels, kind)(4, 5, backend="reference")
    auto(x)
    explicit(x)
    with rnnkernels.use_backend("reference"):
        auto(x)
    with rnnkernels.use_backend("cpu"):
        explicit(x)
    monkeypatch.setenv("RNNKERNELS_BACKEND", "reference")
    auto(x)
    explicit(x)
    assert spy == ["cpu", "reference", "reference", "cpu", "reference", "reference"]
    # the outputs agree whichever backend ran
    a = auto(x)
    monkeypatch.delenv("RNNKERNELS_BACKEND")
    b = auto(x)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        u, v = (u[0], v[0]) if isinstance(u, tuple) else (u, v)
        torch.testing.assert_close(u, v)


@pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not loaded")
def test_backend_attribute_and_repr():
    m = rnnkernels.LSTM(4, 5, backend="reference")
    assert m.backend == "reference" and "backend='reference'" in repr(m)
    assert "backend" not in repr(rnnkernels.LSTM(4, 5))
    twin = rnnkernels.GRU.from_torch(torch.nn.GRU(4, 5))
    assert twin.backend == "auto"
    assert repr(twin).startswith("GRU(4, 5")
