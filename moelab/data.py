"""Corpora that need no download, a byte-level tokenizer, splits and batches.

Two corpora:

- ``stdlib_corpus``: real text every Python install has, the standard library's own source files
  (code, comments and docstrings), read from disk at run time.
- ``multidomain_corpus``: generated lines from several domains (arithmetic, sorting,
  copy/reverse, prose) where every byte carries its domain label, so a view can ask whether
  experts specialise by domain.

Everything is deterministic under a seed.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


class ByteTokenizer:
    """UTF-8 bytes as tokens: a 256-symbol vocabulary that can encode any text."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens) -> str:
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """A token stream with optional per-token domain labels."""

    tokens: Tensor  # [N] long
    domains: Tensor | None = None  # [N] long: index into domain_names
    domain_names: tuple[str, ...] = ()
    tokenizer: ByteTokenizer = ByteTokenizer()

    def __len__(self) -> int:
        return self.tokens.numel()

    def split(self, val_fraction: float = 0.1) -> tuple[Corpus, Corpus]:
        """Train / validation split: the last val_fraction of the stream is validation."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
        cut = int(len(self) * (1 - val_fraction))

        def part(sl):
            domains = self.domains[sl] if self.domains is not None else None
            return Corpus(self.tokens[sl], domains, self.domain_names, self.tokenizer)

        return part(slice(0, cut)), part(slice(cut, None))

    def batch(self, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random windows: inputs x [B, T] and next-token targets y [B, T]."""
        starts = self._starts(batch_size, block_size, generator)
        return self._windows(self.tokens, starts, block_size), \
            self._windows(self.tokens, starts + 1, block_size)

    def batch_with_domains(self, batch_size: int, block_size: int,
                           generator: torch.Generator | None = None):
        """Like `batch`, plus the domain label of every input token [B, T]."""
        if self.domains is None:
            raise ValueError("this corpus has no domain labels; use multidomain_corpus()")
        starts = self._starts(batch_size, block_size, generator)
        return (self._windows(self.tokens, starts, block_size),
                self._windows(self.tokens, starts + 1, block_size),
                self._windows(self.domains, starts, block_size))

    def _starts(self, batch_size, block_size, generator) -> Tensor:
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1; got {batch_size}, "
                             f"{block_size}")
        if len(self) < block_size + 1:
            raise ValueError(f"corpus has {len(self)} tokens but block_size={block_size} needs "
                             f"at least {block_size + 1}; use a smaller block_size or more text")
        return torch.randint(0, len(self) - block_size, (batch_size,), generator=generator)

    @staticmethod
    def _windows(stream: Tensor, starts: Tensor, block_size: int) -> Tensor:
        offsets = torch.arange(block_size)
        return stream[starts[:, None] + offsets[None, :]]  # [B, T]


def stdlib_corpus(max_bytes: int = 1_000_000, modules: tuple[str, ...] | None = None) -> Corpus:
    """The standard library's own source text (read from this Python's install), up to max_bytes.

    ``modules`` picks files by name (e.g. ("json/decoder", "textwrap")); default: every top-level
    .py file in sorted order, so the text is the same on every run of the same Python.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1; got {max_bytes!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    if modules is not None:
        files = [root / f"{name}.py" for name in modules]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"no such standard-library files: {missing}")
    else:
        files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise ValueError(f"found no standard-library source under {root}")
    tokenizer = ByteTokenizer()
    chunks, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        data = tokenizer.encode(text)[: max_bytes - total]
        chunks.append(torch.tensor(data, dtype=torch.long))
        total += len(data)
        if total >= max_bytes:
            break
    return Corpus(torch.cat(chunks), tokenizer=tokenizer)


DOMAINS = ("arithmetic", "sorting", "reverse", "prose")
_WORDS = ("the expert router sends every token to the expert that knows it best while the "
          "gate learns balance and capacity keeps the load fair across many small networks "
          "that share one model and each learns a little language of its own").split()


def _line(domain: str, rng: random.Random) -> str:
    if domain == "arithmetic":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        return f"{a}{op}{b}={a + b if op == '+' else a - b}\n"
    if domain == "sorting":
        values = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        return f"sort {' '.join(map(str, values))} : {' '.join(map(str, sorted(values)))}\n"
    if domain == "reverse":
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
        return f"rev {word} : {word[::-1]}\n"
    words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 10))]
    return " ".join(words).capitalize() + ".\n"


def multidomain_corpus(num_bytes: int = 200_000, seed: int = 0,
                       domains: tuple[str, ...] = DOMAINS) -> Corpus:
    """Generated lines from several domains, mixed at random; every byte has its domain label."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"domains must be a non-empty subset of {DOMAINS}; got {domains!r}")
    if num_bytes < 1:
        raise ValueError(f"num_bytes must be >= 1; got {num_bytes!r}")
    rng = random.Random(seed)
    tokenizer = ByteTokenizer()
    tokens, labels = [], []
    while len(tokens) < num_bytes:
        label = rng.randrange(len(domains))
        data = tokenizer.encode(_line(domains[label], rng))
        tokens.extend(data)
        labels.extend([label] * len(data))
    return Corpus(torch.tensor(tokens[:num_bytes]), torch.tensor(labels[:num_bytes]),
                  tuple(domains), tokenizer)
