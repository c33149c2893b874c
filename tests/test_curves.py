"""LearningCurveMonitor: history, derived quantities, the diagnosis rule and the plot."""

from __future__ import annotations

import math
import pickle
import random

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from epochwise.callbacks._checks import ConfigurationError
from epochwise.callbacks.curves import (
    DIAGNOSES,
    DIAGNOSIS_CODES,
    LearningCurveMonitor,
    diagnose,
    ema_series,
    plot_learning_curves,
)

from conftest import MemoryLogger, quiet_trainer

NAN = math.nan


class ScriptedCurves(pl.LightningModule):
    """Logs ``train_*`` from the training step and ``val_*`` from validation, scripted per epoch."""

    def __init__(self, **seqs: list[float]) -> None:
        super().__init__()
        self.seqs = seqs
        self.layer = nn.Linear(2, 1)

    def _log(self, prefix: str) -> None:
        for name, seq in self.seqs.items():
            if name.startswith(prefix):
                self.log(name, float(seq[min(self.current_epoch, len(seq) - 1)]), on_step=False, on_epoch=True)

    def training_step(self, batch, batch_idx):
        self._log("train_")
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self._log("val_")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)


def make_trainer(tmp_path, max_epochs: int, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, max_epochs=max_epochs, **kwargs)


def labels(history: dict[str, list[float]], **kwargs) -> list[str]:
    n = len(history["val_loss"])
    return [diagnose({k: v[: i + 1] for k, v in history.items()}, **kwargs)[0] for i in range(n)]


# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------
def test_ema_series():
    assert ema_series([3.0, 1.0, 2.0], alpha=1.0) == [3.0, 1.0, 2.0]
    assert ema_series([NAN, 2.0, 4.0, NAN, 0.0], alpha=0.5)[1:] == [2.0, 3.0, 3.0, 1.5]
    assert math.isnan(ema_series([NAN, 2.0], alpha=0.5)[0])
    assert ema_series([], alpha=0.3) == []
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigurationError, match=f"`alpha` must be a number in \\(0, 1\\], got {bad}"):
            ema_series([1.0], bad)


def test_diagnosis_codes_documented_order():
    assert DIAGNOSES == ("underfitting", "improving", "plateau", "overfitting")
    assert DIAGNOSIS_CODES == {"underfitting": 0, "improving": 1, "plateau": 2, "overfitting": 3}


TRAIN = [2.0, 0.8, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05, 0.03, 0.02, 0.01]


@pytest.mark.parametrize(
    "val, expected",
    [
        # falling by > 1% per epoch all the way: improving after the first (underfitting) epoch
        ([1.0, 0.8, 0.65, 0.55, 0.47, 0.41, 0.36, 0.32, 0.29, 0.26, 0.24, 0.22], "uiiiiiiiiiii"),
        # flat from epoch 4: the EMA (alpha 0.5) keeps falling > 1% per epoch until epoch 7
        ([1.0, 0.8, 0.65, 0.55, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "uiiiiiippppp"),  # 3 epochs without a new best
        # raw minimum at epoch 4, EMA minimum (0.502) at epoch 6; the EMA is > 2% above it at
        # epochs 7, 8, 9, so overfitting from epoch 9 on; plateau while the rise is short
        ([1.0, 0.8, 0.6, 0.5, 0.45, 0.47, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75], "uiiiiipppooo"),
    ],
)
def test_diagnose_scripted(val, expected):
    got = "".join(label[0] for label in labels({"train_loss": TRAIN, "val_loss": val}))
    assert got == expected


def test_overfitting_needs_falling_train_loss_and_a_lasting_rise():
    val = [1.0, 0.8, 0.6, 0.5, 0.45, 0.47, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75]
    # train loss rises with the val loss (unstable training, not overfitting): plateau
    rising_train = TRAIN[:4] + [0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert "overfitting" not in labels({"train_loss": rising_train, "val_loss": val})
    # a short bump that comes back down never becomes overfitting
    bump = [1.0, 0.8, 0.6, 0.5, 0.45, 0.5, 0.52, 0.44, 0.42, 0.41, 0.40, 0.39]
    assert "overfitting" not in labels({"train_loss": TRAIN, "val_loss": bump})
    # more smoothing or a larger margin delays the diagnosis
    assert labels({"train_loss": TRAIN, "val_loss": val}).index("overfitting") == 9
    assert labels({"train_loss": TRAIN, "val_loss": val}, overfit_epochs=5).index("overfitting") == 11
    assert "overfitting" not in labels({"train_loss": TRAIN, "val_loss": val}, overfit_margin=0.5)


def test_underfitting_rule():
    slow = [2.3, 2.1, 1.9, 1.7, 1.5, 1.3, 1.1, 1.0]
    val = [2.2, 2.0, 1.8, 1.6, 1.45, 1.3, 1.15, 1.05]
    got = labels({"train_loss": slow, "val_loss": val})
    assert got[:5] == ["underfitting"] * 5  # train loss still > 0.5 x 2.3
    assert got[-1] == "improving"  # 1.0 < 1.15
    assert labels({"train_loss": slow, "val_loss": val}, underfit_ratio=0.0)[0] == "improving"


def test_without_train_loss_and_with_missing_val():
    val = [1.0, 0.8, 0.6, 0.5, 0.45, 0.47, 0.5, 0.55, 0.6, 0.65]
    got = labels({"val_loss": val})
    assert got[0] == "improving" and got[-1] == "overfitting"  # judged on the val loss alone
    # epochs without a val loss are skipped; the label is that of the last epoch with one
    sparse = {"train_loss": TRAIN[:5], "val_loss": [1.0, NAN, 0.7, NAN, 0.5]}
    assert diagnose(sparse)[0] == "improving"
    with pytest.raises(ValueError, match="at least one finite 'val_loss'"):
        diagnose({"train_loss": [1.0], "val_loss": [NAN]})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ema_alpha": 0.0}, "`ema_alpha` must be a number in \\(0, 1\\], got 0.0"),
        ({"overfit_margin": -0.1}, "`overfit_margin` must be a finite number >= 0, got -0.1"),
        ({"overfit_epochs": 0}, "`overfit_epochs` must be an int >= 1, got 0"),
        ({"plateau_tol": NAN}, "`plateau_tol` must be a finite number >= 0, got nan"),
        ({"underfit_ratio": 1.0}, "`underfit_ratio` must be a number in \\[0, 1\\), got 1.0"),
    ],
)
def test_diagnosis_argument_validation(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        diagnose({"val_loss": [1.0]}, **kwargs)
    with pytest.raises(ConfigurationError, match=match):
        LearningCurveMonitor(**kwargs)


def test_overfitting_never_before_val_loss_turns_up_random_curves():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 30)
        val = [rng.uniform(0.1, 1.0)]
        train = [rng.uniform(0.5, 2.0)]
        for _ in range(n - 1):
            val.append(max(0.01, val[-1] * rng.uniform(0.8, 1.15)))
            train.append(train[-1] * rng.uniform(0.7, 1.05))
        alpha = rng.choice([0.2, 0.5, 1.0])
        for i, label in enumerate(labels({"train_loss": train, "val_loss": val}, ema_alpha=alpha)):
            if label == "overfitting":
                # some val loss at or before i exceeded every val loss before it after a minimum
                assert any(val[j] > min(val[:j]) for j in range(1, i + 1))
                assert train[i] < max(train[: i + 1])


# --------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------
SEQS = {
    "train_loss": [2.0, 1.0, 0.6, 0.4, 0.3, 0.2],
    "val_loss": [1.5, 0.9, 0.7, 0.65, 0.7, 0.8],
    "train_acc": [0.3, 0.6, 0.8, 0.9, 0.95, 0.97],
    "val_acc": [0.35, 0.6, 0.75, 0.8, 0.79, 0.78],
}


def test_monitor_logs_derived_quantities(tmp_path):
    logger = MemoryLogger()
    mon = LearningCurveMonitor(dirpath=str(tmp_path), ema_alpha=0.5)
    make_trainer(tmp_path, 6, callbacks=[mon], logger=logger).fit(ScriptedCurves(**SEQS))
    assert mon.epochs == list(range(6))
    for name, seq in SEQS.items():
        assert mon.history[name] == pytest.approx(seq)
    gap_loss = [v - t for v, t in zip(SEQS["val_loss"], SEQS["train_loss"], strict=True)]
    gap_acc = [t - v for t, v in zip(SEQS["train_acc"], SEQS["val_acc"], strict=True)]
    assert logger.series("curves/gap_loss") == pytest.approx(gap_loss, abs=1e-6)
    assert logger.series("curves/gap_acc") == pytest.approx(gap_acc, abs=1e-6)
    ema = ema_series(SEQS["val_loss"], 0.5)
    assert logger.series("curves/val_loss_ema") == pytest.approx(ema, abs=1e-6)
    assert logger.series("curves/val_loss_ema_slope") == pytest.approx(
        [b - a for a, b in zip(ema[:-1], ema[1:], strict=True)], abs=1e-6
    )
    assert logger.series("curves/best_epoch") == [0, 1, 2, 3, 3, 3]
    assert mon.diagnoses == labels(SEQS, ema_alpha=0.5)
    assert logger.series("curves/diagnosis") == [DIAGNOSIS_CODES[d] for d in mon.diagnoses]
    assert mon.diagnosis == mon.diagnoses[-1] and len(mon.diagnosis_reasons) == 6
    assert mon.png_path == str(tmp_path / "learning_curves.png")
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp*"))


def test_monitor_without_val_loss_logs_no_diagnosis(tmp_path):
    logger = MemoryLogger()
    mon = LearningCurveMonitor(dirpath=str(tmp_path), metrics=("train_loss",))
    make_trainer(tmp_path, 2, callbacks=[mon], logger=logger).fit(ScriptedCurves(train_loss=[1.0, 0.5]))
    assert mon.diagnoses == [None, None] and mon.diagnosis is None
    assert not logger.series("curves/diagnosis")


def test_monitor_state_roundtrip_and_resume(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = LearningCurveMonitor(dirpath=str(tmp_path))
    make_trainer(tmp_path, 3, callbacks=[first, ckpt], enable_checkpointing=True).fit(ScriptedCurves(**SEQS))
    resumed = LearningCurveMonitor(dirpath=str(tmp_path))
    make_trainer(tmp_path, 6, callbacks=[resumed]).fit(ScriptedCurves(**SEQS), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.epochs == list(range(6))
    assert resumed.history["val_loss"] == pytest.approx(SEQS["val_loss"])
    assert resumed.diagnoses == labels(SEQS)

    fresh = LearningCurveMonitor()
    fresh.load_state_dict(pickle.loads(pickle.dumps(resumed.state_dict())))
    assert fresh.diagnoses == resumed.diagnoses and fresh.val_loss_ema == pytest.approx(resumed.val_loss_ema)
    fresh.load_state_dict({})  # tolerant of missing keys
    assert fresh.epochs == [] and fresh.diagnoses == []


def test_monitor_argument_validation():
    with pytest.raises(ConfigurationError, match="`filename` must end with '.png'"):
        LearningCurveMonitor(filename="curves.jpg")
    with pytest.raises(ConfigurationError, match="`metrics` must name at least one metric"):
        LearningCurveMonitor(metrics=())
    assert LearningCurveMonitor(metrics="val_loss").metrics == ("val_loss",)  # one name, not its letters


def test_defect6_validation_values_only_for_epochs_with_validation(tmp_path):
    # validation runs at epochs 1, 3, 5; the 9.9 values are never logged
    seqs = {"train_loss": [1.0, 0.4, 0.3, 0.2, 0.15, 0.1], "val_loss": [9.9, 0.9, 9.9, 0.7, 9.9, 0.5]}
    logger = MemoryLogger()
    mon = LearningCurveMonitor(dirpath=str(tmp_path), underfit_ratio=0.0)
    make_trainer(tmp_path, 6, callbacks=[mon], logger=logger, check_val_every_n_epoch=2).fit(ScriptedCurves(**seqs))
    val = mon.history["val_loss"]
    assert [math.isnan(v) for v in val] == [True, False, True, False, True, False]  # not [nan, .9, .9, .7, .7, .5]
    assert [val[1], val[3], val[5]] == pytest.approx([0.9, 0.7, 0.5])
    assert mon.history["train_loss"] == pytest.approx(seqs["train_loss"])
    # no plateau from a repeated stale value: diagnosed only when validation ran
    assert mon.diagnoses == [None, "improving", None, "improving", None, "improving"]
    assert logger.series("curves/val_loss_ema") == pytest.approx([0.9, 0.8, 0.65])
    assert logger.series("curves/val_loss_ema_slope") == pytest.approx([-0.1, -0.15])
    assert logger.series("curves/best_epoch") == [1, 3, 5]


def test_defect7_second_fit_starts_a_new_history(tmp_path):
    mon = LearningCurveMonitor(dirpath=str(tmp_path))
    for _ in range(2):
        make_trainer(tmp_path, 3, callbacks=[mon]).fit(ScriptedCurves(**SEQS))
        assert mon.epochs == [0, 1, 2] and mon.history["val_loss"] == pytest.approx(SEQS["val_loss"][:3])
        assert len(mon.diagnoses) == 3


@pytest.mark.slow
def test_defect10_two_process_ddp_without_dirpath_writes_into_the_logger_folder(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    mon = LearningCurveMonitor()  # no dirpath: the run folder comes from the logger, on rank 0 only
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_epochs=2, callbacks=[mon],
                            logger=CSVLogger(str(tmp_path), name="run"))
    trainer.fit(ScriptedCurves(**SEQS))  # used to end with "Connection closed by peer"
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert [str(p) for p in written] == ["run/version_0/learning_curves.png"]


def test_plot_draws_ema_and_title(tmp_path):
    path = plot_learning_curves(
        {"train_loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "val_loss_ema": [1.1, 0.9]},
        tmp_path / "c.png",
        title="diagnosis after epoch 2: improving",
    )
    assert path == str(tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# acceptance: a wide MLP overfits a small slice of digits
# --------------------------------------------------------------------------------------------

def test_acceptance_digits_overfitting_reported_after_val_loss_turns_up(tmp_path, one_thread):
    from epochwise.datamodules import DigitsDataModule
    from epochwise.modules import MLP, ImageClassifier

    pl.seed_everything(0)
    # 20% of the non-test digits (~290 images) to train on, no regularisation, 0.5 M parameters
    dm = DigitsDataModule(batch_size=16, image_size=8, val_fraction=0.8, seed=0)
    model = ImageClassifier(backbone=MLP(input_size=8, hidden=(512, 512)), lr=2e-3)
    mon = LearningCurveMonitor(dirpath=str(tmp_path))
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, 25, callbacks=[mon], logger=logger, deterministic=True)
    trainer.fit(model, dm)

    val, train, diag = mon.history["val_loss"], mon.history["train_loss"], mon.diagnoses
    assert diag[-1] == "overfitting", list(zip(val, diag, strict=True))
    best = min(range(len(val)), key=val.__getitem__)
    first = diag.index("overfitting")
    assert first > best  # only after the val loss has turned up from its minimum
    for i, label in enumerate(diag):
        if label == "overfitting":
            assert val[i] > min(val[:i])  # the val loss is above its best so far ...
            assert train[i] < train[best]  # ... while the train loss kept falling
        if i > 0 and val[i] <= min(val[:i]):
            assert label != "overfitting"  # never at a new best val loss
    assert logger.series("curves/diagnosis")[-1] == DIAGNOSIS_CODES["overfitting"]
    assert logger.series("curves/gap_loss")[-1] > 0.1


def test_diagnosis_never_calls_a_recovering_val_loss_overfitting():
    hist = {"train_loss": [1.0, 0.2, 0.15, 0.1, 0.08, 0.06], "val_loss": [1.0, 0.2, 1.5, 1.5, 1.5, 1.2]}
    label, reason = diagnose(hist, ema_alpha=0.5)
    assert label == "plateau" and "beat" in reason  # the smoothed loss falls again: not overfitting
    assert diagnose({k: v[:5] for k, v in hist.items()}, ema_alpha=0.5)[0] == "overfitting"


def test_the_last_diagnosis_agrees_with_a_patience_stop(tmp_path):
    from epochwise.callbacks import EarlyStopping

    from _stopping_helpers import Scripted

    monitor = LearningCurveMonitor(dirpath=str(tmp_path), underfit_ratio=0.0)
    stopper = EarlyStopping("val_loss", patience=1)
    logger = MemoryLogger()
    trainer = quiet_trainer(callbacks=[monitor, stopper], max_epochs=10, logger=logger)
    # the smoothed val loss still falls at epoch 2 (1.0, 0.75, 0.635), but 0.52 is no new best
    trainer.fit(Scripted(val_loss=[1.0, 0.5, 0.52, 0.4], train_loss=[1.0, 0.6, 0.5, 0.4]))
    assert trainer.current_epoch == 3 and monitor.epochs == [0, 1, 2]
    assert monitor.diagnoses[-1] == "plateau" and "stopped because" in monitor.diagnosis_reasons[-1]
    assert logger.series("curves/diagnosis")[-1] == DIAGNOSIS_CODES["plateau"]


def test_the_figure_marks_best_and_stop_and_shows_what_changed(tmp_path):
    from epochwise.callbacks import BatchSizeWarmup, LRScaling

    monitor = LearningCurveMonitor(dirpath=str(tmp_path))
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(4, 16, interval=1), LRScaling(), monitor], max_epochs=3)
    from torch.utils.data import DataLoader

    from conftest import RecordingModule, make_dataset

    class Val(RecordingModule):
        def val_dataloader(self):
            return DataLoader(make_dataset(16, seed=2), batch_size=16)

    trainer.fit(Val(), train_dataloaders=DataLoader(make_dataset(32), batch_size=4))
    assert monitor.controlled["batch size"] == [4.0, 8.0, 16.0]
    assert monitor.controlled["lr"] == pytest.approx([0.1, 0.2, 0.4])
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000
