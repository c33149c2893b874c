"""How epochwise callbacks log: at Lightning's cadence, plus at once when a controlled value changes.

Lightning's own ``LearningRateMonitor`` logs only every ``log_every_n_steps`` optimizer steps, at
Lightning's step counter (``_batches_that_stepped``). epochwise does the same, so TensorBoard
shows callbacks' scalars on the same x axis as ``self.log`` metrics and the logger's writer thread
is not woken on every step. A value that a callback *controls* and that changes in jumps (batch
size, accumulation, image size) is also logged at the step where it changes, so every change shows
at its step without flooding. Values are plain Python floats: logging never syncs the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import lightning.pytorch as pl

from ._lightning_internals import is_logging_step, logging_step

__all__ = ["log_dir_of", "log_metrics", "CadenceLog"]


def log_dir_of(trainer: pl.Trainer) -> str:
    """The run folder of the Trainer's logger (``lightning_logs/version_N``), else its root dir.

    Reads the logger itself rather than ``trainer.log_dir``, which under DDP is a broadcast that
    every rank must join: a rank-zero-only caller would wait for the others forever.
    """
    logger = trainer.logger
    if logger is not None:
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if folder:
            return os.fspath(folder)
    return os.fspath(trainer.default_root_dir)


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Send scalars straight to every logger of the Trainer (rank 0 only), at Lightning's step.

    Callbacks use this rather than ``pl_module.log`` for values they control: it works from any
    hook and needs no reduction, since every rank holds the same value by construction.
    """
    if not metrics or not trainer.loggers or trainer.global_rank != 0:
        return
    at = logging_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=at)


class CadenceLog:
    """Logs one callback's scalars at Lightning's cadence and whenever a watched value changes.

    Args:
        watch: keys whose change is logged at the step it happens (values that move in jumps).

    Call it from a per-step hook with the current values; it decides whether to write, at most
    once per optimizer step (several micro-batches of one step share Lightning's step).

    Example:
        >>> log = CadenceLog(watch=("batch_size/per_device",))
        >>> log.changed({"batch_size/per_device": 16.0})
        True
        >>> log.remember({"batch_size/per_device": 16.0}); log.changed({"batch_size/per_device": 16.0})
        False
    """

    def __init__(self, watch: Iterable[str] = ()) -> None:
        self.watch = tuple(watch)
        self.reset()

    def reset(self) -> None:
        """Forget what was logged (a new fit)."""
        self._last: dict[str, float] = {}
        self._last_step = -1
        self._quiet_step = -1
        self._last_watched: tuple = ()

    def skip_step(self, trainer: pl.Trainer, *watched: float) -> bool:
        """A cheap first test for a per-step caller, before it builds its metrics: True when
        nothing is to be logged now (no logger; already logged at this step; or not Lightning's
        logging step and the watched values are the ones last logged). Decided once per step."""
        if not trainer.loggers:
            return True
        step = logging_step(trainer)
        if watched != self._last_watched:
            return False
        if step == self._last_step or step == self._quiet_step:
            return True
        if is_logging_step(trainer):
            return False
        self._quiet_step = step
        return True

    def changed(self, metrics: Mapping[str, float]) -> bool:
        """Whether a watched value differs from the one last logged."""
        last = self._last
        return any(key in metrics and last.get(key) != metrics[key] for key in self.watch)

    def remember(self, metrics: Mapping[str, float]) -> None:
        self._last.update(metrics)

    def __call__(self, trainer: pl.Trainer, metrics: Mapping[str, float], force: bool = False) -> bool:
        """Log ``metrics`` if this is a logging step, a watched value changed, or ``force``."""
        if not trainer.loggers:
            return False
        step = logging_step(trainer)
        changed = self.changed(metrics)
        if not (force or changed or (step != self._last_step and is_logging_step(trainer))):
            return False
        self._last_step = step
        self.remember(metrics)
        self._last_watched = tuple(metrics[key] for key in self.watch if key in metrics)
        log_metrics(trainer, metrics, step)
        return True
