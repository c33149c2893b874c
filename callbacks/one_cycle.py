"""OneCycleBatchLR: the one-cycle policy moving the LR and the batch size together, over samples seen.

The pure schedule is :class:`~epochwise.callbacks.one_cycle_schedules.OneCycleBatchLRSchedule`
(``progress -> (lr_factor, batch_factor)``). This callback applies it through the batch-size engine
(it is a :class:`~epochwise.callbacks.controller.BatchSizeController` with a request per optimizer
step) and the one LR path (the factor ``one_cycle``).

Progress is measured in samples: the progress of optimizer step ``s`` is the number of samples (all
ranks) trained before it, divided by the cycle's ``total_samples``. Because the batch of a step
depends on the samples before it, and those on the batches before, the callback keeps a *sample
clock*: for each epoch, the optimizer step and the samples it starts at (simulated from the
engine's own epoch plans, so short last batches, ``limit_train_batches`` and ``drop_last`` count
exactly), and within the epoch the samples before each step (each step trains
``accumulation x micro-batch`` samples per rank). Everything is a pure function of the Trainer's
configuration, so every DDP rank computes the same sizes and LRs, a resumed fit recomputes them,
and ``trainer.estimated_stepping_batches`` is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from ._checks import ConfigurationError, check_int
from ._logging import CadenceLog
from .controller import BatchSizeController
from .fit_checks import simulate
from .lr_path import LRPath
from .one_cycle_schedules import OneCycleBatchLRSchedule
from .plans import EpochPlan, limited_length
from .schedules import split_for_max_per_device

__all__ = ["OneCycleBatchLR", "OneCycleBatchLRSchedule"]


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass
class _Clock:
    """The sample clock of one epoch: the requests and the global samples before each of its steps."""

    first_step: int
    start: int  # global samples trained before the epoch
    extra: int  # micro-batches per request (max_per_device split) the epoch's plan uses
    requests: list[int] = field(default_factory=list)
    before: list[int] = field(default_factory=list)


class OneCycleBatchLR(BatchSizeController):
    """One-cycle policy for the LR *and* the batch size: the LR rises while the batch shrinks, then
    both reverse and the LR anneals toward zero.

    At optimizer step ``s`` with ``progress = samples trained before s / total_samples``:
    the per-device batch is ``base x batch_factor(progress)`` (rounded half up) and the LR is the
    optimizer's (and its scheduler's) LR ``x lr_factor(progress)``, with the factors of
    :class:`OneCycleBatchLRSchedule` (defaults: LR 1x -> 10x -> 0.001x, batch 1x -> 0.5x -> 1x,
    the turn at half the samples). Every micro-batch of one step has the same size and LR.
    Measured in samples, the LR curve over the data is the same whatever path the batch takes.

    The batch goes through the batch-size engine: ``max_per_device`` splits a large request into
    micro-batches with gradient accumulation (the split of each epoch is fixed; the sample clock
    counts what the split really trains), ``Trainer(accumulate_grad_batches)`` multiplies every
    step, DDP ranks all take the same sizes, ``trainer.estimated_stepping_batches`` is exact and a
    resumed fit continues exactly. The LR is a factor on the one LR path (it multiplies what any
    LR scheduler gives). Do not add :class:`~epochwise.callbacks.LRScaling` unless the LR should
    also follow the batch linearly.

    Args:
        max_lr_factor, min_batch_factor, pct_start, final_lr_factor, anneal: the schedule's shape
            (see :class:`OneCycleBatchLRSchedule`).
        total_samples: length of the cycle in samples over all ranks; default
            ``max_epochs x`` the samples of an epoch (all ranks). Needed for a stream without length,
            without ``max_epochs``, or with ``limit_train_batches``. After the cycle the final
            factors hold.
        batch_size: the 1x per-device batch; default the train DataLoader's ``batch_size``.
        max_per_device, seed: as in :class:`~epochwise.callbacks.BatchSizeWarmup`.

    Logged: the controller's ``batch_size/*`` and ``samples_seen`` (at Lightning's cadence and at
    every change), the LR path's ``lr/group{j}`` and ``lr_factor/one_cycle`` (at Lightning's
    cadence), ``one_cycle/progress`` (at Lightning's cadence).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> cycle = OneCycleBatchLR(max_lr_factor=10, min_batch_factor=0.5)
        >>> cycle.schedule(0.5), cycle.schedule.batch_size(0.25, 64)
        ((10.0, 0.5), 48)
        >>> trainer = Trainer(callbacks=[cycle], max_epochs=20, logger=False)
    """

    factor_name: ClassVar[str] = "one_cycle"

    def __init__(
        self,
        max_lr_factor: float = 10.0,
        min_batch_factor: float = 0.5,
        pct_start: float = 0.5,
        final_lr_factor: float = 1e-3,
        anneal: Literal["cos", "linear"] = "cos",
        total_samples: int | None = None,
        batch_size: int | None = None,
        max_per_device: int | Literal["auto"] | None = None,
        seed: int | None = None,
    ) -> None:
        self.schedule = OneCycleBatchLRSchedule(max_lr_factor, min_batch_factor, pct_start, final_lr_factor, anneal)
        self.total_samples = check_int("total_samples", total_samples, minimum=1, optional=True)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, optional=True)
        self._cycle_log = CadenceLog()
        super().__init__(unit="step", max_per_device=max_per_device, seed=seed)

    # -- per-fit state ----------------------------------------------------------------------------
    def _reset_fit(self) -> None:
        super()._reset_fit()
        self._path: LRPath | None = None
        self._saved_path: dict[str, Any] | None = None
        self._total: int | None = None
        self._loaded_total: int | None = None
        self._limit: int | float = 1.0
        self._max_epochs: int | None = None
        self._guess_base: int | None = None
        self._starts: dict[int, tuple[int, int]] = {0: (0, 0)}  # epoch -> (first step, global samples before)
        self._clocks: dict[int, _Clock] = {}
        self._warned_split = False
        self._cycle_log.reset()

    # -- the sample clock ---------------------------------------------------------------------------
    def _base(self) -> int:
        base = self.batch_size or self.loader_batch_size or self._guess_base
        if base is None:
            raise RuntimeError("OneCycleBatchLR: the base batch size is known once the train loader is built")
        return int(base)

    def largest_batch_size(self) -> int | None:
        """The 1x batch: the batch factor never exceeds 1."""
        return self.batch_size or self.loader_batch_size or self._guess_base

    def total(self) -> int:
        """Samples (all ranks) of the whole cycle in this fit."""
        if self._total is None:
            total = self.total_samples or self._loaded_total
            if total is None:
                limit, epochs, samples = self._limit, self._max_epochs, self._samples
                if samples is None or epochs is None or epochs < 1 or not (isinstance(limit, float) and limit == 1.0):
                    raise ConfigurationError(
                        "OneCycleBatchLR measures the cycle in samples and needs `total_samples` when the "
                        "train data is a stream without __len__, the Trainer has no max_epochs, or "
                        f"limit_train_batches is set (got max_epochs={epochs}, limit_train_batches={limit})"
                    )
                total = int(epochs) * int(samples) * self._world_size
            self._total = int(total)
        return self._total

    def _step_samples(self, request: int, extra: int) -> int:
        """Global samples one full optimizer step trains for ``request`` under an ``extra``-way split."""
        micro = max(1, _half_up(request / extra))
        if self._max is not None:
            micro = min(micro, self._max)
        return micro * extra * self._base_accumulation * self._world_size

    def _extend(self, clock: _Clock, index: int) -> None:
        """Lay out the clock up to step ``index`` of its epoch (steps past the epoch's end are
        hypothetical: the plan's walk may ask for them)."""
        total, base = self.total(), self._base()
        while len(clock.requests) <= index:
            if clock.requests:
                before = clock.before[-1] + self._step_samples(clock.requests[-1], clock.extra)
            else:
                before = clock.start
            clock.before.append(before)
            clock.requests.append(self.schedule.batch_size(min(1.0, before / total), base))

    def _clock(self, epoch: int) -> _Clock:
        clock = self._clocks.get(epoch)
        if clock is None:
            first_step, start = self._epoch_start(epoch)
            clock = self._clocks[epoch] = self._settle(first_step, start, self.epoch_samples(epoch))
        return clock

    def _settle(self, first_step: int, start: int, samples: int | None) -> _Clock:
        """The epoch's clock, with the ``max_per_device`` split its plan will choose.

        The plan splits every request of the epoch by the split of the largest one, and the samples
        of a step depend on that split: iterate to the split that reproduces itself (at once
        without ``max_per_device``; in practice one or two rounds).
        """
        limit = self._max
        if limit is None:
            return _Clock(first_step, start, 1)
        if samples is None:
            return _Clock(first_step, start, split_for_max_per_device(self._base(), limit)[1])
        extra, seen = 1, set()
        while True:
            clock = _Clock(first_step, start, extra)
            # plan_epoch's walk (plans.py): the largest request of the epoch fixes its split
            largest, remaining, i = 1, samples, 0
            while remaining > 0:
                self._extend(clock, i)
                largest = max(largest, clock.requests[i])
                remaining -= clock.requests[i] * self._base_accumulation
                i += 1
            found = split_for_max_per_device(largest, limit)[1]
            if found == extra:
                return clock
            if found in seen:  # a cycle of splits: sizes stay exact, the clock may be off by rounding
                if not self._warned_split:
                    self._warned_split = True
                    rank_zero_warn(
                        "OneCycleBatchLR: the max_per_device split of an epoch does not settle; progress "
                        "counts the scheduled samples of its steps (off by the split's rounding)"
                    )
                return clock
            seen.add(extra)
            extra = found

    def _epoch_start(self, epoch: int) -> tuple[int, int]:
        """``(first optimizer step, global samples before)`` of ``epoch``, simulated from the plans."""
        known = max(e for e in self._starts if e <= epoch)
        while known < epoch:
            first_step, start = self._starts[known]
            samples = self.epoch_samples(known)
            if samples is None:
                raise RuntimeError("OneCycleBatchLR: the start of a new epoch of a stream is measured when planned")
            plan = super()._make_plan(known, first_step)
            batches = int(limited_length(plan.length, self._limit))  # type: ignore[arg-type]
            trained = min(samples, sum(plan.size_of(i) for i in range(batches)))
            steps = math.ceil(batches / plan.accumulation)
            self._starts[known + 1] = (first_step + steps, start + trained * self._world_size)
            known += 1
        return self._starts[epoch]

    def progress_at(self, epoch: int, step: int) -> float:
        """Fraction of the cycle trained before optimizer ``step`` (of ``epoch``), in ``[0, 1]``."""
        clock, index = self._at(epoch, step)
        return min(1.0, clock.before[index] / self.total())

    def scheduled_batch_size(self, epoch: int, step: int) -> int:
        clock, index = self._at(epoch, step)
        return clock.requests[index]

    def _at(self, epoch: int, step: int) -> tuple[_Clock, int]:
        clock = self._clock(epoch)
        index = step - clock.first_step
        if index < 0:
            raise RuntimeError(f"OneCycleBatchLR: step {step} is before epoch {epoch}'s first step {clock.first_step}")
        self._extend(clock, index)
        return clock, index

    def _make_plan(self, epoch: int, first_step: int) -> EpochPlan:
        predicted = self._starts.get(epoch)
        if predicted is None and self.epoch_samples(epoch) is not None:
            predicted = self._epoch_start(epoch)
        if predicted is None or predicted[0] != first_step:
            # a stream's new epoch, or steps taken otherwise than planned (manual optimization):
            # the clock restarts from what was really trained
            self._starts = {e: s for e, s in self._starts.items() if e < epoch}
            self._clocks = {e: c for e, c in self._clocks.items() if e < epoch}
            self._starts[epoch] = (first_step, int(self._fit.batch.samples_seen))  # type: ignore[union-attr]
        return super()._make_plan(epoch, first_step)

    # -- Lightning hooks --------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._limit = trainer.limit_train_batches
        self._max_epochs = trainer.max_epochs
        self._path = self._fit.lr_path()  # type: ignore[union-attr]
        self._path.register(self.factor_name, type(self).__name__)

    def _wrap_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if size is not None and self._guess_base is None:
            self._guess_base = int(size)  # a stream's largest size is needed before the controller reads it
        return super()._wrap_loader(trainer, loader)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._path.attach(trainer, self._fit, self._saved_path)  # type: ignore[union-attr, arg-type]
        self._saved_path = None
        self._check_cycle(trainer)

    def _check_cycle(self, trainer: pl.Trainer) -> None:
        """Warn when the fit and the cycle do not end together (the LR would not anneal, or would sit
        at its final value)."""
        fit = simulate(self, trainer)
        if not fit or math.isinf(fit[-1].steps):
            return
        last = fit[-1]
        clock = self._clock(last.epoch)
        index = int(last.steps)
        if not math.isinf(last.batches) and last.steps == math.ceil(last.batches / last.accumulation):
            end = self._epoch_start(last.epoch + 1)[1] if self.epoch_samples(last.epoch) is not None else None
        else:
            self._extend(clock, index)
            end = clock.before[index]
        if end is None:
            return
        ratio = end / self.total()
        if ratio < 0.99 or ratio > 1.01:
            rank_zero_warn(
                f"OneCycleBatchLR: the fit trains {end} samples but the cycle has total_samples={self.total()} "
                f"({ratio:.0%}); set total_samples (or max_epochs/max_steps) so that they end together"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        plan = self._plan
        progress = self.progress_at(plan.epoch, plan.step_of(batch_idx))  # type: ignore[union-attr]
        path = self._path
        path.set_factor(self.factor_name, self.schedule.lr_factor(progress))  # type: ignore[union-attr]
        path.apply()  # type: ignore[union-attr]
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.loggers:
            self._cycle_log(trainer, {"one_cycle/progress": progress})

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._path.log(trainer)  # type: ignore[union-attr]

    # -- checkpointing ----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._fit is None:
            return super().state_dict()  # the last fit's, with the entries below
        current = self._plan.epoch if self._plan is not None else 0
        return {
            **super().state_dict(),
            "lr_path": self._path.state_dict() if self._path is not None else None,
            "total_samples": self._total,
            "epoch_start": list(self._starts.get(current, (0, 0))),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._saved_path = state_dict.get("lr_path")
        if state_dict.get("total_samples") is not None and self.total_samples is None:
            self._loaded_total = int(state_dict["total_samples"])
        start = state_dict.get("epoch_start")
        if start is not None:  # needed for a stream, whose epoch starts are measured, not simulated
            self._starts[int(state_dict.get("epoch", 0))] = (int(start[0]), int(start[1]))
