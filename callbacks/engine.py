"""Per-fit shared state of the epochwise callbacks of one Trainer, and what the fit must give back.

Callbacks never talk to each other directly. During a fit they share one :class:`FitState`:

- ``batch``: what the batch size is now (:class:`BatchSizeState`: per-device size, accumulation,
  world size, samples seen, who owns it), published by the one batch-size controller;
- ``lr``: the one LR path (:class:`~epochwise.callbacks.lr_path.LRPath`), on which every callback
  that moves the LR sets a named factor;
- ``undo``: what the fit changed on the user's or Lightning's objects (the train loader Lightning
  iterates, the LR schedulers in Lightning's config, ``trainer.accumulate_grad_batches``), each
  with the function that puts it back.

The state is created at the first ``setup("fit")`` of an epochwise callback and released at the
fit's ``teardown`` or ``on_exception``, whichever comes first: the undo functions then run (in
reverse order) and nothing of the fit stays reachable from the callbacks or from this module (the
registry is keyed weakly by the Trainer, and the entry is removed at release).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ._lightning_internals import detach_callback

if TYPE_CHECKING:
    from .lr_path import LRPath

__all__ = [
    "BatchSizeState",
    "FitState",
    "fit_state",
    "release_fit_state",
    "batch_state",
    "batch_length",
    "length_or_none",
    "cached_state_key",
    "FitScopedCallback",
]


@dataclass
class BatchSizeState:
    """What the batch size is right now, shared by every epochwise callback of one fit.

    ``per_device`` is the *scheduled* size of the current batch (a short last batch of an epoch
    does not change it); ``samples_seen`` counts the samples actually trained on, over all ranks.

    Example:
        >>> BatchSizeState(per_device=32, accumulation=4, world_size=2).global_batch
        256
    """

    per_device: int | None = None
    accumulation: int = 1
    world_size: int = 1
    samples_seen: int = 0
    owner: Any = None

    @property
    def global_batch(self) -> int | None:
        """Samples per optimizer step over all devices: per-device x accumulation x world size."""
        if self.per_device is None:
            return None
        return self.per_device * self.accumulation * self.world_size


@dataclass
class FitState:
    """Everything epochwise shares during one fit of one Trainer (see the module docstring).

    Example:
        >>> state = FitState()
        >>> state.count_batch(epoch=0, batch_idx=0, size=8); state.count_batch(0, 0, 8)
        >>> state.batch.samples_seen  # a batch counts once, whoever reports it
        8
    """

    batch: BatchSizeState = field(default_factory=BatchSizeState)
    lr: LRPath | None = None
    undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    counted: tuple[int, int] | None = None  # (epoch, batch_idx) last counted into samples_seen

    def lr_path(self) -> LRPath:
        """The fit's LR path (created on first use)."""
        if self.lr is None:
            from .lr_path import LRPath

            self.lr = LRPath()
        return self.lr

    def on_release(self, what: str, fn: Callable[[], None]) -> None:
        """Register ``fn`` to put ``what`` back when the fit ends (normally or not)."""
        self.undo.append((what, fn))

    def count_batch(self, epoch: int, batch_idx: int, size: int) -> None:
        """Add a training batch of ``size`` samples per rank to ``samples_seen`` once, whoever calls."""
        key = (epoch, batch_idx)
        if key != self.counted:
            self.counted = key
            self.batch.samples_seen += size * self.batch.world_size


_STATES: weakref.WeakKeyDictionary[pl.Trainer, FitState] = weakref.WeakKeyDictionary()


def fit_state(trainer: pl.Trainer, create: bool = True) -> FitState | None:
    """The :class:`FitState` of ``trainer``'s current fit (created unless ``create=False``)."""
    state = _STATES.get(trainer)
    if state is None and create:
        state = _STATES[trainer] = FitState(batch=BatchSizeState(world_size=trainer.world_size))
    return state


def release_fit_state(trainer: pl.Trainer) -> None:
    """End ``trainer``'s fit for epochwise: undo what it changed, drop the shared state.

    Every undo runs even if an earlier one fails; the first failure is raised afterwards.
    Idempotent: the second caller (another callback's teardown) finds nothing to do.
    """
    state = _STATES.pop(trainer, None)
    if state is None:
        return
    first_error: BaseException | None = None
    for _, fn in reversed(state.undo):
        try:
            fn()
        except BaseException as err:  # keep restoring the rest
            first_error = first_error or err
    state.undo.clear()
    if first_error is not None:
        raise first_error


def batch_state(trainer: pl.Trainer) -> BatchSizeState:
    """The :class:`BatchSizeState` of ``trainer``'s current fit.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> batch_state(trainer).global_batch is None
        True
        >>> release_fit_state(trainer)
    """
    return fit_state(trainer).batch  # type: ignore[union-attr]


def batch_length(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor (any nesting)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        raise TypeError(f"cannot find a tensor in a batch of type {type(batch).__name__}")
    for item in items:
        try:
            return batch_length(item)
        except TypeError:
            continue
    raise TypeError("cannot find a tensor in the batch to count its samples")


def length_or_none(obj: Any) -> int | None:
    """``len(obj)``, or ``None`` for something without a length (an endless stream)."""
    try:
        return len(obj)
    except TypeError:
        return None


def cached_state_key(callback: Any, **identity: Any) -> str:
    """Lightning's ``state_key`` for ``callback`` (``Class{identity}``), built once per identity.

    Lightning reads every callback's ``state_key`` at each hook call (it names the profiler's
    section), so a key built from ``repr(identity)`` would be rebuilt about ten times a step.

    Example:
        >>> from lightning.pytorch.callbacks import Callback
        >>> class Stop(Callback):
        ...     @property
        ...     def state_key(self):
        ...         return cached_state_key(self, monitor="val_loss")
        >>> Stop().state_key
        "Stop{'monitor': 'val_loss'}"
    """
    cached = callback.__dict__.get("_cached_state_key")
    if cached is not None and cached[0] == identity:
        return cached[1]
    key = callback._generate_state_key(**identity)
    callback.__dict__["_cached_state_key"] = (identity, key)
    return key


class FitScopedCallback(Callback):
    """A callback whose per-fit state ends with the fit: ``_end_fit(trainer)`` runs once the fit ends,
    normally (``teardown("fit")``) or by an exception, and gives back what the fit changed.

    Subclasses extend ``_end_fit`` (calling ``super()._end_fit(trainer)``); the base drops the module
    handles Lightning attaches to every callback (``detach_callback``), so a kept callback keeps no
    finished fit alive.

    Example:
        >>> class Counter(FitScopedCallback):
        ...     def setup(self, trainer, pl_module, stage):
        ...         self.steps = 0
        ...     def _end_fit(self, trainer):
        ...         super()._end_fit(trainer)
        ...         self.last_fit_steps = self.steps
        >>> isinstance(Counter(), Callback)
        True
    """

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._end_fit(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_fit(trainer)

    def _end_fit(self, trainer: pl.Trainer) -> None:
        detach_callback(self)
