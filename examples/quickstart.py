"""Swap the recurrent layers of a model for rnnkernels' and check that training gives the same numbers.

    python examples/quickstart.py [--cell lstm|gru|rnn] [--steps 20]
"""

import argparse
import copy
import time

import torch
from torch import nn

import rnnkernels


class CharModel(nn.Module):
    def __init__(self, cell: str, vocab: int = 28, hidden: int = 256):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](vocab, hidden)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.decoder(output)


def train(model: nn.Module, batches, steps: int) -> tuple[list[float], float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="lstm", choices=("lstm", "gru", "rnn"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokens = torch.randint(0, 28, (8, 36, 32))  # 8 batches of 35 steps (+1 for the targets), batch 32
    batches = [(nn.functional.one_hot(t[:-1], 28).float(), t[1:]) for t in tokens]
    reference = CharModel(args.cell)
    ours = rnnkernels.convert(copy.deepcopy(reference))
    print(ours)

    torch_losses, torch_time = train(reference, batches, args.steps)
    our_losses, our_time = train(ours, batches, args.steps)
    gap = max(abs(a - b) for a, b in zip(torch_losses, our_losses))
    print(f"loss after {args.steps} steps: torch.nn {torch_losses[-1]:.5f}, rnnkernels {our_losses[-1]:.5f}")
    print(f"largest loss difference over the run: {gap:.2e}")
    print(f"time: torch.nn {torch_time:.2f} s, rnnkernels {our_time:.2f} s ({torch_time / our_time:.2f}x)")


if __name__ == "__main__":
    main()
