"""Epoch arithmetic: exhaustive tables, agreement with DataLoader/Lightning, the memory estimate."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from epochwise.callbacks.epoch_math import (
    OPTIMIZER_STATE_COPIES,
    EpochSuggestion,
    MemoryEstimate,
    estimate_max_batch_size,
    estimate_training_memory,
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


# --------------------------------------------------------------------------------------------
# memory estimate
# --------------------------------------------------------------------------------------------
def test_training_memory_counts_exactly():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    est = estimate_training_memory(model, (1, 8, 8), optimizer="adam", activation_factor=1.0)
    params = (64 * 32 + 32 + 32 * 10 + 10) * 4
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (params, params, 2 * params)
    # input 64 + flatten 64 + linear 32 + relu 32 + linear 10 floats per sample
    assert est.activation_bytes_per_sample == (64 + 64 + 32 + 32 + 10) * 4
    assert est.fixed_bytes == 4 * params and est.bytes_for(10) == 4 * params + 10 * est.per_sample_bytes


def test_frozen_parameters_need_no_gradient_or_optimizer_state():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    est = estimate_training_memory(model, (10,), optimizer="sgd_momentum")
    assert est.param_bytes == (110 + 22) * 4
    assert est.grad_bytes == est.optimizer_bytes == 22 * 4


@pytest.mark.parametrize("optimizer, copies", sorted(OPTIMIZER_STATE_COPIES.items()))
def test_optimizer_state_copies(optimizer, copies):
    est = estimate_training_memory(nn.Linear(3, 3), (3,), optimizer=optimizer)
    assert est.optimizer_bytes == copies * 12 * 4


def test_estimate_leaves_the_model_untouched():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    model[3].eval()  # a mixed mode must come back as it was
    stats = model[1].running_mean.clone()
    estimate_training_memory(model, (1, 8, 8))
    assert torch.equal(model[1].running_mean, stats) and int(model[1].num_batches_tracked) == 0
    assert model.training and model[1].training and not model[3].training


def test_max_batch_size_arithmetic():
    est = MemoryEstimate(param_bytes=100, grad_bytes=100, optimizer_bytes=200, activation_bytes_per_sample=50.0,
                         activation_factor=2.0)
    assert est.max_batch_size(400) == 0  # only the fixed part fits
    assert est.max_batch_size(499) == 0 and est.max_batch_size(500) == 1 and est.max_batch_size(1450) == 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    sizes = [estimate_max_batch_size(model, (1, 8, 8), m) for m in (10_000, 10**6, 10**7, 10**8)]
    assert sizes[0] == 0 and sizes == sorted(sizes) and sizes[-1] > 10_000
    full = estimate_training_memory(model, (1, 8, 8))
    bs = estimate_max_batch_size(model, (1, 8, 8), 10**7, safety_fraction=1.0)
    assert full.bytes_for(bs) <= 10**7 < full.bytes_for(bs + 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "rmsprop"}, "`optimizer` must be one of"),
        ({"activation_factor": 0}, "`activation_factor` must be > 0, got 0"),
        ({"probe_batch_size": 0}, "`probe_batch_size` must be an int >= 1, got 0"),
        ({"sample_shape": ()}, "`sample_shape` must be a non-empty sequence of ints >= 1"),
        ({"memory_bytes": 0}, "`memory_bytes` must be > 0, got 0"),
        ({"safety_fraction": 1.5}, "`safety_fraction` must be in \\(0, 1\\], got 1.5"),
    ],
)
def test_memory_validation(kwargs, match):
    args = {"model": nn.Linear(4, 2), "sample_shape": (4,), "memory_bytes": 1e6, **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate_max_batch_size(**args)
