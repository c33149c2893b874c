"""The pure stopping decisions (rules, Welch test, trackers), MultiMetricEarlyStopping, the shared
best-weights store and both stopping callbacks under DDP."""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import stats

from epochwise.callbacks import significance
from epochwise.callbacks._checks import ConfigurationError
from epochwise.callbacks.best_weights import BestWeights
from epochwise.callbacks.early_stopping import EarlyStopping
from epochwise.callbacks.metric_tracking import MetricCriterion, MetricTracker, decide_stop
from epochwise.callbacks.multi_metric_stopping import MultiMetricEarlyStopping
from epochwise.callbacks.significance import significant_improvement, welch_t_test
from epochwise.callbacks.stopping_rules import improved, improvement_margin

from _stopping_helpers import Scripted, WeightRecorder, make_trainer, same_weights
from conftest import MemoryLogger, quiet_trainer

INF = math.inf
NAN = math.nan


def simulate_stop(seq: list[float], criterion: MetricCriterion) -> int | None:
    """The epoch at which the pure tracker says stop (patience exhausted), else None."""
    tracker = MetricTracker(criterion)
    for epoch, value in enumerate(seq):
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
    with pytest.raises(ConfigurationError, match="min_delta_mode.*'pct'"):
        improvement_margin(1.0, 0.1, "pct")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="mode.*'up'"):
        improved(1.0, 2.0, "up")  # type: ignore[arg-type]


def test_defect8_significance_is_scipys_welch_test(monkeypatch):
    rng = random.Random(0)
    for _ in range(10):
        a = [rng.gauss(0.0, 1.0) for _ in range(rng.randint(2, 8))]
        b = [rng.gauss(0.5, 2.0) for _ in range(rng.randint(2, 8))]
        ref = stats.ttest_ind(a, b, equal_var=False, alternative="less")
        assert welch_t_test(a, b, alternative="less") == (ref.statistic, ref.df, ref.pvalue)
        assert significant_improvement(a, b, "min")[1] == ref.pvalue
    # the p-value comes from scipy.stats.ttest_ind itself, not from a copy of it
    calls = []

    def fake(a, b, equal_var, alternative):
        calls.append((equal_var, alternative))
        return SimpleNamespace(statistic=-9.0, df=3.0, pvalue=0.001)

    monkeypatch.setattr(significance.stats, "ttest_ind", fake)
    assert significant_improvement([0.5, 0.4], [0.9, 0.8], "max") == (False, 0.001)
    assert calls == [(False, "greater")]


def test_defect8_no_hand_written_distribution_code_and_no_monolith():
    import epochwise.callbacks as cbs

    assert not hasattr(cbs, "student_t_cdf")
    folder = Path(cbs.__file__).parent
    for name in ("stopping", "early_stopping", "multi_metric_stopping", "best_weights", "metric_tracking",
                 "significance", "stopping_rules", "budget", "curves", "curve_diagnosis", "ensembles"):
        source = (folder / f"{name}.py").read_text()
        assert len(source.splitlines()) < 500, name
        for needle in ("lgamma", "betacf", "incomplete_beta", "def _mean_var"):
            assert needle not in source, (name, needle)


def test_welch_edge_cases():
    t, _, p = welch_t_test([0.5, 0.5, 0.5], [1.0, 1.0], alternative="less")
    assert t == -INF and p == 0.0
    with pytest.raises(ValueError, match="len\\(a\\)=1"):
        welch_t_test([1.0], [1.0, 2.0])
    with pytest.raises(ConfigurationError, match="`alternative` must be"):
        welch_t_test([1.0, 2.0], [1.0, 2.0], alternative="lower")


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
    # constant windows: different means are certain, equal means are no evidence
    assert significant_improvement([1.0, 1.0], [2.0, 2.0], "min") == (True, 0.0)
    ok, p = significant_improvement([2.0, 2.0], [2.0, 2.0], "min")
    assert not ok and math.isnan(p)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"monitor": ""}, "`monitor` must be a non-empty str, got ''"),
        ({"mode": "minimum"}, "`mode` must be 'min' or 'max', got 'minimum' \\(monitor 'val_loss'\\)"),
        ({"patience": -1}, "`patience` must be an int >= 0, got -1"),
        ({"patience": 2.5}, "`patience` must be an int >= 0, got 2.5"),
        ({"min_delta": -0.1}, "`min_delta` must be a finite number >= 0, got -0.1"),
        ({"min_delta": NAN}, "`min_delta` must be a finite number >= 0, got nan"),
        ({"min_delta_mode": "pct"}, "`min_delta_mode` must be 'abs' or 'rel', got 'pct'"),
        ({"test": "wilcoxon"}, "`test` must be 'delta' or 'ttest', got 'wilcoxon'"),
        ({"window": 1}, "`window` must be an int >= 2, got 1"),
        ({"alpha": 1.0}, "`alpha` must be a number in \\(0, 1\\), got 1.0"),
    ],
)
def test_metric_criterion_validation(kwargs, match):
    args = {"monitor": "val_loss", **kwargs}
    with pytest.raises(ConfigurationError, match=match):
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
    with pytest.raises(ConfigurationError, match="stop_when"):
        decide_stop([a], "some")  # type: ignore[arg-type]


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
        ({"val_loss": {"mode": "up"}}, {}, "`mode` must be 'min' or 'max', got 'up'"),
        ({"val_loss": {"patience": -1}}, {}, "`patience` must be an int >= 0, got -1 \\(monitor 'val_loss'\\)"),
        ({"val_loss": {"test": "ttest", "window": 1}}, {}, "`window` must be an int >= 2, got 1"),
        ({"val_loss": {}}, {"stop_when": "most"}, "`stop_when` must be 'all' or 'any', got 'most'"),
        ({"val_loss": {}}, {"strict": "yes"}, "`strict` must be True or False, got 'yes'"),
        ({"val_loss": {}}, {"restore_best_weights": "val_acc"}, "one of the monitors \\['val_loss'\\], got 'val_acc'"),
        ({"val_loss": {}}, {"start_from_epoch": 1.5}, "`start_from_epoch` must be an int >= 0, got 1.5"),
    ],
)
def test_multi_metric_validation(monitors, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
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


def test_multi_metric_second_fit_starts_afresh():
    cb = MultiMetricEarlyStopping({"val_loss": {"patience": 2}}, restore_best_weights=True)
    make_trainer(callbacks=[cb]).fit(Scripted(val_loss=[0.2, 0.3, 0.4, 0.5]))
    assert cb.stopped_epoch == 2 and cb.restored_epoch == 0
    recorder, second = WeightRecorder(), Scripted(val_loss=[0.9, 0.8, 0.85, 0.86, 0.87])
    make_trainer(callbacks=[cb, recorder]).fit(second)
    # the first fit's best (0.2) neither carries over nor lends its weights: 0.8 at epoch 1 is this fit's best
    assert cb.trackers["val_loss"].best == pytest.approx(0.8) and cb.stopped_epoch == 3 and cb.restored_epoch == 1
    assert same_weights(second.state_dict(), recorder.weights[1])


# --------------------------------------------------------------------------------------------
# the one best-weights store
# --------------------------------------------------------------------------------------------
def test_defect8_both_stopping_callbacks_copy_and_restore_through_one_store(monkeypatch):
    calls = []
    original_snapshot, original_restore = BestWeights.snapshot, BestWeights.restore

    def snapshot(self, module, epoch):
        calls.append(("snapshot", epoch))
        original_snapshot(self, module, epoch)

    def restore(self, trainer, module):
        calls.append(("restore", self.epoch))
        return original_restore(self, trainer, module)

    monkeypatch.setattr(BestWeights, "snapshot", snapshot)
    monkeypatch.setattr(BestWeights, "restore", restore)
    es = EarlyStopping("val_loss", patience=1, restore_best_weights=True)
    multi = MultiMetricEarlyStopping({"val_loss": {"patience": 1}}, restore_best_weights=True)
    for cb in (es, multi):
        make_trainer(callbacks=[cb]).fit(Scripted(val_loss=[1.0, 0.5, 0.7, 0.8]))
        assert isinstance(cb.best_weights, BestWeights) and cb.restored_epoch == 1
    assert calls == [("snapshot", 0), ("snapshot", 1), ("restore", 1)] * 2


class FakeStrategy:
    def __init__(self, rank0_payload):
        self.rank0_payload, self.broadcasts = rank0_payload, 0

    def broadcast(self, obj, src=0):
        self.broadcasts += 1
        return self.rank0_payload


class FakeTrainer:
    def __init__(self, rank: int, world_size: int, strategy=None):
        self.global_rank, self.world_size, self.strategy = rank, world_size, strategy


def test_defect9_one_copy_on_rank_zero_broadcast_once_at_restore():
    net = torch.nn.Linear(3, 1)
    rank0, rank1 = BestWeights(), BestWeights()
    rank0.setup(FakeTrainer(0, 2))
    rank1.setup(FakeTrainer(1, 2))
    for store in (rank0, rank1):
        store.snapshot(net, epoch=4)
    assert rank0.has_copy and not rank1.has_copy and rank1.epoch == 4  # one copy per job, not per rank
    assert "best_state" not in rank1.state_dict()
    rank1.load_state_dict(rank0.state_dict())  # resuming: every rank reads the checkpoint ...
    assert not rank1.has_copy  # ... but only rank 0 keeps the weights
    # at fit end rank 1 receives rank 0's copy through one broadcast and loads it
    other = torch.nn.Linear(3, 1)
    strategy = FakeStrategy((4, rank0.state))
    assert rank1.restore(FakeTrainer(1, 2, strategy), other) == 4 and strategy.broadcasts == 1
    assert same_weights(other.state_dict(), net.state_dict())
    # a new fit forgets the copy
    rank0.setup(FakeTrainer(0, 2))
    assert not rank0.has_copy and rank0.epoch == -1


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
    """Records weights per epoch, which ranks hold a weights copy before the restore, and writes at
    fit end (after the restore) what this rank holds."""

    def __init__(self, out_dir: str, es: EarlyStopping, multi: MultiMetricEarlyStopping) -> None:
        super().__init__()
        self.out_dir, self.es, self.multi = out_dir, es, multi
        self.copies: list[bool] = []

    def on_train_end(self, trainer, pl_module) -> None:
        self.copies = [self.es.best_weights.has_copy, self.multi.best_weights.has_copy]

    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        final = {k: v.tolist() for k, v in pl_module.state_dict().items()}
        recorded = {e: {k: v.tolist() for k, v in w.items()} for e, w in self.weights.items()}
        payload = {"epoch": trainer.current_epoch, "multi_stopped": self.multi.stopped_epoch,
                   "restored": self.es.restored_epoch, "multi_restored": self.multi.restored_epoch,
                   "copies": self.copies, "final": final, "recorded": recorded}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(payload, f)


@pytest.mark.slow
def test_two_process_ddp_stop_together_and_restore_the_same_weights(tmp_path):
    import json

    synced = [1.0, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 1.0]
    local = [[1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1],  # rank 0: patience 2 runs out at epoch 3
             [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]]  # rank 1: keeps improving
    es = EarlyStopping("synced", patience=10, restore_best_weights=True)
    # callbacks run in order: multi restores after es, so the final weights are multi's
    multi = MultiMetricEarlyStopping({"local": {"patience": 2}}, restore_best_weights=True)
    dump = RankDump(str(tmp_path), es, multi)
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_epochs=8, callbacks=[es, multi, dump])
    trainer.fit(RankScripted(synced, local))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["multi_stopped"] == 3 and rank["epoch"] == 4  # rank 0's decision stops both
        # rank 0's best "local" epoch (1) is restored on both ranks, not rank 1's (3)
        assert rank["restored"] == 1 and rank["multi_restored"] == 1
        assert rank["final"] == rank["recorded"]["1"]  # the best epoch's weights
    assert ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["copies"] == [True, True] and ranks[1]["copies"] == [False, False]  # defect 9
