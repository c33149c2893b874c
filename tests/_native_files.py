"""Write small datasets in their native on-disk formats, where torchvision looks for them.

The files are what torchvision's own parsers read: big-endian IDX ``ubyte`` files for MNIST and
FashionMNIST (uncompressed, in ``<root>/<ClassName>/raw/``), and pickled dict batches for CIFAR-10
(in ``<root>/cifar-10-batches-py/``). Each image stores its label in its first pixel
(``label * 25``), so a test can check that images and labels stay paired through shuffles.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["NativeSplits", "write_cifar10", "write_idx", "write_mnist"]

LABEL_PIXEL_SCALE = 25  # first pixel of each image = label * 25 (labels 0..9 fit in a uint8)


@dataclass
class NativeSplits:
    """What was written: images ``(N, C, H, W)`` uint8 and labels ``(N,)``, in file order."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict[str, Path]


def _images(
    rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...], low: int, high: int
) -> np.ndarray:
    images = rng.integers(low, high, size=(len(labels), *shape), dtype=np.uint8)
    # Channel c is offset by 40*c so per-channel normalisation is visible in the statistics.
    for c in range(shape[0]):
        images[:, c] = np.clip(images[:, c].astype(int) + 40 * c, 0, 255).astype(np.uint8)
    images[:, 0, 0, 0] = labels * LABEL_PIXEL_SCALE
    return images


def _labels(n: int, offset: int) -> np.ndarray:
    return ((np.arange(n) * 7 + offset) % 10).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic ``0x0000080<ndim>``, big-endian dims, raw bytes."""
    if array.dtype != np.uint8:
        raise ValueError(f"only uint8 IDX files are written here, got {array.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array).tobytes())


def write_mnist(
    root: Path, folder: str = "MNIST", n_train: int = 50, n_test: int = 20, seed: int = 0
) -> NativeSplits:
    """Write the four MNIST IDX files under ``root/folder/raw/`` (folder = torchvision class name).

    Test images are brighter than train images (values 150..255 vs 0..120), so statistics taken
    from the test split would show.
    """
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    train_y, test_y = _labels(n_train, 0), _labels(n_test, 3)
    train_x = _images(rng, train_y, (1, 28, 28), 0, 120)
    test_x = _images(rng, test_y, (1, 28, 28), 150, 255)
    files = {
        "train_images": raw / "train-images-idx3-ubyte",
        "train_labels": raw / "train-labels-idx1-ubyte",
        "test_images": raw / "t10k-images-idx3-ubyte",
        "test_labels": raw / "t10k-labels-idx1-ubyte",
    }
    write_idx(files["train_images"], train_x[:, 0])
    write_idx(files["train_labels"], train_y)
    write_idx(files["test_images"], test_x[:, 0])
    write_idx(files["test_labels"], test_y)
    return NativeSplits(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), files)


def _write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 10, n_test: int = 20, seed: int = 0) -> NativeSplits:
    """Write ``data_batch_1..5``, ``test_batch`` and ``batches.meta`` under ``root/cifar-10-batches-py``.

    Each batch is a dict with ``data`` (``(n, 3072)`` uint8, rows = R plane, G plane, B plane) and
    ``labels`` (list of int), as in the official python release.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    n_train = 5 * per_batch
    train_y, test_y = _labels(n_train, 0), _labels(n_test, 3)
    train_x = _images(rng, train_y, (3, 32, 32), 0, 120)
    test_x = _images(rng, test_y, (3, 32, 32), 130, 176)  # +80 on channel 2 stays <= 255
    files: dict[str, Path] = {}
    for i in range(5):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        files[f"data_batch_{i + 1}"] = folder / f"data_batch_{i + 1}"
        _write_pickle(
            files[f"data_batch_{i + 1}"],
            {"data": train_x[rows].reshape(per_batch, -1), "labels": train_y[rows].tolist()},
        )
    files["test_batch"] = folder / "test_batch"
    _write_pickle(
        files["test_batch"], {"data": test_x.reshape(n_test, -1), "labels": test_y.tolist()}
    )
    files["batches.meta"] = folder / "batches.meta"
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    _write_pickle(files["batches.meta"], {"label_names": names, "num_vis": 3072})
    return NativeSplits(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), files)
