"""What every claim measurement shares: its settings, the medians with their spread, its result."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Settings:
    """How a claims run measures: ``quick`` (shorter runs), the seeds, the data set and device."""

    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    data: str = "digits"
    data_dir: str = "data"
    device: str = "cpu"
    work_dir: str = "runs/claims"
    log: Callable[[str], None] = field(default=lambda line: None)


@dataclass
class Measured:
    """A claim's measurement: the numbers its rule reads, the seeds, and what else explains them.

    ``verdict`` is set only when no rule can decide (the claim needs hardware this run lacks).
    """

    numbers: dict[str, Any]
    seeds: list[int]
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    verdict: str | None = None


def median(values: Sequence[float]) -> float:
    """The median of finite-or-infinite values (NaN for none)."""
    return float(statistics.median(values)) if len(values) else float("nan")


def with_spread(numbers: dict[str, Any], name: str, values: Sequence[float], digits: int = 4) -> float:
    """Store ``name`` (the median over seeds), ``name_per_seed`` and ``name_spread`` (max - min)."""
    values = [float(v) for v in values]
    numbers[name] = round(median(values), digits)
    numbers[f"{name}_per_seed"] = [round(v, digits) for v in values]
    numbers[f"{name}_spread"] = round(max(values) - min(values), digits) if values else float("nan")
    return numbers[name]


def points(fraction: float) -> float:
    """An accuracy difference in percentage points."""
    return 100.0 * fraction
