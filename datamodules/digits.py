"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (no network)."""

from __future__ import annotations

import torch

from .base import ImageArrays, InMemoryImageDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(InMemoryImageDataModule):
    """The 1,797 real handwritten digits shipped inside scikit-learn, upsampled to ``image_size``.

    A seeded split holds out ``test_fraction`` of the images for test, then ``val_fraction`` of the
    rest for validation. Normalisation statistics come from the train split only. Everything is
    held in memory and gathered by index, so an epoch costs a few milliseconds of loading.

    Args:
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        persistent_workers: keep workers alive between epochs.
        val_fraction: fraction of the non-test images used for validation.
        test_fraction: fraction of all images held out for test.
        seed: seed of the split and of the training shuffle.
        image_size: side of the square images fed to the model (8 = native resolution).
        augment_shift: random translation in pixels applied to training batches (0 = off).

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
        )
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}")
        self.test_fraction = test_fraction
        self.save_hyperparameters()

    def load_arrays(self) -> ImageArrays:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: never downloads

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed + 1)
        perm = torch.randperm(len(targets), generator=g)
        n_test = int(round(self.test_fraction * len(targets)))
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        return ImageArrays(images[train_idx], targets[train_idx], images[test_idx], targets[test_idx])
