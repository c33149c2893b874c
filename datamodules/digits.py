"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (no network)."""

from __future__ import annotations

import torch

from ._checks import check_number
from .base import ImageArrays, InMemoryImageDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(InMemoryImageDataModule):
    """The 1,797 real handwritten digits shipped inside scikit-learn, upsampled to ``image_size``.

    A split seeded by ``split_seed`` holds out ``test_fraction`` of the images for test, then
    ``val_fraction`` of the rest for validation; the training ``seed`` changes neither (runs with
    different seeds are compared on the same images). The images are stored as they come, 8x8 with
    values 0..16, in ``uint8`` (115 KB); each batch is upsampled to ``image_size`` and normalised
    with statistics of the train split only (at ``image_size``). Everything is held in memory and
    gathered by index, so an epoch costs a few milliseconds of loading.

    Args:
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        persistent_workers: keep workers alive between epochs.
        val_fraction: fraction of the non-test images used for validation.
        test_fraction: fraction of all images held out for test.
        seed: seed of the training shuffle (see :class:`.InMemoryImageDataModule`).
        image_size: side of the square images fed to the model (8 = native resolution).
        augment_shift: random translation in pixels applied to training batches (0 = off).
        split_seed: seed of the test and validation splits.
        device: where the splits live (``None``: host memory; ``"auto"``, ``"cuda"``, ...).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
        ((32, 1, 28, 28), 1797)
    """

    num_classes = 10
    num_channels = 1

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        image_size: int = 28,
        augment_shift: int = 0,
        split_seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            val_fraction=val_fraction,
            seed=seed,
            image_size=image_size,
            augment_shift=augment_shift,
            split_seed=split_seed,
            device=device,
        )
        check_number("test_fraction", test_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        self.test_fraction = test_fraction
        self.save_hyperparameters()

    def load_arrays(self) -> ImageArrays:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: never downloads

        digits = load_digits()
        # Integers 0..16 held as float64 by sklearn: uint8 stores them exactly, 8x smaller.
        images = torch.as_tensor(digits.images).to(torch.uint8).unsqueeze(1)
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        # split_seed + 1: the test split's own stream (the val split uses split_seed itself).
        g = torch.Generator().manual_seed(self.split_seed + 1)
        perm = torch.randperm(len(targets), generator=g)
        n_test = int(round(self.test_fraction * len(targets)))
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        return ImageArrays(
            images[train_idx], targets[train_idx], images[test_idx], targets[test_idx], max_value=16.0
        )
