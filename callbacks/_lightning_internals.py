"""Every use of a private Lightning internal in epochwise, each wrapped in one small function.

Lightning 2.6 caches the train epoch length at setup and creates the first train iterator before
any callback hook runs (see shared/LIGHTNING-NOTES.md). Changing the batch size during fit needs to
update both. ``tests/test_lightning_internals.py`` checks every attribute used here, so an upgrade
that moves them fails loudly there instead of silently mis-sizing epochs.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from torch.utils.data import DataLoader

__all__ = ["train_dataloaders", "restart_train_iterator", "set_train_epoch_length"]


def _combined_loader(trainer: pl.Trainer):
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    if loader is None:
        raise RuntimeError(
            "the train DataLoader is not set up yet (trainer.fit_loop._combined_loader is None); "
            "call this from on_train_start or later"
        )
    return loader


def train_dataloaders(trainer: pl.Trainer) -> list[DataLoader]:
    """The train DataLoaders as Lightning will iterate them (after its DDP sampler injection)."""
    return list(_combined_loader(trainer).flattened)


def restart_train_iterator(trainer: pl.Trainer) -> None:
    """Re-create the train iterator so no batch prefetched at the old size is used.

    ``FitLoop.setup_data`` calls ``iter()`` on the data fetcher before ``on_train_start``, and the
    epoch loop re-uses that iterator for the first epoch of a fit (also after a resume). With
    persistent workers this resets the iterator without restarting the worker processes.
    """
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None:
        raise RuntimeError("trainer.fit_loop._data_fetcher is missing: Lightning's fit loop changed")
    iter(fetcher)


def set_train_epoch_length(trainer: pl.Trainer, num_batches: int) -> int:
    """Tell the fit loop that the epoch now has ``num_batches`` batches (before the limit).

    Updates what ``FitLoop.setup_data`` computed once: the combined loader's limit, the fit loop's
    ``max_batches`` (``trainer.num_training_batches``: progress bar total, epoch end) and
    ``trainer.val_check_batch`` for fractional ``val_check_interval``. Returns the limited length.
    """
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        limited = min(num_batches, limit)
    else:
        limited = num_batches if limit == 1.0 else int(num_batches * float(limit))
    combined = _combined_loader(trainer)
    combined.limits = [limited] * len(combined.flattened)
    trainer.fit_loop.max_batches = limited
    interval = trainer.val_check_interval
    if (
        getattr(trainer, "_val_check_time_interval", None) is None
        and isinstance(interval, float)
        and not math.isinf(limited)
    ):
        trainer.val_check_batch = max(1, int(limited * interval))
    return limited
