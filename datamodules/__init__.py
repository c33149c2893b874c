"""epochwise.datamodules: data, and the one mechanism that sizes batches."""

from .augment import random_translate
from .base import ImageArrays, InMemoryImageDataModule
from .digits import DigitsDataModule
from .memory import InMemoryImageDataset, gather_collate, make_loader

__all__ = [
    "DigitsDataModule",
    "InMemoryImageDataModule",
    "ImageArrays",
    "InMemoryImageDataset",
    "gather_collate",
    "make_loader",
    "random_translate",
]
