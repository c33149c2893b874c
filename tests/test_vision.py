"""MNIST / FashionMNIST / CIFAR-10 DataModules on small files written in their native formats.

Every test writes its own files into ``tmp_path`` and parses them with torchvision's real code;
nothing touches the network (an autouse fixture makes any socket connection fail).
"""

from __future__ import annotations

import doctest
import pickle
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist

from epochwise.datamodules import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    InMemoryImageDataModule,
    MNISTDataModule,
)
from epochwise.datamodules import vision as vision_module

from _native_files import LABEL_PIXEL_SCALE, NativeSplits, write_cifar10, write_idx, write_mnist


@dataclass(frozen=True)
class Case:
    """One DataModule, the writer of its native files, and what its tensors look like."""

    cls: type[InMemoryImageDataModule]
    write: Callable[[Path], NativeSplits]
    channels: int
    size: int
    torchvision_module: object  # where the dataset class looks up download_and_extract_archive

    def __str__(self) -> str:
        return self.cls.__name__


CASES = [
    Case(
        MNISTDataModule, lambda root: write_mnist(root, "MNIST"), 1, 28, torchvision.datasets.mnist
    ),
    Case(
        FashionMNISTDataModule,
        lambda root: write_mnist(root, "FashionMNIST", seed=1),
        1,
        28,
        torchvision.datasets.mnist,
    ),
    Case(CIFAR10DataModule, write_cifar10, 3, 32, torchvision.datasets.cifar),
]
cases = pytest.mark.parametrize("case", CASES, ids=str)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _setup(case: Case, root: Path, **kwargs: object) -> InMemoryImageDataModule:
    dm = case.cls(data_dir=root, batch_size=8, **kwargs)
    dm.setup("fit")
    return dm


# -- reading ----------------------------------------------------------------------------------
@cases
def test_load_arrays_round_trips_the_written_files(case: Case, tmp_path: Path) -> None:
    written = case.write(tmp_path)
    arrays = case.cls(data_dir=tmp_path).load_arrays()
    for images, labels, want_x, want_y in [
        (arrays.train_images, arrays.train_targets, written.train_images, written.train_labels),
        (arrays.test_images, arrays.test_targets, written.test_images, written.test_labels),
    ]:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (len(want_y), case.channels, case.size, case.size)
        assert images.is_contiguous()
        # Exact equality also checks CIFAR's NHWC -> NCHW conversion channel by channel.
        assert torch.equal(images, torch.from_numpy(want_x))
        assert torch.equal(labels, torch.from_numpy(want_y))


@cases
def test_setup_serves_normalised_batches_with_paired_labels(case: Case, tmp_path: Path) -> None:
    written = case.write(tmp_path)
    dm = _setup(case, tmp_path, val_fraction=0.2)
    n_train, n_test = len(written.train_labels), len(written.test_labels)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (
        n_train - n_train // 5,
        n_train // 5,
        n_test,
    )

    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, case.channels, case.size, case.size)
        assert x.dtype == torch.float32 and y.dtype == torch.int64

    # Train + val hold exactly the written training labels; test keeps file order.
    fit_and_val = torch.cat([dm.train_set.targets, dm.val_set.targets])
    assert sorted(fit_and_val.tolist()) == sorted(written.train_labels.tolist())
    assert dm.test_set.targets.tolist() == written.test_labels.tolist()

    # Each image still carries its own label in its first pixel: stored as read (uint8, after the
    # split), and in every gathered batch once normalisation is undone.
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert ds.images.dtype == torch.uint8
        assert torch.equal(ds.images[:, 0, 0, 0].long(), ds.targets * LABEL_PIXEL_SCALE)
        x, y = ds.gather(range(len(ds)))
        raw = (x * dm.std + dm.mean) * 255
        assert torch.equal(raw[:, 0, 0, 0].round().long(), y * LABEL_PIXEL_SCALE)


@cases
def test_normalisation_uses_the_train_split_only(case: Case, tmp_path: Path) -> None:
    case.write(tmp_path)
    dm = _setup(case, tmp_path)
    train = dm.train_set.gather(range(len(dm.train_set)))[0]
    assert dm.mean.shape == dm.std.shape == (case.channels, 1, 1)
    torch.testing.assert_close(
        train.mean(dim=(0, 2, 3)), torch.zeros(case.channels), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        train.std(dim=(0, 2, 3)), torch.ones(case.channels), atol=1e-4, rtol=0
    )
    # The written test images are much brighter: statistics mixing them in would hide that.
    test = dm.test_set.gather(range(len(dm.test_set)))[0]
    assert (test.mean(dim=(0, 2, 3)) > 1.0).all()


@cases
def test_image_size_resizes_every_split(case: Case, tmp_path: Path) -> None:
    case.write(tmp_path)
    dm = _setup(case, tmp_path, image_size=16)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, _ = next(iter(loader))
        assert x.shape[1:] == (case.channels, 16, 16)
    # resized per batch: the stored images keep their native size
    assert dm.train_set.images.shape[1:] == (case.channels, case.size, case.size)


@cases
def test_augmentation_changes_train_batches_only(case: Case, tmp_path: Path) -> None:
    case.write(tmp_path)
    plain, shifted = _setup(case, tmp_path), _setup(case, tmp_path, augment_shift=3)
    assert not torch.equal(
        next(iter(plain.train_dataloader()))[0], next(iter(shifted.train_dataloader()))[0]
    )
    assert torch.equal(
        next(iter(plain.val_dataloader()))[0], next(iter(shifted.val_dataloader()))[0]
    )


# -- missing and damaged files ---------------------------------------------------------------
@cases
def test_missing_file_raises_file_not_found_naming_it(case: Case, tmp_path: Path) -> None:
    written = case.write(tmp_path)
    gone = sorted(written.files.values())[-1]
    gone.unlink()
    dm = case.cls(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(gone))) as info:
        dm.setup("fit")
    assert "download=True" in str(info.value)
    assert sum(str(path) in str(info.value) for path in written.files.values()) == 1


@cases
def test_empty_data_dir_lists_every_missing_file(case: Case, tmp_path: Path) -> None:
    expected = case.write(tmp_path / "reference").files.values()
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        case.cls(data_dir=tmp_path / "empty").setup("fit")
    for path in expected:
        assert str(tmp_path / "empty" / path.relative_to(tmp_path / "reference")) in str(info.value)


@cases
def test_missing_file_with_download_true_says_to_run_prepare_data(
    case: Case, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=r"prepare_data\(\)"):
        case.cls(data_dir=tmp_path, download=True).setup("fit")


DAMAGED = [
    (case, name)
    for case in CASES
    for name in (
        ["train_images", "train_labels", "test_images", "test_labels"]
        if case.cls is not CIFAR10DataModule
        else ["data_batch_1", "data_batch_4", "test_batch", "batches.meta"]
    )
]


@pytest.mark.parametrize(("case", "name"), DAMAGED, ids=[f"{c}-{n}" for c, n in DAMAGED])
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_file_raises_naming_it(case: Case, name: str, damage: str, tmp_path: Path) -> None:
    files = case.write(tmp_path).files
    bad = files[name]
    data = bad.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(),
    }[damage]
    bad.write_bytes(damaged)
    with pytest.raises(RuntimeError, match=re.escape(str(bad))) as info:
        case.cls(data_dir=tmp_path).setup("fit")
    message = str(info.value)
    assert "delete it and download again (download=True)" in message
    assert info.value.__cause__ is not None  # torchvision's own error stays attached
    others = [path for path in files.values() if path != bad]
    assert not any(path.name in message for path in others)  # only the bad file is blamed


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_images_and_labels_of_different_lengths_name_both_files(case: Case, tmp_path: Path) -> None:
    written = case.write(tmp_path)
    write_idx(
        written.files["train_labels"], written.train_labels[:-1].astype(np.uint8)
    )  # valid IDX
    with pytest.raises(RuntimeError, match="50 images but 49 labels") as info:
        case.cls(data_dir=tmp_path).setup("fit")
    assert str(written.files["train_images"]) in str(info.value)
    assert str(written.files["train_labels"]) in str(info.value)


@cases
def test_labels_out_of_range_raise(case: Case, tmp_path: Path) -> None:
    written = case.write(tmp_path)
    if case.cls is CIFAR10DataModule:
        path = written.files["test_batch"]
        batch = pickle.loads(path.read_bytes())
        batch["labels"][0] = 12
        path.write_bytes(pickle.dumps(batch))
    else:
        labels = written.test_labels.astype(np.uint8)
        labels[0] = 12
        write_idx(written.files["test_labels"], labels)
    with pytest.raises(RuntimeError, match=r"labels outside 0\.\.9 \(found 12\)"):
        case.cls(data_dir=tmp_path).setup("fit")


# -- download (torchvision's path, with the network call replaced) ---------------------------
@cases
def test_prepare_data_downloads_through_torchvision_only_when_needed(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_download_and_extract_archive(
        url: str, download_root: str, *args: object, **kwargs: object
    ) -> None:
        calls.append(url)
        case.write(tmp_path)  # what a download + extract leaves behind

    monkeypatch.setattr(
        case.torchvision_module, "download_and_extract_archive", fake_download_and_extract_archive
    )

    case.cls(data_dir=tmp_path).prepare_data()  # download=False: never downloads
    assert calls == []
    dm = case.cls(data_dir=tmp_path, download=True)
    dm.prepare_data()
    assert calls and all(url.startswith("http") for url in calls)
    n_calls = len(calls)
    dm.prepare_data()  # files present now: nothing to fetch
    assert len(calls) == n_calls
    dm.setup("fit")
    assert len(dm.test_set) == 20


@cases
def test_failed_download_names_the_missing_files(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network here")

    monkeypatch.setattr(case.torchvision_module, "download_and_extract_archive", offline)
    missing = case.write(tmp_path / "reference").files[
        "test_labels" if case.channels == 1 else "test_batch"
    ]
    with pytest.raises(RuntimeError, match="download=True did not produce") as info:
        case.cls(data_dir=tmp_path, download=True).prepare_data()
    assert str(tmp_path / missing.relative_to(tmp_path / "reference")) in str(info.value)
    assert "no network here" in str(info.value)


# -- arguments and metadata --------------------------------------------------------------------
@cases
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"image_size": 0}, "image_size"),
        ({"augment_shift": -1}, "augment_shift"),
        ({"download": 1}, "download"),
        ({"seed": True}, "seed"),
        ({"split_seed": 0.5}, "split_seed"),
        ({"device": "tpu:x"}, "device"),
    ],
)
def test_bad_arguments_raise_value_error(
    case: Case, kwargs: dict, argument: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        case.cls(data_dir=tmp_path, **kwargs)


@cases
def test_hyperparameters_and_class_attributes(case: Case, tmp_path: Path) -> None:
    dm = case.cls(data_dir=tmp_path, batch_size=16, image_size=20, download=False, seed=3, split_seed=4)
    assert dm.hparams.batch_size == 16 and dm.hparams.image_size == 20 and dm.hparams.seed == 3
    assert dm.hparams.split_seed == 4 and dm.hparams.device is None
    assert Path(dm.hparams.data_dir) == tmp_path and dm.hparams.download is False
    assert (dm.num_channels, dm.num_classes) == (case.channels, 10)


def test_docstring_examples_run() -> None:
    # The examples that need real data are marked +SKIP; the rest must hold.
    result = doctest.testmod(vision_module, raise_on_error=False, verbose=False)
    assert result.failed == 0 and result.attempted > 0


def test_fits_with_a_trainer(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from epochwise.modules import ImageClassifier

    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=tmp_path, batch_size=16, image_size=16, augment_shift=2)
    model = ImageClassifier(num_classes=dm.num_classes, in_channels=dm.num_channels)
    trainer = pl.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
