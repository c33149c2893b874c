"""EarlyStopping (superset of Lightning's), MultiMetricEarlyStopping and their pure decisions."""

from __future__ import annotations

import inspect
import math
import pickle
import random

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from epochwise.callbacks.stopping import (
    EarlyStopping,
    MetricCriterion,
    MetricTracker,
    MultiMetricEarlyStopping,
    decide_stop,
    improved,
    improvement_margin,
    significant_improvement,
    student_t_cdf,
    welch_t_test,
)

from conftest import MemoryLogger, quiet_trainer

INF = math.inf
NAN = math.nan


# --------------------------------------------------------------------------------------------
# helpers: a module that logs scripted values, a logger that records, a weight recorder
# --------------------------------------------------------------------------------------------
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


def simulate_stop(seq: list[float], criterion: MetricCriterion, start_from_epoch: int = 0) -> int | None:
    """The epoch at which the pure tracker says stop (patience exhausted), else None."""
    tracker = MetricTracker(criterion)
    for epoch, value in enumerate(seq):
        if epoch < start_from_epoch:
            continue
        tracker.update(value, epoch)
        if tracker.exhausted:
            return epoch
    return None


# --------------------------------------------------------------------------------------------
# pure decisions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "current, best, mode, min_delta, delta_mode, expected",
    [
        (0.9, 1.0, "min", 0.0, "abs", True),
        (1.0, 1.0, "min", 0.0, "abs", False),  # equal is no improvement
        (0.95, 1.0, "min", 0.05, "abs", False),  # a change of exactly min_delta is no improvement
        (0.94, 1.0, "min", 0.05, "abs", True),
        (1.1, 1.0, "max", 0.0, "abs", True),
        (1.05, 1.0, "max", 0.05, "abs", False),
        (0.96, 1.0, "min", 0.05, "rel", False),  # needs > 5% of |best| = 0.05
        (0.94, 1.0, "min", 0.05, "rel", True),
        (-2.2, -2.0, "min", 0.05, "rel", True),  # margin 0.1 from |best|
        (-2.05, -2.0, "min", 0.05, "rel", False),
        (10.6, 10.0, "max", 0.05, "rel", True),
        (10.4, 10.0, "max", 0.05, "rel", False),
        (5.0, INF, "min", 0.5, "rel", True),  # no best yet: any finite value improves
        (5.0, -INF, "max", 0.5, "abs", True),
        (NAN, 1.0, "min", 0.0, "abs", False),
        (-INF, 1.0, "min", 0.0, "abs", False),
    ],
)
def test_improved_table(current, best, mode, min_delta, delta_mode, expected):
    assert improved(current, best, mode, min_delta, delta_mode) is expected


def test_improvement_margin_and_errors():
    assert improvement_margin(2.0, 0.1, "abs") == 0.1
    assert improvement_margin(-4.0, 0.1, "rel") == pytest.approx(0.4)
    assert improvement_margin(INF, 0.1, "rel") == 0.0
    with pytest.raises(ValueError, match="min_delta_mode.*'pct'"):
        improvement_margin(1.0, 0.1, "pct")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode.*'up'"):
        improved(1.0, 2.0, "up")  # type: ignore[arg-type]


@pytest.mark.parametrize("t", [-50.0, -3.0, -1.0, -0.2, 0.0, 0.3, 1.5, 4.0, 40.0])
def test_student_t_cdf_closed_forms(t):
    # dof=1 is the Cauchy distribution, dof=2 has a closed form too.
    assert student_t_cdf(t, 1.0) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert student_t_cdf(t, 2.0) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert student_t_cdf(-t, 7.3) == pytest.approx(1.0 - student_t_cdf(t, 7.3), abs=1e-12)


def test_student_t_cdf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1.0, 2.5, 3.0, 7.7, 30.0, 300.0):
        for t in (-6.0, -2.0, -0.7, 0.0, 0.4, 1.96, 5.0):
            assert student_t_cdf(t, dof) == pytest.approx(stats.t.cdf(t, dof), abs=1e-10)
    assert student_t_cdf(INF, 3.0) == 1.0 and student_t_cdf(-INF, 3.0) == 0.0
    with pytest.raises(ValueError, match="dof"):
        student_t_cdf(1.0, 0.0)


def test_welch_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(10):
        a = [rng.gauss(0.0, 1.0) for _ in range(rng.randint(2, 8))]
        b = [rng.gauss(0.5, 2.0) for _ in range(rng.randint(2, 8))]
        t, dof = welch_t_test(a, b)
        ref = stats.ttest_ind(a, b, equal_var=False, alternative="less")
        assert t == pytest.approx(ref.statistic, rel=1e-9)
        assert student_t_cdf(t, dof) == pytest.approx(ref.pvalue, abs=1e-9)
        assert significant_improvement(a, b, "min", alpha=0.05)[1] == pytest.approx(ref.pvalue, abs=1e-9)


def test_welch_edge_cases():
    assert welch_t_test([1.0, 1.0], [1.0, 1.0]) == (0.0, 2.0)
    t, _ = welch_t_test([0.5, 0.5, 0.5], [1.0, 1.0])
    assert t == -INF
    with pytest.raises(ValueError, match="len\\(a\\)=1"):
        welch_t_test([1.0], [1.0, 2.0])


def test_significant_improvement_cases():
    falling = [0.50, 0.48, 0.47, 0.46]
    before = [0.70, 0.66, 0.64, 0.62]
    assert significant_improvement(falling, before, "min")[0]
    assert not significant_improvement(before, falling, "min")[0]  # got worse
    # same data, "max" mode: improvement means higher
    assert significant_improvement(before, falling, "max")[0]
    noisy = [0.50, 0.70, 0.47, 0.66]
    ok, p = significant_improvement(noisy, [0.52, 0.66, 0.49, 0.68], "min")
    assert not ok and p > 0.05
    # significant, but by less than the required margin in mean
    assert not significant_improvement(falling, before, "min", min_delta=0.5)[0]
    # constant windows: decided by the means alone
    assert significant_improvement([1.0, 1.0], [2.0, 2.0], "min") == (True, 0.0)
    assert significant_improvement([2.0, 2.0], [2.0, 2.0], "min") == (False, 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"monitor": ""}, "`monitor` must be a non-empty str, got ''"),
        ({"mode": "minimum"}, "`mode` must be one of 'min', 'max', got 'minimum'"),
        ({"patience": -1}, "`patience` must be an int >= 0, got -1"),
        ({"patience": 2.5}, "`patience` must be an int >= 0, got 2.5"),
        ({"min_delta": -0.1}, "`min_delta` must be a finite number >= 0, got -0.1"),
        ({"min_delta": NAN}, "`min_delta` must be a finite number >= 0, got nan"),
        ({"min_delta_mode": "pct"}, "`min_delta_mode` must be one of 'abs', 'rel', got 'pct'"),
        ({"test": "wilcoxon"}, "`test` must be one of 'delta', 'ttest', got 'wilcoxon'"),
        ({"window": 1}, "`window` must be an int >= 2, got 1"),
        ({"alpha": 1.0}, "`alpha` must be in \\(0, 1\\), got 1.0"),
    ],
)
def test_metric_criterion_validation(kwargs, match):
    args = {"monitor": "val_loss", **kwargs}
    with pytest.raises(ValueError, match=match):
        MetricCriterion(**args)


def test_tracker_delta_follows_lightning_rule():
    tr = MetricTracker(MetricCriterion("val_loss", patience=2, min_delta=0.05))
    assert [tr.update(v, i) for i, v in enumerate([1.0, 0.96, 0.90, 0.88, 0.80])] == [True, False, True, False, True]
    assert (tr.best, tr.best_epoch, tr.wait) == (0.80, 4, 0)
    tr.update(NAN, 5)  # a NaN is no improvement
    assert tr.wait == 1


def test_tracker_ttest_warmup_and_exhaustion():
    c = MetricCriterion("val_loss", patience=2, test="ttest", window=3, alpha=0.05)
    tr = MetricTracker(c)
    falling = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert all(tr.update(v, i) for i, v in enumerate(falling))  # warm-up, then significant
    assert tr.last_p_value is not None and tr.last_p_value < 0.05
    flat = [0.5, 0.51, 0.49, 0.5, 0.51, 0.49]
    results = [tr.update(v, 6 + i) for i, v in enumerate(flat)]
    assert results[-1] is False and tr.exhausted
    assert tr.best == 0.49 and tr.best_epoch == 8  # raw best, not margin-gated


def test_decide_stop_all_any():
    a = MetricTracker(MetricCriterion("val_loss", patience=1))
    b = MetricTracker(MetricCriterion("val_acc", mode="max", patience=3))
    for i, (loss, acc) in enumerate([(1.0, 0.5), (1.1, 0.5)]):
        a.update(loss, i)
        b.update(acc, i)
    assert decide_stop([a, b], "all") == (False, None)
    stop, reason = decide_stop([a, b], "any")
    assert stop and "val_loss" in reason and "val_acc" not in reason
    with pytest.raises(ValueError, match="stop_when"):
        decide_stop([a], "some")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# EarlyStopping
# --------------------------------------------------------------------------------------------
def test_lightning_private_hooks_we_override_exist():
    # EarlyStopping extends these two private methods of Lightning's; fail loudly if they change.
    assert list(inspect.signature(LightningEarlyStopping._run_early_stopping_check).parameters) == ["self", "trainer"]
    assert list(inspect.signature(LightningEarlyStopping._evaluate_stopping_criteria).parameters) == [
        "self",
        "current",
    ]
    assert not hasattr(LightningEarlyStopping(monitor="x"), "start_from_epoch")  # not in Lightning yet


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "avg"}, "`mode` must be one of 'min', 'max', got 'avg'"),
        ({"patience": -2}, "`patience` must be an int >= 0, got -2"),
        ({"min_delta": -1.0}, "`min_delta` must be a finite number >= 0, got -1.0"),
        ({"min_delta_mode": "ratio"}, "`min_delta_mode` must be one of 'abs', 'rel', got 'ratio'"),
        ({"start_from_epoch": -1}, "`start_from_epoch` must be an int >= 0, got -1"),
        ({"log_prefix": "es/"}, "`log_prefix` must be a non-empty str"),
    ],
)
def test_early_stopping_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(monitor="val_loss", **kwargs)


LOSS = [1.0, 0.8, 0.79, 0.78, 0.9, 0.85, 0.77, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]


@pytest.mark.parametrize(
    "kwargs, expected_stop",
    [
        ({"patience": 3}, 9),  # best 0.77 at epoch 6, then 7, 8, 9 without improvement
        ({"patience": 2}, 5),  # best 0.78 at 3; 4, 5 fail
        # abs 0.012: 0.79 is no improvement on 0.8, 0.78 is; 0.77 is not on 0.78 -> best at 3
        ({"patience": 3, "min_delta": 0.012}, 6),
        # rel 0.012: the margin shrinks with |best| (0.0096 at 0.8): 0.79, 0.78, 0.77 all improve
        ({"patience": 3, "min_delta": 0.012, "min_delta_mode": "rel"}, 9),
        ({"patience": 3, "min_delta": 0.02, "min_delta_mode": "rel"}, 6),  # 0.016 at 0.8
        ({"patience": 2, "start_from_epoch": 4}, 8),  # epochs 0-3 ignored: 0.9, 0.85, 0.77 improve
    ],
)
def test_stopping_epoch_scripted(kwargs, expected_stop):
    es = EarlyStopping(monitor="val_loss", **kwargs)
    trainer = make_trainer(callbacks=[es])
    trainer.fit(Scripted(val_loss=LOSS))
    assert es.stopped_epoch == expected_stop
    assert trainer.current_epoch == expected_stop + 1
    assert "did not improve" in es.stopping_reason_message
    # the pure tracker takes the same decision
    criterion = MetricCriterion(
        "val_loss", "min", kwargs["patience"], kwargs.get("min_delta", 0.0), kwargs.get("min_delta_mode", "abs")
    )
    assert simulate_stop(LOSS, criterion, kwargs.get("start_from_epoch", 0)) == expected_stop


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patience": 3},
        {"patience": 1, "min_delta": 0.05},
        {"patience": 2, "mode": "max"},
        {"patience": 5, "stopping_threshold": 0.785},
        {"patience": 5, "divergence_threshold": 0.88},
    ],
)
def test_same_as_lightning_in_abs_mode(kwargs):
    ours, theirs = EarlyStopping(monitor="val_loss", **kwargs), LightningEarlyStopping(monitor="val_loss", **kwargs)
    for cb in (ours, theirs):
        make_trainer(callbacks=[cb]).fit(Scripted(val_loss=LOSS))
    assert (ours.stopped_epoch, ours.wait_count, ours.stopping_reason) == (
        theirs.stopped_epoch,
        theirs.wait_count,
        theirs.stopping_reason,
    )
    assert float(ours.best_score) == float(theirs.best_score)
    assert ours.stopping_reason_message == theirs.stopping_reason_message


def test_random_sequences_agree_with_pure_tracker():
    rng = random.Random(1)
    for _ in range(4):
        seq = [1.0]
        for _ in range(14):
            seq.append(seq[-1] * rng.uniform(0.9, 1.08))
        es = EarlyStopping(monitor="val_loss", patience=2, min_delta=0.02, min_delta_mode="rel")
        make_trainer(max_epochs=15, callbacks=[es]).fit(Scripted(val_loss=seq))
        expected = simulate_stop(seq, MetricCriterion("val_loss", patience=2, min_delta=0.02, min_delta_mode="rel"))
        assert (es.stopped_epoch if es.stopping_reason_message else None) == expected


def test_logs_wait_and_best_per_epoch():
    logger = MemoryLogger()
    es = EarlyStopping(monitor="val_loss", patience=3)
    make_trainer(callbacks=[es], logger=logger).fit(Scripted(val_loss=LOSS))
    assert logger.series("early_stopping/val_loss_wait") == [0, 0, 0, 0, 1, 2, 0, 1, 2, 3]
    assert logger.series("early_stopping/val_loss_best") == pytest.approx(
        [1.0, 0.8, 0.79, 0.78, 0.78, 0.78, 0.77, 0.77, 0.77, 0.77]
    )


@pytest.mark.parametrize("max_epochs, expect_stop", [(20, True), (8, False)])
def test_restore_best_weights(max_epochs, expect_stop):
    recorder = WeightRecorder()
    es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    model = Scripted(val_loss=LOSS)
    make_trainer(max_epochs=max_epochs, callbacks=[es, recorder]).fit(model)
    assert bool(es.stopping_reason_message) is expect_stop
    assert es.best_epoch == 6 and es.restored_epoch == 6
    assert same_weights(model.state_dict(), recorder.weights[6])
    last = max(recorder.weights)
    assert not same_weights(model.state_dict(), recorder.weights[last])


def test_no_restore_keeps_last_weights():
    recorder = WeightRecorder()
    es = EarlyStopping(monitor="val_loss", patience=3)
    model = Scripted(val_loss=LOSS)
    make_trainer(callbacks=[es, recorder]).fit(model)
    assert es.best_state is None and es.restored_epoch is None
    assert same_weights(model.state_dict(), recorder.weights[9])


def test_restore_matches_model_checkpoint(tmp_path):
    es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min", save_top_k=1)
    model = Scripted(val_loss=LOSS)
    make_trainer(tmp_path, callbacks=[es, ckpt], enable_checkpointing=True).fit(model)
    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
    assert best["epoch"] == 6
    assert same_weights(model.state_dict(), best["state_dict"])


def test_resume_keeps_counters_and_best_weights(tmp_path):
    seq = [1.0, 0.5, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9]  # best at epoch 1, patience 3 -> stop at 4
    full_es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    full = Scripted(val_loss=seq)
    make_trainer(callbacks=[full_es]).fit(full)
    assert full_es.stopped_epoch == 4

    first_es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, max_epochs=3, callbacks=[first_es, ckpt], enable_checkpointing=True).fit(Scripted(val_loss=seq))
    assert first_es.wait_count == 1
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"][first_es.state_key]
    assert state["wait_count"] == 1 and state["best_epoch"] == 1 and "best_state" in state

    resumed_es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    resumed = Scripted(val_loss=seq)
    make_trainer(tmp_path, callbacks=[resumed_es]).fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert (resumed_es.stopped_epoch, resumed_es.wait_count, resumed_es.best_epoch) == (4, 3, 1)
    assert resumed_es.restored_epoch == 1
    assert same_weights(resumed.state_dict(), full.state_dict())


def test_state_dict_tolerant_and_pickle():
    es = EarlyStopping(monitor="val_loss", restore_best_weights=True)
    es.load_state_dict({})  # nothing there: keeps defaults
    es.load_state_dict({"wait_count": 2})  # an older/partial checkpoint
    assert es.wait_count == 2 and es.best_epoch == -1
    es.best_state = {"w": torch.ones(2)}
    clone = pickle.loads(pickle.dumps(es))
    assert clone.state_key == es.state_key and torch.equal(clone.best_state["w"], torch.ones(2))
    other = EarlyStopping(monitor="val_acc", mode="max")
    assert other.state_key != es.state_key
    # the checkpoint key is Lightning's, so Lightning's EarlyStopping state loads into ours
    assert es.state_key == LightningEarlyStopping(monitor="val_loss").state_key


# --------------------------------------------------------------------------------------------
# MultiMetricEarlyStopping
# --------------------------------------------------------------------------------------------
# loss stops improving after epoch 2; accuracy keeps improving (by > 0.005) until epoch 6
M_LOSS = [1.0, 0.7, 0.6, 0.65, 0.66, 0.67, 0.68, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
M_ACC = [0.5, 0.6, 0.7, 0.72, 0.74, 0.75, 0.76, 0.762, 0.763, 0.76, 0.76, 0.76, 0.76, 0.76]
MONITORS = {"val_loss": {"patience": 2, "mode": "min"}, "val_acc": {"patience": 3, "mode": "max", "min_delta": 0.005}}


@pytest.mark.parametrize("stop_when, expected", [("any", 4), ("all", 9)])
def test_multi_metric_all_vs_any(stop_when, expected):
    logger = MemoryLogger()
    cb = MultiMetricEarlyStopping(MONITORS, stop_when=stop_when)
    make_trainer(callbacks=[cb], logger=logger).fit(Scripted(val_loss=M_LOSS, val_acc=M_ACC))
    assert cb.stopped_epoch == expected
    assert "val_loss" in cb.stopping_reason_message
    loss_wait = logger.series("early_stopping/val_loss_wait")
    acc_wait = logger.series("early_stopping/val_acc_wait")
    assert len(loss_wait) == len(acc_wait) == expected + 1
    if stop_when == "all":
        assert loss_wait == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
        assert acc_wait == [0, 0, 0, 0, 0, 0, 0, 1, 2, 3]  # 0.762, 0.763 are not > 0.005 better
        assert "val_acc" in cb.stopping_reason_message
        assert logger.series("early_stopping/val_acc_best")[-1] == pytest.approx(0.76)


def test_multi_metric_ttest_stops_on_flat_noise_not_on_steady_gains():
    falling = [1.0 * 0.9**i for i in range(30)]
    flat = [1.0, 0.8, 0.7, 0.6, 0.55] + [0.5 + 0.01 * ((-1) ** i) for i in range(25)]
    monitors = {"val_loss": {"patience": 2, "test": "ttest", "window": 3, "alpha": 0.05}}
    keep = MultiMetricEarlyStopping(monitors)
    make_trainer(max_epochs=15, callbacks=[keep]).fit(Scripted(val_loss=falling))
    assert keep.stopping_reason_message is None
    stop = MultiMetricEarlyStopping(monitors)
    make_trainer(max_epochs=30, callbacks=[stop]).fit(Scripted(val_loss=flat))
    expected = simulate_stop(flat, MetricCriterion("val_loss", patience=2, test="ttest", window=3))
    assert stop.stopped_epoch == expected
    assert expected is not None and 6 <= expected < 15


def test_multi_metric_restore_on_chosen_metric():
    recorder = WeightRecorder()
    cb = MultiMetricEarlyStopping(MONITORS, stop_when="all", restore_best_weights="val_acc")
    model = Scripted(val_loss=M_LOSS, val_acc=M_ACC)
    make_trainer(callbacks=[cb, recorder]).fit(model)
    best_acc_epoch = cb.trackers["val_acc"].best_epoch
    assert best_acc_epoch == 6 and cb.restored_epoch == 6
    assert same_weights(model.state_dict(), recorder.weights[6])
    first = MultiMetricEarlyStopping(MONITORS, restore_best_weights=True)
    assert first.restore_from == "val_loss"


def test_multi_metric_non_finite_and_missing():
    cb = MultiMetricEarlyStopping({"val_loss": {"patience": 10}})
    make_trainer(callbacks=[cb]).fit(Scripted(val_loss=[1.0, 0.9, NAN, 0.8]))
    assert cb.stopped_epoch == 2 and "not finite" in cb.stopping_reason_message
    strict = MultiMetricEarlyStopping({"val_f1": {}})
    with pytest.raises(RuntimeError, match="val_f1"):
        make_trainer(callbacks=[strict]).fit(Scripted(val_loss=[1.0]))
    lenient = MultiMetricEarlyStopping({"val_f1": {}, "val_loss": {"patience": 1}}, strict=False)
    make_trainer(callbacks=[lenient]).fit(Scripted(val_loss=[1.0, 1.0, 1.0, 1.0]))
    assert lenient.stopping_reason_message is None  # a missing metric is never exhausted: "all" waits
    lenient_any = MultiMetricEarlyStopping({"val_f1": {}, "val_loss": {"patience": 1}}, stop_when="any", strict=False)
    make_trainer(callbacks=[lenient_any]).fit(Scripted(val_loss=[1.0, 1.0, 1.0, 1.0]))
    assert lenient_any.stopped_epoch == 1


def test_multi_metric_resume(tmp_path):
    full = MultiMetricEarlyStopping(MONITORS, stop_when="all")
    make_trainer(callbacks=[full]).fit(Scripted(val_loss=M_LOSS, val_acc=M_ACC))

    first = MultiMetricEarlyStopping(MONITORS, stop_when="all")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, max_epochs=5, callbacks=[first, ckpt], enable_checkpointing=True).fit(
        Scripted(val_loss=M_LOSS, val_acc=M_ACC)
    )
    resumed = MultiMetricEarlyStopping(MONITORS, stop_when="all")
    make_trainer(tmp_path, callbacks=[resumed]).fit(
        Scripted(val_loss=M_LOSS, val_acc=M_ACC), ckpt_path=tmp_path / "last.ckpt"
    )
    assert resumed.stopped_epoch == full.stopped_epoch == 9
    for name in MONITORS:
        assert resumed.trackers[name].state_dict() == full.trackers[name].state_dict()


@pytest.mark.parametrize(
    "monitors, kwargs, match",
    [
        ({}, {}, "`monitors` must be a non-empty mapping"),
        (["val_loss"], {}, "`monitors` must be a non-empty mapping"),
        ({"": {}}, {}, "`monitors` keys must be non-empty metric names"),
        ({"val_loss": 5}, {}, "`monitors\\['val_loss'\\]` must be a mapping of options, got 5"),
        ({"val_loss": {"paitence": 5}}, {}, "unknown option\\(s\\) \\['paitence'\\]; allowed: mode, patience"),
        ({"val_loss": {"mode": "up"}}, {}, "`mode` must be one of 'min', 'max', got 'up'"),
        ({"val_loss": {"patience": -1}}, {}, "`patience` must be an int >= 0, got -1 for 'val_loss'"),
        ({"val_loss": {"test": "ttest", "window": 1}}, {}, "`window` must be an int >= 2, got 1"),
        ({"val_loss": {}}, {"stop_when": "most"}, "`stop_when` must be one of 'all', 'any', got 'most'"),
        ({"val_loss": {}}, {"restore_best_weights": "val_acc"}, "one of the monitors \\['val_loss'\\], got 'val_acc'"),
        ({"val_loss": {}}, {"start_from_epoch": 1.5}, "`start_from_epoch` must be an int >= 0, got 1.5"),
    ],
)
def test_multi_metric_validation(monitors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiMetricEarlyStopping(monitors, **kwargs)


def test_multi_metric_does_not_mutate_and_state_roundtrip():
    monitors = {"val_loss": {"patience": 2}, "val_acc": {"mode": "max"}}
    snapshot = {k: dict(v) for k, v in monitors.items()}
    cb = MultiMetricEarlyStopping(monitors)
    assert monitors == snapshot
    cb.trackers["val_loss"].update(0.5, 0)
    clone = pickle.loads(pickle.dumps(cb))
    fresh = MultiMetricEarlyStopping(monitors)
    fresh.load_state_dict(clone.state_dict())
    assert fresh.trackers["val_loss"].best == 0.5
    fresh.load_state_dict({})  # tolerant of missing keys
    other = MultiMetricEarlyStopping({"val_loss": {}})
    assert other.state_key != cb.state_key


# --------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo)
# --------------------------------------------------------------------------------------------
class RankScripted(Scripted):
    """Logs ``synced`` (the same on every rank, reduced) and ``local`` (different per rank)."""

    def __init__(self, synced: list[float], local_by_rank: list[list[float]]) -> None:
        super().__init__()
        self.synced = synced
        self.local_by_rank = local_by_rank

    def validation_step(self, batch, batch_idx):
        e = self.current_epoch
        self.log("synced", self.synced[e], sync_dist=True)
        self.log("local", self.local_by_rank[self.global_rank][e])


class RankDump(WeightRecorder):
    """Records weights per epoch and writes, at fit end (after the restore), what this rank holds."""

    def __init__(self, out_dir: str, es: EarlyStopping, multi: MultiMetricEarlyStopping) -> None:
        super().__init__()
        self.out_dir, self.es, self.multi = out_dir, es, multi

    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        final = {k: v.tolist() for k, v in pl_module.state_dict().items()}
        recorded = {e: {k: v.tolist() for k, v in w.items()} for e, w in self.weights.items()}
        payload = {"epoch": trainer.current_epoch, "multi_stopped": self.multi.stopped_epoch,
                   "restored": self.es.restored_epoch, "final": final, "recorded": recorded}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(payload, f)


@pytest.mark.slow
def test_two_process_ddp_stop_together_and_restore_the_same_weights(tmp_path):
    import json

    synced = [1.0, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 1.0]
    local = [[1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1],  # rank 0: patience 2 runs out at epoch 3
             [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]]  # rank 1: keeps improving
    es = EarlyStopping("synced", patience=10, restore_best_weights=True)
    multi = MultiMetricEarlyStopping({"local": {"patience": 2}})
    dump = RankDump(str(tmp_path), es, multi)
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_epochs=8, callbacks=[es, multi, dump])
    trainer.fit(RankScripted(synced, local))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["multi_stopped"] == 3 and rank["epoch"] == 4  # rank 0's decision stops both
        assert rank["restored"] == 1
        assert rank["final"] == rank["recorded"]["1"]  # the best epoch's weights
    assert ranks[0]["final"] == ranks[1]["final"]
