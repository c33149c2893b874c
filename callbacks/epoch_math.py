"""Epoch arithmetic: iterations per epoch, total optimizer updates and a starting ``max_epochs``
by dataset size. Plain functions over plain numbers, usable without Lightning.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ._checks import check_int

__all__ = [
    "iterations_per_epoch",
    "total_updates",
    "EpochSuggestion",
    "suggest_max_epochs",
]


def _check_int(name: str, value: object, minimum: int) -> None:
    check_int(name, value, minimum=minimum)


def iterations_per_epoch(num_samples: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one epoch: ``ceil(num_samples / batch_size)``, or ``floor`` with ``drop_last``.

    Example:
        >>> iterations_per_epoch(1000, 32), iterations_per_epoch(1000, 32, drop_last=True)
        (32, 31)
    """
    _check_int("num_samples", num_samples, 0)
    _check_int("batch_size", batch_size, 1)
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


def total_updates(
    num_samples: int,
    batch_size: int,
    epochs: int,
    accumulate_grad_batches: int = 1,
    drop_last: bool = False,
) -> int:
    """Optimizer steps in ``epochs`` epochs: ``epochs * ceil(batches / accumulate_grad_batches)``.

    Lightning steps the optimizer on the last batch of an epoch even when fewer than
    ``accumulate_grad_batches`` batches were accumulated, hence the ``ceil`` (the same count as
    ``Trainer.estimated_stepping_batches``).

    Example:
        >>> total_updates(1000, 32, epochs=10)
        320
        >>> total_updates(1000, 32, epochs=10, accumulate_grad_batches=4)
        80
    """
    _check_int("epochs", epochs, 0)
    _check_int("accumulate_grad_batches", accumulate_grad_batches, 1)
    batches = iterations_per_epoch(num_samples, batch_size, drop_last)
    return epochs * -(-batches // accumulate_grad_batches)


class EpochSuggestion(NamedTuple):
    """A starting range of epochs and the value to pass as ``max_epochs``.

    Example:
        >>> EpochSuggestion(50, 100, 100, "small dataset").suggested
        100
    """

    low: int
    high: int
    suggested: int
    rule: str


# (upper bound of the dataset size, exclusive; low; high; description), from the reference guide.
_EPOCH_TABLE: tuple[tuple[float, int, int, str], ...] = (
    (10_000, 50, 100, "small dataset (< 10,000 samples)"),
    (100_001, 20, 50, "medium dataset (10,000-100,000 samples)"),
    (1_000_000, 10, 20, "large dataset (> 100,000 samples)"),
    (math.inf, 3, 10, "massive dataset (millions of samples)"),
)


def suggest_max_epochs(num_samples: int, complex_task: bool = False) -> EpochSuggestion:
    """The reference guide's starting epoch range by dataset size, and a ``max_epochs`` to use.

    ========================  ============
    samples                   epochs
    ========================  ============
    < 10,000                  50-100
    10,000 - 100,000          20-50
    100,001 - 999,999         10-20
    >= 1,000,000 (millions)   3-10
    ========================  ============

    ``complex_task=True`` doubles both ends (the guide's advice for complex tasks or
    architectures). ``suggested`` is the upper end: the range is a starting point for
    ``max_epochs`` with early stopping, which ends the run sooner when the validation metric stops
    improving, so the cap should not be what stops a run that is still learning.

    Example:
        >>> suggest_max_epochs(1_797)
        EpochSuggestion(low=50, high=100, suggested=100, rule='small dataset (< 10,000 samples)')
        >>> suggest_max_epochs(60_000, complex_task=True)[:3]
        (40, 100, 100)
    """
    _check_int("num_samples", num_samples, 1)
    _, low, high, rule = next(row for row in _EPOCH_TABLE if num_samples < row[0])
    factor = 2 if complex_task else 1
    if complex_task:
        rule += ", doubled for a complex task"
    return EpochSuggestion(low * factor, high * factor, high * factor, rule)
