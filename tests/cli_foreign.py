"""A user's own DataModule, outside the project, for the CLI tests (``--data cli_foreign.ForeignData``)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class ForeignData(pl.LightningDataModule):
    """Random 3-channel 12x12 images in 5 classes; says so through ``num_channels``/``num_classes``."""

    num_channels = 3
    num_classes = 5

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def _loader(self, n: int, seed: int, shuffle: bool = False) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        data = TensorDataset(torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 5, (n,), generator=g))
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(32, 0, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(16, 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(16, 2)
