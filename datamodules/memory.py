"""In-memory datasets whose batches are gathered by index: the fast path for small image sets.

A DataLoader normally calls ``dataset[i]`` once per sample and then stacks the samples with
``default_collate``: for 8x8 digits that Python overhead costs more than the model. Here the whole
split lives in two tensors and ``__getitems__`` of :class:`GatheringView` (which PyTorch's fetcher calls with a
whole list of indices) gathers a batch with one ``index_select``. :func:`gather_collate` then passes the
already-batched tensors through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

__all__ = ["InMemoryImageDataset", "GatheringView", "gather_collate", "make_loader"]


class _Gathered(tuple):
    """Marks a sample tuple that already holds a whole batch (so collate must not stack it)."""


class InMemoryImageDataset(Dataset):
    """Images and integer labels held as tensors; batches are gathered with one indexing op.

    The tensors may live on any device (a GPU included): batches are gathered where they are.

    Args:
        images: ``(N, C, H, W)`` tensor, stored compactly (``uint8`` as read from the files) or
            already as floats.
        targets: ``(N,)`` integer labels, on the same device as ``images``.
        transform: optional function applied to a whole batch of images ``(B, C, H, W)``; it runs
            once per batch, never per sample (:class:`.BatchTransform` converts, resizes,
            normalises and augments). Use a module-level callable, not a local function or
            lambda, so the dataset pickles into DataLoader workers under ``spawn``.

    Example:
        >>> import torch
        >>> ds = InMemoryImageDataset(torch.zeros(10, 1, 8, 8), torch.arange(10))
        >>> loader = make_loader(ds, batch_size=4)
        >>> [tuple(x.shape) for x, _ in loader]
        [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)]
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"`images` must be (N, C, H, W), got shape {tuple(images.shape)}")
        if targets.ndim != 1 or len(targets) != len(images):
            raise ValueError(
                f"`targets` must be 1-D with one label per image: got shape {tuple(targets.shape)}"
                f" for {len(images)} images"
            )
        if targets.device != images.device:
            raise ValueError(
                f"`targets` must be on the device of `images` ({images.device}), got {targets.device}"
            )
        self.images = images
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x.unsqueeze(0)).squeeze(0)
        return x, self.targets[index]

    def gather(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """A whole batch ``(images, targets)`` by one ``index_select`` (and one transform call)."""
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.images.device)
        images = self.images
        if images.is_contiguous():
            # Rows as one dimension: index_select copies whole rows, ~10x faster than over (C, H, W).
            flat = images.view(images.shape[0], math.prod(images.shape[1:]))
            x = flat.index_select(0, idx).view(len(idx), *images.shape[1:])
        else:
            x = images.index_select(0, idx)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets.index_select(0, idx)


class GatheringView(Dataset):
    """Exposes ``dataset.gather`` as ``__getitems__``, which PyTorch's fetcher calls per batch.

    Kept separate from :class:`InMemoryImageDataset` so that a plain ``DataLoader`` over the
    dataset itself (default collate, one ``__getitem__`` per sample) keeps working.

    Example:
        >>> view = GatheringView(InMemoryImageDataset(torch.zeros(5, 1, 2, 2), torch.arange(5)))
        >>> x, y = gather_collate(view.__getitems__([4, 0]))
        >>> tuple(x.shape), y.tolist()
        ((2, 1, 2, 2), [4, 0])
    """

    def __init__(self, dataset: InMemoryImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> _Gathered:
        return _Gathered(self.dataset.gather(indices))


def gather_collate(batch: Any) -> Any:
    """Collate that passes batches gathered by ``__getitems__`` through and stacks anything else.

    Returns a ``list`` ``[images, targets]`` (like ``default_collate`` does for tuple samples), so
    callbacks may replace the images in place.
    """
    if isinstance(batch, _Gathered):
        return list(batch)
    return default_collate(batch)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` with :func:`gather_collate` and sane worker settings.

    An :class:`InMemoryImageDataset` is wrapped in a :class:`GatheringView`, so each batch is
    gathered by one indexing op instead of one ``__getitem__`` per sample.
    """
    if isinstance(dataset, InMemoryImageDataset):
        dataset = GatheringView(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        drop_last=drop_last,
        collate_fn=gather_collate,
        generator=generator,
    )
