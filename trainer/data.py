"""Training data for the built-in trainer: a deterministic synthetic corpus (no downloads) or the
user's own text/token file, and a sampler whose order depends only on (seed, epoch) and whose position
is saved in the checkpoint, so a resume neither repeats nor skips data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher", "our team"]
_VERBS = ["sees", "likes", "finds", "builds", "paints", "follows", "carries", "remembers"]
_OBJECTS = ["the red ball", "a green box", "the river", "a tall tree", "the blue car", "an old book", "the moon"]
_PLACES = ["in the park", "at home", "near the sea", "on the hill", "under the bridge", "in the morning"]


def synthetic_corpus(n_chars: int, seed: int) -> str:
    """Sentences from a small grammar plus sums: structure a small model learns quickly and visibly."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < n_chars:
        if rng.random() < 0.25:
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            s = f"{a} plus {b} is {a + b}.\n"
        else:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}.\n"
        parts.append(s)
        total += len(s)
    return "".join(parts)[:n_chars]


@dataclass
class Corpus:
    train: np.ndarray
    val: np.ndarray
    vocab: list[str]  # index -> character ('' for token files)
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        stoi = {c: i for i, c in enumerate(self.vocab)}
        return [stoi[c] for c in text if c in stoi]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] if i < len(self.vocab) else "?" for i in ids)


def load_corpus(path: Optional[Path], synthetic_chars: int, seed: int, val_fraction: float) -> Corpus:
    if path is None or path.suffix not in (".npy", ".bin"):
        text = synthetic_corpus(synthetic_chars, seed) if path is None else path.read_text(encoding="utf-8")
        vocab = sorted(set(text))
        stoi = {c: i for i, c in enumerate(vocab)}
        ids = np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))
        vocab_size = len(vocab)
    else:
        ids = (np.load(path) if path.suffix == ".npy" else np.fromfile(path, dtype=np.uint16)).astype(np.int64)
        vocab, vocab_size = [], int(ids.max()) + 1
    n_val = max(int(len(ids) * val_fraction), 1)
    return Corpus(ids[:-n_val], ids[-n_val:], vocab, vocab_size)


class Sampler:
    """Epoch-wise permutation of non-overlapping blocks, seeded by (seed, epoch). A step consumes
    `global_batch` samples; rank r takes its slice. Position is (epoch, pos): samples consumed in the
    epoch, independent of the world size, so a resume with another world size continues the same order."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.data = torch.from_numpy(data)
        self.block = block_size
        self.batch = batch_size
        self.seed = seed
        self.rank, self.world = rank, world_size
        self.n = (len(data) - 1) // block_size
        if self.n < batch_size * world_size:
            raise ValueError(
                f"The training data has {self.n} blocks of {block_size} tokens, fewer than one global batch "
                f"({batch_size} x {world_size}). Use more data, or a smaller trainer.batch_size or model.block_size."
            )
        self.epoch, self.pos = 0, 0
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch * self.world)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_blocks": self.n}

    def load_state(self, s: dict) -> None:
        if s.get("n_blocks", self.n) != self.n:
            raise ValueError(
                f"The checkpoint was trained on data of {s['n_blocks']} blocks, this data has {self.n}: the data "
                "position cannot be restored. Resume with the same trainer.data and model.block_size."
            )
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])

    def _perm_for(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(x, y, epoch_ended): this rank's slice of the next global batch."""
        g = self.batch * self.world
        if self.pos + g > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._perm_for(self.epoch)[self.pos + self.rank * self.batch : self.pos + (self.rank + 1) * self.batch]
        self.pos += g
        starts = torch.from_numpy(idx * self.block)
        offs = torch.arange(self.block + 1)
        chunk = self.data[starts[:, None] + offs[None, :]]
        ended = self.pos + g > self.n
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(), ended


def val_batches(data: np.ndarray, block_size: int, batch_size: int, n_batches: int):
    """Fixed validation batches (the same every evaluation, so val_loss is comparable)."""
    t = torch.from_numpy(data)
    n = (len(data) - 1) // block_size
    rng = np.random.default_rng(12345)
    offs = torch.arange(block_size + 1)
    for _ in range(n_batches):
        starts = torch.from_numpy(rng.integers(0, n, size=batch_size) * block_size)
        chunk = t[starts[:, None] + offs[None, :]]
        yield chunk[:, :-1], chunk[:, 1:]
