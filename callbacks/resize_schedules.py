"""Progressive resizing's pure parts, usable in any PyTorch loop (no Lightning):

- :func:`resize_batch`: ``(N, C, H, W) -> (N, C, h, w)``, bilinear and antialiased, or a center crop;
- :class:`StagedResizeSchedule` and :class:`ContinuousResizeSchedule`: epoch or fraction of
  training -> image size, as frozen dataclasses;
- :func:`coupled_batch_size`: the batch that keeps ``batch x pixels`` constant.

The callback that applies them is :class:`~epochwise.callbacks.resizing.ProgressiveResizing`.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import ConfigurationError, is_int, is_number

__all__ = [
    "resize_batch",
    "ResizeStage",
    "StagedResizeSchedule",
    "ContinuousResizeSchedule",
    "coupled_batch_size",
    "SizeLike",
    "as_hw",
]

SizeLike = int | Sequence[int]
_MODES = ("resize", "crop")


def as_hw(size: SizeLike, name: str = "size") -> tuple[int, int]:
    """``16`` -> ``(16, 16)``; ``(16, 24)`` -> ``(16, 24)``; anything else -> ``ValueError``."""
    if is_int(size):
        pair = (int(size), int(size))  # type: ignore[arg-type]
    elif isinstance(size, (tuple, list, torch.Size)) and len(size) == 2 and all(is_int(s) for s in size):
        pair = (int(size[0]), int(size[1]))
    else:
        raise ConfigurationError(f"`{name}` must be an int or a pair of ints (height, width), got {size!r}")
    if min(pair) < 1:
        raise ConfigurationError(f"`{name}` must be >= 1 in both dimensions, got {size!r}")
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
        raise ConfigurationError(f"`images` must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ConfigurationError(f"`images` must be a 4-D tensor (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ConfigurationError(
            f"`images` must be a floating tensor, got dtype {images.dtype}; convert it first "
            "(e.g. images.float() / 255)"
        )
    if mode not in _MODES:
        raise ConfigurationError(f"`mode` must be one of {_MODES}, got {mode!r}")
    h, w = as_hw(size)
    H, W = int(images.shape[-2]), int(images.shape[-1])
    if (h, w) == (H, W):
        return images
    if mode == "crop":
        if h > H or w > W:
            raise ConfigurationError(
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
            raise ConfigurationError(
                "`stages` must be a non-empty list of (start_epoch, image_size[, batch_size]) "
                f"tuples, got {given!r}"
            )
        parsed: list[ResizeStage] = []
        for i, stage in enumerate(given):
            if isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence) or len(stage) not in (2, 3):
                raise ConfigurationError(
                    f"`stages[{i}]` must be (start_epoch, image_size) or "
                    f"(start_epoch, image_size, batch_size), got {stage!r}"
                )
            start, size = stage[0], stage[1]
            batch = stage[2] if len(stage) == 3 else None
            if not is_int(start) or start < 0:  # type: ignore[operator]
                raise ConfigurationError(f"`stages[{i}]` start_epoch must be an int >= 0, got {start!r}")
            if not is_int(size) or size < 1:  # type: ignore[operator]
                raise ConfigurationError(f"`stages[{i}]` image_size must be an int >= 1, got {size!r}")
            if batch is not None and (not is_int(batch) or batch < 1):
                raise ConfigurationError(f"`stages[{i}]` batch_size must be None or an int >= 1, got {batch!r}")
            parsed.append(ResizeStage(int(start), int(size), None if batch is None else int(batch)))  # type: ignore[arg-type]
        if parsed[0].start_epoch != 0:
            raise ConfigurationError(f"the first stage must start at epoch 0, got start_epoch={parsed[0].start_epoch}")
        for prev, cur in zip(parsed, parsed[1:], strict=False):
            if cur.start_epoch <= prev.start_epoch:
                raise ConfigurationError(
                    "stage starts must increase strictly, got start_epoch="
                    f"{cur.start_epoch} after {prev.start_epoch}"
                )
        object.__setattr__(self, "stages", tuple(parsed))
        object.__setattr__(self, "_starts", tuple(s.start_epoch for s in parsed))

    def stage_at(self, epoch: int) -> ResizeStage:
        """The stage in force at ``epoch`` (the last one whose start is ``<= epoch``)."""
        if epoch < 0:
            raise ConfigurationError(f"epoch must be >= 0, got {epoch}")
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
        if not is_number(self.initial_scale) or not 0.0 < self.initial_scale <= 1.0:
            raise ConfigurationError(f"`initial_scale` must be a number in (0, 1], got {self.initial_scale!r}")
        if not is_number(self.finetune_fraction) or not 0.0 <= self.finetune_fraction <= 1.0:
            raise ConfigurationError(f"`finetune_fraction` must be a number in [0, 1], got {self.finetune_fraction!r}")
        if not is_number(self.delay_fraction) or not 0.0 <= self.delay_fraction <= 1.0:
            raise ConfigurationError(f"`delay_fraction` must be a number in [0, 1], got {self.delay_fraction!r}")
        if self.delay_fraction + self.finetune_fraction > 1.0 + 1e-12:
            raise ConfigurationError(
                "`delay_fraction` + `finetune_fraction` must be <= 1 (got delay_fraction="
                f"{self.delay_fraction}, finetune_fraction={self.finetune_fraction})"
            )
        if not is_int(self.size_increment) or self.size_increment < 1:
            raise ConfigurationError(f"`size_increment` must be an int >= 1, got {self.size_increment!r}")

    def scale(self, progress: float) -> float:
        """Unrounded linear scale at ``progress`` (fraction of training elapsed)."""
        if not is_number(progress) or progress < 0:
            raise ConfigurationError(f"progress must be a number >= 0, got {progress!r}")
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
        if not is_int(full_size) or full_size < 1:
            raise ConfigurationError(f"`full_size` must be an int >= 1, got {full_size!r}")
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
    if not is_int(base_batch) or base_batch < 1:
        raise ConfigurationError(f"`base_batch` must be an int >= 1, got {base_batch!r}")
    if not is_int(min_batch) or min_batch < 1:
        raise ConfigurationError(f"`min_batch` must be an int >= 1, got {min_batch!r}")
    if max_batch is not None and (not is_int(max_batch) or max_batch < min_batch):
        raise ConfigurationError(f"`max_batch` must be None or an int >= min_batch={min_batch}, got {max_batch!r}")
    H, W = as_hw(full_size, "full_size")
    h, w = as_hw(size, "size")
    n = _round_half_up(base_batch * (H * W) / (h * w))
    n = max(min_batch, n)
    return min(n, max_batch) if max_batch is not None else n
