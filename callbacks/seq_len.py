"""SequenceLengthWarmup: train a sequence model on short sequences first, the batch coupled to the length.

The callback applies the pure schedule of :mod:`epochwise.callbacks.seq_len_schedules` to every
training batch (the same shape as :class:`~epochwise.callbacks.ProgressiveResizing`) and, when
coupled, owns the batch size through the batch-size engine (it is a
:class:`~epochwise.callbacks.controller.BatchSizeController` with a request per optimizer step).
"""

from __future__ import annotations

import math
import random
from collections.abc import MutableMapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from epochwise.datamodules.sampler import epoch_seed

from ._checks import ConfigurationError, check_bool, check_choice, check_int, check_number
from ._logging import CadenceLog
from .controller import BatchSizeController
from .schedules import split_for_max_per_device
from .seq_len_schedules import SequenceLengthSchedule, coupled_batch_for_length, truncate_sequences

__all__ = ["SequenceLengthWarmup", "SequenceLengthSchedule", "coupled_batch_for_length", "truncate_sequences"]

_WATCH = ("seq_len/length",)


class SequenceLengthWarmup(BatchSizeController):
    """Truncate the training sequences to a length that grows from ``start_len`` to ``end_len``;
    coupled, the batch grows as the length shrinks so every optimizer step holds as many tokens.

    At optimizer step ``s`` the length is ``SequenceLengthSchedule(start_len, end_len,
    warmup_steps, increment)(s)``; ``warmup_steps`` is given, or ``duration x max_steps``. Every
    **training** batch is cut on its device in ``on_train_batch_start`` (before ``training_step``):
    each tensor of the batch whose size along ``seq_dim`` is the batch's sequence length (inputs,
    targets, attention masks...), or the entries ``keys``, is replaced by its first ``length``
    positions (``mode="truncate"``) or a window at a seeded random offset (``mode="crop"``).
    The batch must be a ``list`` (what ``default_collate`` returns for tuple samples) or a
    ``dict``. Validation, test and predict batches are never touched: the model is evaluated at
    full length. Every micro-batch of one optimizer step has the same length.

    ``couple_batch_size=True`` (default) makes this callback the batch-size owner: the per-device
    batch at step ``s`` is ``base x end_len / length(s)`` (rounded half up, clamped to
    ``[min_batch_size, max_batch_size]``), ``base`` the DataLoader's batch size, so the tokens of a
    step stay ``base x end_len`` (within ``1 / (2 x batch)``; a warning says if a clamp or a small
    batch takes some step more than 5% off). The batch goes through the engine (``max_per_device``
    turns it into accumulation, DDP, resume, exact ``estimated_stepping_batches``), and works on a
    stream (``IterableDataset``) as on a map-style data set. ``couple_batch_size=False`` leaves
    the batch to the loader or to another controller.

    Args:
        start_len, end_len: first and final training length (tokens).
        warmup_steps: optimizer steps of the warmup; or
        duration: the warmup as a fraction of ``Trainer(max_steps)``.
        increment: lengths are multiples of it during the warmup.
        couple_batch_size: own the batch size and keep the tokens per step level.
        mode: ``"truncate"`` or ``"crop"``.
        keys: which entries of the batch to cut (indices of a list batch, keys of a dict batch);
            default: every tensor with the batch's sequence length along ``seq_dim``.
        seq_dim: the sequence dimension of the batch tensors.
        min_batch_size, max_batch_size: bounds of the coupled per-device batch.
        max_per_device, seed: as in :class:`~epochwise.callbacks.BatchSizeWarmup` (``seed`` also
            draws the crop offsets).

    Logged (at Lightning's cadence and at every change): ``seq_len/length``,
    ``seq_len/tokens_per_step`` (all ranks, scheduled), and the controller's ``batch_size/*``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> warmup = SequenceLengthWarmup(start_len=16, end_len=128, warmup_steps=100)
        >>> warmup.schedule(0), warmup.schedule(50), warmup.schedule(100)
        (16, 72, 128)
        >>> trainer = Trainer(callbacks=[warmup], max_steps=300, logger=False)
    """

    def __init__(
        self,
        start_len: int,
        end_len: int,
        warmup_steps: int | None = None,
        duration: float | None = None,
        increment: int = 8,
        couple_batch_size: bool = True,
        mode: Literal["truncate", "crop"] = "truncate",
        keys: Sequence[int | str] | None = None,
        seq_dim: int = 1,
        min_batch_size: int = 1,
        max_batch_size: int | None = None,
        max_per_device: int | Literal["auto"] | None = None,
        seed: int | None = None,
    ) -> None:
        if (warmup_steps is None) == (duration is None):
            raise ConfigurationError(
                f"give one of `warmup_steps` and `duration` (got warmup_steps={warmup_steps!r}, duration={duration!r})"
            )
        check_int("warmup_steps", warmup_steps, minimum=1, optional=True)
        self.duration = check_number("duration", duration, 0.0, 1.0, low_inclusive=False, optional=True)
        self.schedule = SequenceLengthSchedule(start_len, end_len, int(warmup_steps or 1), increment)
        self.warmup_steps = warmup_steps
        self.couple_batch_size = check_bool("couple_batch_size", couple_batch_size)
        self.mode = check_choice("mode", mode, ("truncate", "crop"))
        if keys is not None and (isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence) or not keys):
            raise ConfigurationError(f"`keys` must be None or a non-empty list of indices or keys, got {keys!r}")
        self.keys = None if keys is None else list(keys)
        self.seq_dim = check_int("seq_dim", seq_dim, minimum=1)
        self.min_batch_size = check_int("min_batch_size", min_batch_size, minimum=1)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, minimum=min_batch_size, optional=True)
        self._seq_log = CadenceLog(watch=_WATCH)
        super().__init__(unit="step", max_per_device=max_per_device, seed=seed)

    # -- the schedule -------------------------------------------------------------------------------
    def length_at(self, step: int) -> int:
        """Training length at optimizer ``step``."""
        return self.schedule(step)

    def _base(self) -> int | None:
        return self.loader_batch_size or self._guess_base

    def scheduled_batch_size(self, epoch: int, step: int) -> int | None:
        """Coupled per-device batch at ``step`` (``None`` when not coupled: the loader's own)."""
        if not self.couple_batch_size:
            return None
        base = self._base()
        if base is None:
            raise RuntimeError("SequenceLengthWarmup: the coupled batch is known once the train loader is built")
        return coupled_batch_for_length(
            int(base), self.schedule.end_len, self.length_at(step), self.min_batch_size, self.max_batch_size
        )

    def largest_batch_size(self) -> int | None:
        """The coupled batch at ``start_len`` (the shortest length)."""
        if not self.couple_batch_size or self._base() is None:
            return None
        return self.scheduled_batch_size(0, 0)

    # -- Lightning hooks ----------------------------------------------------------------------------
    def _reset_fit(self) -> None:
        super()._reset_fit()
        self._guess_base: int | None = None
        self._seq_log.reset()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.duration is not None:
            if trainer.max_steps is None or trainer.max_steps < 1:
                raise ConfigurationError(
                    f"SequenceLengthWarmup(duration={self.duration}) is a fraction of Trainer(max_steps), but "
                    f"max_steps={trainer.max_steps}: set max_steps, or give warmup_steps instead"
                )
            steps = max(1, int(round(self.duration * trainer.max_steps)))
            s = self.schedule
            self.schedule = SequenceLengthSchedule(s.start_len, s.end_len, steps, s.increment)
        if self.couple_batch_size:
            super().setup(trainer, pl_module, stage)
        else:
            self._reset_fit()
            self._world_size = trainer.world_size

    def _wrap_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if size is not None and self._guess_base is None:
            self._guess_base = int(size)  # a stream's largest size is needed before the controller reads it
        return super()._wrap_loader(trainer, loader)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.couple_batch_size:
            return
        super().on_train_start(trainer, pl_module)
        worst = max((abs(self._step_tokens(n) / self._full_tokens() - 1.0), n) for n in self.schedule.lengths())
        if worst[0] > 0.05:
            rank_zero_warn(
                f"SequenceLengthWarmup: at length {worst[1]} a step holds {worst[0]:.0%} more or fewer tokens "
                f"than at full length (batch {self._base()} x {self.schedule.end_len}); a larger base batch, "
                "max_per_device or max_batch_size keeps them level"
            )

    def _full_tokens(self) -> int:
        return int(self._base() or 1) * self.schedule.end_len

    def _step_tokens(self, length: int) -> int:
        """Tokens per device and optimizer step at ``length``, with the ``max_per_device`` split of the
        largest request (a stream's, and a bound for any epoch's: a smaller split rounds finer)."""
        batch = coupled_batch_for_length(
            int(self._base() or 1), self.schedule.end_len, length, self.min_batch_size, self.max_batch_size
        )
        extra = split_for_max_per_device(int(self.largest_batch_size() or batch), self._max)[1]
        return max(1, int(math.floor(batch / extra + 0.5))) * extra * length

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.couple_batch_size:
            super().on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.couple_batch_size:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = self._plan.step_of(batch_idx) if self.couple_batch_size else trainer.global_step  # type: ignore[union-attr]
        length = self.length_at(step)
        self.cut(batch, length, step)
        if self.couple_batch_size:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.loggers:
            per_step = self._fit.batch.global_batch if self._fit is not None else None
            metrics = {"seq_len/length": float(length)}
            if per_step is not None:
                metrics["seq_len/tokens_per_step"] = float(per_step * length)
            self._seq_log(trainer, metrics)

    def cut(self, batch: Any, length: int, step: int = 0) -> None:
        """Cut the sequences of ``batch`` (a list or dict) to ``length`` in place."""
        entries = _entries(batch)
        dim = self.seq_dim
        chosen = self.keys if self.keys is not None else [
            k for k, v in entries if isinstance(v, Tensor) and v.ndim > dim
        ]
        tensors = {k: v for k, v in entries if k in chosen}
        missing = [k for k in chosen if k not in tensors or not isinstance(tensors[k], Tensor)]
        if missing or not tensors:
            raise KeyError(f"SequenceLengthWarmup: no sequence tensor at {missing or 'any entry'} of the batch; set `keys`")
        full = max(int(v.shape[dim]) for v in tensors.values())
        if full < self.schedule.end_len:
            raise ValueError(
                f"SequenceLengthWarmup: training sequences have {full} tokens, fewer than end_len="
                f"{self.schedule.end_len}; set end_len to the data's sequence length"
            )
        if length >= full:
            return
        offset = 0
        if self.mode == "crop":
            offset = random.Random(epoch_seed(self._seed_in_use or self.seed or 0, step)).randint(0, full - length)
        for key, value in tensors.items():
            if self.keys is None and int(value.shape[dim]) != full:
                continue  # not a sequence of the batch's length (e.g. per-sample labels)
            batch[key] = truncate_sequences(value, length, dim, offset)

    # -- checkpointing ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() if self.couple_batch_size else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.couple_batch_size:
            super().load_state_dict(state_dict)


def _entries(batch: Any) -> list[tuple[Any, Any]]:
    if isinstance(batch, tuple):
        raise TypeError(
            "SequenceLengthWarmup replaces the sequences in the batch in place, but this batch is a tuple, "
            "which cannot be changed. Return a list or a dict from the collate_fn (torch's default_collate "
            "returns a list for (inputs, targets) samples)."
        )
    if isinstance(batch, MutableMapping):
        return list(batch.items())
    if isinstance(batch, list):
        return list(enumerate(batch))
    raise TypeError(f"SequenceLengthWarmup needs a list or dict batch, got a {type(batch).__name__}")

