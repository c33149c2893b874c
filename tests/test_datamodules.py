"""DigitsDataModule, the in-memory fast path and batch augmentation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from epochwise.datamodules import (
    DigitsDataModule,
    InMemoryImageDataset,
    gather_collate,
    make_loader,
    random_translate,
)


def test_digits_split_sizes_seed_and_normalisation():
    dm = DigitsDataModule(batch_size=32, seed=3)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    assert len(dm.test_set) == round(0.2 * 1797)
    x = dm.train_set.images
    assert x.shape[1:] == (1, 28, 28)
    # statistics come from the train split only
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std().item() == pytest.approx(1.0, abs=1e-2)
    assert dm.val_set.images.mean().abs().item() < 0.2
    again = DigitsDataModule(batch_size=32, seed=3)
    again.setup("fit")
    assert torch.equal(again.val_set.targets, dm.val_set.targets)
    other = DigitsDataModule(batch_size=32, seed=4)
    other.setup("fit")
    assert not torch.equal(other.val_set.targets, dm.val_set.targets)
    assert set(dm.train_set.targets.tolist()) == set(range(10))


def test_digits_hyperparameters_and_loaders():
    dm = DigitsDataModule(batch_size=50, image_size=8, num_workers=0, val_fraction=0.2)
    assert dm.hparams.batch_size == 50 and dm.hparams.image_size == 8 and dm.hparams.val_fraction == 0.2
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 8, 8) and y.dtype == torch.long
    sizes = [len(b[1]) for b in dm.val_dataloader()]
    assert sum(sizes) == len(dm.val_set)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(val_fraction=1.5), "val_fraction"),
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(image_size=0), "image_size"),
        (dict(augment_shift=-1), "augment_shift"),
    ],
)
def test_digits_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_gathered_batches_equal_per_sample_batches():
    images, targets = torch.randn(20, 1, 5, 5), torch.arange(20)
    ds = InMemoryImageDataset(images, targets)
    fast = list(make_loader(ds, batch_size=6))
    slow = list(DataLoader(ds, batch_size=6))  # default collate, one __getitem__ per sample
    assert len(fast) == len(slow) == 4
    for (a, b), (c, d) in zip(fast, slow):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert isinstance(fast[0], list)


def test_gather_uses_one_call_per_batch():
    calls = []

    class Counting(InMemoryImageDataset):
        def gather(self, indices):
            calls.append(len(indices))
            return super().gather(indices)

    ds = Counting(torch.zeros(10, 1, 2, 2), torch.zeros(10))
    list(make_loader(ds, batch_size=4))
    assert calls == [4, 4, 2]


def test_gather_collate_falls_back_to_default():
    batch = gather_collate([(torch.zeros(2), 1), (torch.ones(2), 0)])
    assert batch[0].shape == (2, 2) and batch[1].tolist() == [1, 0]


def test_dataset_validation():
    with pytest.raises(ValueError, match="images"):
        InMemoryImageDataset(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="targets"):
        InMemoryImageDataset(torch.zeros(3, 1, 2, 2), torch.zeros(4))


def test_random_translate_shifts_each_sample_within_bounds():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    y = random_translate(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    rows, cols = torch.nonzero(y[:, 0], as_tuple=True)[1:]
    assert y.sum() == 64  # the dot stays inside: shifts are at most 2 px
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # per-sample offsets, not one per batch
    assert random_translate(x, 0) is x
    with pytest.raises(ValueError, match="max_shift"):
        random_translate(x, -1)


def test_augmented_training_batches_only():
    dm = DigitsDataModule(batch_size=16, image_size=8, augment_shift=1)
    dm.setup("fit")
    assert dm.train_set.transform is not None and dm.val_set.transform is None
