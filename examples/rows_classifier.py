"""Classifying images row by row: a 2-layer LSTM reads an image one row per time step and a linear layer
classifies its last output (the "MNIST rows" recipe; shapes from the "mnist-rows" workload of
rnnkernels/workloads.py).

    python examples/rows_classifier.py --compare                 # scikit-learn's bundled 8x8 digits
    python examples/rows_classifier.py --mnist ~/data --epochs 3   # MNIST, where it is already on disk

Images: MNIST from --mnist DIR (the four idx files, gzipped or not, in DIR or DIR/MNIST/raw, as
torchvision leaves them); otherwise the 8x8 digits that scikit-learn ships (1,797 images, nothing to
download); where scikit-learn is not installed, synthetic 8x8 row patterns made here, saying so.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import common
from rnnkernels.workloads import lookup

(WORKLOAD,) = lookup("mnist-rows")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class RowsClassifier(nn.Module):
    def __init__(self, cell: str, width: int, hidden: int, layers: int, classes: int = 10):
        super().__init__()
        self.rnn = common.torch_rnn(cell)(width, hidden, layers, batch_first=True)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (batch, rows, width) -> class scores (batch, classes), from the output after the last row."""
        output, _ = self.rnn(images)
        return self.classifier(output[:, -1])


def read_idx(path: Path) -> torch.Tensor:
    """An idx file (MNIST's format): a magic number whose last byte is the rank, the sizes, the bytes."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
        data = file.read()
    rank = data[3]
    shape = struct.unpack(f">{rank}I", data[4:4 + 4 * rank])
    return torch.frombuffer(bytearray(data[4 + 4 * rank:]), dtype=torch.uint8).reshape(shape)


def load_mnist(folder: Path):
    for where in (folder, folder / "MNIST" / "raw"):
        paths = [next((p for p in (where / name, where / f"{name}.gz") if p.exists()), None) for name in MNIST_FILES]
        if all(paths):
            train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
            return train_x.float() / 255, train_y.long(), test_x.float() / 255, test_y.long(), f"MNIST from {where}"
    raise SystemExit(f"rows_classifier: no MNIST idx files ({', '.join(MNIST_FILES)}, or .gz) in {folder} "
                     f"or {folder / 'MNIST' / 'raw'}")


def split(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, test_share: float = 0.2):
    order = torch.randperm(len(images), generator=generator)
    cut = int(len(images) * (1 - test_share))
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


def synthetic_patterns(generator: torch.Generator, count: int = 2000):
    """Ten classes of 8x8 images: a fixed random pattern per class, shifted by up to a pixel either way
    and noised, so that the class shows only in how the rows follow one another."""
    templates = (torch.rand(10, 8, 8, generator=generator) > 0.6).float()
    labels = torch.randint(10, (count,), generator=generator)
    shifts = torch.randint(-1, 2, (count, 2), generator=generator)
    images = torch.stack([templates[y].roll(tuple(s.tolist()), dims=(0, 1)) for y, s in zip(labels, shifts)])
    return (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1), labels


def load_images(args, generator: torch.Generator):
    """(train images, train labels, test images, test labels, what they are); images (count, rows, width)."""
    if args.mnist:
        return load_mnist(args.mnist)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("scikit-learn is not installed: training on synthetic 8x8 row patterns instead of its bundled "
              "digits (pip install scikit-learn for those)")
        return (*split(*synthetic_patterns(generator), generator), "synthetic 8x8 row patterns")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16  # pixel values 0 to 16
    return (*split(images, torch.tensor(digits.target), generator), "scikit-learn's 8x8 digits")


def train_step(run: common.Run, images: torch.Tensor, labels: torch.Tensor) -> float:
    loss = F.cross_entropy(run.model(images), labels)
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in zip(images.split(1000), labels.split(1000)))
    model.train()
    return correct / len(labels)


def main(argv: list[str] | None = None) -> common.Runs:
    parser = common.parser(__doc__)
    parser.add_argument("--mnist", type=Path, help="folder holding MNIST's idx files")
    parser.add_argument("--cell", default="lstm", choices=WORKLOAD.cells)
    parser.add_argument("--hidden", type=int, default=WORKLOAD.hidden)
    parser.add_argument("--layers", type=int, default=WORKLOAD.layers)
    parser.add_argument("--batch", type=int, default=WORKLOAD.batch)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.003, help="Adam's learning rate")
    args = common.parse(parser, argv)

    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y, test_x, test_y, origin = load_images(args, generator)
    train_x, train_y, test_x, test_y = (t.to(args.device) for t in (train_x, train_y, test_x, test_y))
    rows, width = train_x.shape[1:]
    print(f"images: {origin}: {len(train_x):,} to train, {len(test_x):,} to test, {rows} rows of {width} pixels")

    runs = common.build_runs(args, lambda: RowsClassifier(args.cell, width, args.hidden, args.layers),
                             lambda model: torch.optim.Adam(model.parameters(), lr=args.lr))
    for epoch in range(1, args.epochs + 1):
        chosen = torch.randperm(len(train_x), generator=generator).to(args.device).split(args.batch)
        losses = runs.epoch(f"epoch {epoch}", [(train_x[c], train_y[c]) for c in chosen], train_step,
                            items=lambda batch: len(batch[1]))
        runs.log(f"epoch {epoch}/{args.epochs}", {"train loss": losses,
                                                   "test accuracy": [accuracy(r.model, test_x, test_y) for r in runs]})

    runs.finish(args.out / "rows_classifier.png", f"rows_classifier: {args.cell}, {origin}", "images",
                log_scale=("train loss",))
    return runs


if __name__ == "__main__":
    main()
