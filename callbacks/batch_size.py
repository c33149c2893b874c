"""Batch size as a schedule: growth (warmup) and milestones, thin callbacks over the engine's
controller (:class:`~epochwise.callbacks.controller.BatchSizeController`) and the pure schedules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from .controller import BatchSizeController
from .schedules import MilestoneSchedule, Unit, WarmupSchedule

__all__ = ["BatchSizeController", "BatchSizeWarmup", "BatchSizeSchedule"]


class BatchSizeWarmup(BatchSizeController):
    """Grow the batch size during training, per epoch or per optimizer step.

    ``mode="exponential"`` multiplies by ``factor`` every ``interval`` units up to ``end``
    (``start=16, end=256, factor=2, interval=2`` gives per epoch 16,16,32,32,64,64,128,128,256,...);
    ``mode="linear"`` adds ``increment`` every ``interval`` units (Megatron-style ramp).
    Sizes are per device. Pair with :class:`~epochwise.callbacks.LRScaling` to move the LR with it.

    Args:
        start, end: first and final per-device batch size.
        factor: growth factor (exponential mode).
        interval: units between growth steps.
        unit: ``"epoch"`` or ``"step"`` (optimizer steps; the only unit for a stream without length).
        mode: ``"exponential"`` or ``"linear"``.
        increment: added per interval (linear mode).
        max_per_device: largest micro-batch a device may take (int, or ``"auto"``: measured at fit
            start); beyond it the effective batch is kept by raising gradient accumulation.
        seed: base seed of the per-epoch order of a plain ``RandomSampler`` (default:
            ``torch.initial_seed()``, kept in the checkpoint).

    Logged: see :class:`BatchSizeController`.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> warmup = BatchSizeWarmup(start=16, end=256, factor=2, interval=2)
        >>> [warmup.schedule(e) for e in range(6)]
        [16, 16, 32, 32, 64, 64]
        >>> trainer = Trainer(callbacks=[warmup], max_epochs=10, logger=False)
    """

    def __init__(
        self,
        start: int,
        end: int,
        factor: float = 2,
        interval: int = 2,
        unit: Unit = "epoch",
        mode: Literal["exponential", "linear"] = "exponential",
        increment: int | None = None,
        max_per_device: int | Literal["auto"] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(unit=unit, max_per_device=max_per_device, seed=seed)
        self.schedule = WarmupSchedule(start, end, factor, interval, mode, increment)  # type: ignore[arg-type]

    def scheduled_batch_size(self, epoch: int, step: int) -> int:
        return self.schedule(epoch if self.unit == "epoch" else step)

    def largest_batch_size(self) -> int:
        return self.schedule.end


class BatchSizeSchedule(BatchSizeController):
    """Absolute per-device batch size from each milestone on: ``{0: 64, 30: 128, 60: 256}``.

    The "don't decay the learning rate, increase the batch size" recipe (Smith et al. 2017):
    where a step schedule would divide the LR by k, multiply the batch size by k instead. Before
    the first milestone the loader's own batch size is used.

    Args:
        milestones: ``{epoch_or_step: batch_size}`` (not modified).
        unit: ``"epoch"`` or ``"step"`` (optimizer steps).
        max_per_device, seed: as in :class:`BatchSizeWarmup`.

    Logged: see :class:`BatchSizeController`.

    Example:
        >>> sched = BatchSizeSchedule({0: 64, 30: 128, 60: 256})
        >>> sched.schedule(45)
        128
    """

    def __init__(
        self,
        milestones: Mapping[int, int],
        unit: Unit = "epoch",
        max_per_device: int | Literal["auto"] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(unit=unit, max_per_device=max_per_device, seed=seed)
        self.schedule = MilestoneSchedule(milestones)

    def scheduled_batch_size(self, epoch: int, step: int) -> int | None:
        return self.schedule(epoch if self.unit == "epoch" else step)

    def largest_batch_size(self) -> int:
        return max(self.schedule.milestones.values())
