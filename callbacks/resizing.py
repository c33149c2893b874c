"""Progressive resizing: train on smaller images first, with the batch size coupled to resolution.

Three layers, each usable on its own:

- :func:`resize_batch`: a pure function ``(N, C, H, W) -> (N, C, h, w)`` for any PyTorch loop;
- :class:`StagedResizeSchedule` and :class:`ContinuousResizeSchedule`: pure schedules
  (epoch or fraction of training -> image size) as frozen dataclasses, plus
  :func:`coupled_batch_size` (keep ``batch x pixels`` constant);
- :class:`ProgressiveResizing`: the Lightning callback that applies them to every training batch
  and, when coupled, owns the batch size through the one batch-size engine
  (:class:`~epochwise.callbacks.batch_size.BatchSizeController`), so
  :class:`~epochwise.callbacks.LRScaling` follows the coupled batch on its own.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import IterableDataset
from typing_extensions import override

from ._checks import ConfigurationError
from ._logging import CadenceLog
from .batch_size import BatchSizeController
from .engine import length_or_none

__all__ = [
    "resize_batch",
    "ResizeStage",
    "StagedResizeSchedule",
    "ContinuousResizeSchedule",
    "coupled_batch_size",
    "ProgressiveResizing",
]

SizeLike = int | Sequence[int]
_MODES = ("resize", "crop")


# ---------------------------------------------------------------------------------------------
# small checks
# ---------------------------------------------------------------------------------------------
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_hw(size: SizeLike, name: str = "size") -> tuple[int, int]:
    """``16`` -> ``(16, 16)``; ``(16, 24)`` -> ``(16, 24)``; anything else -> ``ValueError``."""
    if _is_int(size):
        pair = (int(size), int(size))  # type: ignore[arg-type]
    elif isinstance(size, (tuple, list, torch.Size)) and len(size) == 2 and all(_is_int(s) for s in size):
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"`{name}` must be an int or a pair of ints (height, width), got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"`{name}` must be >= 1 in both dimensions, got {size!r}")
    return pair


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ---------------------------------------------------------------------------------------------
# the pure function
# ---------------------------------------------------------------------------------------------
def resize_batch(images: Tensor, size: SizeLike, mode: str = "resize", antialias: bool = True) -> Tensor:
    """Resize or center-crop a batch of images to ``size``.

    ``mode="resize"`` uses bilinear interpolation (``align_corners=False``) with an antialiasing
    filter when an image dimension shrinks (``antialias=True``), so small images are proper
    low-resolution versions rather than aliased subsamples. ``mode="crop"`` takes the central
    ``size`` window (``size`` must then fit inside the image). A batch already at ``size`` is
    returned as is (no copy). Reduced-precision inputs that the device cannot antialias
    (bfloat16/float16 on CPU) are resized in float32 and cast back.

    Args:
        images: floating tensor ``(N, C, H, W)`` on any device.
        size: output side ``s`` (square ``s x s``) or ``(height, width)``.
        mode: ``"resize"`` or ``"crop"``.
        antialias: antialias when downsampling (``"resize"`` only).

    Returns:
        Tensor ``(N, C, height, width)`` with the dtype and device of ``images``.

    Raises:
        ValueError: if ``images`` is not a 4-D floating tensor, ``size`` is not a positive int or
            pair of ints, ``mode`` is unknown, or a crop is larger than the image.

    Example:
        >>> import torch
        >>> x = torch.rand(8, 3, 32, 32)
        >>> resize_batch(x, 16).shape
        torch.Size([8, 3, 16, 16])
        >>> resize_batch(x, (24, 20), mode="crop").shape
        torch.Size([8, 3, 24, 20])
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"`images` must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"`images` must be a 4-D tensor (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(
            f"`images` must be a floating tensor, got dtype {images.dtype}; convert it first "
            "(e.g. images.float() / 255)"
        )
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
    h, w = _as_hw(size)
    H, W = int(images.shape[-2]), int(images.shape[-1])
    if (h, w) == (H, W):
        return images
    if mode == "crop":
        if h > H or w > W:
            raise ValueError(
                f"cannot center-crop {H}x{W} images to {h}x{w}: a crop must fit inside the image "
                "(use mode='resize' to upsample)"
            )
        top, left = (H - h) // 2, (W - w) // 2
        out = images[:, :, top : top + h, left : left + w]
        channels_last = images.shape[1] > 1 and images.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    aa = bool(antialias) and (h < H or w < W)
    if aa and images.dtype in (torch.float16, torch.bfloat16) and images.device.type == "cpu":
        # CPU has no antialiased kernel for reduced precision: do it in float32
        out = F.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return out.to(images.dtype)
    return F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=aa)


# ---------------------------------------------------------------------------------------------
# the pure schedules
# ---------------------------------------------------------------------------------------------
class ResizeStage(NamedTuple):
    """One stage of a :class:`StagedResizeSchedule`: from ``start_epoch`` on, ``image_size`` px.

    Example:
        >>> ResizeStage(start_epoch=4, image_size=24).batch_size is None
        True
    """

    start_epoch: int
    image_size: int
    batch_size: int | None = None


@dataclass(frozen=True)
class StagedResizeSchedule:
    """Explicit stages: ``[(start_epoch, image_size, batch_size_or_None), ...]``.

    From each ``start_epoch`` on, training images are ``image_size x image_size``; a stage's
    ``batch_size`` (per device) overrides the coupled batch size, ``None`` (or a 2-tuple
    ``(start_epoch, image_size)``) lets it be derived from the resolution. The first stage must
    start at epoch 0 and starts must increase strictly. The caller's list is copied, never changed.

    Example:
        >>> s = StagedResizeSchedule([(0, 16, 256), (3, 24), (6, 32, 64)])
        >>> [s(e) for e in range(8)]
        [16, 16, 16, 24, 24, 24, 32, 32]
        >>> s.stage_at(4)
        ResizeStage(start_epoch=3, image_size=24, batch_size=None)
    """

    stages: Sequence[Sequence[int | None]]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = self.stages
        if isinstance(given, (str, bytes, Mapping)) or not isinstance(given, Sequence) or not given:
            raise ValueError(
                "`stages` must be a non-empty list of (start_epoch, image_size[, batch_size]) "
                f"tuples, got {given!r}"
            )
        parsed: list[ResizeStage] = []
        for i, stage in enumerate(given):
            if isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence) or len(stage) not in (2, 3):
                raise ValueError(
                    f"`stages[{i}]` must be (start_epoch, image_size) or "
                    f"(start_epoch, image_size, batch_size), got {stage!r}"
                )
            start, size = stage[0], stage[1]
            batch = stage[2] if len(stage) == 3 else None
            if not _is_int(start) or start < 0:  # type: ignore[operator]
                raise ValueError(f"`stages[{i}]` start_epoch must be an int >= 0, got {start!r}")
            if not _is_int(size) or size < 1:  # type: ignore[operator]
                raise ValueError(f"`stages[{i}]` image_size must be an int >= 1, got {size!r}")
            if batch is not None and (not _is_int(batch) or batch < 1):
                raise ValueError(f"`stages[{i}]` batch_size must be None or an int >= 1, got {batch!r}")
            parsed.append(ResizeStage(int(start), int(size), None if batch is None else int(batch)))  # type: ignore[arg-type]
        if parsed[0].start_epoch != 0:
            raise ValueError(f"the first stage must start at epoch 0, got start_epoch={parsed[0].start_epoch}")
        for prev, cur in zip(parsed, parsed[1:], strict=False):
            if cur.start_epoch <= prev.start_epoch:
                raise ValueError(
                    "stage starts must increase strictly, got start_epoch="
                    f"{cur.start_epoch} after {prev.start_epoch}"
                )
        object.__setattr__(self, "stages", tuple(parsed))
        object.__setattr__(self, "_starts", tuple(s.start_epoch for s in parsed))

    def stage_at(self, epoch: int) -> ResizeStage:
        """The stage in force at ``epoch`` (the last one whose start is ``<= epoch``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self.stages[bisect_right(self._starts, epoch) - 1]  # type: ignore[return-value]

    def __call__(self, epoch: int) -> int:
        """Image size (side) at ``epoch``."""
        return self.stage_at(epoch).image_size

    def batch_size(self, epoch: int) -> int | None:
        """The stage's explicit per-device batch size at ``epoch`` (``None``: derive it)."""
        return self.stage_at(epoch).batch_size

    @property
    def has_batch_sizes(self) -> bool:
        """Whether any stage fixes its batch size explicitly."""
        return any(s.batch_size is not None for s in self.stages)  # type: ignore[union-attr]


@dataclass(frozen=True)
class ContinuousResizeSchedule:
    """Composer-style ramp over the fraction of training elapsed, ``progress`` in ``[0, 1]``.

    The scale is ``initial_scale`` for the first ``delay_fraction`` of training, then grows
    linearly to 1 so that it reaches full size when the last ``finetune_fraction`` begins, and
    stays at 1 (full size) until the end::

        scale(p) = initial_scale + (1 - initial_scale) * clip((p - delay) / (1 - delay - finetune), 0, 1)

    (with ``delay + finetune == 1`` the scale jumps from ``initial_scale`` to 1 at ``p = delay``).
    :meth:`size` turns a scale into pixels: ``full x scale`` rounded (half up) to a multiple of
    ``size_increment``, at least one increment and never above ``full``; at scale 1 it is exactly
    ``full`` even when ``full`` is not a multiple of the increment.

    Unlike Composer (whose ``delay + finetune <= 1`` check lets ``initial_scale=0`` produce empty
    images and whose pinning can round above the full size) sizes here are always in
    ``[min(increment, full), full]``.

    Args:
        initial_scale: scale of the first phase, in ``(0, 1]``.
        finetune_fraction: final fraction of training at full size, in ``[0, 1]``.
        delay_fraction: initial fraction of training at ``initial_scale``, in ``[0, 1]``,
            with ``delay_fraction + finetune_fraction <= 1``.
        size_increment: sizes are multiples of this (4 for most CNNs; 8 or 32 for tensor cores /
            deep strided nets).

    Example:
        >>> s = ContinuousResizeSchedule(initial_scale=0.5, finetune_fraction=0.2, delay_fraction=0.5)
        >>> [s.size(p, 32) for p in (0.0, 0.5, 0.6, 0.7, 0.8, 1.0)]
        [16, 16, 20, 28, 32, 32]
        >>> s.scale(0.65)
        0.75
    """

    initial_scale: float = 0.5
    finetune_fraction: float = 0.2
    delay_fraction: float = 0.5
    size_increment: int = 4

    def __post_init__(self) -> None:
        if not _is_number(self.initial_scale) or not 0.0 < self.initial_scale <= 1.0:
            raise ValueError(f"`initial_scale` must be a number in (0, 1], got {self.initial_scale!r}")
        if not _is_number(self.finetune_fraction) or not 0.0 <= self.finetune_fraction <= 1.0:
            raise ValueError(f"`finetune_fraction` must be a number in [0, 1], got {self.finetune_fraction!r}")
        if not _is_number(self.delay_fraction) or not 0.0 <= self.delay_fraction <= 1.0:
            raise ValueError(f"`delay_fraction` must be a number in [0, 1], got {self.delay_fraction!r}")
        if self.delay_fraction + self.finetune_fraction > 1.0 + 1e-12:
            raise ValueError(
                "`delay_fraction` + `finetune_fraction` must be <= 1 (got delay_fraction="
                f"{self.delay_fraction}, finetune_fraction={self.finetune_fraction})"
            )
        if not _is_int(self.size_increment) or self.size_increment < 1:
            raise ValueError(f"`size_increment` must be an int >= 1, got {self.size_increment!r}")

    def scale(self, progress: float) -> float:
        """Unrounded linear scale at ``progress`` (fraction of training elapsed)."""
        if not _is_number(progress) or progress < 0:
            raise ValueError(f"progress must be a number >= 0, got {progress!r}")
        ramp = 1.0 - self.delay_fraction - self.finetune_fraction
        if progress < self.delay_fraction:
            t = 0.0
        elif ramp <= 1e-12:
            t = 1.0
        else:
            t = min((progress - self.delay_fraction) / ramp, 1.0)
        return float(self.initial_scale + (1.0 - self.initial_scale) * t)

    def size(self, progress: float, full_size: int) -> int:
        """Image side at ``progress`` for images whose full side is ``full_size``."""
        if not _is_int(full_size) or full_size < 1:
            raise ValueError(f"`full_size` must be an int >= 1, got {full_size!r}")
        s = self.scale(progress)
        if s >= 1.0:
            return full_size
        inc = self.size_increment
        pinned = _round_half_up(full_size * s / inc) * inc
        return max(min(inc, full_size), min(full_size, pinned))

    def __call__(self, progress: float, full_size: int) -> int:
        """Same as :meth:`size`."""
        return self.size(progress, full_size)


def coupled_batch_size(
    base_batch: int,
    full_size: SizeLike,
    size: SizeLike,
    min_batch: int = 1,
    max_batch: int | None = None,
) -> int:
    """Per-device batch that keeps ``batch x pixels`` constant: ``base x (full / size)^2``.

    Rounded to the nearest int (half up), then clamped to ``[min_batch, max_batch]``.

    Args:
        base_batch: batch size at full resolution.
        full_size: full image side or ``(height, width)``.
        size: current image side or ``(height, width)``.
        min_batch, max_batch: bounds (``max_batch=None``: no upper bound).

    Example:
        >>> coupled_batch_size(64, 32, 16), coupled_batch_size(64, 32, 24), coupled_batch_size(64, 32, 16, max_batch=200)
        (256, 114, 200)
    """
    if not _is_int(base_batch) or base_batch < 1:
        raise ValueError(f"`base_batch` must be an int >= 1, got {base_batch!r}")
    if not _is_int(min_batch) or min_batch < 1:
        raise ValueError(f"`min_batch` must be an int >= 1, got {min_batch!r}")
    if max_batch is not None and (not _is_int(max_batch) or max_batch < min_batch):
        raise ValueError(f"`max_batch` must be None or an int >= min_batch={min_batch}, got {max_batch!r}")
    H, W = _as_hw(full_size, "full_size")
    h, w = _as_hw(size, "size")
    n = _round_half_up(base_batch * (H * W) / (h * w))
    n = max(min_batch, n)
    return min(n, max_batch) if max_batch is not None else n


# ---------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------
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
        if not _is_int(key) or not -len(batch) <= key < len(batch):  # type: ignore[operator]
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
        mode: str = "resize",
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
                raise ValueError(
                    f"give either `stages` or the continuous arguments, not both (got stages and {sorted(given)})"
                )
            self.schedule = StagedResizeSchedule(stages)
        else:
            self.schedule = ContinuousResizeSchedule(**given)
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
        if not isinstance(antialias, bool):
            raise ValueError(f"`antialias` must be a bool, got {antialias!r}")
        if not isinstance(input_key, (int, str)) or isinstance(input_key, bool):
            raise ValueError(f"`input_key` must be an int (list batches) or a str (dict batches), got {input_key!r}")
        if not isinstance(couple_batch_size, bool):
            raise ValueError(f"`couple_batch_size` must be a bool, got {couple_batch_size!r}")
        if (
            not couple_batch_size
            and isinstance(self.schedule, StagedResizeSchedule)
            and self.schedule.has_batch_sizes
        ):
            raise ValueError(
                "stages with a batch size need couple_batch_size=True (with couple_batch_size=False "
                "another callback owns the batch size); drop the batch sizes from `stages`"
            )
        if not _is_int(min_batch_size) or min_batch_size < 1:
            raise ValueError(f"`min_batch_size` must be an int >= 1, got {min_batch_size!r}")
        if max_batch_size is not None and (not _is_int(max_batch_size) or max_batch_size < min_batch_size):
            raise ValueError(
                f"`max_batch_size` must be None or an int >= min_batch_size={min_batch_size}, got {max_batch_size!r}"
            )
        self.mode = mode
        self.antialias = antialias
        self.input_key = input_key
        self.couple_batch_size = couple_batch_size
        self.full_size: tuple[int, int] | None = None if full_size is None else _as_hw(full_size, "full_size")
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self._resize_log = CadenceLog(watch=("progressive_resizing/size",))
        self._full_hw: tuple[int, int] | None = None  # full size in force during this fit
        self._loaded_full_hw: tuple[int, int] | None = None
        self._max_epochs: int | None = None

    # -- the schedule -------------------------------------------------------------------------
    def image_size(self, epoch: int, full_size: SizeLike, fraction: float = 0.0) -> tuple[int, int]:
        """``(height, width)`` of the training images at ``epoch`` (+ ``fraction`` of it).

        ``fraction`` (the part of the epoch done) only matters for the continuous ramp; when
        coupled the callback always passes 0 (size fixed per epoch).
        """
        H, W = _as_hw(full_size, "full_size")
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
        images = _find_images(batch, self.input_key)
        full = (int(images.shape[-2]), int(images.shape[-1]))
        if self._full_hw is None:  # uncoupled: the first training batch tells the full size
            self._full_hw = full
        if full != self._full_hw:
            raise ValueError(
                f"ProgressiveResizing: training images are {full[0]}x{full[1]} but the full size is "
                f"{self._full_hw[0]}x{self._full_hw[1]} (from `full_size` or the first sample); "
                "every training batch must come at the full size"
            )
        if self.couple_batch_size:
            size = self.image_size(trainer.current_epoch, full)
        else:
            fraction = 0.0
            per_epoch = trainer.num_training_batches
            if isinstance(self.schedule, ContinuousResizeSchedule) and math.isfinite(per_epoch) and per_epoch > 0:
                fraction = min(batch_idx / per_epoch, 1.0)
            size = self.image_size(trainer.current_epoch, full, fraction)
        if size != full:
            batch[self.input_key] = resize_batch(images, size, self.mode, self.antialias)
        if trainer.loggers:
            scale = math.sqrt(size[0] * size[1] / (full[0] * full[1]))
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
            self._loaded_full_hw = _as_hw(tuple(saved), "full_size")
