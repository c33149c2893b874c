"""SnapshotEnsemble: the cyclic cosine schedule, snapshots, stopping, resume and the evaluation."""

from __future__ import annotations

import math
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from epochwise.callbacks._checks import ConfigurationError
from epochwise.callbacks.ensembles import (
    SnapshotEnsemble,
    evaluate_snapshot_ensemble,
    load_snapshot_state,
    snapshot_lr_factor,
)
from epochwise.callbacks.lr import LRWarmup
from epochwise.callbacks.schedules import linear_warmup_factor

from conftest import MemoryLogger, make_dataset, quiet_trainer

BATCHES_PER_EPOCH = 5


class TwoGroups(pl.LightningModule):
    """Two param groups with different LRs; records the LRs each training step saw."""

    def __init__(self, scheduler: bool = False, lr_scale: float = 1.0) -> None:
        super().__init__()
        self.lr_scale = lr_scale
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)
        self.scheduler = scheduler
        self.lrs: list[tuple[int, int, float, float]] = []

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

    def training_step(self, batch, batch_idx):
        groups = self.trainer.optimizers[0].param_groups
        self.lrs.append((self.current_epoch, batch_idx, groups[0]["lr"], groups[1]["lr"]))
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": self.a.parameters(), "lr": 0.1 * self.lr_scale},
                               {"params": self.b.parameters(), "lr": 0.02 * self.lr_scale}])
        if self.scheduler:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}
        return opt

    def train_dataloader(self):
        return DataLoader(make_dataset(8 * BATCHES_PER_EPOCH), batch_size=8)


class WeightRecorder(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True



# --------------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "epoch, fraction, expected",
    [
        (0, 0.0, 1.0),
        (1, 0.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 3))),  # 0.775
        (2, 0.0, 0.1 + 0.45 * (1 + math.cos(2 * math.pi / 3))),  # 0.325
        (2, 0.5, 0.1 + 0.45 * (1 + math.cos(2.5 * math.pi / 3))),
        (3, 0.0, 1.0),  # restart
        (7, 0.0, 0.775),
    ],
)
def test_snapshot_lr_factor_table(epoch, fraction, expected):
    assert snapshot_lr_factor(epoch, 3, min_lr_factor=0.1, epoch_fraction=fraction) == pytest.approx(expected)


def test_snapshot_lr_factor_shape():
    points = [snapshot_lr_factor(e, 4, 0.05, f / 10) for e in range(4) for f in range(10)]
    assert all(a > b for a, b in zip(points[:-1], points[1:], strict=True))  # falls within a cycle
    assert points[-1] == pytest.approx(0.05, abs=0.01)  # reaches about min_lr_factor at its end
    assert snapshot_lr_factor(4, 4, 0.05) == 1.0
    assert snapshot_lr_factor(5, 1) == 1.0  # one-epoch cycles restart every epoch


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epoch": -1}, "`epoch` must be an int >= 0, got -1"),
        ({"cycle_epochs": 0}, "`cycle_epochs` must be an int >= 1, got 0"),
        ({"epoch_fraction": 1.0}, "`epoch_fraction` must be a number in \\[0, 1\\), got 1.0"),
    ],
)
def test_snapshot_lr_factor_validation(kwargs, match):
    args = {"epoch": 0, "cycle_epochs": 2, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        snapshot_lr_factor(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cycle_epochs": 0}, "`cycle_epochs` must be an int >= 1, got 0"),
        ({"num_cycles": 2.0}, "`num_cycles` must be an int >= 1, got 2.0"),
        ({"min_lr_factor": 1.5}, "`min_lr_factor` must be a number in \\[0, 1\\], got 1.5"),
        ({"filename": "snap.pt"}, "`filename` must be a format string containing '\\{cycle\\}'"),
        ({"filename": "{cycle}_{epoch}.pt"}, "`filename` must format with only `cycle`"),
    ],
)
def test_callback_validation(kwargs, match):
    args = {"cycle_epochs": 2, "num_cycles": 2, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        SnapshotEnsemble(**args)


# --------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------
def expected_lr(base: float, epoch: int, batch_idx: int, cycle: int, min_lr: float) -> float:
    return base * snapshot_lr_factor(epoch, cycle, min_lr, batch_idx / BATCHES_PER_EPOCH)


def test_sets_every_group_lr_per_batch_saves_snapshots_and_stops(tmp_path):
    snap = SnapshotEnsemble(cycle_epochs=2, num_cycles=3, min_lr_factor=0.1)
    recorder = WeightRecorder()
    model = TwoGroups()
    trainer = quiet_trainer(tmp_path, max_epochs=50, callbacks=[snap, recorder])
    trainer.fit(model)
    assert trainer.current_epoch == 6  # stopped after 3 cycles x 2 epochs
    assert len(model.lrs) == 6 * BATCHES_PER_EPOCH
    for epoch, batch_idx, lr0, lr1 in model.lrs:
        assert lr0 == pytest.approx(expected_lr(0.1, epoch, batch_idx, 2, 0.1))
        assert lr1 == pytest.approx(expected_lr(0.02, epoch, batch_idx, 2, 0.1))
    # a snapshot at the end of epochs 1, 3, 5, in the default folder (no logger: default_root_dir)
    assert snap.snapshot_paths == [str(tmp_path / "snapshots" / f"snapshot_{c}.pt") for c in range(3)]
    for cycle, epoch in enumerate((1, 3, 5)):
        saved = torch.load(snap.snapshot_paths[cycle], weights_only=True)
        assert saved["cycle"] == cycle and saved["epoch"] == epoch
        assert all(torch.equal(saved["state_dict"][k], v) for k, v in recorder.weights[epoch].items())
    assert not list((tmp_path / "snapshots").glob("*.tmp"))


def test_max_epochs_too_small_is_an_error(tmp_path):
    snap = SnapshotEnsemble(cycle_epochs=3, num_cycles=2)
    with pytest.raises(ValueError, match="max_epochs=5.*Trainer\\(max_epochs=6\\)"):
        quiet_trainer(tmp_path, max_epochs=5, callbacks=[snap]).fit(TwoGroups())


def test_composes_with_the_module_scheduler(tmp_path):
    # the scheduler keeps stepping on its own values (StepLR halves every epoch); the cycle multiplies
    snap = SnapshotEnsemble(cycle_epochs=2, num_cycles=2, dirpath=tmp_path, min_lr_factor=0.1)
    model = TwoGroups(scheduler=True)
    quiet_trainer(tmp_path, max_epochs=4, callbacks=[snap]).fit(model)
    for epoch, batch_idx, lr0, lr1 in model.lrs:
        assert lr0 == pytest.approx(expected_lr(0.1 * 0.5**epoch, epoch, batch_idx, 2, 0.1))
        assert lr1 == pytest.approx(expected_lr(0.02 * 0.5**epoch, epoch, batch_idx, 2, 0.1))


@pytest.mark.parametrize("order", ["warmup-first", "snapshot-first"])
def test_defect4_composes_with_lr_warmup_in_any_order(tmp_path, order):
    warmup = LRWarmup(duration=2, unit="epoch", start_factor=0.1)
    snap = SnapshotEnsemble(cycle_epochs=2, num_cycles=2, dirpath=tmp_path, min_lr_factor=0.1)
    model = TwoGroups()
    callbacks = [warmup, snap] if order == "warmup-first" else [snap, warmup]
    quiet_trainer(tmp_path, max_epochs=4, callbacks=callbacks).fit(model)
    assert model.lrs[0][2] == pytest.approx(0.01)  # 0.1 x warmup 0.1 x cycle 1, not 0.1
    for epoch, batch_idx, lr0, lr1 in model.lrs:
        warm = linear_warmup_factor(epoch + batch_idx / BATCHES_PER_EPOCH, 2, 0.1)
        assert lr0 == pytest.approx(warm * expected_lr(0.1, epoch, batch_idx, 2, 0.1))
        assert lr1 == pytest.approx(warm * expected_lr(0.02, epoch, batch_idx, 2, 0.1))


def test_defect7_second_fit_uses_its_own_learning_rates(tmp_path):
    snap = SnapshotEnsemble(cycle_epochs=1, num_cycles=2, dirpath=tmp_path / "a", min_lr_factor=0.1)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[snap]).fit(TwoGroups())
    snap.dirpath = str(tmp_path / "b")
    second = TwoGroups(lr_scale=5.0)  # groups at 0.5 and 0.1
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[snap]).fit(second)
    for epoch, batch_idx, lr0, lr1 in second.lrs:
        assert lr0 == pytest.approx(expected_lr(0.5, epoch, batch_idx, 1, 0.1))
        assert lr1 == pytest.approx(expected_lr(0.1, epoch, batch_idx, 1, 0.1))
    assert snap.snapshot_paths == [str(tmp_path / "b" / f"snapshot_{c}.pt") for c in range(2)]


def test_logs_the_cycle_when_it_changes(tmp_path):
    logger = MemoryLogger()
    snap = SnapshotEnsemble(cycle_epochs=2, num_cycles=3, dirpath=tmp_path)
    quiet_trainer(tmp_path, max_epochs=6, callbacks=[snap], logger=logger, log_every_n_steps=50).fit(TwoGroups())
    rows = [(step, m["snapshot_ensemble/cycle"]) for step, m in logger.rows if "snapshot_ensemble/cycle" in m]
    assert rows == [(0, 0.0), (10, 1.0), (20, 2.0)]  # 5 steps per epoch, 2 epochs per cycle


def test_resume_mid_cycle_continues_the_schedule(tmp_path):
    full_model = TwoGroups()
    quiet_trainer(tmp_path / "full", max_epochs=6, callbacks=[SnapshotEnsemble(3, 2, dirpath=tmp_path / "a")]).fit(
        full_model
    )

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = SnapshotEnsemble(3, 2, dirpath=tmp_path / "b")
    interrupt = StopAfter(epochs=4)  # mid-cycle (cycle 1 = epochs 3-5)
    quiet_trainer(tmp_path, max_epochs=6, callbacks=[first, interrupt, ckpt], enable_checkpointing=True).fit(
        TwoGroups()
    )
    assert len(first.snapshot_paths) == 1
    resumed = SnapshotEnsemble(3, 2, dirpath=tmp_path / "b")
    resumed_model = TwoGroups()
    quiet_trainer(tmp_path, max_epochs=6, callbacks=[resumed]).fit(resumed_model, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.snapshot_paths == [str(tmp_path / "b" / "snapshot_0.pt"), str(tmp_path / "b" / "snapshot_1.pt")]
    expected = full_model.lrs[4 * BATCHES_PER_EPOCH :]
    assert [r[:2] for r in resumed_model.lrs] == [r[:2] for r in expected]
    assert [r[2:] for r in resumed_model.lrs] == [pytest.approx(r[2:]) for r in expected]


def test_state_dict_tolerant_and_pickle():
    snap = SnapshotEnsemble(2, 2)
    snap.load_state_dict({})
    assert snap.snapshot_paths == [] and snap.state_dict()["lr_path"] is None
    snap.load_state_dict({"snapshot_paths": ["a.pt"]})
    clone = pickle.loads(pickle.dumps(snap))
    assert clone.snapshot_paths == ["a.pt"] and clone.state_key == snap.state_key
    assert SnapshotEnsemble(2, 3).state_key != snap.state_key


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def _save(net: nn.Module, path) -> str:
    torch.save({"state_dict": net.state_dict()}, path)
    return str(path)


def test_evaluate_snapshot_ensemble_by_hand(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = torch.randint(0, 3, (64,))
    loader = DataLoader(list(zip(x, y, strict=True)), batch_size=16)
    nets = [nn.Linear(4, 3) for _ in range(3)]
    paths = [_save(n, tmp_path / f"s{i}.pt") for i, n in enumerate(nets)]
    model = nn.Linear(4, 3)
    model.train()
    own = {k: v.clone() for k, v in model.state_dict().items()}

    out = evaluate_snapshot_ensemble(model, paths, loader)

    with torch.no_grad():
        probs = [n(x).softmax(-1) for n in nets]
    accs = [(p.argmax(-1) == y).float().mean().item() for p in probs]
    mean = torch.stack(probs).mean(0)
    assert out["snapshot_acc"] == pytest.approx(accs)
    assert out["ensemble_acc"] == pytest.approx((mean.argmax(-1) == y).float().mean().item())
    assert out["best_snapshot_acc"] == max(accs)
    assert out["ensemble_nll"] == pytest.approx(-mean[torch.arange(64), y].log().mean().item(), rel=1e-5)
    assert out["ensemble_nll"] <= sum(out["snapshot_nll"]) / 3 + 1e-6  # Jensen
    assert (out["num_snapshots"], out["num_samples"]) == (3, 64)
    # the model's own weights and mode are back
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items()) and model.training
    assert set(load_snapshot_state(paths[0])) == {"weight", "bias"}


def test_evaluate_rejects_empty_and_shuffled(tmp_path):
    net = nn.Linear(4, 3)
    path = _save(net, tmp_path / "s.pt")
    torch.manual_seed(0)
    data = list(zip(torch.randn(64, 4), torch.randint(0, 3, (64,)), strict=True))
    with pytest.raises(ValueError, match="`snapshot_paths` must name at least one snapshot"):
        evaluate_snapshot_ensemble(net, [], DataLoader(data))
    shuffled = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="same order on every pass"):
        evaluate_snapshot_ensemble(net, [path, path], shuffled)


def test_digits_snapshot_ensemble_end_to_end(tmp_path, one_thread):
    """Weak, deterministic check; the accuracy comparison is measured by scripts/snapshot_ensemble.py."""
    from epochwise.datamodules import DigitsDataModule
    from epochwise.modules import MLP, ImageClassifier

    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=32, image_size=8)
    model = ImageClassifier(backbone=MLP(input_size=8, hidden=(128,)), optimizer="sgd", lr=0.2)
    snap = SnapshotEnsemble(cycle_epochs=2, num_cycles=3)
    logger = MemoryLogger()
    trainer = quiet_trainer(tmp_path, max_epochs=6, callbacks=[snap], logger=logger, deterministic=True)
    trainer.fit(model, dm)
    result = snap.ensemble_test(trainer, model, datamodule=dm)
    assert result["num_snapshots"] == 3 and result["num_samples"] == len(dm.test_set)
    assert min(result["snapshot_acc"]) > 0.85 and result["ensemble_acc"] > 0.85
    assert result["ensemble_nll"] <= sum(result["snapshot_nll"]) / 3 + 1e-6
    assert logger.series("snapshot_ensemble/ensemble_acc") == [pytest.approx(result["ensemble_acc"])]
    assert len(logger.series("snapshot_ensemble/snapshot_2_acc")) == 1
    assert sorted(set(logger.series("snapshot_ensemble/cycle"))) == [0.0, 1.0, 2.0]
    factors = logger.series("lr_factor/snapshot")  # logged by the LR path at Lightning's cadence
    assert factors and all(0.0 <= f <= 1.0 for f in factors)
