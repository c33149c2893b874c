"""Shared machinery of the image-classification DataModules: split, normalise, hold in memory."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from .augment import random_translate
from .memory import InMemoryImageDataset, make_loader

__all__ = ["ImageArrays", "InMemoryImageDataModule", "check_loader_args"]


@dataclass
class ImageArrays:
    """Raw splits as tensors: images ``(N, C, H, W)`` (uint8 or float) and labels ``(N,)``."""

    train_images: Tensor
    train_targets: Tensor
    test_images: Tensor
    test_targets: Tensor


def check_loader_args(
    batch_size: int, num_workers: int, val_fraction: float, image_size: int | None = None
) -> None:
    """Validate the arguments every DataModule shares; raise ``ValueError`` naming the bad one."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"`image_size` must be an int >= 1 (or None), got {image_size!r}")


class InMemoryImageDataModule(pl.LightningDataModule):
    """Base for DataModules whose splits fit in memory (digits, MNIST, FashionMNIST, CIFAR-10).

    Subclasses implement :meth:`load_arrays`. This class makes a seeded train/val split of the
    training data, resizes to ``image_size`` if given, normalises with per-channel statistics of the
    *train split only*, and serves batches gathered by index (:mod:`.memory`). Optional augmentation
    (random translation by up to ``augment_shift`` pixels) runs on whole batches.

    Subclasses must call ``self.save_hyperparameters()`` in their own ``__init__``.
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
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, val_fraction, image_size)
        if augment_shift < 0:
            raise ValueError(f"`augment_shift` must be >= 0, got {augment_shift!r}")
        # Lightning's batch-size tuner and LightningCLI read/write this attribute.
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.image_size = image_size
        self.augment_shift = augment_shift
        self.train_set: InMemoryImageDataset | None = None
        self.val_set: InMemoryImageDataset | None = None
        self.test_set: InMemoryImageDataset | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    # -- subclass API -----------------------------------------------------------------------
    def load_arrays(self) -> ImageArrays:
        """Return the raw train and test splits. Raise a clear error for missing/corrupt files."""
        raise NotImplementedError

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        arrays = self.load_arrays()
        train_x, train_y = self._prepare(arrays.train_images), arrays.train_targets
        test_x, test_y = self._prepare(arrays.test_images), arrays.test_targets

        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(train_y), generator=g)
        n_val = max(1, int(round(self.val_fraction * len(train_y))))
        val_idx, fit_idx = perm[:n_val], perm[n_val:]

        fit_x = train_x[fit_idx]
        dims = (0, 2, 3)
        self.mean = fit_x.mean(dim=dims, keepdim=True)[0]
        self.std = fit_x.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)

        def norm(x: Tensor) -> Tensor:
            return ((x - self.mean) / self.std).contiguous()

        augment = None
        if self.augment_shift > 0:
            shift = self.augment_shift

            def augment(x: Tensor) -> Tensor:
                return random_translate(x, shift)

        self.train_set = InMemoryImageDataset(norm(fit_x), train_y[fit_idx], transform=augment)
        self.val_set = InMemoryImageDataset(norm(train_x[val_idx]), train_y[val_idx])
        self.test_set = InMemoryImageDataset(norm(test_x), test_y)

    def _prepare(self, images: Tensor) -> Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return x

    def _loader(self, dataset: InMemoryImageDataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for loaders")
        g = torch.Generator().manual_seed(self.seed) if train else None
        return make_loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=g,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
