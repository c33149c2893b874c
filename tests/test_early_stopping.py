"""EarlyStopping: a drop-in for Lightning's (decisions, errors, state), plus restore, baseline, rel delta."""

from __future__ import annotations

import inspect
import math
import pickle
import random
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from epochwise.callbacks._checks import ConfigurationError
from epochwise.callbacks.early_stopping import EarlyStopping
from epochwise.callbacks.metric_tracking import MetricCriterion, MetricTracker

from _stopping_helpers import Scripted, WeightRecorder, make_trainer, same_weights
from conftest import MemoryLogger

INF = math.inf
NAN = math.nan
LOSS = [1.0, 0.8, 0.79, 0.78, 0.9, 0.85, 0.77, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]


def lightning_view(cb: LightningEarlyStopping) -> tuple:
    """Everything Lightning's callback exposes about its decisions."""
    return (cb.stopped_epoch, cb.wait_count, float(cb.best_score), cb.stopping_reason, cb.stopping_reason_message,
            cb.min_delta, cb.patience)


def fit_both(seq: list[float], max_epochs: int = 20, **kwargs) -> tuple[EarlyStopping, LightningEarlyStopping]:
    ours, theirs = EarlyStopping("val_loss", **kwargs), LightningEarlyStopping("val_loss", **kwargs)
    for cb in (ours, theirs):
        make_trainer(max_epochs=max_epochs, callbacks=[cb]).fit(Scripted(val_loss=seq))
    return ours, theirs


def simulate_stop(seq: list[float], criterion: MetricCriterion, start_from_epoch: int = 0) -> int | None:
    tracker = MetricTracker(criterion)
    for epoch, value in enumerate(seq):
        if epoch >= start_from_epoch and (tracker.update(value, epoch) or True) and tracker.exhausted:
            return epoch
    return None


def test_lightning_private_hooks_we_override_exist():
    # EarlyStopping replaces these two private methods of Lightning's; fail loudly if they change.
    assert list(inspect.signature(LightningEarlyStopping._run_early_stopping_check).parameters) == ["self", "trainer"]
    assert list(inspect.signature(LightningEarlyStopping._evaluate_stopping_criteria).parameters) == ["self", "current"]
    assert not hasattr(LightningEarlyStopping(monitor="x"), "start_from_epoch")  # not in Lightning yet


# --------------------------------------------------------------------------------------------
# drop-in: same decisions as Lightning on the same stream
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"patience": 3},
        {"patience": 1, "min_delta": 0.05},
        {"patience": 2, "mode": "max"},
        {"patience": 5, "stopping_threshold": 0.785},
        {"patience": 5, "divergence_threshold": 0.88},
        # defect 2: values Lightning gives a meaning are kept, with that meaning
        {"patience": 2, "min_delta": -0.1},  # tolerates a worsening of 0.1
        {"patience": 2.0},  # a YAML float
        {"patience": 0},
        {"patience": INF, "divergence_threshold": 0.88},
        {"patience": 3, "stopping_threshold": -INF},
        {"patience": 3, "verbose": 1},
    ],
)
def test_same_decisions_as_lightning(kwargs):
    ours, theirs = fit_both(LOSS, **kwargs)
    assert lightning_view(ours) == lightning_view(theirs)


def test_defect2_negative_min_delta_and_float_patience_are_lightnings():
    # negative min_delta: 0.85 is within 0.1 of the best 0.78, so it becomes the best; the fit runs longer
    ours, theirs = fit_both(LOSS, patience=2, min_delta=-0.1)
    assert (ours.stopped_epoch, theirs.stopped_epoch) == (8, 8)
    assert fit_both(LOSS, patience=2)[0].stopped_epoch == 5
    ours, _ = fit_both(LOSS, patience=2.0)
    assert ours.stopped_epoch == 5 and ours.patience == 2.0


def test_defect2_errors_are_lightnings_exception_and_value_error():
    with pytest.raises(MisconfigurationException):
        LightningEarlyStopping("val_loss", mode="unknown")
    for catch in (MisconfigurationException, ValueError):
        with pytest.raises(catch, match="`mode` must be 'min' or 'max', got 'unknown'"):
            EarlyStopping("val_loss", mode="unknown")


@pytest.mark.parametrize(
    "kwargs, match",
    [  # meaningless in both libraries
        ({"mode": "auto"}, "`mode` must be 'min' or 'max', got 'auto'"),
        ({"min_delta": NAN}, "`min_delta` must be a finite number, got nan"),
        ({"min_delta": INF}, "`min_delta` must be a finite number, got inf"),
        ({"patience": NAN}, "`patience` must be a finite number, got nan"),
        ({"patience": True}, "`patience` must be a finite number, got True"),
        ({"patience": "3"}, "`patience` must be a finite number, got '3'"),
        ({"stopping_threshold": NAN}, "`stopping_threshold` must be None or a finite number, got nan"),
        ({"strict": "no"}, "`strict` must be True or False, got 'no'"),
        ({"min_delta_mode": "ratio"}, "`min_delta_mode` must be 'abs' or 'rel', got 'ratio'"),
        ({"start_from_epoch": -1}, "`start_from_epoch` must be an int >= 0, got -1"),
        ({"baseline": NAN}, "`baseline` must be None or a finite number, got nan"),
        ({"restore_best_weights": 1}, "`restore_best_weights` must be True or False, got 1"),
        ({"log_prefix": "es/"}, "`log_prefix` must not end with '/'"),
    ],
)
def test_refuses_only_meaningless_values(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        EarlyStopping(monitor="val_loss", **kwargs)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_random_streams_decide_as_lightning(mode):
    """Check by check, with thresholds, NaNs and a signed min_delta: state and messages equal Lightning's."""
    rng = random.Random(7 if mode == "min" else 8)
    for _ in range(150):
        kwargs = {
            "mode": mode,
            "patience": rng.choice([0, 1, 2, 3.0]),
            "min_delta": rng.choice([0.0, 0.02, -0.03]),
            "check_finite": rng.random() < 0.7,
            "stopping_threshold": rng.choice([None, 0.3, 0.7]),
            "divergence_threshold": rng.choice([None, 0.2, 0.9]),
        }
        ours, theirs = EarlyStopping("m", **kwargs), LightningEarlyStopping("m", **kwargs)
        for _ in range(10):
            value = rng.choice([NAN, INF, round(rng.uniform(0.0, 1.0), 2)])
            current = torch.tensor(value, dtype=torch.float32)
            assert ours._evaluate_stopping_criteria(current) == theirs._evaluate_stopping_criteria(current), kwargs
            assert lightning_view(ours) == lightning_view(theirs), kwargs


# --------------------------------------------------------------------------------------------
# checkpoint state interchangeable with Lightning's, both ways
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "first, second",
    [(LightningEarlyStopping, EarlyStopping), (EarlyStopping, LightningEarlyStopping)],
    ids=["lightning-to-epochwise", "epochwise-to-lightning"],
)
def test_checkpoint_state_interchangeable_with_lightning(tmp_path, first, second):
    seq = [1.0, 0.5, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9]  # best at epoch 1, patience 3 -> stop at 4
    full = LightningEarlyStopping("val_loss", patience=3)
    make_trainer(callbacks=[full]).fit(Scripted(val_loss=seq))
    assert full.stopped_epoch == 4

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    interrupted = first("val_loss", patience=3)
    make_trainer(tmp_path, max_epochs=3, callbacks=[interrupted, ckpt], enable_checkpointing=True).fit(
        Scripted(val_loss=seq)
    )
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert interrupted.state_key == "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}" and interrupted.state_key in state
    resumed = second("val_loss", patience=3)
    make_trainer(tmp_path, callbacks=[resumed]).fit(Scripted(val_loss=seq), ckpt_path=tmp_path / "last.ckpt")
    assert lightning_view(resumed) == lightning_view(full)


def test_resume_keeps_counters_and_best_weights(tmp_path):
    seq = [1.0, 0.5, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9]
    full_es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    full = Scripted(val_loss=seq)
    make_trainer(callbacks=[full_es]).fit(full)

    first_es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, max_epochs=3, callbacks=[first_es, ckpt], enable_checkpointing=True).fit(Scripted(val_loss=seq))
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"][first_es.state_key]
    assert state["wait_count"] == 1 and state["best_epoch"] == 1 and state["best_state_epoch"] == 1
    assert "best_state" in state

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
    es.best_weights.snapshot(torch.nn.Linear(2, 1), epoch=0)
    clone = pickle.loads(pickle.dumps(es))
    assert clone.state_key == es.state_key and clone.best_weights.has_copy
    assert EarlyStopping(monitor="val_acc", mode="max").state_key != es.state_key


# --------------------------------------------------------------------------------------------
# what epochwise adds
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected_stop",
    [
        ({"patience": 3}, 9),  # best 0.77 at epoch 6, then 7, 8, 9 without improvement
        ({"patience": 2}, 5),  # best 0.78 at 3; 4, 5 fail
        ({"patience": 3, "min_delta": 0.012}, 6),  # 0.79 is no improvement on 0.8, 0.78 is; 0.77 is not
        ({"patience": 3, "min_delta": 0.012, "min_delta_mode": "rel"}, 9),  # margin 0.0096 at 0.8
        ({"patience": 3, "min_delta": 0.02, "min_delta_mode": "rel"}, 6),  # 0.016 at 0.8
        ({"patience": 2, "start_from_epoch": 4}, 8),  # epochs 0-3 ignored: 0.9, 0.85, 0.77 improve
    ],
)
def test_stopping_epoch_scripted(kwargs, expected_stop):
    es = EarlyStopping(monitor="val_loss", **kwargs)
    trainer = make_trainer(callbacks=[es])
    trainer.fit(Scripted(val_loss=LOSS))
    assert es.stopped_epoch == expected_stop and trainer.current_epoch == expected_stop + 1
    assert "did not improve" in es.stopping_reason_message
    criterion = MetricCriterion(
        "val_loss", "min", kwargs["patience"], kwargs.get("min_delta", 0.0), kwargs.get("min_delta_mode", "abs")
    )
    assert simulate_stop(LOSS, criterion, kwargs.get("start_from_epoch", 0)) == expected_stop


def test_defect8_min_delta_reads_as_passed_after_relative_checks():
    es = EarlyStopping("val_loss", patience=3, min_delta=0.012, min_delta_mode="rel")
    make_trainer(callbacks=[es]).fit(Scripted(val_loss=LOSS))
    assert es.stopped_epoch == 9  # relative margins were applied ...
    assert es.min_delta == LightningEarlyStopping("val_loss", min_delta=0.012).min_delta == -0.012  # ... not stored


def test_logs_wait_and_best_per_check():
    logger = MemoryLogger()
    es = EarlyStopping(monitor="val_loss", patience=3)
    make_trainer(callbacks=[es], logger=logger).fit(Scripted(val_loss=LOSS))
    assert logger.series("early_stopping/val_loss_wait") == [0, 0, 0, 0, 1, 2, 0, 1, 2, 3]
    assert logger.series("early_stopping/val_loss_best") == pytest.approx(
        [1.0, 0.8, 0.79, 0.78, 0.78, 0.78, 0.77, 0.77, 0.77, 0.77]
    )
    # one row per check, at Lightning's step (4 optimizer steps per epoch)
    assert [s for s, m in logger.rows if "early_stopping/val_loss_wait" in m] == [4 * (e + 1) for e in range(10)]


@pytest.mark.parametrize("max_epochs, expect_stop", [(20, True), (8, False)])
def test_restore_best_weights(max_epochs, expect_stop):
    recorder = WeightRecorder()
    es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    model = Scripted(val_loss=LOSS)
    make_trainer(max_epochs=max_epochs, callbacks=[es, recorder]).fit(model)
    assert bool(es.stopping_reason_message) is expect_stop
    assert es.best_epoch == 6 and es.restored_epoch == 6
    assert same_weights(model.state_dict(), recorder.weights[6])
    assert not same_weights(model.state_dict(), recorder.weights[max(recorder.weights)])


def test_no_restore_keeps_last_weights():
    recorder = WeightRecorder()
    es = EarlyStopping(monitor="val_loss", patience=3)
    model = Scripted(val_loss=LOSS)
    make_trainer(callbacks=[es, recorder]).fit(model)
    assert not es.best_weights.has_copy and es.restored_epoch is None
    assert same_weights(model.state_dict(), recorder.weights[9])


def test_restore_matches_model_checkpoint(tmp_path):
    es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min", save_top_k=1)
    model = Scripted(val_loss=LOSS)
    make_trainer(tmp_path, callbacks=[es, ckpt], enable_checkpointing=True).fit(model)
    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
    assert best["epoch"] == 6 and same_weights(model.state_dict(), best["state_dict"])


def test_defect1_threshold_stop_restores_the_threshold_epoch():
    recorder = WeightRecorder()
    es = EarlyStopping("val_loss", stopping_threshold=0.1, restore_best_weights=True)
    model = Scripted(val_loss=[0.5, 0.3, 0.05, 0.04])
    make_trainer(callbacks=[es, recorder]).fit(model)
    assert es.stopped_epoch == 2 and es.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD
    assert float(es.best_score) == pytest.approx(0.3)  # Lightning's chain leaves best_score alone ...
    assert es.best_epoch == es.restored_epoch == 2  # ... but the best weights are the threshold epoch's
    assert same_weights(model.state_dict(), recorder.weights[2])


def test_defect1_threshold_epoch_stays_best_when_min_epochs_continues():
    # min_epochs overrides the stop; 0.2 improves on best_score 0.3 but not on the 0.05 of epoch 2
    recorder = WeightRecorder()
    es = EarlyStopping("val_loss", stopping_threshold=0.1, restore_best_weights=True)
    model = Scripted(val_loss=[0.5, 0.3, 0.05, 0.2, 0.25])
    make_trainer(max_epochs=5, min_epochs=5, callbacks=[es, recorder]).fit(model)
    assert float(es.best_score) == pytest.approx(0.2)  # Lightning's best_score moved at epoch 3
    assert es.restored_epoch == 2 and same_weights(model.state_dict(), recorder.weights[2])


def test_defect3_baseline_not_beaten_stops_after_patience_checks():
    recorder = WeightRecorder()
    es = EarlyStopping("val_loss", patience=3, baseline=0.5, restore_best_weights=True)
    model = Scripted(val_loss=[0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.3])  # improving, but never below 0.5 in time
    make_trainer(callbacks=[es, recorder]).fit(model)
    assert es.stopped_epoch == 2 and es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert "did not beat the baseline 0.5 in the last 3 records" in es.stopping_reason_message
    assert es.restored_epoch == 2 and same_weights(model.state_dict(), recorder.weights[2])  # best, regardless
    unbounded = EarlyStopping("val_loss", patience=3)
    make_trainer(max_epochs=7, callbacks=[unbounded]).fit(Scripted(val_loss=[0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.3]))
    assert unbounded.stopping_reason_message is None


def test_defect3_beating_the_baseline_restarts_the_wait():
    es = EarlyStopping("val_loss", patience=3, baseline=0.5)
    # 0.9 (wait 1), 0.8 (2), 0.45 beats 0.5 (0), then three checks without improvement
    make_trainer(callbacks=[es]).fit(Scripted(val_loss=[0.9, 0.8, 0.45, 0.46, 0.47, 0.48, 0.3]))
    assert es.stopped_epoch == 5 and "did not improve in the last 3 records" in es.stopping_reason_message
    maximise = EarlyStopping("val_acc", mode="max", patience=2, baseline=0.9)
    make_trainer(callbacks=[maximise]).fit(Scripted(val_acc=[0.5, 0.6, 0.7, 0.95, 0.99]))
    assert maximise.stopped_epoch == 1


def test_defect7_second_fit_keeps_lightnings_counters_but_not_the_weights():
    first_seq, second_seq = [1.0, 0.2, 0.5, 0.6, 0.7], [0.9, 0.8, 0.85, 0.9, 0.9]
    ours = EarlyStopping("val_loss", patience=10, restore_best_weights=True)
    theirs = LightningEarlyStopping("val_loss", patience=10)
    for cb in (ours, theirs):
        make_trainer(max_epochs=5, callbacks=[cb]).fit(Scripted(val_loss=first_seq))
    assert ours.restored_epoch == 1
    recorder = WeightRecorder()
    second = Scripted(val_loss=second_seq)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=5, callbacks=[ours, recorder]).fit(second)
    make_trainer(max_epochs=5, callbacks=[theirs]).fit(Scripted(val_loss=second_seq))
    assert lightning_view(ours) == lightning_view(theirs)  # Lightning's counters carry over
    assert float(ours.best_score) == pytest.approx(0.2) and ours.wait_count == 8
    # no check of the second fit beat 0.2: the second model keeps its own last weights
    assert ours.restored_epoch is None and not ours.best_weights.has_copy
    assert same_weights(second.state_dict(), recorder.weights[4])
    assert any("weights were not restored" in str(w.message) for w in caught)


def test_defect7_second_fit_restores_its_own_best():
    es = EarlyStopping("val_loss", patience=10, restore_best_weights=True)
    make_trainer(max_epochs=3, callbacks=[es]).fit(Scripted(val_loss=[1.0, 0.5, 0.6]))
    recorder, model = WeightRecorder(), Scripted(val_loss=[0.45, 0.3, 0.4])
    make_trainer(max_epochs=3, callbacks=[es, recorder]).fit(model)
    assert es.restored_epoch == 1 and same_weights(model.state_dict(), recorder.weights[1])


def test_a_stop_and_a_restore_are_announced_once_on_rank_zero(caplog):
    import logging

    from epochwise.callbacks.stop_notices import stop_reasons

    es = EarlyStopping("val_loss", patience=1, restore_best_weights=True)
    trainer = make_trainer(callbacks=[es], max_epochs=10)
    with caplog.at_level(logging.INFO):
        trainer.fit(Scripted(val_loss=[1.0, 0.5, 0.7, 0.8, 0.9]))
    notices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epochwise:")]
    assert notices == [
        "epochwise: EarlyStopping stopped the fit at epoch 2: Monitored metric val_loss did not improve in the last"
        " 1 records. Best score: 0.500.",
        "epochwise: EarlyStopping restored the weights of epoch 1 (val_loss 0.5)",
    ]
    assert stop_reasons(trainer) == [n.removeprefix("epochwise: ") for n in notices]
