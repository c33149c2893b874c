"""LR changes caused by batch size, warmup and sample-based schedules: factors on the one LR path.

Each callback here only computes a *factor* from trainer state; the fit's
:class:`~epochwise.callbacks.lr_path.LRPath` writes ``lr = scheduler_lr x product(factors)`` into
every param group, so the callbacks compose with each other and with any LR scheduler.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from typing_extensions import override

from ._checks import ConfigurationError, check_choice, check_int, check_number
from ._lightning_internals import train_dataloaders
from .engine import batch_length, fit_state, length_or_none
from .lr_path import LRFactorCallback
from .schedules import (
    cosine_factor,
    linear_decay_factor,
    linear_warmup_factor,
    lr_scale,
    one_cycle_factor,
)

__all__ = ["LRScaling", "LRWarmup", "SampleBasedLRSchedule"]


class LRScaling(LRFactorCallback):
    """Scale every param group's LR with the effective global batch size.

    ``lr = base_lr x rule(global_batch / base_batch_size)``: ``global_batch`` is the scheduled
    per-device batch of the current step x the accumulation x the world size (with a batch-size
    controller, its plan; else the loader's batch size and ``trainer.accumulate_grad_batches``),
    so it is right for every micro-batch of a step-unit warmup and counts the whole accumulated
    batch. ``base_lr`` is what the optimizer and its schedulers give without scaling: the scale
    multiplies the scheduler's value and never compounds. ``rule``: ``"linear"`` (Goyal et al.
    2017), ``"sqrt"`` (Krizhevsky 2014; Hoffer et al. 2017) or ``"none"``.

    Args:
        rule: ``"linear"``, ``"sqrt"`` or ``"none"``.
        base_batch_size: the global batch at which ``base_lr`` applies; default: the global
            batch at the first step of the fit (kept in the checkpoint).

    Logged (at Lightning's cadence and at each change): ``lr/group{j}``, ``lr_factor/scaling``.

    Example:
        >>> from epochwise.callbacks import BatchSizeWarmup
        >>> from lightning.pytorch import Trainer
        >>> callbacks = [BatchSizeWarmup(16, 256), LRScaling(rule="sqrt", base_batch_size=16)]
        >>> trainer = Trainer(callbacks=callbacks, max_epochs=10, logger=False)
    """

    factor_name = "scaling"
    discrete = True

    def __init__(self, rule: Literal["linear", "sqrt", "none"] = "linear", base_batch_size: int | None = None) -> None:
        super().__init__()
        self.rule = check_choice("rule", rule, ("linear", "sqrt", "none"))
        self.base_batch_size = check_int("base_batch_size", base_batch_size, minimum=1, optional=True)
        self.global_batch: int | None = None
        self._base: int | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._base = self.base_batch_size  # the automatic base is per fit (a checkpoint restores it)
            self.global_batch = None

    def lr_factor(self, trainer: pl.Trainer, batch_idx: int) -> float:
        owner = self._fit.batch.owner  # type: ignore[union-attr]
        if owner is not None and owner.plan is not None:
            per_device, accumulation = owner.planned_size(batch_idx), owner.accumulation
        else:
            per_device, accumulation = _loader_batch_size(trainer), int(trainer.accumulate_grad_batches)
        self.global_batch = per_device * accumulation * trainer.world_size
        if self._base is None:
            self._base = self.global_batch
        return lr_scale(self.rule, self.global_batch / self._base)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base_batch_size": self._base}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("base_batch_size") is not None and self.base_batch_size is None:
            self._base = int(state_dict["base_batch_size"])


def _loader_batch_size(trainer: pl.Trainer) -> int:
    loader = train_dataloaders(trainer)[0]
    size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or getattr(loader, "batch_size", None)
    if size is None:
        raise ConfigurationError("LRScaling needs a train DataLoader with a batch size (batch_size=None given)")
    return int(size)


class LRWarmup(LRFactorCallback):
    """Gradual linear LR warmup (Goyal et al. 2017) from ``start_factor`` x LR to the full LR.

    Progress is derived from trainer state: optimizer steps (``unit="step"``) or fractional
    epochs (``unit="epoch"``: ``epoch + batch_idx / batches_per_epoch``, so the ramp is smooth
    within an epoch and starts at ``start_factor`` on the first batch). Composes with
    :class:`LRScaling` and any scheduler (factors multiply). ``unit="epoch"`` needs epochs of
    known length (not an endless stream).

    Args:
        duration: length of the warmup in ``unit`` (> 0).
        unit: ``"epoch"`` or ``"step"``.
        start_factor: LR factor at the first step, in ``[0, 1]``.

    Logged (at Lightning's cadence): ``lr/group{j}``, ``lr_factor/warmup``.

    Example:
        >>> warmup = LRWarmup(duration=5, unit="epoch", start_factor=0.1)
    """

    factor_name = "warmup"

    def __init__(self, duration: float, unit: Literal["epoch", "step"] = "epoch", start_factor: float = 0.0) -> None:
        super().__init__()
        self.duration = check_number("duration", duration, 0.0, low_inclusive=False)
        self.unit = check_choice("unit", unit, ("epoch", "step"))
        self.start_factor = check_number("start_factor", start_factor, 0.0, 1.0)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch" and math.isinf(trainer.num_training_batches):
            raise ConfigurationError(
                "LRWarmup(unit='epoch') needs epochs of known length, but the train data is a stream "
                "without __len__: use LRWarmup(unit='step')."
            )
        super().on_train_start(trainer, pl_module)

    def lr_factor(self, trainer: pl.Trainer, batch_idx: int) -> float:
        if self.unit == "step":
            progress = float(trainer.global_step)
        else:
            progress = trainer.current_epoch + batch_idx / max(1, int(trainer.num_training_batches))
        return linear_warmup_factor(progress, self.duration, self.start_factor)


_SHAPES: dict[str, Callable[..., float]] = {
    "cosine": cosine_factor,
    "linear": linear_decay_factor,
    "onecycle": one_cycle_factor,
}


class SampleBasedLRSchedule(LRFactorCallback):
    """An LR schedule over *samples seen* instead of steps.

    One-cycle and cosine schedules are normally laid out over a fixed number of optimizer steps;
    once the batch size changes, that number is wrong and the curve is cut short or stretched.
    Here the factor of a batch is ``shape(samples seen before it / total_samples)``, so the LR
    curve over the data is the same whatever path the batch size takes. Use it instead of the
    module's own scheduler. Samples seen are counted over all ranks and checkpointed.

    Args:
        shape: ``"cosine"``, ``"linear"``, ``"onecycle"`` or any ``f(progress in [0, 1]) -> factor``.
        total_samples: length of the schedule in (global) samples; default ``max_epochs x`` the
            train dataset's length (a stream without length needs it given).
        **shape_kwargs: passed to the shape (e.g. ``min_factor=0.01``, ``pct_start=0.25``).

    Logged (at Lightning's cadence): ``lr/group{j}``, ``lr_factor/samples``.

    Example:
        >>> sched = SampleBasedLRSchedule("onecycle", total_samples=100_000, pct_start=0.25)
        >>> round(sched.shape_fn(0.25), 3)
        1.0
    """

    factor_name = "samples"

    def __init__(
        self,
        shape: Literal["cosine", "linear", "onecycle"] | Callable[[float], float] = "cosine",
        total_samples: int | None = None,
        **shape_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(shape, str):
            check_choice("shape", shape, tuple(sorted(_SHAPES)))
            for key, value in shape_kwargs.items():
                check_number(key, value)
            if "min_factor" in shape_kwargs:
                check_number("min_factor", shape_kwargs["min_factor"], 0.0, 1.0)
            self.shape_fn: Callable[[float], float] = functools.partial(_SHAPES[shape], **shape_kwargs)
            try:
                probe = [self.shape_fn(p / 20) for p in range(21)]  # fail now on bad keyword arguments
            except (TypeError, ZeroDivisionError) as err:
                raise ConfigurationError(f"bad keyword arguments {shape_kwargs} for shape {shape!r}: {err}") from None
            if not all(math.isfinite(v) and v >= 0 for v in probe):
                raise ConfigurationError(f"shape {shape!r} with {shape_kwargs} gives negative or non-finite factors")
        elif callable(shape):
            if shape_kwargs:
                raise ConfigurationError(f"keyword arguments {sorted(shape_kwargs)} are only for named shapes")
            self.shape_fn = shape
        else:
            raise ConfigurationError(f"`shape` must be 'cosine', 'linear', 'onecycle' or a callable, got {shape!r}")
        self.total_samples = check_int("total_samples", total_samples, minimum=1, optional=True)
        self._total: int | None = None
        self._loaded_samples: int | None = None
        self._last_samples: int | None = None
        self._this_batch = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._total = self.total_samples
            self._loaded_samples = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        state = fit_state(trainer)
        if self._loaded_samples is not None and state.batch.owner is None:  # type: ignore[union-attr]
            state.batch.samples_seen = self._loaded_samples  # type: ignore[union-attr]
        self._loaded_samples = None
        if self._total is None:
            length = length_or_none(train_dataloaders(trainer)[0].dataset)
            if trainer.max_epochs is None or trainer.max_epochs < 1 or length is None:
                raise ConfigurationError(
                    "SampleBasedLRSchedule needs `total_samples` when the Trainer has no max_epochs or the "
                    "train data is a stream without __len__"
                )
            self._total = int(trainer.max_epochs) * length

    def lr_factor(self, trainer: pl.Trainer, batch_idx: int) -> float:
        state = self._fit
        before = state.batch.samples_seen  # type: ignore[union-attr]
        if state.counted == (trainer.current_epoch, batch_idx):  # type: ignore[union-attr]
            # the controller already counted this batch: go back to the samples before it
            before -= self._this_batch * trainer.world_size
        return float(self.shape_fn(before / float(self._total)))  # type: ignore[arg-type]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._this_batch = batch_length(batch)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._fit.count_batch(trainer.current_epoch, batch_idx, self._this_batch)  # type: ignore[union-attr]

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        fit = self._path is not None
        samples = self._fit.batch.samples_seen if fit and self._fit is not None else self._last_samples
        return {**state, "total_samples": self._total, "samples_seen": samples}

    def _end_fit(self, trainer: pl.Trainer) -> None:
        if self._fit is not None:
            self._last_samples = self._fit.batch.samples_seen
        super()._end_fit(trainer)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("samples_seen") is not None:
            self._loaded_samples = int(state_dict["samples_seen"])
        if state_dict.get("total_samples") is not None and self.total_samples is None:
            self._total = int(state_dict["total_samples"])
