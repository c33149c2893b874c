"""Generic tests every epochwise callback must pass, driven by one registry.

Each entry: a factory and the exact effect the callback must have as a drop-in on a foreign
LightningModule fed by a plain DataLoader passed to ``trainer.fit`` — with the defaults, under
gradient accumulation and under ``precision="bf16-mixed"``. Every entry also pickles, deep-copies
and round-trips its state.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import epochwise.callbacks as cbs
from epochwise.callbacks.schedules import cosine_factor, one_cycle_factor

from conftest import make_dataset, quiet_trainer

LR, N, BATCH, EPOCHS = 0.05, 64, 8, 3


class ForeignModule(pl.LightningModule):
    """A user's module that knows nothing about epochwise; records what each step saw."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        self.steps: list[tuple[int, int, int, int, float]] = []  # epoch, global step, batch_idx, size, lr
        self.epoch_weights: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.steps.append((self.current_epoch, self.global_step, batch_idx, int(x.shape[0]), lr))
        logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def on_train_epoch_end(self):
        self.epoch_weights[self.current_epoch] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    def sizes(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for epoch, _, _, n, _ in self.steps:
            out.setdefault(epoch, []).append(n)
        return out

    def lrs(self) -> list[float]:
        return [lr for *_, lr in self.steps]


def epoch_sizes(size: int) -> list[int]:
    full, rest = divmod(N, size)
    return [size] * full + ([rest] if rest else [])


def samples_before(module: ForeignModule) -> list[int]:
    out, seen = [], 0
    for *_, n, _ in module.steps:
        out.append(seen)
        seen += n
    return out


def restored_best(callback, module: ForeignModule) -> None:
    epoch = callback.restored_epoch
    assert epoch is not None and epoch in module.epoch_weights
    for key, value in module.state_dict().items():
        assert torch.equal(value, module.epoch_weights[epoch][key]), key


@dataclass
class Entry:
    make: Callable[[], object]
    check: Callable[[object, ForeignModule, pl.Trainer, int], None]  # (callback, module, trainer, accumulation)
    companions: Callable[[object], list] | None = None  # callbacks it needs beside it in the Trainer


def companions_of(entry: Entry, callback: object) -> list:
    return entry.companions(callback) if entry.companions is not None else []


def check_warmup(cb, m, t, acc):
    assert m.sizes() == {e: epoch_sizes(s) for e, s in enumerate([4, 8, 16])}


def check_step_warmup(cb, m, t, acc):
    per_step: dict[int, int] = {}
    for _, step, _, n, _ in m.steps:
        per_step[step] = per_step.get(step, 0) + n
    ends = {max(s for e, s, *_ in m.steps if e == epoch) for epoch in range(EPOCHS)}
    for step, n in per_step.items():
        if step not in ends:  # the last step of an epoch may run out of samples
            assert n == cb.schedule(step) * acc, step
    assert max(n for *_, n, _ in m.steps) <= 8


def check_schedule(cb, m, t, acc):
    assert m.sizes() == {0: epoch_sizes(8), 1: epoch_sizes(16), 2: epoch_sizes(16)}


def check_constant_lr(cb, m, t, acc):
    assert m.lrs() == pytest.approx([LR] * len(m.steps))


def check_lr_warmup(cb, m, t, acc):
    per_epoch = N // BATCH
    want = [LR * (0.1 + 0.9 * min(1.0, e + i / per_epoch)) for e, _, i, _, _ in m.steps]
    assert m.lrs() == pytest.approx(want)


def check_samples_schedule(cb, m, t, acc):
    total = EPOCHS * N
    want = [LR * one_cycle_factor(s / total) for s in samples_before(m)]
    assert m.lrs() == pytest.approx(want)


def check_curves(cb, m, t, acc):
    assert cb.epochs == list(range(EPOCHS)) and len(cb.history["val_loss"]) == EPOCHS
    assert cb.history["val_loss"][-1] == pytest.approx(float(t.callback_metrics["val_loss"]))
    assert Path(cb.png_path).is_file()


def check_early_stopping(cb, m, t, acc):
    restored_best(cb, m)


def check_budget(cb, m, t, acc):
    # 100 samples is reached by the 13th batch of 8 (104 samples): the fit ends there
    assert len(m.steps) == 13 and cb.samples_seen == 104 and cb.stopped


def check_snapshots(cb, m, t, acc):
    per_epoch = N // BATCH
    want = [LR * cosine_factor(i / per_epoch) for _, _, i, _, _ in m.steps]
    assert m.lrs() == pytest.approx(want)
    assert [Path(p).name for p in cb.snapshot_paths] == ["snapshot_0.pt", "snapshot_1.pt", "snapshot_2.pt"]


def check_micro_batch(cb, m, t, acc):
    # nothing ran out of memory: every batch ran whole, once, at the constant LR; the module is given back
    assert m.sizes() == {e: epoch_sizes(BATCH) for e in range(EPOCHS)} and m.lrs() == pytest.approx([LR] * len(m.steps))
    assert cb.size is None and cb.ooms == 0 and cb.state_dict()["size"] is None
    assert "training_step" not in m.__dict__ and "backward" not in m.__dict__


def loader_batches(m: ForeignModule) -> dict[int, list[int]]:
    """The loader's batch sizes per epoch: the split source runs the user's step on parts of one batch
    (same ``batch_idx``), so the parts are summed back."""
    sums: dict[tuple[int, int], int] = {}
    for epoch, _, batch_idx, n, _ in m.steps:
        sums[(epoch, batch_idx)] = sums.get((epoch, batch_idx), 0) + n
    out: dict[int, list[int]] = {}
    for (epoch, _), n in sorted(sums.items()):
        out.setdefault(epoch, []).append(n)
    return out


def check_noise_scale(cb, m, t, acc):
    # measures only: batches and LR untouched, the training step given back; the value reaches callback_metrics
    assert loader_batches(m) == {e: epoch_sizes(BATCH) for e in range(EPOCHS)}
    assert m.lrs() == pytest.approx([LR] * len(m.steps))
    assert cb.last_source == ("accumulation" if acc > 1 else "split")
    value = cb.value()
    assert value is not None and float(t.callback_metrics["gns/b_simple"]) == pytest.approx(value)
    assert "training_step" not in m.__dict__


def check_adaptive(cb, m, t, acc):
    decisions = cb.decisions
    assert sorted(decisions) == list(range(EPOCHS)) and decisions[0] == 8
    assert all(4 <= n <= 16 for n in decisions.values())
    assert loader_batches(m) == {e: epoch_sizes(decisions[e]) for e in range(EPOCHS)}  # each epoch at its decision
    assert cb.noise_scale.value() is not None and m.lrs() == pytest.approx([LR] * len(m.steps))


REGISTRY: dict[str, Entry] = {
    "AdaptiveBatchSize": Entry(
        lambda: cbs.AdaptiveBatchSize(4, 16, start=8, noise_scale=cbs.GradientNoiseScale(every_n_steps=1)),
        check_adaptive, companions=lambda cb: [cb.noise_scale]),
    "GradientNoiseScale": Entry(lambda: cbs.GradientNoiseScale(every_n_steps=1), check_noise_scale),
    "AutoMicroBatch": Entry(lambda: cbs.AutoMicroBatch(), check_micro_batch),
    "BatchSizeWarmup": Entry(lambda: cbs.BatchSizeWarmup(4, 16, interval=1), check_warmup),
    "BatchSizeWarmup-step-maxdev": Entry(
        lambda: cbs.BatchSizeWarmup(4, 16, interval=2, unit="step", max_per_device=8), check_step_warmup),
    "BatchSizeSchedule": Entry(lambda: cbs.BatchSizeSchedule({0: 8, 1: 16}), check_schedule),
    "LRScaling": Entry(lambda: cbs.LRScaling("sqrt"), check_constant_lr),
    "LRMonitor": Entry(lambda: cbs.LRMonitor(), check_constant_lr),
    "LRWarmup": Entry(lambda: cbs.LRWarmup(1, unit="epoch", start_factor=0.1), check_lr_warmup),
    "SampleBasedLRSchedule": Entry(lambda: cbs.SampleBasedLRSchedule("onecycle"), check_samples_schedule),
    "LearningCurveMonitor": Entry(lambda: cbs.LearningCurveMonitor(), check_curves),
    "EarlyStopping": Entry(lambda: cbs.EarlyStopping(
        "val_loss", patience=1, restore_best_weights=True, min_delta_mode="rel", min_delta=0.01), check_early_stopping),
    "MultiMetricEarlyStopping": Entry(lambda: cbs.MultiMetricEarlyStopping(
        {"val_loss": {"patience": 1}, "val_acc": {"mode": "max", "test": "ttest", "window": 2}},
        stop_when="any", restore_best_weights=True), check_early_stopping),
    "TrainingBudget": Entry(lambda: cbs.TrainingBudget(max_samples=100, max_flops=1e12), check_budget),
    "SnapshotEnsemble": Entry(lambda: cbs.SnapshotEnsemble(1, EPOCHS), check_snapshots),
}


def test_every_public_callback_is_in_the_registry():
    callbacks = {name for name in cbs.__all__ if isinstance(getattr(cbs, name), type)
                 and issubclass(getattr(cbs, name), pl.Callback)}
    abstract = {"BatchSizeController", "LRFactorCallback"}
    # these need data of their own shape (images to resize, token sequences, per-sample scores) and
    # have their own exact tests: tests/test_resizing.py, test_seq_len.py, test_curriculum.py,
    # test_one_cycle.py, and the engine matrix
    own_data = {"ProgressiveResizing", "SequenceLengthWarmup", "CurriculumSampling", "OneCycleBatchLR"}
    assert callbacks - abstract <= {name.split("-")[0] for name in REGISTRY} | own_data


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_pickle_and_deepcopy(name):
    callback = REGISTRY[name].make()
    clone = pickle.loads(pickle.dumps(callback))
    assert type(clone) is type(callback)
    assert copy.deepcopy(callback).state_dict() == callback.state_dict()


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("setting", ["plain", "accumulate", "bf16"])
def test_drop_in_on_foreign_module(name, setting, tmp_path):
    entry = REGISTRY[name]
    callback = entry.make()
    torch.manual_seed(0)
    loader = DataLoader(make_dataset(N), batch_size=BATCH, shuffle=True)
    val = DataLoader(make_dataset(32, seed=5), batch_size=16)
    kwargs, acc = {}, 1
    if setting == "accumulate":
        kwargs["accumulate_grad_batches"] = acc = 2
    if setting == "bf16":
        kwargs["precision"] = "bf16-mixed"
    trainer = quiet_trainer(tmp_path, callbacks=[*companions_of(entry, callback), callback], max_epochs=EPOCHS, **kwargs)
    module = ForeignModule()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val)
    entry.check(callback, module, trainer, acc)
    # state round trip into a fresh instance
    fresh = entry.make()
    fresh.load_state_dict(copy.deepcopy(callback.state_dict()))
    assert set(fresh.state_dict()) == set(callback.state_dict())
