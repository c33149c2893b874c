"""Batch size as a schedule: the controller that owns it, and the warmup / milestone callbacks.

How a change flows (one path)::

    schedule(epoch or step) -> per-device request
        -> split_for_max_per_device -> (micro-batch, extra accumulation)
        -> ResizableBatchSampler.plan / trainer.accumulate_grad_batches   (no DataLoader rebuilt)
        -> BatchSizeState (per_device, accumulation, world size -> global batch, samples_seen)
        -> LRScaling and logging read it from there
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from epochwise.datamodules.sampler import ResizableBatchSampler

from ._lightning_internals import restart_train_iterator, set_train_epoch_length, train_dataloaders
from ._logging import current_lrs, log_scalars
from .engine import batch_state, has_lr_path
from .schedules import MilestoneSchedule, WarmupSchedule, check_unit, split_for_max_per_device

__all__ = ["BatchSizeController", "BatchSizeWarmup", "BatchSizeSchedule", "probe_max_per_device"]


class BatchSizeController(Callback):
    """Base class of every callback that decides the per-device batch size during fit.

    Subclasses implement :meth:`scheduled_batch_size` (``(epoch, step) -> per-device size`` or
    ``None`` to keep the loader's own). This base class does the rest, once for all of them:

    - at ``on_train_start`` it makes the train DataLoader's ``BatchSampler`` resizable in place
      (:meth:`ResizableBatchSampler.adopt`): no DataLoader is rebuilt, workers keep their PIDs;
    - at each epoch start it gives the sampler a *plan* (size of every batch of the epoch), so
      sizes are exact at every step whatever the prefetching, updates Lightning's cached epoch
      length (progress bar, epoch end, ``val_check_interval``), and for the first epoch of a fit
      (also after a resume) discards batches prefetched at the loader's own size;
    - if a request exceeds ``max_per_device`` it keeps the effective batch by raising
      ``trainer.accumulate_grad_batches`` instead (applied at epoch boundaries);
      ``max_per_device="auto"`` probes it at fit start from the model's measured memory per
      sample and the device's free memory (:func:`probe_max_per_device`), rank 0's answer
      broadcast to all ranks and kept in the checkpoint;
    - it seeds each epoch's shuffle with ``seed + epoch`` so a resumed run sees the same order;
    - it publishes the size in :func:`~epochwise.callbacks.engine.batch_state` and logs every
      step ``batch_size/per_device``, ``batch_size/global``, ``batch_size/accumulation`` and
      ``samples_seen`` (global).

    Only one controller may be attached to a Trainer (a second raises at ``setup``).

    ``unit="step"`` counts optimizer steps (``trainer.global_step``), so with accumulation every
    micro-batch of one step has the same size.
    """

    def __init__(
        self, unit: str = "epoch", max_per_device: int | str | None = None, seed: int | None = None
    ) -> None:
        check_unit(unit)
        if max_per_device != "auto" and max_per_device is not None and (
            not isinstance(max_per_device, int) or isinstance(max_per_device, bool) or max_per_device < 1
        ):
            raise ValueError(f"`max_per_device` must be None, 'auto' or an int >= 1, got {max_per_device!r}")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"`seed` must be None or an int, got {seed!r}")
        self.unit = unit
        self.max_per_device = max_per_device
        self.seed = seed
        self._sampler: ResizableBatchSampler | None = None
        self._base_accumulation = 1
        self._restart_pending = False
        self._samples_loaded: int | None = None
        self._warned_clamp = False
        self._probed_max: int | None = None

    @property
    def _max(self) -> int | None:
        """``max_per_device`` as an int (the probed value for ``"auto"``)."""
        return self._probed_max if self.max_per_device == "auto" else self.max_per_device  # type: ignore[return-value]

    # -- the schedule -------------------------------------------------------------------------
    def scheduled_batch_size(self, epoch: int, step: int) -> int | None:
        """Per-device batch size wanted at ``epoch`` / optimizer ``step`` (``None``: loader's own)."""
        raise NotImplementedError

    def _request(self, epoch: int, step: int) -> int:
        n = self.scheduled_batch_size(epoch, step)
        return int(n) if n is not None else int(self.loader_batch_size or 1)

    def nominal_batch_size(self, batch_idx: int) -> int | None:
        """Planned per-device size of batch ``batch_idx`` of the current epoch (before a short last batch)."""
        return self._sampler.size_of(batch_idx) if self._sampler is not None else None

    @property
    def loader_batch_size(self) -> int | None:
        """The batch size the train DataLoader was built with (known from ``on_train_start``)."""
        return self._loader_batch_size if hasattr(self, "_loader_batch_size") else None

    @property
    def sampler(self) -> ResizableBatchSampler | None:
        """The resizable batch sampler installed in the train DataLoader."""
        return self._sampler

    # -- Lightning hooks ----------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        state = batch_state(trainer)
        if state.owner is not None and state.owner is not self:
            raise RuntimeError(
                f"two callbacks control the batch size: {type(state.owner).__name__} and "
                f"{type(self).__name__}. Keep one (e.g. combine the schedules into one callback)."
            )
        state.owner = self

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        state = batch_state(trainer)
        if state.owner is self:
            state.owner = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = train_dataloaders(trainer)
        if len(loaders) != 1:
            raise RuntimeError(
                f"{type(self).__name__} supports exactly one train DataLoader, got {len(loaders)}"
            )
        loader = loaders[0]
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None:
            raise RuntimeError(
                f"{type(self).__name__} needs a DataLoader that makes batches (batch_size=N); "
                "this one has batch_size=None or an IterableDataset"
            )
        seed = self.seed if self.seed is not None else torch.initial_seed()
        self._sampler = ResizableBatchSampler.adopt(batch_sampler, seed=seed)
        if not hasattr(self, "_loader_batch_size"):
            self._loader_batch_size = int(self._sampler.batch_size)
        self._base_accumulation = int(trainer.accumulate_grad_batches)
        if self.max_per_device == "auto" and self._probed_max is None:
            found = probe_max_per_device(pl_module, loader, trainer.optimizers[0] if trainer.optimizers else None)
            self._probed_max = max(1, int(trainer.strategy.broadcast(found, src=0)))
            log_scalars(trainer, {"batch_size/max_per_device": float(self._probed_max)})
        state = batch_state(trainer)
        state.world_size = trainer.world_size
        state.loader_batch_size = self._loader_batch_size
        state.dataset_length = len(self._sampler.sampler)  # type: ignore[arg-type]
        if self._samples_loaded is not None:
            state.samples_seen = self._samples_loaded
            self._samples_loaded = None
        self._restart_pending = True
        # the first epoch's plan: on_train_epoch_start is skipped when resuming mid/at-end of epoch
        self._prepare_epoch(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare_epoch(trainer)

    def _prepare_epoch(self, trainer: pl.Trainer) -> None:
        sampler = self._sampler
        if sampler is None:
            return
        epoch, step0 = trainer.current_epoch, trainer.global_step
        # with a step schedule, accumulation (fixed within an epoch) must cover the epoch's largest request
        largest = self._request(epoch, step0) if self.unit == "epoch" else self._largest_request(epoch, step0, sampler)
        micro, extra = split_for_max_per_device(largest, self._max)
        accumulation = self._base_accumulation * extra
        trainer.accumulate_grad_batches = accumulation
        if self.unit == "epoch":
            sampler.plan = None
            sampler.batch_size = micro
        else:
            sampler.plan = self._step_plan(epoch, step0, accumulation, extra)
        sampler.set_epoch(epoch)
        set_train_epoch_length(trainer, len(sampler))
        if self._restart_pending:
            restart_train_iterator(trainer)
            self._restart_pending = False
        state = batch_state(trainer)
        state.accumulation = accumulation
        state.per_device = sampler.size_of(0)

    def _largest_request(self, epoch: int, step0: int, sampler: ResizableBatchSampler) -> int:
        """Largest per-device request over the steps this epoch will take (walked step by step)."""
        remaining = len(sampler.sampler)  # type: ignore[arg-type]
        step, largest = step0, 1
        while remaining > 0:
            wanted = self._request(epoch, step)
            largest = max(largest, wanted)
            remaining -= wanted * self._base_accumulation
            step += 1
        return largest

    def _step_plan(self, epoch: int, step0: int, accumulation: int, extra: int) -> Callable[[int], int]:
        """Size of batch ``i`` of this epoch: the request at its optimizer step, split by ``extra``."""
        epoch_cache: dict[int, int] = {}
        max_per_device = self._max

        def plan(i: int) -> int:
            step = step0 + i // accumulation
            size = epoch_cache.get(step)
            if size is None:
                wanted = self._request(epoch, step)
                size = max(1, round(wanted / extra))
                if max_per_device is not None and size > max_per_device:
                    size = max_per_device
                    if not self._warned_clamp:
                        self._warned_clamp = True
                        rank_zero_warn(
                            f"{type(self).__name__}: step {step} asks for {wanted} per device but "
                            f"max_per_device={max_per_device}; the micro-batch is clamped (the "
                            f"effective batch of this step is smaller than scheduled)."
                        )
                epoch_cache[step] = size
            return size

        return plan

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        state = batch_state(trainer)
        state.per_device = state.observe_batch(trainer, batch, batch_idx)
        metrics = {
            "batch_size/per_device": float(state.per_device),
            "batch_size/global": float(state.global_batch or 0),
            "batch_size/accumulation": float(state.accumulation),
            "samples_seen": float(state.samples_seen),
        }
        if not has_lr_path(trainer):  # else the LR path logs them, after applying its factors
            metrics.update(current_lrs(trainer))
        log_scalars(trainer, metrics)

    # -- checkpointing ------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # Progress is derived from trainer state; only what cannot be derived is saved.
        trainer_state = getattr(self, "_trainer_state_ref", None)
        samples = trainer_state.samples_seen if trainer_state is not None else 0
        return {
            "samples_seen": samples,
            "loader_batch_size": self.loader_batch_size,
            "seed": self.seed,
            "probed_max_per_device": self._probed_max,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._samples_loaded = int(state_dict.get("samples_seen", 0))
        if state_dict.get("loader_batch_size") is not None:
            self._loader_batch_size = int(state_dict["loader_batch_size"])
        if state_dict.get("probed_max_per_device") is not None:
            self._probed_max = int(state_dict["probed_max_per_device"])
        if self.seed is None and state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # keep a handle on the shared state so state_dict() (which gets no trainer) can read it
        self._trainer_state_ref = batch_state(trainer)


def probe_max_per_device(
    module: torch.nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer | None = None,
    safety_fraction: float = 0.8,
) -> int:
    """Largest per-device batch whose estimated training memory fits in the device's free memory.

    The per-sample activation memory is measured with one forward pass on inputs shaped like the
    loader's first sample (:func:`~epochwise.callbacks.epoch_math.estimate_max_batch_size`); free
    memory is ``torch.cuda.mem_get_info`` on a GPU, else the available physical memory.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(4, 3)), batch_size=2)
        >>> probe_max_per_device(torch.nn.Linear(3, 2), loader) > 1000
        True
    """
    from .epoch_math import estimate_max_batch_size

    sample = loader.dataset[0]
    x = sample[0] if isinstance(sample, (list, tuple)) else sample
    if isinstance(x, dict):
        x = next(v for v in x.values() if isinstance(v, torch.Tensor))
    if not isinstance(x, torch.Tensor):
        raise RuntimeError("max_per_device='auto' needs samples whose first element is a tensor")
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    name = type(optimizer).__name__.lower() if optimizer is not None else "adam"
    kind = "adamw" if "adamw" in name else "adam" if "adam" in name else "lars" if "lars" in name else (
        "sgd_momentum" if optimizer is not None and optimizer.defaults.get("momentum") else "sgd")
    try:
        return estimate_max_batch_size(module, tuple(x.shape), free, optimizer=kind, safety_fraction=safety_fraction)
    except NotImplementedError as err:  # a LightningModule without forward()
        raise RuntimeError(
            f"max_per_device='auto' runs the module's forward() on one batch to measure memory: {err}. "
            "Define forward() or pass max_per_device as an int."
        ) from err


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
        unit: ``"epoch"`` or ``"step"`` (optimizer steps).
        mode: ``"exponential"`` or ``"linear"``.
        increment: added per interval (linear mode).
        max_per_device: largest micro-batch a device may take; beyond it the effective batch
            is kept by raising gradient accumulation.
        seed: base seed of the per-epoch shuffle (default: ``torch.initial_seed()``).

    Logged every step: ``batch_size/per_device``, ``batch_size/global``,
    ``batch_size/accumulation``, ``samples_seen``.

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
        unit: str = "epoch",
        mode: str = "exponential",
        increment: int | None = None,
        max_per_device: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(unit=unit, max_per_device=max_per_device, seed=seed)
        self.schedule = WarmupSchedule(start, end, factor, interval, mode, increment)  # type: ignore[arg-type]

    def scheduled_batch_size(self, epoch: int, step: int) -> int:
        return self.schedule(epoch if self.unit == "epoch" else step)


class BatchSizeSchedule(BatchSizeController):
    """Absolute per-device batch size from each milestone on: ``{0: 64, 30: 128, 60: 256}``.

    The "don't decay the learning rate, increase the batch size" recipe (Smith et al. 2017):
    where a step schedule would divide the LR by k, multiply the batch size by k instead. Before
    the first milestone the loader's own batch size is used.

    Args:
        milestones: ``{epoch_or_step: batch_size}``.
        unit: ``"epoch"`` or ``"step"`` (optimizer steps).
        max_per_device, seed: as in :class:`BatchSizeWarmup`.

    Logged every step: ``batch_size/per_device``, ``batch_size/global``,
    ``batch_size/accumulation``, ``samples_seen``.

    Example:
        >>> sched = BatchSizeSchedule({0: 64, 30: 128, 60: 256})
        >>> sched.schedule(45)
        128
    """

    def __init__(
        self,
        milestones: Mapping[int, int],
        unit: str = "epoch",
        max_per_device: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(unit=unit, max_per_device=max_per_device, seed=seed)
        self.schedule = MilestoneSchedule(milestones)

    def scheduled_batch_size(self, epoch: int, step: int) -> int | None:
        return self.schedule(epoch if self.unit == "epoch" else step)

