"""ProgressiveResizing: train on smaller images first, with the batch size coupled to resolution.

The callback applies the pure schedules of :mod:`epochwise.callbacks.resize_schedules` to every
training batch and, when coupled, owns the batch size through the one batch-size engine (it is a
:class:`~epochwise.callbacks.controller.BatchSizeController`), so
:class:`~epochwise.callbacks.LRScaling` follows the coupled batch on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import IterableDataset
from typing_extensions import override

from ._checks import ConfigurationError, check_bool, check_choice, check_int, is_int
from ._logging import CadenceLog
from .controller import BatchSizeController
from .engine import length_or_none
from .resize_schedules import (
    ContinuousResizeSchedule,
    ResizeStage,
    SizeLike,
    StagedResizeSchedule,
    as_hw,
    coupled_batch_size,
    resize_batch,
)

__all__ = [
    "ProgressiveResizing",
    "resize_batch",
    "ResizeStage",
    "StagedResizeSchedule",
    "ContinuousResizeSchedule",
    "coupled_batch_size",
]

_MODES = ("resize", "crop")


def _find_images(batch: Any, key: int | str) -> Tensor:
    """The image tensor of a training batch, checked to be ``(N, C, H, W)`` floating."""
    if isinstance(batch, tuple):
        raise TypeError(
            "ProgressiveResizing replaces the images in the batch in place, but this batch is a "
            f"{type(batch).__name__}, which cannot be changed. Return a list or a dict from the "
            "collate_fn (torch's default_collate already returns a list for (image, target) samples)."
        )
    if isinstance(batch, MutableMapping):
        if key not in batch:
            raise KeyError(
                f"ProgressiveResizing: `input_key`={key!r} is not in the batch (keys: {list(batch)}); "
                "pass input_key=<the key of the images>"
            )
        images = batch[key]
    elif isinstance(batch, list):
        if not is_int(key) or not -len(batch) <= key < len(batch):  # type: ignore[operator]
            raise KeyError(
                f"ProgressiveResizing: `input_key`={key!r} is not a valid index of a batch list of "
                f"length {len(batch)}"
            )
        images = batch[key]  # type: ignore[index]
    else:
        raise TypeError(
            f"ProgressiveResizing needs a list or dict batch holding the images, got a "
            f"{type(batch).__name__}. Return a list [images, targets] or a dict from the collate_fn."
        )
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        what = (
            f"a tensor of shape {tuple(images.shape)} and dtype {images.dtype}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise ValueError(
            f"ProgressiveResizing: batch[{key!r}] must be a floating image tensor (N, C, H, W), got "
            f"{what}. Set `input_key` to where the images are."
        )
    return images


def _sample_hw(dataset: Any, key: int | str) -> tuple[int, int]:
    """Spatial size of the first sample of ``dataset`` (its image at ``key``)."""
    sample = dataset[0]
    image = sample[key] if isinstance(sample, (Mapping, Sequence)) and not isinstance(sample, Tensor) else sample
    if not isinstance(image, Tensor) or image.ndim < 2:
        raise ValueError(f"the first sample's input {key!r} is not an image tensor (C, H, W)")
    return int(image.shape[-2]), int(image.shape[-1])


class ProgressiveResizing(BatchSizeController):
    """Train on smaller images first; optionally scale the batch size with the resolution.

    Every **training** batch is resized on its device in ``on_train_batch_start`` (after the
    transfer, before ``training_step``) by replacing the images in the batch in place:
    ``batch[input_key] = resize_batch(batch[input_key], size)``. The batch must therefore be a
    ``list`` (what ``default_collate`` and the epochwise DataModules return) or a ``dict``; a
    tuple raises a ``TypeError`` that says so. Validation, test and predict batches are never
    touched: the model is evaluated at full size.

    The size comes from one of two pure schedules:

    - ``stages=[(start_epoch, image_size, batch_size_or_None), ...]``
      (:class:`StagedResizeSchedule`), or
    - the continuous Composer-style ramp (:class:`ContinuousResizeSchedule`: ``initial_scale``,
      ``finetune_fraction``, ``delay_fraction``, ``size_increment``) over the fraction of
      training elapsed, ``epochs / trainer.max_epochs`` (``max_epochs`` must be set).

    ``couple_batch_size=True`` (default) makes this callback the batch-size owner of the fit
    (it is a :class:`~epochwise.callbacks.batch_size.BatchSizeController`): the per-device batch
    of each epoch is ``round(base x (full / size)^2)``, with ``base`` the train DataLoader's own
    batch size (at full resolution), clamped to ``[min_batch_size, max_batch_size]`` (default:
    1 to the dataset length), or a stage's explicit batch size. ``batch x pixels`` stays about
    constant, so each step costs about the same compute and memory as at full size, and there
    are fewer steps per epoch while the images are small. Since the batch goes through the
    engine, :class:`~epochwise.callbacks.LRScaling` scales the LR with it, ``max_per_device``
    turns too-large batches into gradient accumulation, and ``batch_size/*`` is logged.
    **When coupled, the size is held constant within an epoch**: it is evaluated at the start
    of the epoch (progress ``epoch / max_epochs``) so that the batch size and the images of
    every batch of that epoch agree. ``couple_batch_size=False`` leaves the batch size alone
    (combine with :class:`~epochwise.callbacks.BatchSizeWarmup` or any other owner); the
    continuous ramp then moves within an epoch too, from the fractional progress
    ``(epoch + batch_idx / batches_per_epoch) / max_epochs``.

    Everything is a function of trainer state (epoch, max_epochs) and of the full image size,
    so every DDP rank picks the same size and a resumed run continues with the same sizes. When
    coupled, the full size (``full_size``, else the first training sample's size) and the
    loader's batch size found by the first fit are kept in the checkpoint and reused on resume.

    Args:
        stages: explicit stages (see above); give either ``stages`` or the continuous arguments.
        initial_scale, finetune_fraction, delay_fraction, size_increment: the continuous ramp
            (defaults 0.5, 0.2, 0.5, 4 as in Composer), used when ``stages`` is not given.
        mode: ``"resize"`` (bilinear, antialiased when downsampling) or ``"crop"`` (center crop).
        antialias: antialias when downsampling in ``"resize"`` mode.
        input_key: where the images are in the batch: an index for list batches (default 0),
            a key for dict batches.
        couple_batch_size: own the batch size and couple it to the resolution (see above).
        full_size: full image side or ``(height, width)``; default: the size of the first
            training sample (``dataset[0][input_key]``). Every training batch must have it.
        min_batch_size, max_batch_size: bounds of the coupled per-device batch
            (``max_batch_size=None``: the number of training samples per device).
        max_per_device: largest micro-batch per device when coupled; above it the coupled batch
            is reached with gradient accumulation. ``"auto"`` probes it from the memory of a
            full-size sample, which is conservative for the smaller images.
        seed: base seed of the per-epoch shuffle when coupled (see the controller).

    Logged every training step: ``progressive_resizing/size`` (image height in px) and
    ``progressive_resizing/scale`` (linear scale vs. full size, ``sqrt(h*w / (H*W))``); when
    coupled also the controller's ``batch_size/per_device``, ``batch_size/global``,
    ``batch_size/accumulation`` and ``samples_seen``.

    Raises:
        ValueError: for bad arguments, at construction; at ``setup`` if the continuous ramp has
            no ``max_epochs`` to measure progress, or if coupling meets another batch-size owner.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> pr = ProgressiveResizing(stages=[(0, 16), (4, 24), (8, 32)])
        >>> [pr.schedule(e) for e in (0, 3, 4, 9)]
        [16, 16, 24, 32]
        >>> ramp = ProgressiveResizing(initial_scale=0.5, delay_fraction=0.4, size_increment=8)
        >>> trainer = Trainer(callbacks=[ramp], max_epochs=10, logger=False)
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int | None]] | None = None,
        initial_scale: float | None = None,
        finetune_fraction: float | None = None,
        delay_fraction: float | None = None,
        size_increment: int | None = None,
        mode: Literal["resize", "crop"] = "resize",
        antialias: bool = True,
        input_key: int | str = 0,
        couple_batch_size: bool = True,
        full_size: int | tuple[int, int] | None = None,
        min_batch_size: int = 1,
        max_batch_size: int | None = None,
        max_per_device: int | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(unit="epoch", max_per_device=max_per_device, seed=seed)
        continuous = {
            "initial_scale": initial_scale,
            "finetune_fraction": finetune_fraction,
            "delay_fraction": delay_fraction,
            "size_increment": size_increment,
        }
        given = {k: v for k, v in continuous.items() if v is not None}
        self.schedule: StagedResizeSchedule | ContinuousResizeSchedule
        if stages is not None:
            if given:
                raise ConfigurationError(
                    f"give either `stages` or the continuous arguments, not both (got stages and {sorted(given)})"
                )
            self.schedule = StagedResizeSchedule(stages)
        else:
            self.schedule = ContinuousResizeSchedule(**given)
        check_choice("mode", mode, _MODES)
        check_bool("antialias", antialias)
        if not isinstance(input_key, (int, str)) or isinstance(input_key, bool):
            raise ConfigurationError(f"`input_key` must be an int (list batches) or a str (dict batches), got {input_key!r}")
        check_bool("couple_batch_size", couple_batch_size)
        if (
            not couple_batch_size
            and isinstance(self.schedule, StagedResizeSchedule)
            and self.schedule.has_batch_sizes
        ):
            raise ConfigurationError(
                "stages with a batch size need couple_batch_size=True (with couple_batch_size=False "
                "another callback owns the batch size); drop the batch sizes from `stages`"
            )
        check_int("min_batch_size", min_batch_size, minimum=1)
        check_int("max_batch_size", max_batch_size, minimum=min_batch_size, optional=True)
        self.mode = mode
        self.antialias = antialias
        self.input_key = input_key
        self.couple_batch_size = couple_batch_size
        self.full_size: tuple[int, int] | None = None if full_size is None else as_hw(full_size, "full_size")
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self._resize_log = CadenceLog(watch=("progressive_resizing/size",))
        self._last_side: int | None = None
        self._full_hw: tuple[int, int] | None = None  # full size in force during this fit
        self._loaded_full_hw: tuple[int, int] | None = None
        self._max_epochs: int | None = None
        self._epoch_checked: tuple[int, type] | None = None  # (epoch, batch type) whose first batch was checked
        self._epoch_size: tuple[int, tuple[int, int]] | None = None  # (epoch, its image size) when per epoch
        self._full_shape: torch.Size | None = None

    # -- the schedule -------------------------------------------------------------------------
    def image_size(self, epoch: int, full_size: SizeLike, fraction: float = 0.0) -> tuple[int, int]:
        """``(height, width)`` of the training images at ``epoch`` (+ ``fraction`` of it).

        ``fraction`` (the part of the epoch done) only matters for the continuous ramp; when
        coupled the callback always passes 0 (size fixed per epoch).
        """
        H, W = as_hw(full_size, "full_size")
        if isinstance(self.schedule, StagedResizeSchedule):
            s = self.schedule(epoch)
            return (s, s)
        if not self._max_epochs:
            raise RuntimeError("the continuous schedule needs trainer.max_epochs (known from `setup`)")
        progress = (epoch + fraction) / self._max_epochs
        return (self.schedule.size(progress, H), self.schedule.size(progress, W))

    def scheduled_batch_size(self, epoch: int, step: int) -> int | None:
        """Coupled per-device batch at ``epoch``: the stage's own, else ``base x (full/size)^2``."""
        if not self.couple_batch_size:
            return None
        if isinstance(self.schedule, StagedResizeSchedule):
            explicit = self.schedule.batch_size(epoch)
            if explicit is not None:
                return explicit
        if self._full_hw is None or self.loader_batch_size is None:
            raise RuntimeError("ProgressiveResizing: the coupled batch size is known from on_train_start on")
        size = self.image_size(epoch, self._full_hw)
        upper = self.max_batch_size if self.max_batch_size is not None else self._samples
        if upper is not None:
            upper = max(upper, self.min_batch_size)
        return coupled_batch_size(
            int(self.loader_batch_size), self._full_hw, size, self.min_batch_size, upper
        )

    def controlled_values(self) -> dict[str, float]:
        """The image side (and, when coupled, the batch size) of the current epoch."""
        values = super().controlled_values() if self.couple_batch_size else {}
        if self._last_side is not None:
            values["image size"] = float(self._last_side)
        return values

    # -- Lightning hooks ----------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs
        if isinstance(self.schedule, ContinuousResizeSchedule):
            if max_epochs is None or max_epochs < 1:
                raise ConfigurationError(
                    "ProgressiveResizing's continuous schedule measures progress as epochs / max_epochs, "
                    f"but the Trainer has max_epochs={max_epochs}. Set Trainer(max_epochs=N) or use "
                    "`stages=[(start_epoch, image_size), ...]`."
                )
        self._max_epochs = max_epochs if max_epochs is not None and max_epochs > 0 else None
        self._full_hw = self.full_size  # per fit; the coupled fit reads it from the data or a checkpoint
        self._loaded_full_hw = None
        self._epoch_checked, self._epoch_size, self._full_shape = None, None, None
        self._resize_log.reset()
        if not self.couple_batch_size:
            return  # not the batch-size owner: leave the engine to whoever owns it
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if cb is self or not isinstance(cb, BatchSizeController):
                continue
            if isinstance(cb, ProgressiveResizing) and not cb.couple_batch_size:
                continue
            raise ConfigurationError(
                f"ProgressiveResizing(couple_batch_size=True) owns the batch size, but "
                f"{type(cb).__name__} controls it too. Pass couple_batch_size=False to "
                f"ProgressiveResizing to keep {type(cb).__name__}'s schedule, or remove it."
            )
        super().setup(trainer, pl_module, stage)

    def _wrap_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        if isinstance(loader.dataset, IterableDataset) and length_or_none(loader.dataset) is None:
            raise ConfigurationError(
                "ProgressiveResizing(couple_batch_size=True) couples the batch to the image size per epoch "
                "and needs epochs of known length, but the train data is a stream without __len__. Use "
                "couple_batch_size=False (with a BatchSizeWarmup(unit='step') if the batch should grow), or "
                "give the dataset a __len__."
            )
        # the coupled batch needs the full image size before the first epoch is planned
        if self._full_hw is None:
            self._full_hw = self._loaded_full_hw
        if self._full_hw is None:
            try:
                self._full_hw = _sample_hw(loader.dataset, self.input_key)
            except Exception as err:  # any dataset: say what to do instead
                raise ConfigurationError(
                    "ProgressiveResizing could not read the full image size from the first "
                    f"training sample ({err}); pass full_size=<side> or (height, width)"
                ) from err
        return super()._wrap_loader(trainer, loader)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.couple_batch_size:
            super().on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_checked = None  # the first batch of the epoch is checked in full (see _images)
        if self.couple_batch_size:
            super().on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.couple_batch_size:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _images(self, batch: Any, epoch: int) -> Tensor:
        """The batch's images. The first batch of an epoch (and any batch of another container type)
        is checked in full; the rest of the epoch comes from the same loader, so a per-step lookup
        and a shape comparison suffice (the per-step hook stays a few microseconds)."""
        if self._epoch_checked == (epoch, type(batch)):
            images = batch[self.input_key]
            if images.shape[-2:] != self._full_shape:
                self._check_full_size(images)
            return images
        images = _find_images(batch, self.input_key)
        self._check_full_size(images)
        self._epoch_checked = (epoch, type(batch))
        return images

    def _check_full_size(self, images: Tensor) -> None:
        full = (int(images.shape[-2]), int(images.shape[-1]))
        if self._full_hw is None:  # uncoupled: the first training batch tells the full size
            self._full_hw = full
        if full != self._full_hw:
            raise ValueError(
                f"ProgressiveResizing: training images are {full[0]}x{full[1]} but the full size is "
                f"{self._full_hw[0]}x{self._full_hw[1]} (from `full_size` or the first sample); "
                "every training batch must come at the full size"
            )
        self._full_shape = torch.Size(full)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        epoch = trainer.current_epoch
        images = self._images(batch, epoch)
        full = self._full_hw
        if self.couple_batch_size or isinstance(self.schedule, StagedResizeSchedule):
            # the size depends on the epoch only: computed at its first batch
            if self._epoch_size is None or self._epoch_size[0] != epoch:
                self._epoch_size = (epoch, self.image_size(epoch, full))  # type: ignore[arg-type]
            size = self._epoch_size[1]
        else:
            fraction = 0.0
            per_epoch = trainer.num_training_batches
            if math.isfinite(per_epoch) and per_epoch > 0:
                fraction = min(batch_idx / per_epoch, 1.0)
            size = self.image_size(epoch, full, fraction)  # type: ignore[arg-type]
        self._last_side = size[0]
        if size != full:
            batch[self.input_key] = resize_batch(images, size, self.mode, self.antialias)
        if not self._resize_log.skip_step(trainer, float(size[0])):
            scale = math.sqrt(size[0] * size[1] / (full[0] * full[1]))  # type: ignore[index]
            self._resize_log(trainer, {"progressive_resizing/size": float(size[0]), "progressive_resizing/scale": scale})
        if self.couple_batch_size:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    # -- checkpointing ------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"couple_batch_size": self.couple_batch_size}
        if self.couple_batch_size:
            state.update(super().state_dict())
            state["full_size"] = list(self._full_hw) if self._full_hw is not None else None
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.couple_batch_size:
            return
        super().load_state_dict(state_dict)
        saved = state_dict.get("full_size")
        if saved is not None:
            self._loaded_full_hw = as_hw(tuple(saved), "full_size")
