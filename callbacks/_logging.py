"""Small helpers every callback uses to log and to find the run folder."""

from __future__ import annotations

import os

import lightning.pytorch as pl

__all__ = ["log_dir_of", "log_scalars", "current_lrs"]


def log_dir_of(trainer: pl.Trainer) -> str:
    """The run folder of the Trainer's logger (``lightning_logs/version_N``), else its root dir."""
    folder = trainer.log_dir if trainer.logger is not None else None
    return os.fspath(folder or trainer.default_root_dir)


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Send scalars straight to every logger of the Trainer (rank 0 only).

    Callbacks use this instead of ``pl_module.log`` for quantities they control: it works from any
    hook (``self.log`` is not allowed in e.g. ``on_train_batch_start``/``setup``) and needs no
    reduction, since every rank holds the same value by construction.
    """
    if not trainer.loggers or trainer.global_rank != 0:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def current_lrs(trainer: pl.Trainer) -> dict[str, float]:
    """Effective LR of every param group: ``lr/group{j}`` (``lr/opt{i}_group{j}`` with several optimizers)."""
    optimizers = trainer.optimizers
    many = len(optimizers) > 1
    return {
        (f"lr/opt{i}_group{j}" if many else f"lr/group{j}"): float(group["lr"])
        for i, opt in enumerate(optimizers)
        for j, group in enumerate(opt.param_groups)
    }
