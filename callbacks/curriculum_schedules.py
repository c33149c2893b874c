"""Pure curriculum schedules: how much of the data, sorted by difficulty, is in play, and in which order.

A curriculum (Bengio et al. 2009) trains on easy examples first. Here the data is ranked by a
per-sample difficulty (lower is easier; ties by index), and a *pacing function* (Hacohen &
Weinshall 2019; Platanios et al. 2019) says which fraction of the ranking is in play at each point
of training: epoch ``e`` draws from the easiest ``pool_size`` samples only. The batch size can grow
with the pool (:func:`curriculum_batch_size`). Under DDP every rank computes the same global order
and takes its shard by ``DistributedSampler``'s rule (:func:`shard`). Nothing here knows about
Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._checks import ConfigurationError, check_choice, check_int, check_number

__all__ = [
    "CurriculumPacing",
    "rank_by_difficulty",
    "curriculum_order",
    "distributed_layout",
    "shard",
    "curriculum_batch_size",
]

_PACINGS = ("linear", "root")


@dataclass(frozen=True)
class CurriculumPacing:
    """Fraction of the data (easiest first) in play at ``t``, the fraction of training elapsed.

    With ``c0 = start_fraction`` and ``T = full_at``::

        "linear": c(t) = min(1, c0 + (1 - c0) * t / T)
        "root":   c(t) = min(1, sqrt(c0^2 + (1 - c0^2) * t / T))   (Platanios et al. 2019: faster
                                                                    at first, when the pool is small)

    so ``c(0) = start_fraction`` and ``c(t) = 1`` (all of the data) for ``t >= full_at``. The pool
    holds ``ceil(c(t) x n)`` samples (:meth:`pool_size`), at least one.

    Args:
        start_fraction: fraction in play at the start, in ``(0, 1]``.
        full_at: fraction of training from which all the data is in play, in ``(0, 1]``.
        pacing: ``"linear"`` or ``"root"``.

    Example:
        >>> p = CurriculumPacing(start_fraction=0.25, full_at=0.5)
        >>> [p.fraction(t) for t in (0.0, 0.25, 0.5, 0.9)]
        [0.25, 0.625, 1.0, 1.0]
        >>> p.pool_size(0.0, 10), p.pool_size(0.25, 10)
        (3, 7)
    """

    start_fraction: float = 0.25
    full_at: float = 0.5
    pacing: str = "linear"

    def __post_init__(self) -> None:
        check_number("start_fraction", self.start_fraction, 0.0, 1.0, low_inclusive=False)
        check_number("full_at", self.full_at, 0.0, 1.0, low_inclusive=False)
        check_choice("pacing", self.pacing, _PACINGS)

    def fraction(self, t: float) -> float:
        """Fraction of the data in play at ``t`` (fraction of training elapsed, ``>= 0``)."""
        if not (math.isfinite(t) and t >= 0):
            raise ConfigurationError(f"training fraction must be a finite number >= 0, got {t!r}")
        c0, x = float(self.start_fraction), min(t / self.full_at, 1.0)
        if x >= 1.0:
            return 1.0
        if self.pacing == "linear":
            return c0 + (1.0 - c0) * x
        return min(1.0, math.sqrt(c0 * c0 + (1.0 - c0 * c0) * x))

    def pool_size(self, t: float, n: int) -> int:
        """How many of ``n`` samples (the easiest) are in play at ``t``."""
        check_int("n", n, minimum=1)
        return min(n, max(1, math.ceil(self.fraction(t) * n - 1e-9)))


def rank_by_difficulty(difficulty: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Indices from easiest to hardest (ascending difficulty; equal scores keep index order).

    Example:
        >>> rank_by_difficulty([0.5, 0.1, 0.9, 0.1]).tolist()
        [1, 3, 0, 2]
    """
    scores = torch.as_tensor(difficulty, dtype=torch.float64).reshape(-1)
    return torch.argsort(scores, stable=True)


def curriculum_order(ranked: torch.Tensor, pool: int, seed: int, shuffle: bool = True) -> list[int]:
    """The global order of one epoch: the easiest ``pool`` of ``ranked``, shuffled by ``seed``
    (a ``torch.Generator`` seed, e.g. :func:`~epochwise.datamodules.sampler.epoch_seed`) or, with
    ``shuffle=False``, from easy to hard.

    Example:
        >>> ranked = torch.tensor([4, 2, 0, 1, 3])
        >>> curriculum_order(ranked, 3, seed=0, shuffle=False)
        [4, 2, 0]
        >>> sorted(curriculum_order(ranked, 3, seed=0))
        [0, 2, 4]
    """
    chosen = ranked[:pool]
    if shuffle:
        chosen = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(int(seed)))]
    return chosen.tolist()


def distributed_layout(order: Sequence[int], world_size: int, drop_last: bool = False) -> list[int]:
    """A global order laid out as ``DistributedSampler`` does: padded by repeating its start (or,
    with ``drop_last``, cut) to a multiple of ``world_size``; rank ``r`` then takes positions
    ``r, r + world_size, ...``, so position ``j`` of rank ``r`` is ``layout[r + j x world_size]``.

    Example:
        >>> distributed_layout([5, 6, 7, 8, 9], 2), distributed_layout([5, 6, 7, 8, 9], 2, drop_last=True)
        ([5, 6, 7, 8, 9, 5], [5, 6, 7, 8])
    """
    order = list(order)
    if drop_last:
        return order[: len(order) - len(order) % world_size]
    pad = -len(order) % world_size
    return order + (order * math.ceil(pad / max(1, len(order))))[:pad]


def shard(order: Sequence[int], rank: int, world_size: int, drop_last: bool = False) -> list[int]:
    """This rank's part of a global order (see :func:`distributed_layout`).

    Example:
        >>> shard([5, 6, 7, 8, 9], rank=0, world_size=2), shard([5, 6, 7, 8, 9], rank=1, world_size=2)
        ([5, 7, 9], [6, 8, 5])
    """
    return distributed_layout(order, world_size, drop_last)[rank::world_size]


def curriculum_batch_size(fraction: float, start_fraction: float, start_batch: int, end_batch: int) -> int:
    """Per-device batch that grows with the pool: ``start_batch`` when ``start_fraction`` of the data
    is in play, ``end_batch`` when all of it is, linear in between (rounded half up).

    Example:
        >>> [curriculum_batch_size(f, 0.25, 16, 64) for f in (0.25, 0.5, 1.0)]
        [16, 32, 64]
    """
    if start_fraction >= 1.0:
        return int(end_batch)
    x = min(max((fraction - start_fraction) / (1.0 - start_fraction), 0.0), 1.0)
    return max(1, int(math.floor(start_batch + (end_batch - start_batch) * x + 0.5)))
