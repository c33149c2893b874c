"""MNIST, FashionMNIST and CIFAR-10 DataModules: torchvision parses the files, memory holds them.

torchvision's dataset classes download and parse the native files (IDX for the MNISTs, pickled
batches for CIFAR-10); the DataModules take ``dataset.data`` / ``dataset.targets`` from them once,
as ``(N, C, H, W)`` uint8 tensors, and hand them to :class:`.InMemoryImageDataModule`, which splits
them (still uint8) and serves batches gathered by index, resized and normalised per batch with
train-split statistics.

File problems surface as two errors, each naming the file:

- a missing file raises ``FileNotFoundError`` with the path and how to get it (``download=True``);
- a truncated or corrupt file raises ``RuntimeError`` telling to delete it and download again.
  torchvision's parsers fail in assorted ways on bad bytes (``RuntimeError`` from a tensor view,
  ``AssertionError``, ``KeyError``, ``EOFError``, ``pickle.UnpicklingError``, ``ValueError``...)
  and never say which file; the DataModule catches them, re-parses the split's files one at a time
  with the same torchvision code to find the bad one, and raises one clear error from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from ._checks import check_bool
from .base import ImageArrays, InMemoryImageDataModule

__all__ = ["CIFAR10DataModule", "FashionMNISTDataModule", "MNISTDataModule"]


class _CIFAR10Files(datasets.CIFAR10):
    """torchvision's ``CIFAR10`` with the md5 check of the *extracted* files reduced to existence.

    torchvision compares every batch file and ``batches.meta`` with the md5 of the official release
    before parsing, so any other file in the same format (such as the small ones the tests write)
    is refused as "not found or corrupted". This class is the one place where that check is relaxed:
    with ``md5=None``, torchvision's ``check_integrity`` tests existence only, as it does for the
    MNIST raw files. The downloaded archive keeps its md5 check (``tgz_md5``), and damaged files are
    still caught by the parser, whose errors the DataModule turns into one naming the file.

    Args:
        root: folder holding ``cifar-10-batches-py``.
        train: parse the training batches (else ``test_batch``).
        download: let torchvision download and extract the archive if a file is missing.
        files: parse only these batch files (used to find which file of a split is bad).
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}

    def __init__(
        self, root: str, train: bool = True, download: bool = False, files: list[str] | None = None
    ) -> None:
        if files is not None:
            # Instance attributes shadow the class lists, which torchvision reads in __init__.
            self.train_list = self.test_list = [[name, None] for name in files]
        super().__init__(root, train=train, download=download)


class _TorchvisionDataModule(InMemoryImageDataModule):
    """Shared part of the torchvision-backed DataModules: file checks, download, error wrapping.

    Subclasses say where the files live (:meth:`_split_files`), how torchvision loads a split
    (:meth:`_load_split`) and how it parses a single file (:meth:`_parse_file`).
    """

    dataset_name: ClassVar[str]

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        image_size: int | None = None,
        augment_shift: int = 0,
        download: bool = False,
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
        if not isinstance(data_dir, (str, Path)) or not str(data_dir):
            raise ValueError(f"`data_dir` must be a non-empty path (str or Path), got {data_dir!r}")
        self.data_dir = Path(data_dir)
        self.download = check_bool("download", download)
        self.save_hyperparameters()

    # -- format-specific hooks ----------------------------------------------------------------
    def _split_files(self, train: bool) -> list[Path]:
        """The files torchvision parses for one split, in the order it parses them."""
        raise NotImplementedError

    def _load_split(self, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
        """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of one split, via torchvision."""
        raise NotImplementedError

    def _parse_file(self, path: Path) -> None:
        """Parse ``path`` alone with torchvision's code; raise whatever the parser raises."""
        raise NotImplementedError

    # -- Lightning hooks ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download the missing files with torchvision when ``download=True`` (rank 0 only)."""
        if not self.download or not self._missing_files():
            return
        try:
            # torchvision downloads inside the dataset constructor, which then parses the split.
            self._load_split(train=True, download=True)
        except Exception as err:
            missing = self._missing_files()
            if missing:
                # The download itself failed (no network, ...): torchvision's error says why.
                listed = ", ".join(str(path) for path in missing)
                raise RuntimeError(
                    f"download=True did not produce the {self.dataset_name} file(s) {listed} "
                    f"({type(err).__name__}: {err}). Check the network, or place the files there."
                ) from err
            # The files are there now, so the parse failed: setup() parses again and raises the
            # error that names the bad file, on every rank.

    def load_arrays(self) -> ImageArrays:
        missing = self._missing_files()
        if missing:
            raise FileNotFoundError(self._missing_message(missing))
        train_images, train_targets = self._checked_split(train=True)
        test_images, test_targets = self._checked_split(train=False)
        if train_images.shape[1:] != test_images.shape[1:]:
            files = list(dict.fromkeys(self._split_files(True) + self._split_files(False)))
            shapes = f"{tuple(train_images.shape[1:])} vs {tuple(test_images.shape[1:])}"
            raise RuntimeError(
                self._corrupt_message(files, f"train and test images differ in shape {shapes}")
            )
        return ImageArrays(train_images, train_targets, test_images, test_targets)

    # -- helpers --------------------------------------------------------------------------------
    def _missing_files(self) -> list[Path]:
        files = dict.fromkeys(self._split_files(True) + self._split_files(False))  # ordered set
        return [path for path in files if not path.is_file()]

    def _missing_message(self, missing: list[Path]) -> str:
        listed = "\n  ".join(str(path) for path in missing)
        how = (
            "Call prepare_data() before setup() to download them (the Trainer does this)"
            if self.download
            else "Pass download=True to download them with torchvision"
        )
        return (
            f"{self.dataset_name} file(s) not found:\n  {listed}\n"
            f"{how}, or place the files there (data_dir={str(self.data_dir)!r})."
        )

    def _checked_split(self, train: bool) -> tuple[Tensor, Tensor]:
        files = self._split_files(train)
        try:
            images, targets = self._load_split(train)
        except OSError:
            raise  # unreadable (permissions, I/O): the OS error names the file; not corruption
        except Exception as err:
            raise RuntimeError(self._corrupt_message(self._find_bad_files(files), err)) from err
        # Files can parse and still be wrong; torchvision does not compare images with labels.
        problem = None
        if len(images) == 0:
            problem = "no images"
        elif len(images) != len(targets):
            problem = f"{len(images)} images but {len(targets)} labels"
        elif int(targets.min()) < 0 or int(targets.max()) >= self.num_classes:
            found = int(targets.min()) if int(targets.min()) < 0 else int(targets.max())
            problem = f"labels outside 0..{self.num_classes - 1} (found {found})"
        if problem is not None:
            raise RuntimeError(self._corrupt_message(files, problem))
        return images, targets

    def _find_bad_files(self, files: list[Path]) -> list[Path]:
        """The first file that fails to parse on its own, else all of them (no single culprit)."""
        for path in files:
            try:
                self._parse_file(path)
            except Exception:
                return [path]
        return files

    def _corrupt_message(self, files: list[Path], problem: str | BaseException) -> str:
        if len(files) == 1:
            what, it, copy = f"file {files[0]}", "it", "a good copy"
        else:
            what, it, copy = (
                "files " + ", ".join(str(path) for path in files),
                "them",
                "good copies",
            )
        if isinstance(problem, BaseException):
            problem = f"torchvision cannot parse {it} ({type(problem).__name__}: {problem})"
        return (
            f"Bad {self.dataset_name} {what}: {problem}. The data is truncated or corrupt: delete "
            f"{it} and download again (download=True), or replace {it} with {copy}."
        )


class _IDXDataModule(_TorchvisionDataModule):
    """MNIST-style datasets: four IDX files in ``<data_dir>/<ClassName>/raw/``."""

    _torchvision_class: ClassVar[type[datasets.MNIST]]

    @property
    def _raw_folder(self) -> Path:
        # torchvision's ``MNIST.raw_folder``: root / class name / "raw".
        return self.data_dir / self._torchvision_class.__name__ / "raw"

    def _split_files(self, train: bool) -> list[Path]:
        prefix = "train" if train else "t10k"
        return [
            self._raw_folder / f"{prefix}-{kind}"
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ]

    def _load_split(self, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
        ds = self._torchvision_class(str(self.data_dir), train=train, download=download)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()

    def _parse_file(self, path: Path) -> None:
        # The two readers ``MNIST._load_data`` calls.
        reader = read_image_file if "images" in path.name else read_label_file
        reader(str(path))


class MNISTDataModule(_IDXDataModule):
    """MNIST handwritten digits (60,000 train / 10,000 test, 1x28x28), held in memory.

    torchvision reads the IDX files from ``<data_dir>/MNIST/raw/`` (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) and with
    ``download=True`` fetches them in :meth:`prepare_data`. A seeded split holds out
    ``val_fraction`` of the training images for validation; normalisation statistics come from the
    remaining train split only.

    Args:
        data_dir: root folder holding ``MNIST/raw/``.
        batch_size: samples per batch (per device).
        num_workers, pin_memory, persistent_workers: passed to the DataLoaders.
        val_fraction: fraction of the training images used for validation.
        seed: seed of the training shuffle (see :class:`.InMemoryImageDataModule`).
        image_size: side of the square images fed to the model (``None`` = native 28).
        augment_shift: random translation in pixels applied to training batches (0 = off).
        download: download missing files with torchvision in :meth:`prepare_data`.
        split_seed: seed of the train/val split (independent of ``seed``).
        device: where the ``uint8`` splits live (``None``: host memory; ``"auto"``, ``"cuda"``, ...).

    Raises:
        ValueError: on a bad argument (in ``__init__``).
        FileNotFoundError: in ``setup`` when a file is missing (the message names it).
        RuntimeError: in ``setup`` when a file is truncated or corrupt (the message names it).

    Example:
        >>> dm = MNISTDataModule("data", batch_size=128, augment_shift=2)
        >>> dm.hparams.batch_size, dm.num_channels, dm.num_classes
        (128, 1, 10)
        >>> dm = MNISTDataModule("data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape)  # doctest: +SKIP
        (64, 1, 28, 28)
    """

    num_classes = 10
    num_channels = 1
    dataset_name = "MNIST"
    _torchvision_class = datasets.MNIST


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST clothing images (60,000 train / 10,000 test, 1x28x28), held in memory.

    Same files and layout as MNIST, under ``<data_dir>/FashionMNIST/raw/``; everything else works
    as in :class:`MNISTDataModule`.

    Args:
        data_dir: root folder holding ``FashionMNIST/raw/``.
        batch_size: samples per batch (per device).
        num_workers, pin_memory, persistent_workers: passed to the DataLoaders.
        val_fraction: fraction of the training images used for validation.
        seed: seed of the training shuffle (see :class:`.InMemoryImageDataModule`).
        image_size: side of the square images fed to the model (``None`` = native 28).
        augment_shift: random translation in pixels applied to training batches (0 = off).
        download: download missing files with torchvision in :meth:`prepare_data`.
        split_seed: seed of the train/val split (independent of ``seed``).
        device: where the ``uint8`` splits live (``None``: host memory; ``"auto"``, ``"cuda"``, ...).

    Raises:
        ValueError: on a bad argument (in ``__init__``).
        FileNotFoundError: in ``setup`` when a file is missing (the message names it).
        RuntimeError: in ``setup`` when a file is truncated or corrupt (the message names it).

    Example:
        >>> dm = FashionMNISTDataModule("data", batch_size=256, image_size=32)
        >>> dm.hparams.image_size, dm.num_channels
        (32, 1)
        >>> dm = FashionMNISTDataModule("data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> tuple(next(iter(dm.val_dataloader()))[0].shape)  # doctest: +SKIP
        (64, 1, 28, 28)
    """

    num_classes = 10
    num_channels = 1
    dataset_name = "FashionMNIST"
    _torchvision_class = datasets.FashionMNIST


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 colour images (50,000 train / 10,000 test, 3x32x32), held in memory.

    torchvision reads the pickled batches from ``<data_dir>/cifar-10-batches-py/``
    (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``) and with
    ``download=True`` fetches and extracts the archive in :meth:`prepare_data`. Unlike torchvision,
    the extracted files are not compared with the official md5s (so files in the same format work
    too); a truncated or corrupt file is still reported, by the parser. The ``(N, H, W, C)`` arrays
    torchvision returns are turned into ``(N, C, H, W)`` tensors; normalisation is per channel,
    from the train split only.

    Args:
        data_dir: root folder holding ``cifar-10-batches-py/``.
        batch_size: samples per batch (per device).
        num_workers, pin_memory, persistent_workers: passed to the DataLoaders.
        val_fraction: fraction of the training images used for validation.
        seed: seed of the training shuffle (see :class:`.InMemoryImageDataModule`).
        image_size: side of the square images fed to the model (``None`` = native 32).
        augment_shift: random translation in pixels applied to training batches (0 = off;
            4 is the usual CIFAR setting).
        download: download missing files with torchvision in :meth:`prepare_data`.
        split_seed: seed of the train/val split (independent of ``seed``).
        device: where the ``uint8`` splits live (``None``: host memory; ``"auto"``, ``"cuda"``, ...).

    Raises:
        ValueError: on a bad argument (in ``__init__``).
        FileNotFoundError: in ``setup`` when a file is missing (the message names it).
        RuntimeError: in ``setup`` when a file is truncated or corrupt (the message names it).

    Example:
        >>> dm = CIFAR10DataModule("data", batch_size=128, augment_shift=4)
        >>> dm.num_channels, dm.num_classes
        (3, 10)
        >>> dm = CIFAR10DataModule("data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape)  # doctest: +SKIP
        (64, 3, 32, 32)
    """

    num_classes = 10
    num_channels = 3
    dataset_name = "CIFAR-10"

    @property
    def _batch_folder(self) -> Path:
        return self.data_dir / _CIFAR10Files.base_folder

    def _split_files(self, train: bool) -> list[Path]:
        batches = _CIFAR10Files.train_list if train else _CIFAR10Files.test_list
        # The meta file first: every one-file parse in _find_bad_files reads it too.
        names = [_CIFAR10Files.meta["filename"]] + [name for name, _ in batches]
        return [self._batch_folder / name for name in names]

    def _load_split(self, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
        ds = _CIFAR10Files(str(self.data_dir), train=train, download=download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return images, torch.as_tensor(ds.targets, dtype=torch.long)

    def _parse_file(self, path: Path) -> None:
        if path.name == _CIFAR10Files.meta["filename"]:
            # torchvision's own meta parser, without building (and parsing) a split around it.
            probe = _CIFAR10Files.__new__(_CIFAR10Files)
            probe.root = str(self.data_dir)
            probe._load_meta()
        else:
            _CIFAR10Files(str(self.data_dir), files=[path.name])
