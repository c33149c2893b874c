"""Epoch arithmetic: exhaustive tables, agreement with DataLoader/Lightning, the memory estimate."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from epochwise.callbacks.epoch_math import (
    EpochSuggestion,
    iterations_per_epoch,
    suggest_max_epochs,
    total_updates,
)

from conftest import make_dataset, quiet_trainer


class Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_iterations_per_epoch_exhaustive():
    for n in range(0, 130):
        for bs in range(1, 40):
            assert iterations_per_epoch(n, bs) == math.ceil(n / bs)
            assert iterations_per_epoch(n, bs, drop_last=True) == n // bs


@pytest.mark.parametrize("n, bs", [(0, 3), (1, 1), (10, 3), (10, 5), (17, 4), (64, 64), (63, 64)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_iterations_per_epoch_matches_dataloader(n, bs, drop_last):
    assert iterations_per_epoch(n, bs, drop_last) == len(DataLoader(range(n), batch_size=bs, drop_last=drop_last))


def test_total_updates_exhaustive():
    for n in range(1, 60):
        for bs in range(1, 12):
            for acc in range(1, 6):
                per_epoch = math.ceil(math.ceil(n / bs) / acc)
                assert total_updates(n, bs, 3, acc) == 3 * per_epoch
                assert total_updates(n, bs, 3, acc, drop_last=True) == 3 * math.ceil((n // bs) / acc)
    assert total_updates(100, 10, 0) == 0


@pytest.mark.parametrize("n, bs, epochs, acc", [(40, 8, 2, 1), (40, 8, 2, 2), (44, 8, 3, 4), (10, 16, 2, 3)])
def test_total_updates_matches_lightning(n, bs, epochs, acc):
    trainer = quiet_trainer(max_epochs=epochs, accumulate_grad_batches=acc)
    trainer.fit(Linear(), train_dataloaders=DataLoader(make_dataset(n), batch_size=bs))
    assert trainer.global_step == total_updates(n, bs, epochs, acc)
    assert trainer.estimated_stepping_batches == total_updates(n, bs, epochs, acc)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: iterations_per_epoch(-1, 2), "`num_samples` must be an int >= 0, got -1"),
        (lambda: iterations_per_epoch(10, 0), "`batch_size` must be an int >= 1, got 0"),
        (lambda: iterations_per_epoch(10, 2.0), "`batch_size` must be an int >= 1, got 2.0"),
        (lambda: total_updates(10, 2, -1), "`epochs` must be an int >= 0, got -1"),
        (lambda: total_updates(10, 2, 1, 0), "`accumulate_grad_batches` must be an int >= 1, got 0"),
        (lambda: suggest_max_epochs(0), "`num_samples` must be an int >= 1, got 0"),
    ],
)
def test_argument_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "n, low, high",
    [
        (1, 50, 100),
        (1_797, 50, 100),
        (9_999, 50, 100),
        (10_000, 20, 50),
        (60_000, 20, 50),
        (100_000, 20, 50),
        (100_001, 10, 20),
        (999_999, 10, 20),
        (1_000_000, 3, 10),
        (1_281_167, 3, 10),
        (10**9, 3, 10),
    ],
)
def test_suggest_max_epochs_table(n, low, high):
    s = suggest_max_epochs(n)
    assert isinstance(s, EpochSuggestion)
    assert (s.low, s.high, s.suggested) == (low, high, high)
    doubled = suggest_max_epochs(n, complex_task=True)
    assert (doubled.low, doubled.high, doubled.suggested) == (2 * low, 2 * high, 2 * high)
    assert "complex" in doubled.rule and "complex" not in s.rule
