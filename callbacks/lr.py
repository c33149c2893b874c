"""LR changes caused by batch size, warmup and sample-based schedules, through one LR path.

Each callback here only computes a *factor* from trainer state and hands it to the Trainer's
:class:`~epochwise.callbacks.engine.LRPath`, which writes ``lr = scheduler_lr x prod(factors)``
into every param group. So the callbacks compose with each other and with any LR scheduler.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ._lightning_internals import train_dataloaders
from .engine import batch_state, lr_path
from .schedules import (
    check_unit,
    cosine_factor,
    linear_decay_factor,
    linear_warmup_factor,
    lr_scale,
    one_cycle_factor,
)

__all__ = ["LRScaling", "LRWarmup", "SampleBasedLRSchedule"]


class _LRFactorCallback(Callback):
    """Shared plumbing: attach the LR path at train start, set a factor and apply every batch."""

    factor_name = "factor"

    def __init__(self) -> None:
        self._path_state: dict[str, Any] | None = None
        self._path = None

    def factor(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> float:
        raise NotImplementedError

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = lr_path(trainer)
        if self._path_state is not None:
            # restored optimizer LRs are scaled values: recover the unscaled ones saved with them
            path.load_state_dict(self._path_state)
            self._path_state = None
        path.attach(trainer)
        self._path = path

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        path = lr_path(trainer)
        path.set_factor(self.factor_name, self.factor(trainer, batch, batch_idx))
        path.apply()
        path.log(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lr_path": self._path.state_dict() if self._path is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._path_state = state_dict.get("lr_path")


def _nominal_per_device(trainer: pl.Trainer, batch_idx: int) -> int:
    """Planned per-device batch of this step: the controller's plan, else the loader's size."""
    owner = batch_state(trainer).owner
    if owner is not None and getattr(owner, "sampler", None) is not None:
        return int(owner.nominal_batch_size(batch_idx))
    loader = train_dataloaders(trainer)[0]
    size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or loader.batch_size
    if size is None:
        raise RuntimeError("LRScaling needs a train DataLoader with a batch size (batch_size=None given)")
    return int(size)


class LRScaling(_LRFactorCallback):
    """Scale every param group's LR with the effective global batch size.

    ``lr = base_lr x rule(global_batch / base_batch_size)``, with ``global_batch`` = per-device
    batch x ``accumulate_grad_batches`` x world size, recomputed every step; ``base_lr`` is what
    the optimizer and its schedulers would give without scaling, so the scale multiplies the
    scheduler's value and never compounds. ``rule``: ``"linear"`` (Goyal et al. 2017),
    ``"sqrt"`` (Krizhevsky 2014; Hoffer et al. 2017) or ``"none"``.

    Args:
        rule: ``"linear"``, ``"sqrt"`` or ``"none"``.
        base_batch_size: the global batch at which ``base_lr`` applies; default: the global
            batch at the first step of the fit (kept across resumes).

    Logged every step: ``lr/group{j}`` (effective LR), ``lr_factor/scaling``,
    ``batch_size/global_for_lr``.

    Example:
        >>> from epochwise.callbacks import BatchSizeWarmup
        >>> from lightning.pytorch import Trainer
        >>> callbacks = [BatchSizeWarmup(16, 256), LRScaling(rule="sqrt", base_batch_size=16)]
        >>> trainer = Trainer(callbacks=callbacks, max_epochs=10, logger=False)
    """

    factor_name = "scaling"

    def __init__(self, rule: str = "linear", base_batch_size: int | None = None) -> None:
        super().__init__()
        if rule not in ("linear", "sqrt", "none"):
            raise ValueError(f"`rule` must be 'linear', 'sqrt' or 'none', got {rule!r}")
        if base_batch_size is not None and (not isinstance(base_batch_size, int) or base_batch_size < 1):
            raise ValueError(f"`base_batch_size` must be None or an int >= 1, got {base_batch_size!r}")
        self.rule = rule
        self.base_batch_size = base_batch_size
        self.global_batch: int | None = None

    def factor(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> float:
        per_device = _nominal_per_device(trainer, batch_idx)
        self.global_batch = per_device * int(trainer.accumulate_grad_batches) * trainer.world_size
        if self.base_batch_size is None:
            self.base_batch_size = self.global_batch
        return lr_scale(self.rule, self.global_batch / self.base_batch_size)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base_batch_size": self.base_batch_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("base_batch_size") is not None:
            self.base_batch_size = int(state_dict["base_batch_size"])


class LRWarmup(_LRFactorCallback):
    """Gradual linear LR warmup (Goyal et al. 2017) from ``start_factor`` x LR to the full LR.

    Progress is derived from trainer state: optimizer steps (``unit="step"``) or fractional
    epochs (``unit="epoch"``: ``epoch + batch_idx / batches_per_epoch``, so the ramp is smooth
    within an epoch). Composes with :class:`LRScaling` and any scheduler (factors multiply).

    Args:
        duration: length of the warmup in ``unit``.
        unit: ``"epoch"`` or ``"step"``.
        start_factor: LR factor at the first step, in ``[0, 1]``.

    Logged every step: ``lr/group{j}``, ``lr_factor/warmup``.

    Example:
        >>> warmup = LRWarmup(duration=5, unit="epoch", start_factor=0.1)
    """

    factor_name = "warmup"

    def __init__(self, duration: float, unit: str = "epoch", start_factor: float = 0.0) -> None:
        super().__init__()
        if not isinstance(duration, (int, float)) or duration <= 0:
            raise ValueError(f"`duration` must be a number > 0, got {duration!r}")
        check_unit(unit)
        if not 0.0 <= start_factor <= 1.0:
            raise ValueError(f"`start_factor` must be in [0, 1], got {start_factor!r}")
        self.duration = duration
        self.unit = unit
        self.start_factor = start_factor

    def factor(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> float:
        if self.unit == "step":
            progress = float(trainer.global_step)
        else:
            per_epoch = max(1, int(trainer.num_training_batches))
            progress = trainer.current_epoch + batch_idx / per_epoch
        return linear_warmup_factor(progress, self.duration, self.start_factor)


_SHAPES: dict[str, Callable[..., float]] = {
    "cosine": cosine_factor,
    "linear": linear_decay_factor,
    "onecycle": one_cycle_factor,
}


class SampleBasedLRSchedule(_LRFactorCallback):
    """Define an LR schedule over *samples seen* instead of steps.

    One-cycle and cosine schedules are normally laid out over a fixed number of optimizer steps;
    once the batch size changes, that number is wrong and the curve is cut short or stretched.
    Here the factor is ``shape(samples_seen / total_samples)``, so the LR curve over the data is
    the same whatever path the batch size takes. Use it instead of the module's own scheduler.

    Args:
        shape: ``"cosine"``, ``"linear"``, ``"onecycle"`` or any ``f(progress in [0, 1]) -> factor``.
        total_samples: length of the schedule in (global) samples; default
            ``max_epochs x len(train dataset)``.
        **shape_kwargs: passed to the shape (e.g. ``min_factor=0.01``, ``pct_start=0.25``).

    Logged every step: ``lr/group{j}``, ``lr_factor/samples``, ``samples_seen``.

    Example:
        >>> sched = SampleBasedLRSchedule("onecycle", total_samples=100_000, pct_start=0.25)
        >>> round(sched.shape_fn(0.25), 3)
        1.0
    """

    factor_name = "samples"

    def __init__(
        self,
        shape: str | Callable[[float], float] = "cosine",
        total_samples: int | None = None,
        **shape_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(shape, str):
            if shape not in _SHAPES:
                raise ValueError(f"`shape` must be one of {sorted(_SHAPES)} or a callable, got {shape!r}")
            self.shape_fn: Callable[[float], float] = functools.partial(_SHAPES[shape], **shape_kwargs)
            try:
                self.shape_fn(0.0)  # fail now on bad keyword arguments
            except TypeError as err:
                raise ValueError(f"bad keyword arguments {shape_kwargs} for shape {shape!r}: {err}") from None
        elif callable(shape):
            if shape_kwargs:
                raise ValueError(f"keyword arguments {sorted(shape_kwargs)} are only for named shapes")
            self.shape_fn = shape
        else:
            raise ValueError(f"`shape` must be a name or a callable, got {shape!r}")
        if total_samples is not None and (not isinstance(total_samples, int) or total_samples < 1):
            raise ValueError(f"`total_samples` must be None or an int >= 1, got {total_samples!r}")
        self.total_samples = total_samples
        self._samples_loaded: int | None = None
        self._state = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._state = state = batch_state(trainer)
        if self._samples_loaded is not None and state.owner is None:
            state.samples_seen = self._samples_loaded
        self._samples_loaded = None
        if self.total_samples is None:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ValueError(
                    "SampleBasedLRSchedule needs `total_samples` when the Trainer has no max_epochs"
                )
            dataset = train_dataloaders(trainer)[0].dataset
            self.total_samples = int(trainer.max_epochs) * len(dataset)  # type: ignore[arg-type]

    def factor(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> float:
        state = batch_state(trainer)
        n = state.observe_batch(trainer, batch, batch_idx)
        before = state.samples_seen - n * trainer.world_size  # samples before this step's batch
        return float(self.shape_fn(before / float(self.total_samples)))  # type: ignore[arg-type]

    @override
    def state_dict(self) -> dict[str, Any]:
        samples = self._state.samples_seen if self._state is not None else 0
        return {**super().state_dict(), "samples_seen": samples, "total_samples": self.total_samples}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._samples_loaded = state_dict.get("samples_seen")
        if state_dict.get("total_samples") is not None:
            self.total_samples = int(state_dict["total_samples"])
