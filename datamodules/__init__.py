"""epochwise.datamodules: data, and the one mechanism that sizes batches."""

from .augment import random_translate
from .base import ImageArrays, InMemoryImageDataModule
from .digits import DigitsDataModule
from .memory import InMemoryImageDataset, gather_collate, make_loader
from .preprocess import BatchTransform, channel_stats
from .vision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "DigitsDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "InMemoryImageDataModule",
    "ImageArrays",
    "InMemoryImageDataset",
    "BatchTransform",
    "channel_stats",
    "gather_collate",
    "make_loader",
    "random_translate",
]
