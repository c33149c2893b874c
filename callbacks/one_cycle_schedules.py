"""The pure one-cycle batch/LR schedule: ``progress -> (lr_factor, batch_factor)``.

Smith's one-cycle policy raises the LR to a peak and anneals it; the tutorial's combined variant
moves the batch size the other way at the same time (a small batch is a noisier gradient, like a
large LR): the LR rises while the batch shrinks, then both reverse. ``progress`` is the fraction of
the schedule's samples already trained on, so the curve over the data is the same whatever path the
batch takes. Nothing here knows about Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._checks import check_choice, check_number, is_number

__all__ = ["OneCycleBatchLRSchedule"]

_ANNEAL = ("cos", "linear")


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class OneCycleBatchLRSchedule:
    """LR and batch-size factors of the one-cycle batch/LR policy at ``progress`` in ``[0, 1]``.

    With ``w`` the annealing weight (``"cos"``: ``(1 - cos(pi q)) / 2``; ``"linear"``: ``q``)::

        progress p <= pct_start, q = p / pct_start:
            lr_factor    = 1 + (max_lr_factor - 1) * w(q)            1x -> max_lr_factor
            batch_factor = 1 + (min_batch_factor - 1) * w(q)         1x -> min_batch_factor
        p > pct_start, q = (p - pct_start) / (1 - pct_start):
            lr_factor    = (1 - w(q)) * max_lr_factor + w(q) * final_lr_factor    -> final (~0)
            batch_factor = (1 - w(q)) * min_batch_factor + w(q)                    -> 1x

    ``progress`` outside ``[0, 1]`` is clamped (after the cycle the final values hold). The batch
    of a step is ``base x batch_factor`` rounded half up, at least 1 (:meth:`batch_size`).

    Args:
        max_lr_factor: LR factor at the peak (``pct_start``), >= 1.
        min_batch_factor: batch factor at the peak, in ``(0, 1]``.
        pct_start: fraction of the cycle spent rising, in ``(0, 1)``.
        final_lr_factor: LR factor at the end of the cycle, in ``[0, max_lr_factor]``.
        anneal: ``"cos"`` or ``"linear"``.

    Example:
        >>> s = OneCycleBatchLRSchedule(max_lr_factor=10, min_batch_factor=0.5)
        >>> s(0.0), s(0.5), s(1.0)
        ((1.0, 1.0), (10.0, 0.5), (0.001, 1.0))
        >>> [s.batch_size(p, 64) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
        [64, 48, 32, 48, 64]
    """

    max_lr_factor: float = 10.0
    min_batch_factor: float = 0.5
    pct_start: float = 0.5
    final_lr_factor: float = 1e-3
    anneal: str = "cos"

    def __post_init__(self) -> None:
        check_number("max_lr_factor", self.max_lr_factor, 1.0)
        check_number("min_batch_factor", self.min_batch_factor, 0.0, 1.0, low_inclusive=False)
        check_number("pct_start", self.pct_start, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        check_number("final_lr_factor", self.final_lr_factor, 0.0, float(self.max_lr_factor))
        check_choice("anneal", self.anneal, _ANNEAL)

    def _weight(self, q: float) -> float:
        return (1.0 - math.cos(math.pi * q)) / 2.0 if self.anneal == "cos" else q

    def _phase(self, progress: float) -> tuple[bool, float]:
        """``(rising, weight)`` at ``progress``."""
        if not is_number(progress):
            raise ValueError(f"progress must be a finite number, got {progress!r}")
        p = min(max(float(progress), 0.0), 1.0)
        if p <= self.pct_start:
            return True, self._weight(p / self.pct_start)
        return False, self._weight((p - self.pct_start) / (1.0 - self.pct_start))

    def lr_factor(self, progress: float) -> float:
        """The LR factor at ``progress``."""
        rising, w = self._phase(progress)
        if rising:
            return 1.0 + (self.max_lr_factor - 1.0) * w
        return (1.0 - w) * self.max_lr_factor + w * self.final_lr_factor  # exact at both ends

    def batch_factor(self, progress: float) -> float:
        """The batch-size factor at ``progress``."""
        rising, w = self._phase(progress)
        if rising:
            return 1.0 + (self.min_batch_factor - 1.0) * w
        return (1.0 - w) * self.min_batch_factor + w

    def batch_size(self, progress: float, base: int) -> int:
        """Per-device batch at ``progress`` for a base (1x) batch of ``base``."""
        return max(1, _half_up(base * self.batch_factor(progress)))

    def __call__(self, progress: float) -> tuple[float, float]:
        """``(lr_factor, batch_factor)`` at ``progress``."""
        return self.lr_factor(progress), self.batch_factor(progress)
