"""Batch-level augmentations on tensors: one vectorised op per batch, never a per-sample loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_translate"]


def random_translate(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by its own random offset in ``[-max_shift, max_shift]`` pixels (zero fill).

    Args:
        images: ``(B, C, H, W)`` batch.
        max_shift: largest shift in pixels along each axis; ``0`` returns the input unchanged.
        generator: optional RNG for reproducible offsets.

    Example:
        >>> x = torch.zeros(2, 1, 4, 4); x[:, :, 1, 1] = 1
        >>> y = random_translate(x, 1, torch.Generator().manual_seed(0))
        >>> y.shape, float(y.sum()) <= 2
        (torch.Size([2, 1, 4, 4]), True)
    """
    if max_shift < 0:
        raise ValueError(f"`max_shift` must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(images.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # advanced indexing picks a shifted HxW window per sample: result (B, H, W, C)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
