"""Character-level language model, as Dive into Deep Learning teaches it on H. G. Wells' The Time Machine:
letters and spaces (28 tokens), one-hot or embedded; an RNN, GRU or LSTM of 256 units over 35 steps,
batch 32; sequential or random subsequences; the hidden state carried from batch to batch and detached
(truncated backpropagation through time); gradient clipping; perplexity per epoch; and greedy text from
a prefix, the state warmed up on the prefix first. It trains with Adam rather than d2l's SGD at rate 1,
so that ten epochs (a few minutes on two cores) already write words.

    python examples/char_lm.py --compare                    # torch.nn and rnnkernels side by side
    python examples/char_lm.py --cell gru --layers 2 --sampling random
    python examples/char_lm.py --text book.txt --epochs 50  # any text file
    python examples/char_lm.py --download timemachine       # d2l's copy of the book, where the network allows

Without --text or --download it trains on text every Python installation has offline: the language
reference that ships with pydoc (pydoc_data/topics.py). Shapes default to the "timemachine-char"
workload of rnnkernels/workloads.py.
"""

from __future__ import annotations

import string
import sys
import urllib.request
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import common
from rnnkernels.workloads import lookup

(WORKLOAD,) = lookup("timemachine-char")
VOCAB = ["<unk>", " ", *string.ascii_lowercase]  # what d2l's cleaning leaves: 28 tokens
INDEX = {token: i for i, token in enumerate(VOCAB)}
TIMEMACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"


class CharLM(nn.Module):
    def __init__(self, cell: str, hidden: int, layers: int, embedding: int):
        super().__init__()
        self.embedding = nn.Embedding(len(VOCAB), embedding) if embedding else None
        self.rnn = common.torch_rnn(cell)(embedding or len(VOCAB), hidden, layers)
        self.decoder = nn.Linear(hidden, len(VOCAB))

    def forward(self, tokens: torch.Tensor, state=None):
        """tokens: (steps, batch) indices -> logits (steps, batch, vocab), final state."""
        x = self.embedding(tokens) if self.embedding is not None else F.one_hot(tokens, len(VOCAB)).float()
        output, state = self.rnn(x, state)
        return self.decoder(output), state


def load_text(args) -> str:
    if args.text:
        return args.text.read_text(encoding="utf-8", errors="replace")
    if args.download:
        try:
            with urllib.request.urlopen(TIMEMACHINE_URL, timeout=20) as response:
                return response.read().decode("utf-8")
        except OSError as error:
            sys.exit(f"char_lm: could not download the Time Machine from {TIMEMACHINE_URL} ({error}). This "
                     f"network may not allow it: save the text elsewhere and pass it with --text FILE, or run "
                     f"without --download to train on the offline corpus.")
    return common.offline_text()


def encode(text: str) -> torch.Tensor:
    return torch.tensor([INDEX.get(char, 0) for char in text])


def decode(tokens) -> str:
    return "".join(VOCAB[int(t)] for t in tokens)


def sequential_batches(corpus: torch.Tensor, batch: int, steps: int, generator: torch.Generator):
    """d2l's sequential partitioning: a random offset, the corpus cut into `batch` rows read left to
    right, so that each batch continues the one before it row by row (the state can carry over)."""
    offset = int(torch.randint(steps, (1,), generator=generator))
    length = (len(corpus) - offset - 1) // batch * batch
    xs = corpus[offset:offset + length].reshape(batch, -1)
    ys = corpus[offset + 1:offset + 1 + length].reshape(batch, -1)
    return [(xs[:, i:i + steps].T, ys[:, i:i + steps].T) for i in range(0, xs.shape[1] // steps * steps, steps)]


def random_batches(corpus: torch.Tensor, batch: int, steps: int, generator: torch.Generator):
    """d2l's random sampling: subsequences from a random offset, shuffled; neighbours in a batch are not
    neighbours in the text, so every batch starts from a zero state."""
    offset = int(torch.randint(steps, (1,), generator=generator))
    starts = torch.arange(offset, len(corpus) - steps, steps)
    starts = starts[torch.randperm(len(starts), generator=generator)]
    windows = torch.arange(steps)
    return [(corpus[chunk[None] + windows[:, None]], corpus[chunk[None] + windows[:, None] + 1])
            for chunk in starts[:len(starts) // batch * batch].split(batch)]


def train_step(run: common.Run, x: torch.Tensor, y: torch.Tensor, args) -> float:
    # Random subsequences do not continue each other: start from zeros. Sequential ones do: carry the
    # state over, detached so that the gradient stops at the batch boundary.
    state = None if args.sampling == "random" else common.detach(run.state)
    logits, run.state = run.model(x, state)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    run.optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(run.model.parameters(), args.clip)  # an RNN's gradients can explode
    run.optimizer.step()
    return loss.item()


@torch.no_grad()
def predict(model: CharLM, prefix: str, length: int, device: torch.device) -> str:
    """Greedy continuation of `prefix`: the prefix is fed first (warm-up) so the state knows it."""
    model.eval()
    logits, state = model(encode(prefix).to(device)[:, None])
    tokens = []
    for _ in range(length):
        tokens.append(logits[-1, 0].argmax())
        logits, state = model(tokens[-1].reshape(1, 1), state)
    model.train()
    return prefix + decode(tokens)


def main(argv: list[str] | None = None) -> common.Runs:
    parser = common.parser(__doc__)
    parser.add_argument("--cell", default="lstm", choices=WORKLOAD.cells)
    parser.add_argument("--layers", type=int, default=WORKLOAD.layers, choices=(1, 2))
    parser.add_argument("--hidden", type=int, default=WORKLOAD.hidden)
    parser.add_argument("--steps", type=int, default=WORKLOAD.seq, help="time steps per batch (BPTT length)")
    parser.add_argument("--batch", type=int, default=WORKLOAD.batch)
    parser.add_argument("--embedding", type=int, default=0, help="embedding size; 0: one-hot input (default)")
    parser.add_argument("--sampling", default="sequential", choices=("sequential", "random"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.005, help="Adam's learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="largest gradient norm")
    parser.add_argument("--max-chars", type=int, help="train on the first N characters of the corpus only")
    parser.add_argument("--prefix", help="start of the sampled text (default: 'time traveller' where the text "
                                         "has it, else its first word)")
    parser.add_argument("--predict", type=int, default=50, help="characters to sample after the prefix")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="train on this text file")
    source.add_argument("--download", choices=("timemachine",), help="fetch d2l's copy of The Time Machine")
    args = common.parse(parser, argv)

    text = " ".join(common.clean_lines(load_text(args)))[:args.max_chars]
    corpus = encode(text).to(args.device)
    prefix = args.prefix or ("time traveller" if "time traveller" in text else text.split()[0])
    print(f"corpus: {len(text):,} characters, {len(VOCAB)} tokens; {args.cell} {args.layers}x{args.hidden}, "
          f"{'one-hot' if not args.embedding else f'embedding {args.embedding}'} input")

    runs = common.build_runs(args, lambda: CharLM(args.cell, args.hidden, args.layers, args.embedding),
                             lambda model: torch.optim.Adam(model.parameters(), lr=args.lr))
    generator = torch.Generator().manual_seed(args.seed)  # the batches, the same for every run
    batches_of = sequential_batches if args.sampling == "sequential" else random_batches
    for epoch in range(1, args.epochs + 1):
        for run in runs:
            run.state = None
        losses = runs.epoch(f"epoch {epoch}", batches_of(corpus, args.batch, args.steps, generator),
                            lambda run, x, y: train_step(run, x, y, args), items=lambda batch: batch[0].numel())
        runs.log(f"epoch {epoch}/{args.epochs}", {"train perplexity": [common.perplexity(loss) for loss in losses]})

    words = set(text.split())
    for run in runs:
        sample = predict(run.model, prefix, args.predict, args.device)
        known = [word in words for word in sample.split()[:-1]]  # the last word may be cut off
        print(f"{run.name}: {sample!r} ({sum(known)}/{len(known)} words from the corpus)")
    runs.finish(args.out / "char_lm.png", f"char_lm: {args.cell}, {len(text):,} characters", "tokens")
    return runs


if __name__ == "__main__":
    main()
