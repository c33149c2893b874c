"""Per-Trainer shared state: who owns the batch size, what it is now, and the one LR-factor path.

Callbacks never talk to each other directly. A batch-size owner (:class:`BatchSizeController`)
publishes the per-device batch, accumulation and world size here; LR callbacks publish named
*factors* here; :func:`apply_lr_factors` writes ``lr = scheduler_lr x prod(factors)`` into every
param group. LR schedulers keep working on their own, unscaled values: each scheduler attached to
the Trainer has its class swapped once for a subclass whose ``step`` un-applies the factors, steps,
and re-applies them. So a scale multiplies the scheduler's value, is never overwritten by it and
never compounds, whether the scheduler is chainable (StepLR, ReduceLROnPlateau) or closed-form
(OneCycleLR, LambdaLR).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer

from ._logging import current_lrs, log_scalars

__all__ = ["BatchSizeState", "batch_state", "LRPath", "lr_path", "has_lr_path", "batch_length"]


@dataclass
class BatchSizeState:
    """What the batch size is right now, shared by every epochwise callback of one Trainer."""

    per_device: int | None = None
    accumulation: int = 1
    world_size: int = 1
    samples_seen: int = 0
    owner: Any = None
    loader_batch_size: int | None = None
    dataset_length: int | None = None
    _last_counted: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def global_batch(self) -> int | None:
        """Samples per optimizer step over all devices: per-device x accumulation x world size."""
        if self.per_device is None:
            return None
        return self.per_device * self.accumulation * self.world_size

    def observe_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> int:
        """Count a training batch into ``samples_seen`` once, whoever calls; returns its size."""
        n = batch_length(batch)
        key = (trainer.current_epoch, batch_idx)
        if key != self._last_counted:
            self._last_counted = key
            self.samples_seen += n * trainer.world_size
        return n


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batch_state(trainer: pl.Trainer) -> BatchSizeState:
    """The :class:`BatchSizeState` of ``trainer`` (created on first use)."""
    state = _STATES.get(trainer)
    if state is None:
        state = _STATES[trainer] = BatchSizeState(world_size=trainer.world_size)
    return state


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


# ---------------------------------------------------------------------------------------------
# The LR path
# ---------------------------------------------------------------------------------------------
class LRPath:
    """The single place where epochwise changes learning rates.

    Each LR callback sets a named factor (``set_factor("scaling", 2.0)``); :meth:`apply` writes
    ``unscaled_lr x product`` into every param group of every optimizer. ``unscaled`` is what the
    optimizer would have without epochwise (its initial LR as moved by its schedulers); it is
    tracked per group, so a factor of 0 (warmup from zero) loses nothing.
    """

    def __init__(self) -> None:
        self.factors: dict[str, float] = {}
        self.unscaled: dict[tuple[int, int], float] = {}
        self.written: dict[tuple[int, int], float] = {}
        self._optimizers: list[Optimizer] = []
        self._last_logged_step = -1

    @property
    def product(self) -> float:
        return math.prod(self.factors.values()) if self.factors else 1.0

    def set_factor(self, name: str, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"LR factor {name!r} must be finite and >= 0, got {value}")
        self.factors[name] = float(value)

    def attach(self, trainer: pl.Trainer) -> None:
        """Bind to the Trainer's optimizers and wrap its LR schedulers (idempotent)."""
        self._optimizers = list(trainer.optimizers)
        _OPTIMIZER_PATHS.update({opt: self for opt in self._optimizers})
        for config in trainer.lr_scheduler_configs:
            _wrap_scheduler(config.scheduler)

    def _groups(self):
        for i, opt in enumerate(self._optimizers):
            for j, group in enumerate(opt.param_groups):
                yield (i, j), group

    def sync_unscaled(self) -> None:
        """Adopt LRs changed behind epochwise's back (user code) as the new unscaled values."""
        for key, group in self._groups():
            if key not in self.unscaled or group["lr"] != self.written.get(key):
                self.unscaled[key] = float(group["lr"])

    def apply(self) -> None:
        """Write ``unscaled x product`` into every param group."""
        self.sync_unscaled()
        product = self.product
        for key, group in self._groups():
            group["lr"] = self.unscaled[key] * product
            self.written[key] = group["lr"]

    def unapply(self, optimizer: Optimizer) -> None:
        """Put the unscaled LRs back into ``optimizer`` (around a scheduler step)."""
        i = self._optimizers.index(optimizer)
        for j, group in enumerate(optimizer.param_groups):
            key = (i, j)
            if key in self.unscaled and group["lr"] == self.written.get(key):
                group["lr"] = self.unscaled[key]

    def reapply(self, optimizer: Optimizer) -> None:
        """After a scheduler step: record its new unscaled LRs and scale them again."""
        i = self._optimizers.index(optimizer)
        product = self.product
        for j, group in enumerate(optimizer.param_groups):
            self.unscaled[(i, j)] = float(group["lr"])
            group["lr"] = group["lr"] * product
            self.written[(i, j)] = group["lr"]

    def log(self, trainer: pl.Trainer) -> None:
        """Log the effective LRs and factors once per optimizer step."""
        if trainer.global_step == self._last_logged_step:
            return
        self._last_logged_step = trainer.global_step
        metrics = current_lrs(trainer)
        metrics.update({f"lr_factor/{k}": v for k, v in self.factors.items()})
        log_scalars(trainer, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "factors": dict(self.factors),
            "unscaled": [[i, j, v] for (i, j), v in self.unscaled.items()],
            "written": [[i, j, v] for (i, j), v in self.written.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factors.update(state.get("factors", {}))
        self.unscaled.update({(i, j): v for i, j, v in state.get("unscaled", [])})
        self.written.update({(i, j): v for i, j, v in state.get("written", [])})


_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OPTIMIZER_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WRAPPED: dict[type, type] = {}


def has_lr_path(trainer: pl.Trainer) -> bool:
    """Whether an LR callback manages (and logs) this Trainer's learning rates."""
    return trainer in _PATHS


def lr_path(trainer: pl.Trainer) -> LRPath:
    """The :class:`LRPath` of ``trainer`` (created on first use)."""
    path = _PATHS.get(trainer)
    if path is None:
        path = _PATHS[trainer] = LRPath()
    return path


def _scaled_step(self, *args: Any, **kwargs: Any) -> Any:
    original_step = _WRAPPED_BY_SUB[type(self)].step
    path = _OPTIMIZER_PATHS.get(self.optimizer)
    if path is None:
        return original_step(self, *args, **kwargs)
    path.unapply(self.optimizer)
    try:
        return original_step(self, *args, **kwargs)
    finally:
        path.reapply(self.optimizer)


_WRAPPED_BY_SUB: dict[type, type] = {}


def _wrap_scheduler(scheduler: Any) -> None:
    """Swap ``scheduler``'s class for a subclass whose ``step`` sees unscaled LRs (once)."""
    cls = type(scheduler)
    if cls in _WRAPPED_BY_SUB:
        return
    sub = _WRAPPED.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"step": _scaled_step, "__module__": cls.__module__,
                                          "__doc__": cls.__doc__})
        _WRAPPED[cls] = sub
        _WRAPPED_BY_SUB[sub] = cls
    scheduler.__class__ = sub
