"""Shared by the early-stopping tests: a module that logs scripted values, and a weight recorder."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer


class Scripted(pl.LightningModule):
    """Trains a tiny regression (so weights change every epoch) and logs ``seqs[name][epoch]``."""

    def __init__(self, **seqs: list[float]) -> None:
        super().__init__()
        self.seqs = seqs
        torch.manual_seed(0)  # same initial weights in every run (resume comparisons)
        self.layer = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        for name, seq in self.seqs.items():
            self.log(name, float(seq[min(self.current_epoch, len(seq) - 1)]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:8], self.y[:8]), batch_size=8)


class WeightRecorder(Callback):
    """Copies the module's weights at the end of every training epoch (after validation)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def make_trainer(tmp_path=None, max_epochs: int = 20, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, max_epochs=max_epochs, **kwargs)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
