"""A token stream of generated text: the streaming case (an ``IterableDataset``) with no network.

Language models are trained on streams, and that is where batch-size warmup is used most
(DeepSeek-V2, OLMo). :class:`GeneratedText` makes English-like sentences from a small seeded
grammar, character by character, so the stream has real structure to learn (spelling, word order,
agreement) yet needs no download. :class:`TokenStream` cuts it into next-token prediction windows;
:class:`GeneratedTextDataModule` serves an endless training stream and a fixed validation set.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

__all__ = ["GeneratedText", "TokenStream", "GeneratedTextDataModule", "VOCAB"]

#: The characters of the generated text; a token is an index into this string.
VOCAB = " .abcdefghijklmnopqrstuvwxyz"

_SUBJECTS = ("the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour")
_PLURALS = ("the cats", "two dogs", "my friends", "the children", "some birds", "the teachers")
_VERBS = (("sees", "see"), ("likes", "like"), ("finds", "find"), ("follows", "follow"), ("hears", "hear"))
_OBJECTS = ("the ball", "a red apple", "the river", "an open door", "the quiet garden", "a long road")
_ADVERBS = ("", "", "today", "again", "slowly", "every morning")


class GeneratedText:
    """Sentences from a seeded grammar with subject-verb agreement, as a character string.

    Example:
        >>> text = GeneratedText(seed=0).take(60)
        >>> len(text), set(text) <= set(VOCAB)
        (60, True)
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def sentence(self) -> str:
        rng = self.rng
        plural = rng.random() < 0.4
        subject = rng.choice(_PLURALS if plural else _SUBJECTS)
        verb = rng.choice(_VERBS)[1 if plural else 0]
        words = [subject, verb, rng.choice(_OBJECTS)]
        adverb = rng.choice(_ADVERBS)
        if adverb:
            words.append(adverb)
        return " ".join(words) + ". "

    def take(self, n: int) -> str:
        """The next ``n`` characters."""
        out, length = [], 0
        while length < n:
            out.append(self.sentence())
            length += len(out[-1])
        return "".join(out)[:n]


def encode(text: str) -> Tensor:
    """Characters to token indices (``int64``)."""
    table = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([table[c] for c in text], dtype=torch.long)


class TokenStream(IterableDataset):
    """Next-token windows ``(tokens[t : t + L], tokens[t + 1 : t + L + 1])`` of generated text.

    Endless unless ``num_windows`` is given (then it also has a ``__len__``). Each DataLoader
    worker and each DDP rank reads its own part of the stream (a different seed), so no window
    is seen twice in one pass.

    Args:
        seq_len: tokens per window ``L``.
        seed: seed of the text.
        num_windows: windows per pass over the stream (``None``: endless).
        rank, world_size: this process's share under DDP (set by the DataModule).

    Example:
        >>> x, y = next(iter(TokenStream(seq_len=8)))
        >>> x.shape, bool((x[1:] == y[:-1]).all())
        (torch.Size([8]), True)
    """

    def __init__(
        self, seq_len: int = 32, seed: int = 0, num_windows: int | None = None, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        self.seq_len, self.seed, self.num_windows = seq_len, seed, num_windows
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        if self.num_windows is None:
            raise TypeError("an endless TokenStream has no length")
        return self.num_windows

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        share = self.rank * workers + worker
        shares = self.world_size * workers
        text = GeneratedText(seed=self.seed * 100_003 + share)
        count = None if self.num_windows is None else len(range(share, self.num_windows, shares))
        produced = 0
        while count is None or produced < count:
            tokens = encode(text.take(self.seq_len + 1))
            yield tokens[:-1], tokens[1:]
            produced += 1


class GeneratedTextDataModule(pl.LightningDataModule):
    """An endless stream of generated text for training, a fixed set of windows for validation.

    Args:
        seq_len: tokens per window.
        batch_size: windows per batch (per device).
        num_workers: DataLoader workers (each reads its own part of the stream).
        train_windows: windows per training "epoch" (``None``: an endless stream; bound the fit
            with ``Trainer(max_steps=...)`` and use step-unit schedules).
        val_windows: validation windows (from a seed the training stream never uses).
        seed: seed of the text.

    Example:
        >>> dm = GeneratedTextDataModule(seq_len=16, batch_size=4)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.vocab_size
        ((4, 16), 28)
    """

    vocab_size = len(VOCAB)

    def __init__(
        self,
        seq_len: int = 32,
        batch_size: int = 16,
        num_workers: int = 0,
        train_windows: int | None = None,
        val_windows: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("val_windows", val_windows)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}")
        if train_windows is not None and (not isinstance(train_windows, int) or train_windows < 1):
            raise ValueError(f"`train_windows` must be None or an int >= 1, got {train_windows!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            windows = list(TokenStream(self.hparams.seq_len, seed=self.hparams.seed + 1,
                                       num_windows=self.hparams.val_windows))
            self.val_set = TensorDataset(torch.stack([x for x, _ in windows]), torch.stack([y for _, y in windows]))

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        stream = TokenStream(self.hparams.seq_len, self.hparams.seed, self.hparams.train_windows, rank, world)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise RuntimeError("GeneratedTextDataModule.setup() must run before asking for loaders")
        return DataLoader(self.val_set, batch_size=64)
