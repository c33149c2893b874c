"""DigitsDataModule, the in-memory fast path, per-batch preprocessing and batch augmentation."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from epochwise.datamodules import (
    BatchTransform,
    DigitsDataModule,
    InMemoryImageDataset,
    gather_collate,
    make_loader,
    random_translate,
)
from epochwise.datamodules.base import auto_device, partition_rows_
from epochwise.datamodules.preprocess import channel_stats


def whole(ds: InMemoryImageDataset) -> torch.Tensor:
    """The split's images as the model sees them (tiny data only)."""
    return ds.gather(range(len(ds)))[0]


def test_digits_split_sizes_storage_and_normalisation():
    dm = DigitsDataModule(batch_size=32, seed=3)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    assert len(dm.test_set) == round(0.2 * 1797)
    # stored as they come: 8x8, values 0..16, one byte each
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (1, 8, 8)
        assert int(ds.images.max()) == 16
    # the three splits share nothing and cover the data set once
    assert dm.train_set.images.untyped_storage().nbytes() == (1797 - 359) * 64  # train + val: one buffer
    x = whole(dm.train_set)
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
    # statistics of the train split only, at the size the model sees
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std().item() == pytest.approx(1.0, abs=1e-4)
    assert whole(dm.val_set).mean().abs().item() < 0.2
    assert set(dm.train_set.targets.tolist()) == set(range(10))


def test_split_depends_on_split_seed_not_on_the_training_seed():
    """Issue 11, reproduction 5: the test split changed with the training seed."""
    splits = {}
    for seed, split_seed in [(0, 0), (1, 0), (7, 0), (0, 1)]:
        dm = DigitsDataModule(batch_size=32, image_size=8, seed=seed, split_seed=split_seed)
        dm.setup("fit")
        splits[seed, split_seed] = [(ds.images, ds.targets) for ds in (dm.train_set, dm.val_set, dm.test_set)]
    base = splits[0, 0]
    for key in [(1, 0), (7, 0)]:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(base, splits[key]))
    other = splits[0, 1]
    assert not torch.equal(base[2][1], other[2][1]) and not torch.equal(base[1][1], other[1][1])


def test_digits_hyperparameters_and_loaders():
    dm = DigitsDataModule(batch_size=50, image_size=8, num_workers=0, val_fraction=0.2)
    assert dm.hparams.batch_size == 50 and dm.hparams.image_size == 8 and dm.hparams.val_fraction == 0.2
    assert dm.hparams.split_seed == 0 and dm.hparams.device is None
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    sizes = [len(b[1]) for b in dm.val_dataloader()]
    assert sum(sizes) == len(dm.val_set)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(num_workers=True), "num_workers"),
        (dict(val_fraction=1.5), "val_fraction"),
        (dict(val_fraction=float("nan")), "val_fraction"),
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(image_size=0), "image_size"),
        (dict(augment_shift=-1), "augment_shift"),
        (dict(augment_shift=True), "augment_shift"),
        (dict(seed=True), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(split_seed=None), "split_seed"),
        (dict(pin_memory=1), "pin_memory"),
        (dict(persistent_workers="yes"), "persistent_workers"),
        (dict(device="gpu0"), "device"),
        (dict(device="cuda", num_workers=2), "num_workers"),
    ],
)
def test_digits_validation(kwargs, match):
    with pytest.raises(ValueError, match=f"`{match}` must be .*got"):
        DigitsDataModule(**kwargs)


# -- per-batch preprocessing ------------------------------------------------------------------
def test_batch_transform_equals_the_whole_split_computation():
    """Normalising per batch gives what the old code stored: (resize(x / white) - mean) / std."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (30, 3, 6, 6), dtype=torch.uint8, generator=g)
    mean, std = channel_stats(raw, 255.0, image_size=10)
    want = torch.nn.functional.interpolate(raw.float() / 255, size=(10, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mean, want.mean(dim=(0, 2, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(std, want.std(dim=(0, 2, 3)), atol=1e-6, rtol=0)
    out = BatchTransform(mean, std, 255.0, image_size=10)(raw)
    torch.testing.assert_close(out, (want - mean.view(-1, 1, 1)) / std.view(-1, 1, 1), atol=1e-5, rtol=0)
    assert raw.dtype == torch.uint8  # the stored images are never modified


@pytest.mark.parametrize("shape,size", [((8, 8), 28), ((8, 5), 12), ((32, 32), 16), ((7, 9), 7)])
def test_resizing_by_matmul_equals_bilinear_interpolation(shape, size):
    x = torch.randint(0, 256, (4, 2, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    got = BatchTransform(torch.zeros(2), torch.ones(2) / 255, 255.0, image_size=size)(x)  # identity normalisation
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)


def test_partition_rows_in_place_keeps_each_group_in_order(monkeypatch):
    import epochwise.datamodules.base as base

    monkeypatch.setattr(base, "_PARTITION_CHUNK_BYTES", 3 * 4)  # 3 rows per chunk: many chunks
    x = torch.arange(40).view(10, 4).clone()
    first = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    ptr = x.data_ptr()
    order = partition_rows_(x, first)
    assert order.tolist() == [0, 2, 3, 5, 6, 7, 9, 1, 4, 8]
    assert torch.equal(x, torch.arange(40).view(10, 4)[order]) and x.data_ptr() == ptr


def test_auto_device_puts_data_on_a_gpu_only_with_room_and_no_workers():
    cuda, mib, gib = torch.device("cuda", 0), 2**20, 2**30
    assert auto_device(cuda, 150 * mib, 80 * gib, num_workers=0) == cuda
    assert auto_device(cuda, 150 * mib, 500 * mib, num_workers=0) == torch.device("cpu")  # > 25% of free
    assert auto_device(cuda, 150 * mib, 80 * gib, num_workers=2) == torch.device("cpu")
    assert auto_device(torch.device("cpu"), 150 * mib, None, num_workers=0) == torch.device("cpu")
    assert auto_device(None, 150 * mib, None, num_workers=0) == torch.device("cpu")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_argument_stores_splits_there_and_serves_the_same_batches(device):
    """The device-agnostic path (run on CPU here: no GPU in the test machines)."""
    plain = DigitsDataModule(batch_size=64, image_size=8)
    placed = DigitsDataModule(batch_size=64, image_size=8, device=device)
    plain.setup("fit")
    placed.setup("fit")  # "auto" without a Trainer on a GPU: host memory
    assert placed.data_device == torch.device("cpu") and placed.train_set.images.device.type == "cpu"
    for a, b in zip(plain.train_dataloader(), placed.train_dataloader()):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- the gathering fast path ------------------------------------------------------------------
def test_gathered_batches_equal_per_sample_batches():
    images, targets = torch.randint(0, 256, (20, 1, 5, 5), dtype=torch.uint8), torch.arange(20)
    ds = InMemoryImageDataset(images, targets, transform=BatchTransform([0.5], [0.2], image_size=7))
    fast = list(make_loader(ds, batch_size=6))
    slow = list(DataLoader(ds, batch_size=6))  # default collate, one __getitem__ per sample
    assert len(fast) == len(slow) == 4
    for (a, b), (c, d) in zip(fast, slow):
        assert a.shape[1:] == (1, 7, 7)
        torch.testing.assert_close(a, c)
        assert torch.equal(b, d)
    assert isinstance(fast[0], list)


def test_gathered_raw_batches_equal_per_sample_batches():
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
    assert dm.train_set.transform.augment_shift == 1
    assert dm.val_set.transform.augment_shift == 0 and dm.test_set.transform.augment_shift == 0
    plain = DigitsDataModule(batch_size=16, image_size=8)
    plain.setup("fit")
    assert not torch.equal(dm.train_set.gather(range(16))[0], plain.train_set.gather(range(16))[0])
    assert torch.equal(dm.val_set.gather(range(16))[0], plain.val_set.gather(range(16))[0])


def test_workers_under_spawn_gather_the_same_batches():
    """Everything a worker receives pickles (the old augmentation was a local closure)."""
    dm = DigitsDataModule(batch_size=256, image_size=8, augment_shift=2, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    pickle.dumps(loader.dataset)
    spawned = DataLoader(loader.dataset, batch_size=256, sampler=loader.sampler, num_workers=2,
                         collate_fn=loader.collate_fn, multiprocessing_context="spawn")
    here = DataLoader(loader.dataset, batch_size=256, sampler=loader.sampler, collate_fn=loader.collate_fn)
    got, want = list(spawned), list(here)
    assert [b[1].tolist() for b in got] == [b[1].tolist() for b in want]  # same order, same labels
    assert all(a[0].shape == b[0].shape and a[0].dtype == torch.float32 for a, b in zip(got, want))
