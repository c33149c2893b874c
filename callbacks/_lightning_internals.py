"""Every use of a private Lightning internal in epochwise, each wrapped in one small function.

Lightning 2.6 builds the train DataLoader inside ``fit_loop.setup_data()`` and creates its first
iterator there, before any callback hook; it caches the epoch length at that moment; it logs at
``log_every_n_steps`` through its logger connector. The batch-size engine and the logging helpers
must reach into these places. ``tests/test_lightning_internals.py`` checks each function below (and
the facts about Lightning it relies on, listed in ``docs/LIGHTNING.md``), so an upgrade that moves
one fails loudly there instead of silently mis-sizing epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.data import sized_len

__all__ = [
    "train_dataloaders",
    "replace_train_dataloader",
    "intercept_train_dataloaders",
    "restart_train_iterator",
    "set_train_epoch_length",
    "pending_loader_states",
    "override_stepping_estimate",
    "logging_step",
    "is_logging_step",
    "validates_by_time",
    "detach_callback",
    "amp_grad_scale",
]


def _combined_loader(trainer: pl.Trainer) -> Any:
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    if loader is None:
        raise RuntimeError(
            "the train DataLoader is not set up yet (trainer.fit_loop._combined_loader is None); "
            "call this from on_train_start or later"
        )
    return loader


def train_dataloaders(trainer: pl.Trainer) -> list[Any]:
    """The train DataLoaders as Lightning iterates them (after its DDP sampler injection)."""
    return list(_combined_loader(trainer).flattened)


def replace_train_dataloader(trainer: pl.Trainer, old: Any, new: Any) -> bool:
    """Put ``new`` where Lightning holds ``old`` among the train loaders; False if ``old`` is gone."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    if combined is None:
        return False
    loaders = list(combined.flattened)
    for i, loader in enumerate(loaders):
        if loader is old:
            loaders[i] = new
            combined.flattened = loaders
            return True
    return False


def intercept_train_dataloaders(
    trainer: pl.Trainer, wrap: Callable[[Any], Any], after: Callable[[], None]
) -> Callable[[], None]:
    """Pass every train DataLoader Lightning builds through ``wrap`` before Lightning uses it.

    ``FitLoop.setup_data`` builds the train loaders (at fit start, on every reload and when
    ``trainer.estimated_stepping_batches`` is first read), measures them and creates their first
    iterator at once (workers start prefetching). To be in place before that, ``wrap`` runs where
    Lightning lets the strategy process each loader (``strategy.process_dataloader``, after the
    DDP sampler injection), but only while the *train* loaders are built. ``after()`` runs once
    ``setup_data`` returns having built new loaders. Returns the function that undoes this.
    """
    fit_loop, strategy = trainer.fit_loop, trainer.strategy
    original_setup = fit_loop.setup_data
    original_process = strategy.process_dataloader

    def process_train_dataloader(dataloader: Any) -> Any:
        return wrap(original_process(dataloader))

    def setup_data() -> None:
        before = fit_loop._combined_loader
        strategy.process_dataloader = process_train_dataloader  # type: ignore[method-assign]
        try:
            original_setup()
        finally:
            strategy.__dict__.pop("process_dataloader", None)
        if fit_loop._combined_loader is not None and fit_loop._combined_loader is not before:
            after()

    fit_loop.setup_data = setup_data  # type: ignore[method-assign]

    def undo() -> None:
        if fit_loop.__dict__.get("setup_data") is setup_data:
            del fit_loop.setup_data
        if strategy.__dict__.get("process_dataloader") is process_train_dataloader:
            del strategy.process_dataloader

    return undo


def restart_train_iterator(trainer: pl.Trainer) -> None:
    """Re-create the train iterator, so no batch prefetched by the old one is used.

    With persistent workers this resets the iterator without restarting the worker processes.
    """
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None:
        raise RuntimeError("trainer.fit_loop._data_fetcher is missing: Lightning's fit loop changed")
    iter(fetcher)


def set_train_epoch_length(trainer: pl.Trainer, num_batches: float) -> float:
    """Tell the fit loop that the epoch has ``num_batches`` batches (before ``limit_train_batches``).

    Updates what ``FitLoop.setup_data`` computed once: the combined loader's limits, the fit loop's
    ``max_batches`` (``trainer.num_training_batches``: progress bar, epoch end, accumulation at the
    last batch), the data fetcher's length (its ``done`` flag) and ``trainer.val_check_batch`` for
    a fractional ``val_check_interval``. Returns the limited length. Applies Lightning's own rule
    for ``limit_train_batches`` (an int caps, a float scales and rounds down).
    """
    limit = trainer.limit_train_batches
    if math.isinf(num_batches):
        limited: float = num_batches if isinstance(limit, float) else min(num_batches, limit)
    elif isinstance(limit, int):
        limited = min(int(num_batches), limit)
    else:
        limited = int(num_batches * float(limit))
    combined = _combined_loader(trainer)
    combined.limits = [limited] * len(combined.flattened)
    trainer.fit_loop.max_batches = limited
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is not None and getattr(fetcher, "_combined_loader", None) is combined:
        fetcher.length = sized_len(combined)
        fetcher.done = fetcher.length == 0
    interval = trainer.val_check_interval
    if (
        not validates_by_time(trainer)
        and isinstance(interval, float)
        and not math.isinf(limited)
    ):
        trainer.val_check_batch = max(1, int(limited * interval))
    return limited


def pending_loader_states(trainer: pl.Trainer) -> bool:
    """Whether Lightning holds checkpointed loader states it has not loaded into the loaders yet.

    Lightning loads a stateful train loader's state (``FitLoop.on_load_checkpoint``) in
    ``setup_data`` only when the loop is restarting; if the loader was built earlier (through
    ``trainer.estimated_stepping_batches`` in ``configure_optimizers``) the state is never loaded.
    """
    return bool(getattr(trainer.fit_loop, "_combined_loader_states_to_load", None))


def override_stepping_estimate(trainer: pl.Trainer, total_steps: int) -> Callable[[], None]:
    """Make ``trainer.estimated_stepping_batches`` return ``total_steps`` until undone.

    Lightning computes it as ``min(ceil(num_training_batches / accumulate_grad_batches) x
    max_epochs, max_steps)`` from the loader as first built: wrong once a batch-size schedule
    changes the epoch length. Until the returned undo runs (the engine runs it at
    ``on_train_start``, before the first training step) the fit loop's ``max_batches`` and
    ``max_steps`` are set so that the formula gives ``total_steps``; the training itself never
    runs under these values.
    """
    fit_loop, epoch_loop = trainer.fit_loop, trainer.fit_loop.epoch_loop
    saved_batches, saved_steps = fit_loop.max_batches, epoch_loop.max_steps
    fit_loop.max_batches = total_steps * max(1, int(trainer.accumulate_grad_batches))
    epoch_loop.max_steps = total_steps

    def undo() -> None:
        epoch_loop.max_steps = saved_steps
        fit_loop.max_batches = saved_batches

    return undo


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs ``self.log`` scalars at: optimizer steps taken (``_batches_that_stepped``)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning would log now (every ``log_every_n_steps``, or when stopping), from a training hook.

    Lightning's own rule (``_LoggerConnector.should_update_logs`` while the fit loop runs), read
    without its loop dispatch: several epochwise callbacks ask at every training step, and the
    property costs a few microseconds each time. ``test_fact_14`` compares the two at every hook.
    """
    every = trainer.log_every_n_steps
    if every == 0:
        return False
    return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0 or trainer.should_stop


def validates_by_time(trainer: pl.Trainer) -> bool:
    """Whether ``val_check_interval`` is a wall-time interval (``"00:05:00"``, a timedelta or a dict)."""
    return getattr(trainer, "_val_check_time_interval", None) is not None


def detach_callback(callback: Any) -> None:
    """Drop the handles on the LightningModule that Lightning puts on every callback at fit start.

    ``_CallbackConnector._attach_model_logging_functions`` sets ``callback.log`` and
    ``callback.log_dict`` to the module's bound methods and never removes them: a callback kept
    after ``fit`` would keep the module, its Trainer and optimizer alive. epochwise callbacks drop
    them at the end of every fit (Lightning sets them again at the next one).
    """
    for name in ("log", "log_dict"):
        bound = callback.__dict__.get(name)
        if bound is not None and getattr(bound, "__self__", None) is not None:
            del callback.__dict__[name]


def amp_grad_scale(trainer: pl.Trainer) -> Any:
    """The loss scale of this step's backward under fp16 AMP, as a device tensor; ``None`` without a scaler.

    Lightning's ``MixedPrecision`` plugin keeps a ``torch.amp.GradScaler`` (``None`` for bf16). The
    scale the backward used is the scaler's ``_scale`` tensor until ``scaler.update()`` after the
    optimizer step; it is read as a tensor (``get_scale()`` would copy it to the host: a sync).
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)
