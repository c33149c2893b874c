"""The one LR path: scaling, warmup and sample-based schedules as factors over any scheduler."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from epochwise.callbacks import (
    BatchSizeSchedule,
    BatchSizeWarmup,
    LRFactorCallback,
    LRScaling,
    LRWarmup,
    SampleBasedLRSchedule,
)

from conftest import MemoryLogger, RecordingModule, make_dataset, quiet_trainer


def fit(module, callbacks, loader=None, **trainer_kwargs):
    trainer = quiet_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def reference_scheduler_lrs(kind: str, epochs: int, lr: float = 0.1) -> list[float]:
    """LR per epoch of an independent copy of the module's scheduler (no epochwise)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if kind == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    elif kind == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    elif kind == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(1.0) if kind == "plateau" else sched.step()
    return out


class ConstantValLoss(RecordingModule):
    """val_loss never improves, so ReduceLROnPlateau(patience=0) halves the LR every epoch."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(1.0))


@pytest.mark.parametrize("scheduler", [None, "step", "cosine", "plateau"])
@pytest.mark.parametrize("rule", ["linear", "sqrt"])
def test_lr_is_base_times_rule_times_scheduler_factor_at_every_step(scheduler, rule):
    epochs = 5
    data = make_dataset(64)
    loader = DataLoader(data, batch_size=8)
    module = ConstantValLoss(lr=0.1, scheduler=scheduler)
    kwargs = {}
    if scheduler == "plateau":
        kwargs = dict(val_dataloaders=DataLoader(data, batch_size=64))
    trainer = quiet_trainer(
        callbacks=[BatchSizeWarmup(4, 64, factor=2, interval=1), LRScaling(rule)], max_epochs=epochs
    )
    trainer.fit(module, train_dataloaders=loader, **kwargs)
    ref = reference_scheduler_lrs(scheduler, epochs) if scheduler else [0.1] * epochs
    sizes = module.sizes_by_epoch()
    for epoch, _, batch_idx, _, lr, _ in module.records:
        k = sizes[epoch][0] / 4
        want = ref[epoch] * (k if rule == "linear" else math.sqrt(k))
        assert lr == pytest.approx(want, rel=1e-9), (scheduler, epoch, batch_idx)
    # the scheduler itself still sees its own (unscaled) values
    if scheduler in ("step", "cosine"):
        assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(
            reference_scheduler_lrs(scheduler, epochs + 1)[epochs]
        )


def test_lr_scaling_with_explicit_base_and_warmup_compose():
    loader = DataLoader(make_dataset(64), batch_size=8)
    module = RecordingModule(lr=0.1)
    fit(module, [BatchSizeSchedule({0: 16, 2: 32}), LRScaling("linear", base_batch_size=8),
                 LRWarmup(duration=4, unit="step", start_factor=0.0)], loader, max_epochs=3)
    for epoch, step, _, _, lr, _ in module.records:
        size = 16 if epoch < 2 else 32
        assert lr == pytest.approx(0.1 * size / 8 * min(1.0, step / 4)), (epoch, step)


def test_sample_based_schedule_is_invariant_to_batch_path():
    def lr_by_samples(callbacks, batch):
        loader = DataLoader(make_dataset(64), batch_size=batch)
        module = RecordingModule(lr=1.0)
        fit(module, callbacks + [SampleBasedLRSchedule("cosine")], loader, max_epochs=4)
        seen, out = 0, {}
        for *_, n, lr, _ in module.records:
            out[seen] = lr
            seen += n
        return out

    fixed = lr_by_samples([], 16)
    warm = lr_by_samples([BatchSizeWarmup(8, 32, interval=1)], 16)
    common = set(fixed) & set(warm)
    assert len(common) >= 6
    for s in common:
        assert warm[s] == pytest.approx(fixed[s]), s
        assert warm[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * s / 256)))


def test_scaling_follows_each_steps_planned_size_under_a_step_warmup():
    loader = DataLoader(make_dataset(120), batch_size=8)
    module = RecordingModule(lr=0.1)
    warmup = BatchSizeWarmup(4, 32, factor=2, interval=2, unit="step")
    fit(module, [warmup, LRScaling("linear")], loader, max_epochs=1)
    for _, step, batch_idx, n, lr, _ in module.records[:-1]:  # the last batch may be short
        assert n == warmup.schedule(step)
        assert lr == pytest.approx(0.1 * warmup.schedule(step) / 4), (step, batch_idx)


def test_scaling_counts_the_whole_accumulated_batch():
    loader = DataLoader(make_dataset(64), batch_size=8)
    module = RecordingModule(lr=0.1)
    scaling = LRScaling("linear", base_batch_size=8)
    fit(module, [scaling], loader, max_epochs=1, accumulate_grad_batches=2)
    assert scaling.global_batch == 16
    assert [r[4] for r in module.records] == pytest.approx([0.2] * 8)
    # with a controller, the split for max_per_device is part of the accumulation too
    module = RecordingModule(lr=0.1)
    fit(module, [BatchSizeSchedule({0: 16}, max_per_device=8), LRScaling("linear", base_batch_size=8)], loader,
        max_epochs=1, accumulate_grad_batches=2)
    assert {r[3] for r in module.records} == {8}
    assert [r[4] for r in module.records] == pytest.approx([0.1 * 32 / 8] * 8)


def test_epoch_warmup_is_smooth_within_the_epoch():
    loader = DataLoader(make_dataset(40), batch_size=10)
    module = RecordingModule(lr=1.0)
    fit(module, [LRWarmup(2, unit="epoch", start_factor=0.0)], loader, max_epochs=3)
    lrs = [(r[0], r[2], r[4]) for r in module.records]
    expected = [min(1.0, (epoch + i / 4) / 2) for epoch, i, _ in lrs]
    assert [lr for *_, lr in lrs] == pytest.approx(expected)
    assert lrs[1][2] == pytest.approx(0.125)  # not a staircase (0 for all of epoch 0), not an epoch per batch


def test_logged_lr_is_the_lr_the_optimizer_used_whatever_the_order():
    for order in ("scaling-first", "warmup-first"):
        logger = MemoryLogger()
        loader = DataLoader(make_dataset(40), batch_size=5)
        module = RecordingModule(lr=0.1)
        lr_callbacks = [LRScaling("linear", base_batch_size=5), LRWarmup(4, unit="step", start_factor=0.25)]
        if order == "warmup-first":
            lr_callbacks.reverse()
        fit(module, [BatchSizeSchedule({0: 5, 1: 10}), *lr_callbacks], loader, max_epochs=2, logger=logger,
            log_every_n_steps=1)
        used = {step: lr for _, step, _, _, lr, _ in module.records}
        logged = {step: m["lr/group0"] for step, m in logger.rows if "lr/group0" in m}
        assert logged == pytest.approx(used), order
        assert logged[2] == pytest.approx(0.1 * (0.25 + 0.75 * 2 / 4))


def test_lr_logged_at_cadence_and_at_each_jump_of_the_scaling():
    logger = MemoryLogger()
    loader = DataLoader(make_dataset(40), batch_size=5)
    fit(RecordingModule(lr=0.1), [BatchSizeWarmup(5, 20, interval=1), LRScaling("linear")], loader,
        max_epochs=3, logger=logger, log_every_n_steps=4)
    steps = [step for step, m in logger.rows if "lr/group0" in m]
    assert steps == [0, 3, 7, 8, 11, 12]  # first step, every 4th step, and the jumps at steps 8 and 12


def test_the_users_scheduler_is_never_changed():
    loader = DataLoader(make_dataset(40), batch_size=5)
    module = RecordingModule(scheduler="step")
    trainer = fit(module, [BatchSizeWarmup(5, 20, interval=1), LRScaling(), LRWarmup(3, unit="step")], loader,
                  max_epochs=3)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR
    assert scheduler.get_last_lr() == pytest.approx([0.1 * 0.5])  # its own, unscaled value after 3 epochs
    pickle.dumps(scheduler.state_dict())
    copy.deepcopy(scheduler)


class Constant(LRFactorCallback):
    factor_name = "constant"

    def __init__(self, value):
        super().__init__()
        self.value = value

    def lr_factor(self, trainer, batch_idx):
        return self.value


def test_two_callbacks_setting_one_factor_are_refused():
    class MyWarmup(Constant):
        factor_name = "warmup"

    loader = DataLoader(make_dataset(20), batch_size=5)
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match="two LR callbacks set the LR factor 'warmup'"):
            fit(RecordingModule(), [LRWarmup(2), MyWarmup(0.5)], loader, max_epochs=1)


class ManualSchedulerModule(RecordingModule):
    """Manual optimization that steps its StepLR itself, every 4 training steps."""

    def __init__(self):
        super().__init__(lr=0.1, scheduler="step")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        if (self.global_step) % 4 == 0:
            sched.step()


def test_manual_optimization_scheduler_steps_never_compound_the_factor():
    loader = DataLoader(make_dataset(80), batch_size=5)
    module = ManualSchedulerModule()
    fit(module, [LRScaling("linear", base_batch_size=5), BatchSizeSchedule({0: 10})], loader, max_epochs=1)
    # StepLR(step_size=2, gamma=0.5) stepped at steps 4 and 8: its own LR 0.1, 0.1, then 0.05
    expected = [0.1 * 2 * (0.5 if step > 8 else 1.0) for _, step, *_ in module.records]
    assert [r[4] for r in module.records] == pytest.approx(expected)


def test_a_factor_callback_composes_with_every_other_factor_and_the_scheduler():
    loader = DataLoader(make_dataset(40), batch_size=10)
    module = RecordingModule(lr=0.1, scheduler="step")
    fit(module, [Constant(0.5), LRScaling("sqrt", base_batch_size=10), BatchSizeSchedule({0: 40})], loader,
        max_epochs=3)
    for epoch, *_, lr, _ in module.records:
        assert lr == pytest.approx(0.1 * 0.5 ** (epoch // 2) * 0.5 * 2.0), epoch


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: LRScaling("cubic"), "`rule`"),
        (lambda: LRScaling(base_batch_size=0), "`base_batch_size`"),
        (lambda: LRScaling(base_batch_size=True), "`base_batch_size`"),
        (lambda: LRWarmup(0), "`duration`"),
        (lambda: LRWarmup(float("nan")), "`duration`"),
        (lambda: LRWarmup(True), "`duration`"),
        (lambda: LRWarmup(2, start_factor=2.0), "`start_factor`"),
        (lambda: LRWarmup(2, unit="batch"), "`unit`"),
        (lambda: SampleBasedLRSchedule("zigzag"), "`shape`"),
        (lambda: SampleBasedLRSchedule("cosine", total_samples=0), "`total_samples`"),
        (lambda: SampleBasedLRSchedule("cosine", min_factor=-1), "`min_factor`"),
        (lambda: SampleBasedLRSchedule("cosine", min_factor=float("nan")), "`min_factor`"),
        (lambda: SampleBasedLRSchedule("onecycle", div_factor=0), "onecycle"),
        (lambda: SampleBasedLRSchedule("cosine", warmup=3), "keyword arguments"),
    ],
)
def test_constructor_validation_names_the_argument(make, match):
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match=match):
            make()


class PlateauModule(RecordingModule):
    """val_loss never improves: ReduceLROnPlateau(patience=0) halves the LR after every epoch."""

    def val_dataloader(self):
        return DataLoader(make_dataset(8, seed=3), batch_size=8)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(1.0))


def test_lr_monitor_logs_one_tag_at_cadence_and_at_every_epoch_jump():
    from epochwise.callbacks import LRMonitor

    logger = MemoryLogger()
    module = PlateauModule(lr=0.1, scheduler="plateau")
    fit(module, [LRMonitor()], DataLoader(make_dataset(40), batch_size=5), max_epochs=4, logger=logger,
        log_every_n_steps=50)
    rows = [(step, m["lr/group0"]) for step, m in logger.rows if "lr/group0" in m]
    # the first LR, then each halving at the step it applies (the first epoch only sets the best)
    assert rows == [(0, pytest.approx(0.1)), (16, pytest.approx(0.05)), (24, pytest.approx(0.025))]
    assert not any(k.startswith("lr-") for _, m in logger.rows for k in m)
    assert [r[4] for r in module.records] == pytest.approx([0.1] * 16 + [0.05] * 8 + [0.025] * 8)
