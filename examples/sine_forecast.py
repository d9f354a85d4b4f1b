"""Forecasting noisy sine waves: an LSTM or GRU learns to predict each next value of waves of random
frequency, phase and amplitude, then rolls out the future of held-out waves by feeding its own
predictions back, after warming up its state on their observed past. Saves the loss curves and a plot of
the roll-outs against the true (noise-free) continuation.

    python examples/sine_forecast.py --compare
    python examples/sine_forecast.py --cell gru --horizon 100 --noise 0.1
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import common


class Forecaster(nn.Module):
    def __init__(self, cell: str, hidden: int, layers: int):
        super().__init__()
        self.rnn = common.torch_rnn(cell)(1, hidden, layers)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state=None):
        """x: (steps, batch, 1) values -> the prediction of each next value, same shape; final state."""
        output, state = self.rnn(x, state)
        return self.head(output), state


def waves(count: int, length: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, clean) waves, (length, count, 1): periods of 20 to 40 steps, amplitudes 0.5 to 1."""
    def uniform(low, high):
        return low + (high - low) * torch.rand(count, generator=generator)

    t = torch.arange(length, dtype=torch.float32)[:, None]
    clean = uniform(0.5, 1.0) * torch.sin(2 * math.pi * t / uniform(20, 40) + uniform(0, 2 * math.pi))
    noisy = clean + noise * torch.randn(clean.shape, generator=generator)
    return noisy[..., None], clean[..., None]


def train_step(run: common.Run, x: torch.Tensor, y: torch.Tensor) -> float:
    prediction, _ = run.model(x)
    loss = F.mse_loss(prediction, y)
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    return loss.item()


@torch.no_grad()
def roll_out(model: nn.Module, past: torch.Tensor, horizon: int) -> torch.Tensor:
    """The next `horizon` values after `past`, each predicted from the model's own previous prediction."""
    model.eval()
    prediction, state = model(past)  # warm-up: the state takes in the observed past
    future = [prediction[-1:]]
    for _ in range(horizon - 1):
        prediction, state = model(future[-1], state)
        future.append(prediction)
    model.train()
    return torch.cat(future)


def plot_forecasts(runs: common.Runs, past: torch.Tensor, truth: torch.Tensor, futures: list, path) -> None:
    plt = common.pyplot(path)
    if plt is None:
        return
    shown = min(3, past.shape[1])
    figure, axes = plt.subplots(shown, 1, figsize=(9, 2.4 * shown), squeeze=False, sharex=True)
    t_past = torch.arange(len(past))
    t_future = torch.arange(len(past), len(past) + len(truth))
    for k, axis in enumerate(axes[:, 0]):
        axis.plot(t_past, past[:, k, 0].cpu(), ".", markersize=3, color="gray", label="observed (noisy)")
        axis.plot(t_future, truth[:, k, 0].cpu(), color="black", linewidth=2, label="truth (noise-free)")
        for run, future, style in zip(runs, futures, ("--", ":")):
            axis.plot(t_future, future[:, k, 0].cpu(), style, linewidth=2, label=f"roll-out, {run.name}")
        axis.axvline(len(past) - 0.5, color="gray", linewidth=0.8)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("time step")
    figure.suptitle("sine_forecast: roll-out of held-out waves against the truth")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> common.Runs:
    parser = common.parser(__doc__)
    parser.add_argument("--cell", default="lstm", choices=("lstm", "gru"))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--series", type=int, default=512, help="training waves")
    parser.add_argument("--length", type=int, default=200, help="time steps per wave")
    parser.add_argument("--noise", type=float, default=0.05, help="standard deviation of the noise")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.005, help="Adam's learning rate")
    parser.add_argument("--horizon", type=int, default=60, help="steps to roll out after the observed past")
    args = common.parse(parser, argv)

    generator = torch.Generator().manual_seed(args.seed)
    train, _ = waves(args.series, args.length, args.noise, generator)
    valid, valid_clean = waves(64, args.length + args.horizon, args.noise, generator)
    train, valid, valid_clean = train.to(args.device), valid.to(args.device), valid_clean.to(args.device)
    past, truth = valid[:args.length], valid_clean[args.length:]

    runs = common.build_runs(args, lambda: Forecaster(args.cell, args.hidden, args.layers),
                             lambda model: torch.optim.Adam(model.parameters(), lr=args.lr))
    for epoch in range(1, args.epochs + 1):
        chosen = torch.randperm(args.series, generator=generator).to(args.device).split(args.batch)
        batches = [(train[:-1, c], train[1:, c]) for c in chosen]  # each value, the next one
        losses = runs.epoch(f"epoch {epoch}", batches, train_step, items=lambda batch: batch[0].numel())
        futures = [roll_out(run.model, past, args.horizon) for run in runs]
        runs.log(f"epoch {epoch}/{args.epochs}", {"train MSE": losses,
                                                   "roll-out MSE": [F.mse_loss(f, truth).item() for f in futures]})

    plot_forecasts(runs, past, truth, futures, args.out / "sine_forecast.png")
    runs.finish(args.out / "sine_forecast-loss.png", f"sine_forecast: {args.cell}", "values",
                log_scale=("train MSE", "roll-out MSE"))
    return runs


if __name__ == "__main__":
    main()
