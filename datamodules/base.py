"""Shared machinery of the image-classification DataModules: split, hold in memory, serve batches.

Memory: the splits keep the dtype the data comes in (``uint8`` for image files) at its native
resolution, and the train/val split is made by reordering the training rows in place, so after
``setup`` the DataModule holds the data once, and during ``setup`` little more (statistics are
computed a few megabytes at a time). Conversion to float, resizing, normalisation and augmentation
run per batch (:class:`.BatchTransform`), where the split is stored: host memory, or the GPU with
``device="auto"`` / ``device="cuda"``.

Order: the training loader's shuffle is a function of ``(seed, epoch)``
(:class:`.SeededRandomSampler`, whose ``set_epoch`` Lightning calls every epoch), so a resumed run
continues the uninterrupted run's order and reloaded loaders reshuffle. The validation split comes
from ``split_seed``, independent of the training ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ._checks import check_bool, check_int, check_number
from .memory import InMemoryImageDataset, make_loader
from .preprocess import BatchTransform, channel_stats, one_thread
from .sampler import SeededRandomSampler

__all__ = ["ImageArrays", "InMemoryImageDataModule", "check_loader_args", "partition_rows_", "auto_device"]

#: bytes of rows moved per step by :func:`partition_rows_`
_PARTITION_CHUNK_BYTES = 2**20
#: ``device="auto"`` stores the splits on the GPU when they take at most this share of its free memory
AUTO_DEVICE_FRACTION = 0.25


@dataclass
class ImageArrays:
    """Raw splits: images ``(N, C, H, W)`` (``uint8`` or any dtype) and labels ``(N,)``.

    ``max_value`` is the stored value of white (``None``: 255 for ``uint8``, 1 for floats).

    Example:
        >>> a = ImageArrays(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.arange(8),
        ...                 torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.arange(2))
        >>> a.train_images.dtype, a.max_value
        (torch.uint8, None)
    """

    train_images: Tensor
    train_targets: Tensor
    test_images: Tensor
    test_targets: Tensor
    max_value: float | None = None


def check_loader_args(
    batch_size: int, num_workers: int, val_fraction: float, image_size: int | None = None
) -> None:
    """Validate the arguments every DataModule shares; raise ``ValueError`` naming the bad one."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    check_number("val_fraction", val_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    if image_size is not None:
        check_int("image_size", image_size, minimum=1)


def partition_rows_(x: Tensor, first: Tensor) -> Tensor:
    """Reorder the rows of ``x`` in place: rows where ``first`` is true, then the others.

    Each group keeps its order. Returns ``order`` (row ``i`` now holds old row ``order[i]``).
    Extra memory: a copy of the rows that go last, plus a few megabytes; never a copy of ``x``.

    Example:
        >>> x = torch.arange(5)
        >>> partition_rows_(x, torch.tensor([False, True, False, True, True])).tolist(), x.tolist()
        ([1, 3, 4, 0, 2], [1, 3, 4, 0, 2])
    """
    head = first.nonzero().squeeze(1)
    rest = (~first).nonzero().squeeze(1)
    rows_of = x.view(x.shape[0], math.prod(x.shape[1:])) if x.is_contiguous() and x.ndim > 1 else x  # 2-D: ~10x faster gathers
    tail = rows_of.index_select(0, rest.to(x.device))  # saved before head rows overwrite them
    row_bytes = max(1, x[0].numel() * x.element_size()) if len(x) else 1
    rows = max(1, _PARTITION_CHUNK_BYTES // row_bytes)
    with one_thread():  # many small copies: see one_thread
        for start in range(0, len(head), rows):
            src = head[start : start + rows]
            if int(src[0]) == start and int(src[-1]) == start + len(src) - 1:
                continue  # already in place (head is sorted and unique)
            # Each head row moves to an index <= its own, so later chunks still read unmoved rows.
            rows_of[start : start + len(src)] = rows_of.index_select(0, src.to(x.device))
    rows_of[len(head) :] = tail
    return torch.cat([head, rest])


def auto_device(accelerator: torch.device | None, nbytes: int, free_bytes: int | None, num_workers: int) -> torch.device:
    """Where ``device="auto"`` stores the splits: the GPU if it is one and they fit comfortably.

    The accelerator is used when it is a CUDA device, the loaders have no worker processes (a
    worker cannot gather from GPU memory) and the splits take at most ``AUTO_DEVICE_FRACTION`` of
    its ``free_bytes``; else host memory.

    Example:
        >>> auto_device(torch.device("cuda", 0), nbytes=150 * 2**20, free_bytes=70 * 2**30, num_workers=0)
        device(type='cuda', index=0)
        >>> auto_device(torch.device("cpu"), nbytes=150 * 2**20, free_bytes=None, num_workers=0)
        device(type='cpu')
    """
    if accelerator is None or accelerator.type != "cuda" or num_workers > 0 or free_bytes is None:
        return torch.device("cpu")
    return accelerator if nbytes <= AUTO_DEVICE_FRACTION * free_bytes else torch.device("cpu")


class InMemoryImageDataModule(pl.LightningDataModule):
    """Base for DataModules whose splits fit in memory (digits, MNIST, FashionMNIST, CIFAR-10).

    Subclasses implement :meth:`load_arrays` and call ``self.save_hyperparameters()`` in their
    own ``__init__``. ``setup`` splits the training data into train and val (``split_seed``),
    computes per-channel statistics of the *train split only* (at ``image_size``), and keeps every
    split in its stored dtype; each batch is gathered by one ``index_select`` and then converted,
    resized, normalised and (training only) randomly translated by up to ``augment_shift``
    pixels. The loaders yield normalised float32 batches, with or without a Trainer.

    Args:
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes (0: gather in the main process; must be 0 when
            the splits are on a GPU).
        pin_memory: pin batches in page-locked memory (host-stored splits only).
        persistent_workers: keep workers alive between epochs.
        val_fraction: fraction of the training data held out for validation.
        seed: seed of the training shuffle (the order of epoch ``e`` is a function of
            ``(seed, e)``). Under DDP Lightning swaps in a ``DistributedSampler``, whose order is
            a function of ``seed_everything``'s seed and the epoch. Augmentation draws from the
            torch RNG of the process that gathers (seeded by ``seed_everything``, or per worker).
        image_size: side of the square images fed to the model (``None``: as stored).
        augment_shift: random translation in pixels applied to training batches (0 = off).
        split_seed: seed of the train/val split, kept apart from ``seed`` so that runs with
            different training seeds are evaluated on the same data.
        device: where the splits live: ``None`` (host memory), ``"auto"`` (the Trainer's
            accelerator when it is a GPU with room to spare, see :func:`auto_device`), or a device
            such as ``"cuda"``, ``"cuda:1"``, ``"cpu"``.

    Example:
        >>> class Random(InMemoryImageDataModule):
        ...     def load_arrays(self):
        ...         g = torch.Generator().manual_seed(0)
        ...         images = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8, generator=g)
        ...         return ImageArrays(images[:40], torch.arange(40) % 10, images[40:], torch.arange(10))
        >>> dm = Random(batch_size=16, image_size=12)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> dm.train_set.images.dtype, tuple(x.shape), x.dtype
        (torch.uint8, (16, 1, 12, 12), torch.float32)
    """

    num_classes: int = 10
    num_channels: int = 1

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        image_size: int | None = None,
        augment_shift: int = 0,
        split_seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, val_fraction, image_size)
        check_bool("pin_memory", pin_memory)
        check_bool("persistent_workers", persistent_workers)
        check_int("seed", seed)
        check_int("split_seed", split_seed)
        check_int("augment_shift", augment_shift, minimum=0)
        if device is not None and device != "auto":
            try:
                resolved = torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"`device` must be None, 'auto' or a torch device such as 'cuda' or 'cpu', got {device!r}"
                ) from err
            if resolved.type != "cpu" and num_workers > 0:
                raise ValueError(
                    f"`num_workers` must be 0 when `device` is {device!r} (workers cannot gather from "
                    f"device memory), got {num_workers!r}"
                )
        # Lightning's batch-size tuner and LightningCLI read/write this attribute.
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.split_seed = split_seed
        self.image_size = image_size
        self.augment_shift = augment_shift
        self.device = device
        self.data_device: torch.device | None = None  # where setup put the splits
        self.train_set: InMemoryImageDataset | None = None
        self.val_set: InMemoryImageDataset | None = None
        self.test_set: InMemoryImageDataset | None = None
        self.mean: Tensor | None = None  # (C, 1, 1), in units of white (0..1 for image files)
        self.std: Tensor | None = None

    # -- subclass API -----------------------------------------------------------------------
    def load_arrays(self) -> ImageArrays:
        """Return the raw train and test splits. Raise a clear error for missing/corrupt files.

        The DataModule takes ownership of the returned tensors: ``setup`` reorders the training
        rows in place (to split without a copy), so return tensors nothing else holds.
        """
        raise NotImplementedError

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        arrays = self.load_arrays()
        train_x, test_x = arrays.train_images, arrays.test_images
        max_value = arrays.max_value
        if max_value is None:
            max_value = 255.0 if train_x.dtype == torch.uint8 else 1.0

        n = len(arrays.train_targets)
        n_val = max(1, int(round(self.val_fraction * n)))
        if n_val >= n:
            raise ValueError(
                f"`val_fraction` must leave training data: {self.val_fraction!r} of {n} images is {n_val}"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        is_val = torch.zeros(n, dtype=torch.bool)
        is_val[perm[:n_val]] = True
        order = partition_rows_(train_x, ~is_val)  # train rows first, then val rows
        train_y = arrays.train_targets[order.to(arrays.train_targets.device)]
        n_fit = n - n_val

        device = self._data_device(train_x.nbytes + test_x.nbytes)
        train_x, train_y = train_x.to(device), train_y.to(device)
        test_x, test_y = test_x.to(device), arrays.test_targets.to(device)
        del arrays  # the host copies go once moved

        mean, std = channel_stats(train_x[:n_fit], max_value, self.image_size)
        std = std.clamp_min(1e-6)
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        plain = BatchTransform(mean, std, max_value, self.image_size).to(device)
        train_tf = BatchTransform(mean, std, max_value, self.image_size, self.augment_shift).to(device)
        self.data_device = device
        self.train_set = InMemoryImageDataset(train_x[:n_fit], train_y[:n_fit], transform=train_tf)
        self.val_set = InMemoryImageDataset(train_x[n_fit:], train_y[n_fit:], transform=plain)
        self.test_set = InMemoryImageDataset(test_x, test_y, transform=plain)

    def _data_device(self, nbytes: int) -> torch.device:
        if self.device is None:
            return torch.device("cpu")
        if self.device != "auto":
            return torch.device(self.device)
        trainer = getattr(self, "trainer", None)
        accelerator = trainer.strategy.root_device if trainer is not None else None
        free = None
        if accelerator is not None and accelerator.type == "cuda":
            free = torch.cuda.mem_get_info(accelerator)[0]
        return auto_device(accelerator, nbytes, free, self.num_workers)

    def _loader(self, dataset: InMemoryImageDataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for loaders")
        on_host = dataset.images.device.type == "cpu"
        return make_loader(
            dataset,
            batch_size=self.batch_size,
            # A fresh sampler per call is fine: its order depends on (seed, epoch) only.
            sampler=SeededRandomSampler(dataset, seed=self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and on_host,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
