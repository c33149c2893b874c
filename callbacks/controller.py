"""The batch-size engine's controller: the one callback that owns the batch size of a fit.

How a change flows (one path)::

    schedule(epoch or step) -> per-device request -> EpochPlan (plans.py: sizes, accumulation)
        -> ResizableBatchSampler.plan of the train loader Lightning iterates (never rebuilt)
        -> trainer.accumulate_grad_batches, Lightning's cached epoch length
        -> BatchSizeState (per-device, accumulation, world size -> global batch, samples seen)
        -> LRScaling and logging read it from there

The controller never changes the user's DataLoader: when Lightning builds the train loader (at fit
start and on every reload) the controller hands Lightning a *twin* of it instead — the same
dataset, workers settings, collate function and class, with a :class:`ResizableBatchSampler` over
the same index sampler — before Lightning measures it or starts its workers. See
``docs/ENGINE.md`` for every Trainer configuration and how it is honoured or refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset
from typing_extensions import override

from epochwise.datamodules.sampler import (
    ResizableBatchSampler,
    close_loader,
    is_plain_batch_sampler,
    resizable_copy,
)

from ._checks import ConfigurationError, check_choice, check_int
from ._lightning_internals import (
    intercept_train_dataloaders,
    override_stepping_estimate,
    pending_loader_states,
    replace_train_dataloader,
    restart_train_iterator,
    set_train_epoch_length,
    validates_by_time,
)
from ._logging import CadenceLog
from ._max_per_device import measure_max_per_device, same_batches
from .engine import (
    FitScopedCallback,
    FitState,
    batch_length,
    fit_state,
    length_or_none,
    release_fit_state,
)
from .fit_checks import check_trainer, total_steps, val_check_error, validate_fit
from .plans import EpochPlan, plan_epoch
from .schedules import Unit

__all__ = ["BatchSizeController"]

_KEYS = ("batch_size/per_device", "batch_size/global", "batch_size/accumulation")


class BatchSizeController(FitScopedCallback):
    """Base class of every callback that decides the per-device batch size during fit.

    Subclasses implement :meth:`scheduled_batch_size` (``(epoch, step) -> per-device size``, or
    ``None`` for the loader's own). The controller does the rest, once for all of them:

    - it hands Lightning a resizable twin of each train loader it builds (fit start, reloads), so
      sizes are exact from the first batch, whatever the workers prefetch, and the user's loader is
      never touched;
    - before each epoch it lays out the epoch's batches (:func:`~epochwise.callbacks.plans.plan_epoch`)
      and updates Lightning's cached epoch length (progress bar, epoch end, ``val_check_interval``);
    - a request above ``max_per_device`` keeps the effective batch by raising
      ``trainer.accumulate_grad_batches`` for that epoch (put back to the user's value at the end);
    - the order of each epoch is a function of ``(seed, epoch)``, and the position within the
      epoch is checkpointed, so a fit resumed from any step continues exactly;
    - it simulates the whole fit before training, so ``trainer.estimated_stepping_batches`` (read
      in ``configure_optimizers``) counts the optimizer steps the fit will really take, and a
      configuration it cannot honour exactly is refused before the first step.

    Only one controller may own the batch size of a fit. ``unit="step"`` counts optimizer steps
    (``trainer.global_step``): every micro-batch of one step has the same size.

    Logged at Lightning's cadence and at every step where a value changes:
    ``batch_size/per_device`` (scheduled size; a short last batch is not a change),
    ``batch_size/global``, ``batch_size/accumulation``, and ``samples_seen`` (all ranks).

    Example:
        >>> class Doubling(BatchSizeController):
        ...     def scheduled_batch_size(self, epoch, step):
        ...         return 16 * 2 ** epoch
        >>> Doubling().scheduled_batch_size(2, 0)
        64
    """

    #: ``True`` for a controller whose sizes come from measurements made during the fit (the
    #: size of epoch ``e`` is known only once epoch ``e - 1`` has trained): the fit is not simulated
    #: ahead, so ``trainer.estimated_stepping_batches`` is Lightning's own (the first epoch's
    #: length x ``max_epochs``), a step scheduler with a fixed horizon is refused, and the
    #: epoch-length checks are made at :meth:`largest_batch_size` (the shortest epoch it may plan).
    adaptive: bool = False

    def __init__(
        self, unit: Unit = "epoch", max_per_device: int | Literal["auto"] | None = None, seed: int | None = None
    ) -> None:
        check_choice("unit", unit, ("epoch", "step"))
        if max_per_device != "auto":
            check_int("max_per_device", max_per_device, minimum=1, optional=True)
        check_int("seed", seed, optional=True)
        self.unit = unit
        self.max_per_device = max_per_device
        self.seed = seed
        self._log = CadenceLog(watch=_KEYS)
        self._last_state: dict[str, Any] | None = None
        self._reset_fit()

    # -- the schedule -------------------------------------------------------------------------
    def scheduled_batch_size(self, epoch: int, step: int) -> int | None:
        """Per-device batch size wanted at ``epoch`` / optimizer ``step`` (``None``: the loader's own)."""
        raise NotImplementedError

    def largest_batch_size(self) -> int | None:
        """The largest size the schedule ever asks for (fixes the accumulation of an endless stream)."""
        return None

    def epoch_samples(self, epoch: int) -> int | None:
        """Samples this rank trains on in epoch ``epoch`` (``None``: a stream without length).

        Default: the train loader's sampler length, every epoch. A subclass that also chooses the
        epoch's samples (:meth:`epoch_order`) says how many there are, so the plan and the whole-fit
        simulation stay exact.
        """
        return self._samples

    def epoch_order(self, epoch: int) -> Sequence[int] | None:
        """This rank's dataset indices for epoch ``epoch``, in order (``None``: the loader's own order).

        Handed to the resizable sampler as its ``order``: a subclass returns the same global order
        on every rank, then this rank's shard, and ``len()`` of it must be :meth:`epoch_samples`.
        """
        return None

    def _request(self, epoch: int, step: int) -> int:
        n = self.scheduled_batch_size(epoch, step)
        return int(n) if n is not None else int(self._loader_batch_size or 1)

    @property
    def plan(self) -> EpochPlan | None:
        """The current epoch's plan (``None`` outside a fit)."""
        return self._plan

    @property
    def sampler(self) -> ResizableBatchSampler | None:
        """The resizable batch sampler of the train loader Lightning iterates (during a fit)."""
        return self._sampler

    @property
    def loader_batch_size(self) -> int | None:
        """The batch size the user's train DataLoader was built with."""
        return self._loader_batch_size

    def planned_size(self, batch_idx: int) -> int:
        """Scheduled per-device size of batch ``batch_idx`` of the current epoch."""
        return self._plan.size_of(batch_idx)  # type: ignore[union-attr]

    def controlled_values(self) -> dict[str, float]:
        """What this controller set for the current epoch (read by ``LearningCurveMonitor``)."""
        if self._plan is None:
            return {}
        return {"batch size": float(self._plan.size_of(0)), "accumulation": float(self._plan.accumulation)}

    @property
    def accumulation(self) -> int:
        """Accumulation of the current epoch (the user's times the ``max_per_device`` split)."""
        return self._plan.accumulation if self._plan is not None else self._base_accumulation

    # -- per-fit state ------------------------------------------------------------------------
    def _reset_fit(self) -> None:
        self._fit: FitState | None = None
        self._loaded: dict[str, Any] | None = None
        self._twin: Any = None
        self._original: Any = None
        self._sampler: ResizableBatchSampler | None = None
        self._plan: EpochPlan | None = None
        self._plan_key: tuple[int, int, int] | None = None
        self._base_accumulation = 1
        self._loader_batch_size: int | None = None
        self._samples: int | None = None  # samples per rank and epoch (None: a stream)
        self._epoch_first_step = 0
        self._batches_done = 0
        self._probed_max: int | None = None
        self._seed_in_use: int | None = None
        self._training = False
        self._undo_estimate: Any = None
        self._world_size = 1
        self._warned_clamp = False
        self._log.reset()

    @property
    def _max(self) -> int | None:
        """``max_per_device`` as an int (the probed value for ``"auto"``)."""
        return self._probed_max if self.max_per_device == "auto" else self.max_per_device  # type: ignore[return-value]

    # -- setup: refuse what cannot be honoured, install the interception ----------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_fit()
        check_trainer(self, trainer, pl_module)
        state = fit_state(trainer)
        if state.batch.owner is not None and state.batch.owner is not self:
            raise ConfigurationError(
                f"two callbacks control the batch size: {type(state.batch.owner).__name__} and "
                f"{type(self).__name__}. Keep one (combine the schedules into one callback)."
            )
        state.batch.owner = self
        state.batch.world_size = self._world_size = trainer.world_size
        self._fit = state
        self._base_accumulation = user_accumulation = int(trainer.accumulate_grad_batches)

        def give_back_accumulation() -> None:
            trainer.accumulate_grad_batches = user_accumulation

        state.on_release("trainer.accumulate_grad_batches", give_back_accumulation)
        state.on_release("train loader", lambda: self._give_back_loader(trainer))
        state.on_release(
            "train-loader interception",
            intercept_train_dataloaders(
                trainer, lambda loader: self._wrap_loader(trainer, loader), lambda: self._after_build(trainer)
            ),
        )

    # -- the twin loader ------------------------------------------------------------------------
    def _wrap_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        name = type(self).__name__
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None:
            raise ConfigurationError(
                f"{name} needs a train DataLoader that makes batches (DataLoader(batch_size=N)); this "
                "one has batch_size=None. Build it with batch_size=..., or remove the callback."
            )
        if not is_plain_batch_sampler(batch_sampler):
            raise ConfigurationError(
                f"{name} can resize only a plain torch.utils.data.BatchSampler, but the train "
                f"DataLoader uses {type(batch_sampler).__name__}. Build the DataLoader with "
                "batch_size=... (and shuffle/sampler) instead of batch_sampler=..."
            )
        stream = isinstance(loader.dataset, IterableDataset)
        samples = length_or_none(batch_sampler.sampler)
        if samples is None and stream:
            samples = length_or_none(loader.dataset)
        if samples is None and self.unit == "epoch":
            raise ConfigurationError(
                f"{name}(unit='epoch') needs to know how many samples an epoch has, but the train data "
                "is a stream without __len__ (an IterableDataset). Use unit='step', or give the "
                "dataset a __len__."
            )
        if samples is None and self.largest_batch_size() is None:
            raise ConfigurationError(f"{name} cannot drive a stream without length: its schedule has no largest size")
        if self._loader_batch_size is None:
            loaded = (self._loaded or {}).get("loader_batch_size")
            self._loader_batch_size = int(loaded) if loaded else int(batch_sampler.batch_size)
        if self._seed_in_use is None:
            loaded_seed = (self._loaded or {}).get("seed")
            self._seed_in_use = self.seed if self.seed is not None else (
                int(loaded_seed) if loaded_seed is not None else int(torch.initial_seed()) % (1 << 62)
            )
        twin = resizable_copy(loader, self._loader_batch_size, seed=self._seed_in_use)
        sampler = twin.batch_sampler
        sampler.order = self.epoch_order
        self._give_back_loader(trainer)  # a reload: the previous twin is finished
        self._original, self._twin, self._sampler, self._samples = loader, twin, sampler, samples
        self._plan_key = None
        self._prepare(trainer, at_build=True)
        return twin

    def _after_build(self, trainer: pl.Trainer) -> None:
        length = self._plan.length if self._plan is not None else None
        set_train_epoch_length(trainer, math.inf if length is None else length)
        if not self._training and self._undo_estimate is None:
            total = total_steps(self, trainer)
            if total is not None:
                self._undo_estimate = override_stepping_estimate(trainer, total)

    def _give_back_loader(self, trainer: pl.Trainer) -> None:
        twin, original = self._twin, self._original
        if twin is None:
            return
        replace_train_dataloader(trainer, twin, original)
        close_loader(twin)  # persistent workers of the twin: not the user's to keep
        self._twin = self._original = None

    # -- planning -------------------------------------------------------------------------------
    def _make_plan(self, epoch: int, first_step: int, request: Any = None) -> EpochPlan:
        return plan_epoch(
            epoch,
            first_step,
            request or self._request,
            self.epoch_samples(epoch),
            unit=self.unit,
            base_accumulation=self._base_accumulation,
            max_per_device=self._max,
            drop_last=bool(self._sampler.drop_last) if self._sampler is not None else False,
            largest_request=self.largest_batch_size(),
        )

    def _position(self, trainer: pl.Trainer) -> tuple[int, int, int]:
        """``(epoch, optimizer step at the epoch's start, first batch)`` the loop continues from."""
        epoch, step = trainer.current_epoch, trainer.global_step
        loaded = self._loaded
        if loaded and int(loaded.get("epoch", -1)) == epoch and 0 < int(loaded.get("batches_done", 0)):
            return epoch, int(loaded["epoch_first_step"]), int(loaded["batches_done"])
        return epoch, step, 0

    def _prepare(self, trainer: pl.Trainer, at_build: bool = False) -> bool:
        """Plan the epoch the loop is at and give it to the sampler; True if the plan changed."""
        epoch, first_step, start = self._position(trainer)
        key = (epoch, first_step, start)
        if key == self._plan_key:
            return False
        plan = self._make_plan(epoch, first_step)
        sampler = self._sampler
        sampler.plan = plan.size_of  # type: ignore[union-attr]
        sampler.set_epoch(epoch)  # type: ignore[union-attr]
        # A stateful loader (torchdata's StatefulDataLoader) whose checkpointed state Lightning is
        # about to load positions itself, by replaying this deterministic plan; any other loader,
        # or a re-created iterator, starts where the interrupted epoch stopped.
        replays = at_build and _is_stateful(self._twin) and pending_loader_states(trainer)
        sampler.start_batch = 0 if replays else start  # type: ignore[union-attr]
        interval = trainer.val_check_interval
        length = plan.length
        if (
            isinstance(interval, int)
            and length is not None
            and length < interval
            and trainer.check_val_every_n_epoch is not None
            and trainer.limit_val_batches != 0
            and not validates_by_time(trainer)
        ):
            raise val_check_error(self, interval, f"epoch {epoch} has {length} batches")
        self._plan, self._plan_key = plan, key
        self._epoch_first_step, self._batches_done = first_step, start
        trainer.accumulate_grad_batches = plan.accumulation
        state = self._fit
        state.batch.accumulation = plan.accumulation  # type: ignore[union-attr]
        state.batch.per_device = plan.size_of(start)  # type: ignore[union-attr]
        if not at_build:
            set_train_epoch_length(trainer, math.inf if length is None else length)
        return True

    # -- Lightning hooks ------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._undo_estimate is not None:
            self._undo_estimate()
            self._undo_estimate = None
        if self._sampler is None:
            raise RuntimeError(f"{type(self).__name__}: the train loader was built before setup('fit')")
        self._training = True
        unmeasured = None
        if self.max_per_device == "auto" and self._probed_max is None:
            unmeasured, key = self._plan, self._plan_key
            self._probed_max = measure_max_per_device(trainer, pl_module, self._original, self._samples)
            self._plan_key = None
        if self._loaded is not None:
            self._fit.batch.samples_seen = int(self._loaded.get("samples_seen", 0))  # type: ignore[union-attr]
        if self._prepare(trainer) and not (unmeasured is not None and key == self._plan_key
                                           and same_batches(unmeasured, self._plan)):  # type: ignore[arg-type]
            restart_train_iterator(trainer)  # batches were prefetched under the wrong plan
        validate_fit(self, trainer)
        self._loaded = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        state = self._fit
        plan = self._plan
        state.batch.per_device = plan.size_of(batch_idx)  # type: ignore[union-attr]
        state.count_batch(trainer.current_epoch, batch_idx, batch_length(batch))  # type: ignore[union-attr]
        if plan.clamped and not self._warned_clamp:  # type: ignore[union-attr]
            self._warned_clamp = True
            rank_zero_warn(
                f"{type(self).__name__}: step {plan.clamped[0]} asks for more than max_per_device="  # type: ignore[union-attr]
                f"{self._max} per micro-batch; the micro-batch is capped (that step's effective batch "
                "is smaller than scheduled)."
            )
        if trainer.loggers:
            self._log_now(trainer)

    def _log_now(self, trainer: pl.Trainer) -> None:
        batch = self._fit.batch  # type: ignore[union-attr]
        global_batch = batch.global_batch
        if self._log.skip_step(trainer, float(batch.per_device or 0), float(global_batch or 0), float(batch.accumulation)):
            return
        self._log(
            trainer,
            {
                "batch_size/per_device": float(batch.per_device or 0),
                "batch_size/global": float(global_batch or 0),
                "batch_size/accumulation": float(batch.accumulation),
                "samples_seen": float(batch.samples_seen),
            },
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_done = batch_idx + 1

    @override
    def _end_fit(self, trainer: pl.Trainer) -> None:
        super()._end_fit(trainer)
        if self._fit is None:
            return
        self._last_state = self.state_dict()
        if self._undo_estimate is not None:
            self._undo_estimate()
        release_fit_state(trainer)
        self._reset_fit()

    # -- checkpointing --------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._fit is None:
            return dict(self._last_state or {})
        return {
            "epoch": self._plan.epoch if self._plan is not None else 0,
            "epoch_first_step": self._epoch_first_step,
            "batches_done": self._batches_done,
            "samples_seen": self._fit.batch.samples_seen,
            "loader_batch_size": self._loader_batch_size,
            "seed": self._seed_in_use,
            "probed_max_per_device": self._probed_max,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        self._last_state = dict(state_dict)
        if state_dict.get("probed_max_per_device") is not None:
            self._probed_max = int(state_dict["probed_max_per_device"])


def _is_stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
