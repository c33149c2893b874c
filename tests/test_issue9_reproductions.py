"""The 13 reproductions of issue 9 ("Trust the engine"), one test each, written against the public
API that existed before the fix (so each can be run on the old code, where it fails).

Errors are caught as Lightning's ``MisconfigurationException`` and as ``ValueError``, as a
Lightning user would.
"""

from __future__ import annotations

import gc
import pickle
import re
import weakref
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from epochwise.callbacks import (
    BatchSizeSchedule,
    BatchSizeWarmup,
    LearningCurveMonitor,
    LRScaling,
    LRWarmup,
    SampleBasedLRSchedule,
)

from conftest import MemoryLogger, RecordingModule, make_dataset, quiet_trainer

ROOT = Path(__file__).resolve().parent.parent


def refused(match: str):
    """Both exception types a Lightning user may catch."""
    return pytest.raises((MisconfigurationException, ValueError), match=match)


def indexed(n: int = 100) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return TensorDataset(x, torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(1)))


class Crash(Exception):
    pass


class IndexModule(RecordingModule):
    def __init__(self, crash_at=None, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at
        self.samples: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == self.crash_at:
            raise Crash()
        self.samples.setdefault(self.current_epoch, []).extend(int(i) for i in batch[0][:, 0])
        return super().training_step(batch, batch_idx)


# 1 --------------------------------------------------------------------------------------------
class FreshLoaders(IndexModule):
    def train_dataloader(self):  # a new DataLoader at every reload, as DataModules build them
        return DataLoader(indexed(), batch_size=10, shuffle=True)


def test_1_reloaded_loaders_keep_the_schedule_and_every_sample():
    module = FreshLoaders()
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(10, 40, interval=1)], max_epochs=4,
                            reload_dataloaders_every_n_epochs=1)
    trainer.fit(module)
    assert [v[0] for v in module.sizes_by_epoch().values()] == [10, 20, 40, 40]
    assert all(sorted(s) == list(range(100)) for s in module.samples.values())


# 2 --------------------------------------------------------------------------------------------
class ValCounter(RecordingModule):
    def __init__(self):
        super().__init__()
        self.val_epochs: list[int] = []

    def val_dataloader(self):
        return DataLoader(make_dataset(10, seed=3), batch_size=10)

    def on_validation_start(self):
        if not self.trainer.sanity_checking:
            self.val_epochs.append(self.current_epoch)


def test_2_integer_val_check_interval_keeps_validating_and_no_epoch_silently_empties():
    module = ValCounter()
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(10, 40, interval=1)], max_epochs=4, val_check_interval=3)
    trainer.fit(module, train_dataloaders=DataLoader(make_dataset(100), batch_size=10))
    assert module.val_epochs == [0, 0, 0, 1, 2, 3]  # epochs of 10, 5, 3 and 3 batches
    module = RecordingModule()
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(10, 40, interval=1)], max_epochs=4, limit_train_batches=0.2)
    with refused("limit_train_batches=0.2"):
        trainer.fit(module, train_dataloaders=DataLoader(make_dataset(100), batch_size=10))


# 3 --------------------------------------------------------------------------------------------
def test_3_the_users_loader_and_scheduler_are_left_as_built():
    loader = DataLoader(make_dataset(40), batch_size=5, shuffle=True)
    before = (type(loader.batch_sampler), loader.batch_sampler.batch_size, len(loader),
              sorted(loader.batch_sampler.__dict__))
    module = RecordingModule(scheduler="step")
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(5, 20, interval=1), LRScaling()], max_epochs=3)
    trainer.fit(module, train_dataloaders=loader)
    after = (type(loader.batch_sampler), loader.batch_sampler.batch_size, len(loader),
             sorted(loader.batch_sampler.__dict__))
    assert after == before
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR
    pickle.dumps(scheduler)
    plain = RecordingModule()
    quiet_trainer(max_epochs=1).fit(plain, train_dataloaders=loader)
    assert plain.sizes_by_epoch()[0] == [5] * 8


# 4 --------------------------------------------------------------------------------------------
def test_4_a_finished_fit_is_not_kept_alive():
    callbacks = [BatchSizeWarmup(4, 8), LRScaling(), LRWarmup(1)]

    def run():
        module = RecordingModule()
        trainer = quiet_trainer(callbacks=callbacks, max_epochs=1)
        trainer.fit(module, train_dataloaders=DataLoader(make_dataset(16), batch_size=4))
        return weakref.ref(trainer.optimizers[0]), weakref.ref(module)

    optimizer, module = run()
    gc.collect()
    assert optimizer() is None and module() is None


# 5 --------------------------------------------------------------------------------------------
def test_5_resume_from_a_mid_epoch_checkpoint_sees_each_sample_once(tmp_path):
    def run(ckpt_path=None, crash_at=None):
        module = IndexModule(crash_at=crash_at)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = quiet_trainer(callbacks=[BatchSizeWarmup(8, 32, interval=1), checkpoint], max_epochs=3,
                                enable_checkpointing=True, default_root_dir=tmp_path)
        try:
            trainer.fit(module, train_dataloaders=DataLoader(indexed(), batch_size=8, shuffle=True),
                        ckpt_path=ckpt_path)
        except Crash:
            pass
        return module

    first = run(crash_at=(1, 2))
    second = run(ckpt_path=str(tmp_path / "last.ckpt"))
    epoch_1 = first.samples[1] + second.samples[1]
    assert sorted(epoch_1) == list(range(100))


# 6 --------------------------------------------------------------------------------------------
class OneCycle(RecordingModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_6_one_cycle_sized_from_estimated_stepping_batches_with_a_shrinking_batch():
    module = OneCycle()
    trainer = quiet_trainer(callbacks=[BatchSizeSchedule({0: 20, 2: 5})], max_epochs=4)
    trainer.fit(module, train_dataloaders=DataLoader(make_dataset(100), batch_size=20))
    assert trainer.global_step == 50


# 7 --------------------------------------------------------------------------------------------
class Manual(RecordingModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.optimizers().zero_grad()
        self.manual_backward(loss)
        self.optimizers().step()


def test_7_manual_optimization_with_max_per_device_is_refused():
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(8, 32, interval=1, max_per_device=8), LRScaling()],
                            max_epochs=2)
    with refused("automatic_optimization=False"):
        trainer.fit(Manual(), train_dataloaders=DataLoader(make_dataset(64), batch_size=8))


# 8 --------------------------------------------------------------------------------------------
class Accumulation(Callback):
    def __init__(self):
        self.values: list[int] = []

    def on_train_batch_start(self, trainer, *args):
        self.values.append(trainer.accumulate_grad_batches)


def test_8_callbacks_are_reusable_across_fits_and_trainers():
    schedule = BatchSizeSchedule({2: 16})
    first, second = RecordingModule(), RecordingModule()
    quiet_trainer(callbacks=[schedule], max_epochs=3).fit(first, train_dataloaders=DataLoader(make_dataset(32), batch_size=4))
    quiet_trainer(callbacks=[schedule], max_epochs=3).fit(second, train_dataloaders=DataLoader(make_dataset(32), batch_size=8))
    assert [v[0] for v in second.sizes_by_epoch().values()] == [8, 8, 16]
    probe = Accumulation()
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(8, 16, interval=1, max_per_device=8), probe], max_epochs=2,
                            accumulate_grad_batches=4)
    loader = DataLoader(make_dataset(64), batch_size=8)
    trainer.fit(RecordingModule(), train_dataloaders=loader)
    trainer.fit_loop.max_epochs = 3
    trainer.fit(RecordingModule(), train_dataloaders=loader)
    assert max(probe.values) == 8 and trainer.accumulate_grad_batches == 4


# 9 --------------------------------------------------------------------------------------------
class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(4, generator=g), torch.randint(0, 2, (), generator=g)


def test_9_streams_are_driven_by_step_schedules_and_the_rest_is_refused():
    module = RecordingModule()
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(2, 8, interval=2, unit="step"), LRScaling(),
                                       LRWarmup(4, unit="step")], max_steps=8)
    trainer.fit(module, train_dataloaders=DataLoader(Stream(), batch_size=2))
    assert [r[3] for r in module.records] == [2, 2, 4, 4, 8, 8, 8, 8]
    for callback, match in ((LRWarmup(2, unit="epoch"), "unit='step'"), (SampleBasedLRSchedule(), "total_samples")):
        with refused(match):
            quiet_trainer(callbacks=[callback], max_steps=4).fit(
                RecordingModule(), train_dataloaders=DataLoader(Stream(), batch_size=2))


# 10 -------------------------------------------------------------------------------------------
def test_10_digits_with_augmentation_work_under_spawn():
    from epochwise.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=16, augment_shift=2, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    spawned = DataLoader(loader.dataset, batch_size=16, num_workers=2, multiprocessing_context="spawn",
                         collate_fn=loader.collate_fn)
    assert len(next(iter(spawned))[0]) == 16


# 11 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LRWarmup(float("nan")), "duration"),
        (lambda: SampleBasedLRSchedule(min_factor=-1), "min_factor"),
        (lambda: LRScaling(base_batch_size=True), "base_batch_size"),
        (lambda: BatchSizeWarmup(4, 8, seed=True), "seed"),
        (lambda: BatchSizeWarmup(True, 8), "start"),
        (lambda: LRScaling(rule=1), "rule"),
    ],
)
def test_11_bad_arguments_are_refused_naming_the_argument(make, match):
    with refused(match):
        make()


def test_11_a_single_metric_name_is_one_metric_and_auto_is_parsed():
    monitor = LearningCurveMonitor(metrics="val_loss")
    assert tuple(monitor.metrics) == ("val_loss",)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(BatchSizeWarmup, "warmup")
    config = parser.parse_args(["--warmup.start=4", "--warmup.end=8", "--warmup.max_per_device=auto"])
    assert parser.instantiate_classes(config).warmup.max_per_device == "auto"


# 12 -------------------------------------------------------------------------------------------
def test_12_the_lightning_range_is_the_one_the_tests_prove():
    import lightning

    spec = re.search(r'"lightning([^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert spec == ">=2.6,<2.7"
    major, minor = map(int, lightning.__version__.split(".")[:2])
    assert (major, minor) == (2, 6)


# 13 -------------------------------------------------------------------------------------------
def test_13_the_logged_lr_is_the_lr_used():
    logger = MemoryLogger()
    module = RecordingModule(lr=0.01)
    trainer = quiet_trainer(callbacks=[LRScaling("linear", base_batch_size=4), LRWarmup(4, unit="step")],
                            max_epochs=1, logger=logger, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(make_dataset(40), batch_size=8))
    used = [lr for *_, lr, _ in module.records]
    logged = logger.series("lr/group0")
    assert logged == pytest.approx(used)
