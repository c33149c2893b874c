"""Batch size as a schedule: exact per-step sizes, LR coupling, workers, loaders, accumulation, resume."""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from epochwise.callbacks import (
    BatchSizeSchedule,
    BatchSizeWarmup,
    LRScaling,
    LRWarmup,
    SampleBasedLRSchedule,
    batch_state,
)

from conftest import MemoryLogger, RecordingModule, make_dataset, quiet_trainer


def fit(module, callbacks, loader=None, datamodule=None, **trainer_kwargs):
    trainer = quiet_trainer(callbacks=callbacks, **trainer_kwargs)
    if datamodule is not None:
        trainer.fit(module, datamodule=datamodule)
    elif loader is not None:
        trainer.fit(module, train_dataloaders=loader)
    else:
        trainer.fit(module)
    return trainer


def expected_epoch_sizes(n: int, size: int) -> list[int]:
    full, rest = divmod(n, size)
    return [size] * full + ([rest] if rest else [])


class EpochLengthProbe(Callback):
    """Reads Lightning's cached epoch length from inside the loop (progress bar total, epoch end)."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.lengths.append(trainer.num_training_batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_warmup_sizes_exact_from_first_step(num_workers):
    loader = DataLoader(make_dataset(100), batch_size=7, shuffle=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    module, probe = RecordingModule(), EpochLengthProbe()
    fit(module, [BatchSizeWarmup(4, 32, factor=2, interval=1), probe], loader, max_epochs=5)
    sizes = module.sizes_by_epoch()
    for epoch, want in enumerate([4, 8, 16, 32, 32]):
        assert sizes[epoch] == expected_epoch_sizes(100, want), epoch
    # Lightning's cached epoch length follows the batch size (progress bar, epoch end)
    assert probe.lengths == [25, 13, 7, 4, 4]


def test_issue_example_table():
    loader = DataLoader(make_dataset(64), batch_size=64)
    module = RecordingModule()
    fit(module, [BatchSizeWarmup(16, 256, factor=2, interval=2)], loader, max_epochs=9)
    firsts = [v[0] for v in module.sizes_by_epoch().values()]
    assert firsts == [16, 16, 32, 32, 64, 64, 64, 64, 64]  # capped by the 64-sample dataset


@pytest.mark.parametrize("num_workers", [0, 2])
def test_step_unit_exact_at_every_step_despite_prefetch(num_workers):
    loader = DataLoader(make_dataset(200), batch_size=50, shuffle=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    module = RecordingModule()
    warmup = BatchSizeWarmup(2, 32, factor=2, interval=3, unit="step")
    fit(module, [warmup], loader, max_epochs=3)
    by_epoch = module.sizes_by_epoch()
    for epoch, step, batch_idx, n, _, _ in module.records:
        last = batch_idx == len(by_epoch[epoch]) - 1
        if not last:
            assert n == warmup.schedule(step), (epoch, step, n)
        else:
            assert n <= warmup.schedule(step)
    assert sum(by_epoch[0]) == 200


def test_linear_mode_and_milestones():
    loader = DataLoader(make_dataset(60), batch_size=3)
    module = RecordingModule()
    fit(module, [BatchSizeWarmup(5, 20, interval=1, mode="linear", increment=5)], loader, max_epochs=5)
    assert [v[0] for v in module.sizes_by_epoch().values()] == [5, 10, 15, 20, 20]

    module = RecordingModule()
    fit(module, [BatchSizeSchedule({0: 6, 2: 12, 4: 30})], loader, max_epochs=5)
    assert [v[0] for v in module.sizes_by_epoch().values()] == [6, 6, 12, 12, 30]


def test_milestones_before_first_use_loader_size():
    loader = DataLoader(make_dataset(40), batch_size=10)
    module = RecordingModule()
    fit(module, [BatchSizeSchedule({2: 20})], loader, max_epochs=3)
    assert [v[0] for v in module.sizes_by_epoch().values()] == [10, 10, 20]


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


class PidDataset(Dataset):
    def __len__(self):
        return 96

    def __getitem__(self, i):
        return torch.full((4,), float(i)), torch.tensor(i % 2), torch.tensor(os.getpid())


class PidModule(RecordingModule):
    def __init__(self):
        super().__init__()
        self.pids: dict[int, set[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y, pid = batch
        self.pids.setdefault(self.current_epoch, set()).update(pid.tolist())
        return super().training_step((x, y), batch_idx)


def test_worker_pids_unchanged_across_three_size_changes():
    loader = DataLoader(PidDataset(), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)
    module = PidModule()
    fit(module, [BatchSizeWarmup(4, 32, factor=2, interval=1)], loader, max_epochs=4)
    assert [v[0] for v in module.sizes_by_epoch().values()] == [4, 8, 16, 32]  # three changes
    pid_sets = list(module.pids.values())
    assert len(pid_sets[0]) == 2 and os.getpid() not in pid_sets[0]
    assert all(s == pid_sets[0] for s in pid_sets)


class LoaderDataModule(pl.LightningDataModule):
    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def train_dataloader(self):
        return self.loader


@pytest.mark.parametrize("how", ["datamodule", "module_hook", "fit_argument"])
def test_three_ways_of_providing_the_train_loader(how):
    loader = DataLoader(make_dataset(48), batch_size=5, shuffle=True)
    warmup = BatchSizeWarmup(6, 24, factor=2, interval=1)
    if how == "datamodule":
        module = RecordingModule()
        fit(module, [warmup], datamodule=LoaderDataModule(loader), max_epochs=3)
    elif how == "module_hook":
        module = RecordingModule(loader=loader)
        fit(module, [warmup], max_epochs=3)
    else:
        module = RecordingModule()
        fit(module, [warmup], loader, max_epochs=3)
    assert module.sizes_by_epoch() == {0: [6] * 8, 1: [12] * 4, 2: [24] * 2}


def test_in_memory_digits_fast_path():
    from epochwise.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, image_size=8)

    class Tiny(RecordingModule):
        def __init__(self):
            super().__init__(features=64)
            self.layer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    module = Tiny()
    fit(module, [BatchSizeWarmup(32, 128, interval=1)], datamodule=dm, max_epochs=3, limit_val_batches=0)
    n = len(dm.train_set)
    for epoch, want in enumerate([32, 64, 128]):
        assert module.sizes_by_epoch()[epoch] == expected_epoch_sizes(n, want)


class AccumProbe(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = batch_state(trainer)
        self.rows.append((trainer.current_epoch, trainer.accumulate_grad_batches, state.global_batch))


def test_max_per_device_keeps_effective_batch_through_accumulation():
    loader = DataLoader(make_dataset(128), batch_size=8)
    module, probe = RecordingModule(), AccumProbe()
    fit(module, [BatchSizeWarmup(8, 32, factor=2, interval=1, max_per_device=8), probe], loader, max_epochs=3)
    assert all(n <= 8 for *_, n, _, _ in [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in module.records])
    per_epoch = {e: (acc, glob) for e, acc, glob in probe.rows}
    assert per_epoch == {0: (1, 8), 1: (2, 16), 2: (4, 32)}
    # optimizer steps per epoch = 128 samples / effective batch
    steps = {}
    for epoch, step, *_ in module.records:
        steps.setdefault(epoch, set()).add(step)
    assert [len(s) for s in steps.values()] == [16, 8, 4]


def test_logging_every_step():
    logger = MemoryLogger()
    loader = DataLoader(make_dataset(40), batch_size=10)
    module = RecordingModule()
    fit(module, [BatchSizeWarmup(5, 20, interval=1), LRScaling("linear")], loader, max_epochs=3, logger=logger)
    per_device = logger.series("batch_size/per_device")
    assert per_device == [5.0] * 8 + [10.0] * 4 + [20.0] * 2
    assert logger.series("batch_size/global") == per_device
    samples = logger.series("samples_seen")
    assert samples[-1] == 120 and samples == sorted(samples)
    lrs = logger.series("lr/group0")
    assert len(lrs) == 14 and lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.4)


def test_max_steps_is_respected():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = RecordingModule()
    trainer = fit(module, [BatchSizeWarmup(2, 64, interval=1)], loader, max_epochs=100, max_steps=60)
    assert trainer.global_step == 60 and len(module.records) == 60


def test_two_owners_is_an_error_at_setup():
    loader = DataLoader(make_dataset(20), batch_size=5)
    with pytest.raises(RuntimeError, match="two callbacks control the batch size"):
        fit(RecordingModule(), [BatchSizeWarmup(2, 8), BatchSizeSchedule({0: 4})], loader, max_epochs=1)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: BatchSizeWarmup(0, 8), "start"),
        (lambda: BatchSizeWarmup(8, 4), "end"),
        (lambda: BatchSizeWarmup(2, 8, unit="batch"), "unit"),
        (lambda: BatchSizeWarmup(2, 8, max_per_device=0), "max_per_device"),
        (lambda: BatchSizeSchedule({0: -1}), "milestones"),
        (lambda: LRScaling("cubic"), "rule"),
        (lambda: LRScaling(base_batch_size=0), "base_batch_size"),
        (lambda: LRWarmup(0), "duration"),
        (lambda: LRWarmup(2, start_factor=2.0), "start_factor"),
        (lambda: SampleBasedLRSchedule("zigzag"), "shape"),
        (lambda: SampleBasedLRSchedule("cosine", total_samples=0), "total_samples"),
        (lambda: SampleBasedLRSchedule("cosine", warmup=3), "keyword arguments"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


class Boom(Exception):
    pass


class CrashingModule(RecordingModule):
    def __init__(self, crash_at=None, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        if self.crash_at == (self.current_epoch, batch_idx):
            raise Boom()
        return super().training_step(batch, batch_idx)


def run_resumable(tmp_path, crash_at=None, ckpt_path=None, num_workers=0):
    pl.seed_everything(0)
    loader = DataLoader(make_dataset(100), batch_size=7, shuffle=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    module = CrashingModule(crash_at=crash_at, scheduler="step")
    logger = MemoryLogger()
    callbacks = [BatchSizeWarmup(4, 32, factor=2, interval=1), LRScaling("sqrt"),
                 ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    trainer = quiet_trainer(callbacks=callbacks, max_epochs=6, deterministic=True, logger=logger,
                            enable_checkpointing=True, default_root_dir=tmp_path)
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    except Boom:
        pass
    return module, logger


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_warmup_continues_exactly(tmp_path, num_workers):
    full, full_log = run_resumable(tmp_path / "full", num_workers=num_workers)
    part, part_log = run_resumable(tmp_path / "part", crash_at=(3, 1), num_workers=num_workers)
    resumed, res_log = run_resumable(tmp_path / "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"),
                                     num_workers=num_workers)
    merged = [r for r in part.records if r[0] < 3] + resumed.records
    assert [r[:5] for r in merged] == [r[:5] for r in full.records]  # sizes, steps, LRs
    assert [r[5] for r in merged] == [r[5] for r in full.records]  # the very same samples
    assert resumed.records[0][0] == 3
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
    # samples_seen continues from the checkpoint, not from zero
    full_samples = dict(zip(range(len(full.records)), full_log.series("samples_seen")))
    n_before = len([r for r in part.records if r[0] < 3])
    assert res_log.series("samples_seen")[0] == full_samples[n_before]


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


def test_progress_bar_total_follows_the_batch_size():
    class BarProbe(Callback):
        def __init__(self):
            self.totals = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.totals.append(trainer.progress_bar_callback.train_progress_bar.total)

    probe = BarProbe()
    loader = DataLoader(make_dataset(100), batch_size=10)
    fit(RecordingModule(), [BatchSizeWarmup(5, 50, interval=1), probe], loader, max_epochs=4,
        enable_progress_bar=True)
    assert probe.totals == [20, 10, 5, 3]  # sizes 5, 10, 20, 40


def test_max_per_device_auto_probes_memory_and_is_checkpointed():
    from epochwise.callbacks.batch_size import probe_max_per_device

    loader = DataLoader(make_dataset(64), batch_size=8)
    module = RecordingModule()
    probed = probe_max_per_device(module, loader, torch.optim.SGD(module.parameters(), lr=0.1))
    assert probed > 1000  # a 4->2 linear layer fits millions of samples in host memory
    warmup = BatchSizeWarmup(8, 32, interval=1, max_per_device="auto")
    fit(module, [warmup], loader, max_epochs=2)
    assert warmup.state_dict()["probed_max_per_device"] > 1000
    assert module.sizes_by_epoch()[1] == [16] * 4
    fresh = BatchSizeWarmup(8, 32, interval=1, max_per_device="auto")
    fresh.load_state_dict({"probed_max_per_device": 12})
    module = RecordingModule()
    fit(module, [fresh], loader, max_epochs=2)
    assert module.sizes_by_epoch()[1] == [8] * 8  # 16 split as 2 x 8 under the restored limit of 12


def test_step_schedule_with_max_per_device_keeps_every_step_effective_batch():
    loader = DataLoader(make_dataset(96), batch_size=8)
    module, probe = RecordingModule(), AccumProbe()
    warmup = BatchSizeWarmup(4, 16, factor=2, interval=2, unit="step", max_per_device=8)
    fit(module, [warmup, probe], loader, max_epochs=1)
    assert {acc for _, acc, _ in probe.rows} == {2}  # covers the epoch's largest request (16 = 2 x 8)
    samples_per_step: dict[int, int] = {}
    for _, step, _, n, _, _ in module.records:
        samples_per_step[step] = samples_per_step.get(step, 0) + n
    steps = sorted(samples_per_step)
    for step in steps[:-1]:  # the last step may be short: the epoch ran out of samples
        assert samples_per_step[step] == warmup.schedule(step), step
    assert all(n <= 8 for *_, n, _, _ in module.records)
