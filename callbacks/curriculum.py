"""CurriculumSampling: easy examples (in small batches) first, harder ones and larger batches later.

The pure parts are in :mod:`epochwise.callbacks.curriculum_schedules` (pacing, order, shard, batch).
This callback owns the batch size (it is a
:class:`~epochwise.callbacks.controller.BatchSizeController`) and hands the resizable sampler the
order of every epoch (the controller's ``epoch_order`` hook): the same global order on every rank,
then this rank's shard. With ``difficulty="loss"`` it also collects the model's own per-sample
training loss, without an extra pass: the losses stay on the device during the epoch and are read
(one transfer; under DDP one gather over the ranks) at each validation start and at the epoch end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import IterableDataset
from typing_extensions import override

from epochwise.datamodules.sampler import epoch_seed

from ._checks import ConfigurationError, check_bool, check_int, check_str
from ._logging import CadenceLog
from .controller import BatchSizeController
from .curriculum_schedules import (
    CurriculumPacing,
    curriculum_batch_size,
    curriculum_order,
    distributed_layout,
    rank_by_difficulty,
    shard,
)
from .engine import batch_length, length_or_none

__all__ = ["CurriculumSampling", "CurriculumPacing"]

_KEYS = ("curriculum/fraction", "curriculum/pool")


class CurriculumSampling(BatchSizeController):
    """Train on the easiest part of the data first, adding harder samples (and a larger batch) as
    training goes on.

    Epoch ``e`` draws from the ``pool`` easiest samples, with ``pool = ceil(c(t) x N)``,
    ``t = e / max_epochs`` and ``c`` the pacing function (:class:`CurriculumPacing`:
    ``start_fraction`` of the data at first, all of it from ``full_at``, a fraction of training).
    The pool is shuffled for the epoch from ``(seed, epoch)`` (``shuffle=False``: easy to hard), so
    the epoch has ``pool`` samples and every one appears once; once the pacing reaches 1, every
    sample of the data set appears once per epoch. The per-device batch of the epoch grows with the
    pool, linearly from ``start_batch_size`` (pool = ``start_fraction``) to ``end_batch_size``
    (all data). Under DDP every rank computes the same global order and takes its shard
    (``DistributedSampler``'s rule: padded by repeating the order's start).

    Difficulty (lower is easier):

    - a sequence or tensor of ``len(train dataset)`` scores, or
    - ``"loss"``: the model's own per-sample training loss, recorded during the previous epochs.
      ``training_step`` must return ``{"loss": loss, "per_sample_loss": losses}`` (``losses``:
      the unreduced loss of each sample of the batch, ``loss_key`` names it). Epoch 0 sees all the
      data once (in a seeded random order) to score it; the pacing applies from epoch 1 on. A
      sample outside the pool keeps the last loss recorded for it (an unscored sample is the
      hardest). No extra pass and no per-step host sync: losses stay on the device and are read
      once per validation run and epoch (under DDP: one ``all_gather``).

    Resume: the order of every epoch is a function of ``(seed, epoch, scores)`` and the scores are
    checkpointed (with ``"loss"``: with the losses recorded so far in the epoch), so a resumed fit
    trains the same samples in the same order. Under DDP a checkpoint taken between validations
    holds rank 0's losses since the last validation only (the other ranks' samples keep their
    earlier scores).

    Args:
        difficulty: per-sample scores, or ``"loss"``.
        start_fraction, full_at, pacing: the pacing function (:class:`CurriculumPacing`).
        start_batch_size: per-device batch while ``start_fraction`` of the data is in play
            (default: ``end_batch_size x start_fraction``, rounded, so an epoch has about as many
            steps at every point of the curriculum).
        end_batch_size: per-device batch with all the data (default: the DataLoader's).
        shuffle: shuffle the pool each epoch (``False``: easy to hard).
        loss_key: the key of the per-sample losses in ``training_step``'s output (``"loss"`` mode).
        max_per_device, seed: as in :class:`~epochwise.callbacks.BatchSizeWarmup`.

    Logged (at Lightning's cadence and at every change): ``curriculum/fraction``,
    ``curriculum/pool`` and the controller's ``batch_size/*``, ``samples_seen``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> curriculum = CurriculumSampling(difficulty=[0.3, 0.1, 0.9, 0.5], start_fraction=0.5, full_at=0.5)
        >>> curriculum.pacing.pool_size(0.0, 4), curriculum.pacing.pool_size(0.5, 4)
        (2, 4)
        >>> trainer = Trainer(callbacks=[curriculum], max_epochs=10, logger=False)
    """

    def __init__(
        self,
        difficulty: Sequence[float] | Tensor | Literal["loss"],
        start_fraction: float = 0.25,
        full_at: float = 0.5,
        pacing: Literal["linear", "root"] = "linear",
        start_batch_size: int | None = None,
        end_batch_size: int | None = None,
        shuffle: bool = True,
        loss_key: str = "per_sample_loss",
        max_per_device: int | Literal["auto"] | None = None,
        seed: int | None = None,
    ) -> None:
        self.pacing = CurriculumPacing(start_fraction, full_at, pacing)
        if isinstance(difficulty, str):
            if difficulty != "loss":
                raise ConfigurationError(f"`difficulty` must be per-sample scores or 'loss', got {difficulty!r}")
            self.difficulty: Tensor | None = None
        else:
            try:
                scores = torch.as_tensor(difficulty, dtype=torch.float64).reshape(-1).clone()
            except (TypeError, ValueError) as err:
                raise ConfigurationError(f"`difficulty` must be per-sample scores or 'loss' ({err})") from None
            if len(scores) == 0 or not bool(torch.isfinite(scores).all()):
                raise ConfigurationError("`difficulty` scores must be a non-empty sequence of finite numbers")
            self.difficulty = scores
        self.start_batch_size = check_int("start_batch_size", start_batch_size, minimum=1, optional=True)
        self.end_batch_size = check_int("end_batch_size", end_batch_size, minimum=1, optional=True)
        self.shuffle = check_bool("shuffle", shuffle)
        self.loss_key = check_str("loss_key", loss_key)
        self._curriculum_log = CadenceLog(watch=_KEYS)
        super().__init__(unit="epoch", max_per_device=max_per_device, seed=seed)

    @property
    def by_loss(self) -> bool:
        """Whether the difficulty is the model's own per-sample loss."""
        return self.difficulty is None

    # -- per-fit state ----------------------------------------------------------------------------
    def _reset_fit(self) -> None:
        super()._reset_fit()
        self._n: int | None = None  # samples in the data set
        self._rank = 0
        self._max_epochs = 1
        self._dist_drop_last = False
        self._scores: Tensor | None = None  # float64 (n,), host: the difficulty the next order uses
        self._ranked: Tensor | None = None
        self._orders: dict[int, list[int]] = {}  # epoch -> global order (padding not included)
        self._loaded_order: tuple[int, list[int]] | None = None
        self._pending: list[Tensor] = []  # per-sample losses of this rank since the last read
        self._pending_from: int | None = None  # their first position in this rank's shard
        self._curriculum_log.reset()

    # -- the schedule -----------------------------------------------------------------------------
    def epoch_fraction(self, epoch: int) -> float:
        """Fraction of the data in play in ``epoch`` (1 for the scoring epoch 0 of ``"loss"``)."""
        if self.by_loss and epoch == 0:
            return 1.0
        return self.pacing.fraction(epoch / self._max_epochs)

    def pool_size(self, epoch: int) -> int:
        """Samples (all ranks, before padding) in play in ``epoch``."""
        n = self._require_n()
        if self.by_loss and epoch == 0:
            return n
        return self.pacing.pool_size(epoch / self._max_epochs, n)

    def _require_n(self) -> int:
        if self._n is None:
            raise RuntimeError("CurriculumSampling: the data set's size is known once the train loader is built")
        return self._n

    def _end_batch(self) -> int:
        return int(self.end_batch_size or self.loader_batch_size or 1)

    def scheduled_batch_size(self, epoch: int, step: int) -> int:
        end = self._end_batch()
        c0 = float(self.pacing.start_fraction)
        start = self.start_batch_size or max(1, int(math.floor(end * c0 + 0.5)))
        return curriculum_batch_size(self.epoch_fraction(epoch), c0, start, end)

    def epoch_samples(self, epoch: int) -> int | None:
        pool, world = self.pool_size(epoch), self._world_size
        return pool // world if self._dist_drop_last else math.ceil(pool / world)

    def global_order(self, epoch: int) -> list[int]:
        """The order of ``epoch`` over all ranks (before padding), the same on every rank."""
        order = self._orders.get(epoch)
        if order is None:
            if self._loaded_order is not None and self._loaded_order[0] == epoch:
                order = self._loaded_order[1]
            else:
                if self._ranked is None:
                    self._ranked = rank_by_difficulty(self._scores)  # type: ignore[arg-type]
                seed = epoch_seed(self._seed_in_use or 0, epoch)
                order = curriculum_order(self._ranked, self.pool_size(epoch), seed, self.shuffle)
            self._orders = {epoch: order}  # one epoch at a time: the past ones are never asked again
        return order

    def epoch_order(self, epoch: int) -> list[int]:
        return shard(self.global_order(epoch), self._rank, self._world_size, self._dist_drop_last)

    # -- Lightning hooks --------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ConfigurationError(
                "CurriculumSampling paces the data over epoch / max_epochs, but the Trainer has "
                f"max_epochs={trainer.max_epochs}: set Trainer(max_epochs=N)"
            )
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._rank, self._max_epochs = int(trainer.global_rank), int(trainer.max_epochs)  # type: ignore[arg-type]

    def _wrap_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        dataset = loader.dataset
        n = None if isinstance(dataset, IterableDataset) else length_or_none(dataset)
        if n is None:
            raise ConfigurationError(
                "CurriculumSampling orders the samples of a map-style data set (with __len__ and "
                "indices); the train data is a stream. Use a map-style Dataset, or remove the callback."
            )
        inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        world = trainer.world_size
        if length_or_none(inner) not in (n, math.ceil(n / world), n // world):
            raise ConfigurationError(
                f"CurriculumSampling orders the whole data set ({n} samples), but the train loader's "
                f"sampler ({type(inner).__name__}) draws {length_or_none(inner)}: build the loader "
                "with shuffle=True/False instead of a sampler that selects samples"
            )
        if self.difficulty is not None and len(self.difficulty) != n:
            raise ConfigurationError(
                f"`difficulty` has {len(self.difficulty)} scores but the train data set has {n} samples"
            )
        self._n = n
        self._dist_drop_last = bool(getattr(inner, "drop_last", False)) and world > 1
        if self._scores is None:
            loaded = (self._loaded or {}).get("scores")
            if loaded is not None:
                self._scores = torch.as_tensor(loaded, dtype=torch.float64).clone()
            elif self.difficulty is not None:
                self._scores = self.difficulty.clone()
            else:
                self._scores = torch.full((n,), math.inf, dtype=torch.float64)  # unscored: hardest
        return super()._wrap_loader(trainer, loader)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.loggers:
            epoch = trainer.current_epoch
            self._curriculum_log(
                trainer, {"curriculum/fraction": self.epoch_fraction(epoch), "curriculum/pool": float(self.pool_size(epoch))}
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.by_loss:
            return
        losses = outputs.get(self.loss_key) if isinstance(outputs, Mapping) else None
        n = batch_length(batch)
        if not isinstance(losses, Tensor) or losses.ndim != 1 or losses.shape[0] != n:
            raise ConfigurationError(
                f"CurriculumSampling(difficulty='loss') needs the per-sample losses of each training batch: "
                f"return {{'loss': loss, {self.loss_key!r}: losses}} from training_step, with losses of shape "
                f"({n},) (e.g. F.cross_entropy(logits, y, reduction='none')); got "
                f"{type(losses).__name__ if not isinstance(losses, Tensor) else tuple(losses.shape)}"
            )
        if self._pending_from is None:
            self._pending_from = self._plan.samples_before(batch_idx)  # type: ignore[union-attr]
        self._pending.append(losses.detach().float())  # stays on the device: no sync here

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.by_loss and self._fit is not None and not trainer.sanity_checking:
            self._read_losses(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.by_loss and self._fit is not None:
            self._read_losses(trainer)

    def _read_losses(self, trainer: pl.Trainer) -> None:
        """Move the losses recorded since the last read into the scores: one transfer to the host,
        and under DDP one ``all_gather``, so every rank holds every rank's losses (and orders alike)."""
        if not self._pending:
            return
        values = torch.cat(self._pending)
        if self._world_size > 1:
            values = trainer.strategy.all_gather(values).reshape(self._world_size, -1)
        ranks = range(self._world_size) if self._world_size > 1 else [self._rank]
        indices, keep = self._pending_indices(ranks)
        self._scores[indices[keep]] = values.reshape(-1).cpu().double()[keep]  # type: ignore[index]
        self._pending, self._pending_from, self._ranked = [], None, None

    def _pending_indices(self, ranks: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Data-set indices of the pending losses of ``ranks`` (rank-major, as gathered), and which
        to keep: not the padding's repeats (a sample keeps the loss of its own place in the order)."""
        count = sum(int(v.shape[0]) for v in self._pending)
        world, order = self._world_size, self.global_order(self._plan.epoch)  # type: ignore[union-attr]
        layout = torch.as_tensor(distributed_layout(order, world, self._dist_drop_last), dtype=torch.long)
        positions = torch.arange(int(self._pending_from or 0), int(self._pending_from or 0) + count)
        places = (torch.as_tensor(list(ranks)).reshape(-1, 1) + positions.reshape(1, -1) * world).reshape(-1)
        return layout[places], places < len(order)

    # -- checkpointing ----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._fit is None:
            return super().state_dict()
        state = super().state_dict()
        if self.by_loss and self._scores is not None:
            scores = self._scores.clone()
            if self._pending:  # this rank's losses since the last read (one transfer, no collective)
                indices, keep = self._pending_indices([self._rank])
                scores[indices[keep]] = torch.cat(self._pending).cpu().double()[keep]
            epoch = state["epoch"]
            state["scores"] = scores
            if epoch in self._orders:
                state["order"] = [epoch, torch.as_tensor(self._orders[epoch], dtype=torch.long)]
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        order = state_dict.get("order")
        if order is not None and self.by_loss:
            self._loaded_order = (int(order[0]), torch.as_tensor(order[1], dtype=torch.long).tolist())

