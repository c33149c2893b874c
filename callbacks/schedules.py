"""Pure schedules: progress (epoch, step or training fraction) -> batch size or LR factor.

Nothing here knows about Lightning. Each schedule is a frozen dataclass that validates its
arguments once and is then called like a function, so it can be tested exhaustively and used in a
plain PyTorch loop as well as by the callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ._checks import ConfigurationError, check_choice, check_int, check_number

__all__ = [
    "WarmupSchedule",
    "MilestoneSchedule",
    "lr_scale",
    "linear_warmup_factor",
    "cosine_factor",
    "one_cycle_factor",
    "linear_decay_factor",
    "split_for_max_per_device",
]

Unit = Literal["epoch", "step"]


def _check_int(name: str, value: object, minimum: int) -> None:
    check_int(name, value, minimum=minimum)


@dataclass(frozen=True)
class WarmupSchedule:
    """Batch-size warmup: grow from ``start`` to ``end`` every ``interval`` units.

    ``mode="exponential"`` multiplies by ``factor`` every ``interval`` units;
    ``mode="linear"`` adds ``increment`` every ``interval`` units (Megatron-style ramp).
    The value never exceeds ``end``.

    Example:
        >>> s = WarmupSchedule(start=16, end=256, factor=2, interval=2)
        >>> [s(t) for t in range(10)]
        [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]
        >>> WarmupSchedule(32, 128, interval=1, mode="linear", increment=32)(2)
        96
    """

    start: int
    end: int
    factor: float = 2
    interval: int = 2
    mode: Literal["exponential", "linear"] = "exponential"
    increment: int | None = None

    def __post_init__(self) -> None:
        _check_int("start", self.start, 1)
        _check_int("end", self.end, 1)
        if self.end < self.start:
            raise ConfigurationError(f"`end` must be >= `start` (got end={self.end}, start={self.start})")
        _check_int("interval", self.interval, 1)
        check_choice("mode", self.mode, ("exponential", "linear"))
        if self.mode == "exponential":
            check_number("factor", self.factor, 1.0, low_inclusive=False)
            if self.increment is not None:
                raise ConfigurationError(f"`increment` is only for mode='linear', got increment={self.increment!r}")
        else:
            if self.increment is None:
                raise ConfigurationError("`increment` is required for mode='linear' (got None)")
            _check_int("increment", self.increment, 1)

    def __call__(self, t: int) -> int:
        if t < 0:
            raise ValueError(f"progress must be >= 0, got {t}")
        k = t // self.interval
        if self.mode == "linear":
            return min(self.end, self.start + k * int(self.increment))  # type: ignore[arg-type]
        # integer arithmetic for integer factors: no float drift at large k
        if float(self.factor).is_integer():
            f = int(self.factor)
            value = self.start
            for _ in range(k):
                value *= f
                if value >= self.end:
                    return self.end
            return value
        return min(self.end, int(round(self.start * self.factor**k)))


@dataclass(frozen=True)
class MilestoneSchedule:
    """Absolute batch size from each milestone on: ``{0: 64, 30: 128, 60: 256}``.

    Before the first milestone the schedule returns ``None`` (keep the loader's own size).

    Example:
        >>> s = MilestoneSchedule({0: 64, 30: 128, 60: 256})
        >>> [s(t) for t in (0, 29, 30, 59, 60, 1000)]
        [64, 64, 128, 128, 256, 256]
    """

    milestones: Mapping[int, int]
    _keys: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.milestones, Mapping) or not self.milestones:
            raise ConfigurationError(
                f"`milestones` must be a non-empty dict {{start: batch_size}}, got {self.milestones!r}"
            )
        for k, v in self.milestones.items():
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise ConfigurationError(f"`milestones` keys must be ints >= 0, got {k!r}")
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigurationError(f"`milestones` values must be ints >= 1, got {v!r} at {k}")
        # a private, sorted copy: never mutate the caller's dict
        object.__setattr__(self, "milestones", dict(sorted(self.milestones.items())))
        object.__setattr__(self, "_keys", tuple(self.milestones))

    def __call__(self, t: int) -> int | None:
        value = None
        for k in self._keys:
            if k > t:
                break
            value = self.milestones[k]
        return value


def lr_scale(rule: str, ratio: float) -> float:
    """LR multiplier for a batch ``ratio`` times the base: ``linear`` -> k, ``sqrt`` -> sqrt(k).

    Example:
        >>> lr_scale("linear", 4), lr_scale("sqrt", 4), lr_scale("none", 4)
        (4.0, 2.0, 1.0)
    """
    if ratio <= 0:
        raise ValueError(f"batch ratio must be > 0, got {ratio}")
    if rule == "linear":
        return float(ratio)
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "none":
        return 1.0
    raise ConfigurationError(f"`rule` must be 'linear', 'sqrt' or 'none', got {rule!r}")


def linear_warmup_factor(progress: float, duration: float, start_factor: float = 0.0) -> float:
    """Gradual warmup (Goyal et al. 2017): ``start_factor`` at 0, rising linearly to 1 at ``duration``.

    Example:
        >>> [linear_warmup_factor(t, 4, 0.0) for t in (0, 1, 2, 4, 9)]
        [0.0, 0.25, 0.5, 1.0, 1.0]
    """
    if duration <= 0:
        return 1.0
    p = min(max(progress / duration, 0.0), 1.0)
    return start_factor + (1.0 - start_factor) * p


def cosine_factor(p: float, min_factor: float = 0.0) -> float:
    """Cosine decay from 1 at ``p=0`` to ``min_factor`` at ``p>=1``.

    Example:
        >>> cosine_factor(0.0), cosine_factor(0.5), cosine_factor(1.0)
        (1.0, 0.5, 0.0)
    """
    p = min(max(p, 0.0), 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * p))


def linear_decay_factor(p: float, min_factor: float = 0.0) -> float:
    """Linear decay from 1 at ``p=0`` to ``min_factor`` at ``p>=1``."""
    p = min(max(p, 0.0), 1.0)
    return 1.0 - (1.0 - min_factor) * p


def one_cycle_factor(
    p: float, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4
) -> float:
    """One-cycle policy (Smith & Topin) as a factor of the peak LR, cosine annealed both ways.

    Rises from ``1/div_factor`` to 1 over the first ``pct_start`` of training, then falls to
    ``1/(div_factor*final_div_factor)``. Same shape as ``torch.optim.lr_scheduler.OneCycleLR``.

    Example:
        >>> round(one_cycle_factor(0.0), 4), one_cycle_factor(0.3), round(one_cycle_factor(1.0), 8)
        (0.04, 1.0, 4e-06)
    """
    p = min(max(p, 0.0), 1.0)
    lo, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    if p <= pct_start:
        q = p / pct_start if pct_start > 0 else 1.0
        return 1.0 + (lo - 1.0) * 0.5 * (1.0 + math.cos(math.pi * q))
    q = (p - pct_start) / (1.0 - pct_start)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * q))


def split_for_max_per_device(batch_size: int, max_per_device: int | None) -> tuple[int, int]:
    """Split a per-device batch into ``(micro_batch, accumulation)`` with ``micro <= max_per_device``.

    Prefers an exact split (``micro * accumulation == batch_size``) with the fewest accumulation
    steps; if none exists within ``max_per_device``, uses ``ceil`` and the closest micro-batch.

    Example:
        >>> split_for_max_per_device(256, 64), split_for_max_per_device(96, 64), split_for_max_per_device(50, None)
        ((64, 4), (48, 2), (50, 1))
    """
    if max_per_device is None or batch_size <= max_per_device:
        return batch_size, 1
    k_min = math.ceil(batch_size / max_per_device)
    for k in range(k_min, min(batch_size, 4 * k_min) + 1):
        if batch_size % k == 0:
            return batch_size // k, k
    # half up, as the step-unit plans round (Python's round() would take 50.5 to 50, the plans to 51)
    return min(max_per_device, math.floor(batch_size / k_min + 0.5)), k_min
