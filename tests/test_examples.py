"""Smoke tests of examples/: each runs a few steps on tiny settings on the CPU, on its offline data, and
must lower its loss and write the files it promises (the plots only where matplotlib is installed)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their shared module as `common`

import char_lm  # noqa: E402
import common  # noqa: E402
import rows_classifier  # noqa: E402
import sine_forecast  # noqa: E402
import word_lm  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def falls(runs: common.Runs, curve: str) -> bool:
    """Every run's `curve` ends lower than it starts."""
    return all(run.curves[curve][-1][1] < run.curves[curve][0][1] for run in runs)


def check_plots(tmp_path: Path, *names: str) -> None:
    for name in names:
        assert (tmp_path / name).exists() == HAS_MATPLOTLIB, name


def check_twins(runs: common.Runs, curve: str, tolerance: float) -> None:
    """--compare ran torch.nn and the twin, and their curves agree."""
    assert [run.name.split()[0] for run in runs] == [common.TORCH, "rnnkernels"]
    for (_, a), (_, b) in zip(runs[0].curves[curve], runs[1].curves[curve]):
        assert b == pytest.approx(a, rel=tolerance)


def test_char_lm_compare(tmp_path, capsys):
    runs = char_lm.main(["--compare", "--epochs", "2", "--max-chars", "3000", "--hidden", "32", "--batch", "8",
                         "--steps", "10", "--predict", "10", "--out", str(tmp_path)])
    assert falls(runs, "train perplexity")
    check_twins(runs, "train perplexity", 1e-3)
    output = capsys.readouterr().out
    assert "words from the corpus" in output and "tokens/s" in output and "speed-up" in output
    check_plots(tmp_path, "char_lm.png")


def test_char_lm_random_sampling_embedding_two_layers(tmp_path):
    runs = char_lm.main(["--cell", "gru", "--layers", "2", "--embedding", "8", "--sampling", "random", "--epochs", "2",
                         "--max-chars", "3000", "--hidden", "32", "--batch", "8", "--steps", "10", "--out", str(tmp_path)])
    assert falls(runs, "train perplexity")


def test_char_lm_text_file_and_failed_download(tmp_path, monkeypatch):
    text = tmp_path / "book.txt"
    text.write_text("The Time Traveller (for so it will be convenient to speak of him) was expounding. " * 40)
    runs = char_lm.main(["--text", str(text), "--backend", "torch", "--epochs", "2", "--hidden", "16", "--batch", "4",
                         "--steps", "10", "--predict", "5", "--out", str(tmp_path)])
    assert falls(runs, "train perplexity") and runs[0].name == common.TORCH
    monkeypatch.setattr(char_lm, "TIMEMACHINE_URL", "http://127.0.0.1:9/timemachine.txt")  # nothing listens there
    with pytest.raises(SystemExit, match="could not download the Time Machine"):
        char_lm.main(["--download", "timemachine", "--out", str(tmp_path)])


def test_word_lm_offline(tmp_path):
    runs = word_lm.main(["--size", "small", "--epochs", "2", "--max-words", "3000", "--log-interval", "2",
                         "--out", str(tmp_path)])
    assert falls(runs, "train perplexity") and falls(runs, "validation perplexity")
    check_plots(tmp_path, "word_lm.png")


def test_word_lm_data_folder_tied_compare(tmp_path, capsys):
    # A folder like the workspace's WikiText-2 copy: valid.txt and test.txt, no train.txt.
    lines = common.clean_lines(common.offline_text())
    (tmp_path / "valid.txt").write_text("\n".join(lines[:300]))
    (tmp_path / "test.txt").write_text("\n".join(lines[300:400]))
    runs = word_lm.main(["--data", str(tmp_path), "--size", "small", "--tied", "--compare", "--epochs", "2",
                         "--max-words", "2500", "--log-interval", "2", "--out", str(tmp_path)])
    assert "valid.txt (train)" in capsys.readouterr().out
    assert falls(runs, "validation perplexity")
    check_twins(runs, "validation perplexity", 1e-2)
    assert runs[1].model.decoder.weight is runs[1].model.embedding.weight


def test_sine_forecast(tmp_path):
    runs = sine_forecast.main(["--compare", "--series", "32", "--length", "40", "--horizon", "10", "--hidden", "16",
                               "--epochs", "3", "--batch", "8", "--out", str(tmp_path)])
    assert falls(runs, "train MSE")
    check_twins(runs, "train MSE", 1e-3)
    check_plots(tmp_path, "sine_forecast.png", "sine_forecast-loss.png")


def test_rows_classifier_without_scikit_learn(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    runs = rows_classifier.main(["--compare", "--epochs", "3", "--hidden", "32", "--out", str(tmp_path)])
    assert "scikit-learn is not installed" in capsys.readouterr().out
    assert falls(runs, "train loss")
    assert runs[1].curves["test accuracy"][-1][1] > 0.3  # ten classes: chance is 0.1
    check_plots(tmp_path, "rows_classifier.png")


def write_idx(path: Path, data: torch.Tensor) -> None:
    header = bytes([0, 0, 8, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + data.to(torch.uint8).numpy().tobytes())


def test_rows_classifier_mnist_files(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    labels = torch.arange(160) % 10
    images = (labels[:, None, None] * 25 * (torch.arange(28)[None, :, None] % 3 == 0)).expand(-1, 28, 28)
    for prefix, part in (("train", slice(0, 128)), ("t10k", slice(128, 160))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels[part])
    runs = rows_classifier.main(["--mnist", str(tmp_path), "--epochs", "3", "--hidden", "16", "--batch", "32",
                                 "--lr", "0.01", "--out", str(tmp_path)])
    assert "128 to train, 32 to test, 28 rows of 28 pixels" in capsys.readouterr().out
    assert falls(runs, "train loss")


def test_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    sine_forecast.main(["--series", "8", "--length", "20", "--horizon", "5", "--hidden", "8", "--epochs", "1",
                        "--out", str(tmp_path)])
    output = capsys.readouterr().out
    assert "matplotlib is not installed: skipping the plot" in output and "values/s" in output
    assert not list(tmp_path.glob("*.png"))


def test_compare_needs_an_rnnkernels_backend(tmp_path):
    with pytest.raises(SystemExit):
        sine_forecast.main(["--compare", "--backend", "torch", "--out", str(tmp_path)])
