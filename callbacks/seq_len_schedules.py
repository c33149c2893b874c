"""Pure sequence-length warmup: the length of the training sequences at each optimizer step, the batch
that keeps the tokens of a step level, and the truncation itself.

Sequence-length warmup (Li et al. 2022; Composer's ``SeqLengthWarmup``) trains a language model
on short sequences first: early steps are cheaper and more stable. Composer keeps the batch fixed,
so early steps hold fewer tokens; coupling the batch to the length (``base x full / length``)
keeps the tokens of every optimizer step level, the same idea as coupling the batch to the image
size in progressive resizing. Nothing here knows about Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ._checks import ConfigurationError, check_int, is_int

__all__ = ["SequenceLengthSchedule", "coupled_batch_for_length", "truncate_sequences"]


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class SequenceLengthSchedule:
    """Length of the training sequences at optimizer step ``step``.

    ``start_len + (end_len - start_len) x step / warmup_steps``, rounded down to a multiple of
    ``increment``, never below ``start_len``; ``end_len`` from ``warmup_steps`` on::

        length(s) = end_len                                                   s >= warmup_steps
                  = max(start_len, increment * floor(raw(s) / increment))     otherwise

    Args:
        start_len: length of the first steps (>= 1).
        end_len: length after the warmup (>= ``start_len``).
        warmup_steps: optimizer steps of the warmup (>= 1).
        increment: lengths are multiples of it during the warmup (8 suits tensor cores).

    Example:
        >>> s = SequenceLengthSchedule(start_len=16, end_len=64, warmup_steps=6, increment=8)
        >>> [s(t) for t in range(8)]
        [16, 24, 32, 40, 48, 56, 64, 64]
    """

    start_len: int
    end_len: int
    warmup_steps: int
    increment: int = 8

    def __post_init__(self) -> None:
        check_int("start_len", self.start_len, minimum=1)
        check_int("end_len", self.end_len, minimum=self.start_len)
        check_int("warmup_steps", self.warmup_steps, minimum=1)
        check_int("increment", self.increment, minimum=1)

    def __call__(self, step: int) -> int:
        if not is_int(step) or step < 0:
            raise ConfigurationError(f"step must be an int >= 0, got {step!r}")
        if step >= self.warmup_steps:
            return self.end_len
        raw = self.start_len + (self.end_len - self.start_len) * step / self.warmup_steps
        return min(self.end_len, max(self.start_len, self.increment * int(math.floor(raw / self.increment))))

    def lengths(self) -> list[int]:
        """Every length the schedule takes, in order."""
        return sorted({self(t) for t in range(self.warmup_steps + 1)})


def coupled_batch_for_length(
    base_batch: int, full_len: int, length: int, min_batch: int = 1, max_batch: int | None = None
) -> int:
    """Per-device batch that keeps ``batch x length`` (the tokens of a step) level:
    ``base_batch x full_len / length`` rounded half up, clamped to ``[min_batch, max_batch]``.

    The tokens of a step are off by at most ``length / 2`` from ``base_batch x full_len``
    (rounding), i.e. by at most ``1 / (2 x batch)`` relatively: under 5% from a batch of 10 up.

    Example:
        >>> coupled_batch_for_length(16, 128, 32), coupled_batch_for_length(16, 128, 48)
        (64, 43)
    """
    check_int("base_batch", base_batch, minimum=1)
    check_int("full_len", full_len, minimum=1)
    check_int("length", length, minimum=1)
    check_int("min_batch", min_batch, minimum=1)
    check_int("max_batch", max_batch, minimum=min_batch, optional=True)
    n = max(min_batch, _half_up(base_batch * full_len / length))
    return min(n, max_batch) if max_batch is not None else n


def truncate_sequences(tokens: Tensor, length: int, dim: int = 1, offset: int = 0) -> Tensor:
    """The ``length`` positions of ``tokens`` along ``dim`` from ``offset`` (a view, no copy).

    Example:
        >>> import torch
        >>> truncate_sequences(torch.arange(12).reshape(2, 6), 3, offset=2).tolist()
        [[2, 3, 4], [8, 9, 10]]
    """
    full = int(tokens.shape[dim])
    if offset < 0 or offset + length > full:
        raise ConfigurationError(f"cannot take {length} positions from offset {offset} of a sequence of {full}")
    if length == full:
        return tokens
    return tokens.narrow(dim, offset, length)
