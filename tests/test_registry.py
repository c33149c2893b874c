"""Generic tests every epochwise callback must pass, driven by one registry.

Each entry: (name, factory). The tests check pickling, the state_dict round trip, and that the
callback runs as a drop-in on a foreign LightningModule fed by a plain DataLoader passed to
``trainer.fit`` — also under gradient accumulation and ``precision="bf16-mixed"``.
"""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import epochwise.callbacks as cbs

from conftest import make_dataset, quiet_trainer

REGISTRY: dict[str, object] = {
    "BatchSizeWarmup": lambda: cbs.BatchSizeWarmup(4, 16, interval=1),
    "BatchSizeWarmup-step-maxdev": lambda: cbs.BatchSizeWarmup(4, 16, interval=2, unit="step", max_per_device=8),
    "BatchSizeSchedule": lambda: cbs.BatchSizeSchedule({0: 8, 1: 16}),
    "LRScaling": lambda: cbs.LRScaling("sqrt"),
    "LRWarmup": lambda: cbs.LRWarmup(1, unit="epoch", start_factor=0.1),
    "SampleBasedLRSchedule": lambda: cbs.SampleBasedLRSchedule("onecycle"),
    "LearningCurveMonitor": lambda: cbs.LearningCurveMonitor(),
    "EarlyStopping": lambda: cbs.EarlyStopping(
        "val_loss", patience=1, restore_best_weights=True, min_delta_mode="rel", min_delta=0.01
    ),
    "MultiMetricEarlyStopping": lambda: cbs.MultiMetricEarlyStopping(
        {"val_loss": {"patience": 1}, "val_acc": {"mode": "max", "test": "ttest", "window": 2}},
        stop_when="any", restore_best_weights=True,
    ),
    "TrainingBudget": lambda: cbs.TrainingBudget(max_samples=100, max_flops=1e9),
    "SnapshotEnsemble": lambda: cbs.SnapshotEnsemble(1, 3),
}


class ForeignModule(pl.LightningModule):
    """A user's module that knows nothing about epochwise (dict of logs, its own names)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        self.log("train_acc", (self.net(x).argmax(-1) == y).float().mean(), on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_pickle_and_deepcopy(name):
    callback = REGISTRY[name]()
    clone = pickle.loads(pickle.dumps(callback))
    assert type(clone) is type(callback)
    assert copy.deepcopy(callback).state_dict() == callback.state_dict()


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("setting", ["plain", "accumulate", "bf16"])
def test_drop_in_on_foreign_module(name, setting, tmp_path):
    callback = REGISTRY[name]()
    loader = DataLoader(make_dataset(64), batch_size=8, shuffle=True)
    val = DataLoader(make_dataset(32, seed=5), batch_size=16)
    kwargs = {}
    if setting == "accumulate":
        kwargs["accumulate_grad_batches"] = 2
    if setting == "bf16":
        kwargs["precision"] = "bf16-mixed"
    trainer = quiet_trainer(tmp_path, callbacks=[callback], max_epochs=3, **kwargs)
    module = ForeignModule()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val)
    assert trainer.state.finished
    for p in module.parameters():
        assert torch.isfinite(p).all()
    # state round trip into a fresh instance
    fresh = REGISTRY[name]()
    fresh.load_state_dict(copy.deepcopy(callback.state_dict()))
    restored = fresh.state_dict()
    assert set(restored) == set(callback.state_dict())
