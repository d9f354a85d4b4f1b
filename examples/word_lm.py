"""Word-level language model after Zaremba et al. (2014) and PyTorch's word_language_model example:
embedding, 2-layer LSTM, linear decoder (optionally tied to the embedding), dropout, truncated
backpropagation through 35 steps, SGD (learning rate 20, falling linearly to zero over the run) with
gradient clipping; validation perplexity after every epoch.

    python examples/word_lm.py --data /work/shared/data/wikitext-2 --compare   # medium (650), 1 epoch
    python examples/word_lm.py --data DIR --size large --tied --epochs 6
    python examples/word_lm.py --train a.txt --valid b.txt --size small

--data DIR reads DIR/train.txt and DIR/valid.txt; where DIR has no train.txt (a copy holding only
WikiText-2's valid.txt and test.txt) it trains on valid.txt and validates on test.txt. Text is split on
white space with <eos> at each line's end, as WikiText and the PTB come. Without --data or --train it
trains on the offline text of pydoc_data/topics.py (90% train, 10% validation). Sizes: medium and large
are the "ptb-medium" and "ptb-large" workloads of rnnkernels/workloads.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import common
from rnnkernels.workloads import lookup

MEDIUM, LARGE = lookup("ptb-medium,ptb-large")
# size -> (units of the embedding and of each LSTM layer, dropout), Zaremba et al.'s three models;
# small has no benchmark workload.
SIZES = {"small": (200, 0.0), "medium": (MEDIUM.hidden, 0.5), "large": (LARGE.hidden, 0.65)}
EVAL_BATCH = 10


class WordLM(nn.Module):
    def __init__(self, vocab: int, size: int, layers: int, dropout: float, tied: bool):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab, size)
        self.lstm = nn.LSTM(size, size, layers, dropout=dropout)
        self.decoder = nn.Linear(size, vocab)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tied:  # Press & Wolf (2017), Inan et al. (2017): one matrix for the input and output words
            self.decoder.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, state=None):
        output, state = self.lstm(self.drop(self.embedding(tokens)), state)
        return self.decoder(self.drop(output)), state


def read_words(path: Path) -> list[str]:
    return [word for line in path.read_text(encoding="utf-8").splitlines() for word in line.split() + ["<eos>"]]


def load_corpus(args) -> tuple[list[str], list[str], str]:
    """(training words, validation words, where they came from)."""
    if args.data:
        train = args.data / "train.txt"
        train, valid = (train, args.data / "valid.txt") if train.exists() else (args.data / "valid.txt", args.data / "test.txt")
    elif args.train:
        train, valid = args.train, args.valid
    else:
        lines = [line.split() + ["<eos>"] for line in common.clean_lines(common.offline_text())]
        cut = len(lines) * 9 // 10
        flat = lambda part: [word for line in part for word in line]  # noqa: E731
        return flat(lines[:cut]), flat(lines[cut:]), "pydoc_data/topics.py (offline)"
    return read_words(train), read_words(valid), f"{short(train)} (train), {short(valid)} (validation)"


def short(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def batchify(ids: list[int], batch: int, device: torch.device) -> torch.Tensor:
    """The text cut into `batch` columns read top to bottom: (length, batch), so consecutive windows
    continue each other column by column and the state can carry over."""
    data = torch.tensor(ids[:len(ids) // batch * batch], device=device)
    return data.view(batch, -1).T.contiguous()


def windows(data: torch.Tensor, bptt: int):
    for i in range(0, len(data) - 1, bptt):
        length = min(bptt, len(data) - 1 - i)
        yield data[i:i + length], data[i + 1:i + 1 + length]


def train_step(run: common.Run, x: torch.Tensor, y: torch.Tensor, clip: float) -> float:
    logits, run.state = run.model(x, common.detach(run.state))  # truncated BPTT: the state, not its history
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    run.optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    run.optimizer.step()
    run.schedule.step()
    return loss.item()


@torch.no_grad()
def validation_perplexity(model: nn.Module, data: torch.Tensor, bptt: int) -> float:
    model.eval()
    total, state = 0.0, None
    for x, y in windows(data, bptt):
        logits, state = model(x, state)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    model.train()
    return common.perplexity(total / (len(data) - 1) / data.shape[1])


def main(argv: list[str] | None = None) -> common.Runs:
    parser = common.parser(__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="folder with train.txt and valid.txt (or valid.txt and test.txt)")
    source.add_argument("--train", type=Path, help="training text (with --valid)")
    parser.add_argument("--valid", type=Path, help="validation text (with --train)")
    parser.add_argument("--size", default="medium", choices=SIZES)
    parser.add_argument("--layers", type=int, default=MEDIUM.layers)
    parser.add_argument("--tied", action="store_true", help="decoder weights tied to the embedding")
    parser.add_argument("--bptt", type=int, default=MEDIUM.seq, help="time steps per batch")
    parser.add_argument("--batch", type=int, default=MEDIUM.batch)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=20.0, help="initial SGD learning rate")
    parser.add_argument("--clip", type=float, default=0.25, help="largest gradient norm")
    parser.add_argument("--max-words", type=int, help="use the first N words of each text only")
    parser.add_argument("--log-interval", type=int, default=50, help="steps between training perplexity lines")
    args = common.parse(parser, argv)
    if (args.train is None) != (args.valid is None):
        parser.error("--train and --valid go together")

    train_words, valid_words, origin = load_corpus(args)
    train_words, valid_words = train_words[:args.max_words], valid_words[:args.max_words]
    vocabulary = {word: i for i, word in enumerate(dict.fromkeys(train_words + valid_words))}
    train = batchify([vocabulary[w] for w in train_words], args.batch, args.device)
    valid = batchify([vocabulary[w] for w in valid_words], EVAL_BATCH, args.device)
    size, dropout = SIZES[args.size]
    print(f"corpus: {origin}: {len(train_words):,} training words, {len(valid_words):,} validation words, "
          f"vocabulary {len(vocabulary):,}; {args.size}: {args.layers}x{size}, dropout {dropout}"
          + (", tied" if args.tied else ""))

    runs = common.build_runs(args, lambda: WordLM(len(vocabulary), size, args.layers, dropout, args.tied),
                             lambda model: torch.optim.SGD(model.parameters(), lr=args.lr))
    steps_per_epoch = math.ceil((len(train) - 1) / args.bptt)
    # The learning rate falls linearly to zero over the run. At a constant 20 the clipped steps stay large
    # and the model wanders from step to step: its validation perplexity at the end of a run then varies by
    # several percent between two torch.nn runs whose weights differ by one part in 10^7.
    for run in runs:
        run.schedule = torch.optim.lr_scheduler.LambdaLR(
            run.optimizer, lambda step: 1 - step / (args.epochs * steps_per_epoch))
    for epoch in range(1, args.epochs + 1):
        for run in runs:
            run.state = None
        totals, count = [0.0] * len(runs), 0
        for i, (x, y) in enumerate(windows(train, args.bptt), 1):
            losses = runs.step(lambda run: train_step(run, x, y, args.clip), items=x.numel())
            totals, count = [total + loss for total, loss in zip(totals, losses)], count + 1
            common.progress(f"epoch {epoch}", i, steps_per_epoch)
            if i % args.log_interval == 0 or i == steps_per_epoch:
                runs.log(f"epoch {epoch} step {i}/{steps_per_epoch}",
                         {"train perplexity": [common.perplexity(t / count) for t in totals]}, ".2f")
                totals, count = [0.0] * len(runs), 0
        valid_ppl = [validation_perplexity(run.model, valid, args.bptt) for run in runs]
        runs.log(f"epoch {epoch}/{args.epochs}", {"validation perplexity": valid_ppl}, ".2f")

    runs.finish(args.out / "word_lm.png", f"word_lm: {args.size} LSTM, {origin}", "tokens",
                log_scale=("train perplexity",))
    return runs


if __name__ == "__main__":
    main()
