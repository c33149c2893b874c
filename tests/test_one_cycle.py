"""OneCycleBatchLR: per-step batch sizes and LRs read inside training_step follow the pure schedule over
samples seen exactly, against an independent batch-by-batch model of the fit (accumulation,
max_per_device, limits, drop_last, a stream, a user scheduler, a mid-epoch resume)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from epochwise.callbacks import LRWarmup, OneCycleBatchLR, OneCycleBatchLRSchedule
from epochwise.datamodules.text import GeneratedTextDataModule

from conftest import MemoryLogger, RecordingModule, make_dataset, quiet_trainer
from test_engine_matrix import CONFIGS, LOADER_BATCH, ImageStream, MatrixModule, N, images

LR = 0.1


def half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split(size: int, limit: int | None) -> int:
    """Fewest micro-batches of at most ``limit`` that divide ``size`` (the test values divide)."""
    if limit is None or size <= limit:
        return 1
    k = math.ceil(size / limit)
    while size % k:
        k += 1
    return k


def expected(n, base, epochs, schedule, total, acc=1, limit_pd=None, limit_batches=None, drop_last=False,
             world=1, max_steps=None, lr_of_epoch=lambda e: LR):
    """(epoch, step, size, lr) of every batch: each step's batch and LR come from the samples (all
    ranks) trained before it; an epoch's requests are split by the split of its largest one; then
    Lightning's limits cut the epoch (an int caps its batches, a float scales them) and max_steps
    the fit."""
    rows, seen, step = [], 0, 0
    for epoch in range(epochs):
        k = 1
        for _ in range(10):
            epoch_rows, largest, s, st, remaining = [], 1, seen, step, n
            while remaining > 0 and len(epoch_rows) < 10_000:  # a stream: far enough
                p = min(1.0, s / total)
                request = schedule.batch_size(p, base)
                largest = max(largest, request)
                micro = max(1, half_up(request / k))
                step_rows = []
                for _ in range(acc * k):
                    if remaining <= 0 or (drop_last and remaining < micro):
                        remaining = 0
                        break
                    step_rows.append((epoch, st, min(micro, remaining), lr_of_epoch(epoch) * schedule.lr_factor(p)))
                    remaining -= micro
                if not step_rows:
                    break
                epoch_rows += step_rows
                s += world * sum(r[2] for r in step_rows)
                st += 1
            if split(largest, limit_pd) == k:
                break
            k = split(largest, limit_pd)
        if limit_batches is not None:
            length = len(epoch_rows)
            keep = min(length, limit_batches) if isinstance(limit_batches, int) else int(length * limit_batches)
            epoch_rows = epoch_rows[:keep]
        if max_steps is not None:
            epoch_rows = [r for r in epoch_rows if r[1] < max_steps]
        rows += epoch_rows
        seen += world * sum(r[2] for r in epoch_rows)
        step = epoch_rows[-1][1] + 1 if epoch_rows else step
        if max_steps is not None and step >= max_steps:
            break
    return rows


class Recorder(RecordingModule):
    def configure_optimizers(self):
        self.estimated = self.trainer.estimated_stepping_batches
        return super().configure_optimizers()


def fit(callback, loader, **trainer_kwargs):
    module = Recorder(lr=LR, scheduler=trainer_kwargs.pop("scheduler", None))
    logger = MemoryLogger()
    trainer = quiet_trainer(callbacks=[callback], logger=logger, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return module, logger


def check(module, want):
    got = [(e, s, n) for e, s, _, n, _, _ in module.records]
    assert got == [w[:3] for w in want]
    assert [r[4] for r in module.records] == pytest.approx([w[3] for w in want], rel=1e-12)
    assert module.estimated == len({w[1] for w in want})  # exact optimizer steps, from configure_optimizers


SHAPE = OneCycleBatchLRSchedule(max_lr_factor=10, min_batch_factor=0.5)


def test_batch_and_lr_follow_the_schedule_over_samples_and_compose_with_a_scheduler():
    module, logger = fit(OneCycleBatchLR(), DataLoader(make_dataset(100), batch_size=10, shuffle=True),
                         max_epochs=4, scheduler="step")
    step_lr = lambda e: LR * 0.5 ** (e // 2)  # noqa: E731  StepLR(step_size=2, gamma=0.5) per epoch
    want = expected(100, 10, 4, SHAPE, total=400, lr_of_epoch=step_lr)
    check(module, want)
    sizes = [n for *_, n, _ in want]
    assert sizes[0] == 10 and 5 in sizes and max(sizes[-4:]) == 10  # 1x -> 0.5x -> back to 1x
    assert max(r[4] for r in module.records) == pytest.approx(10 * LR, rel=0.01)  # the peak, 10x
    factors = logger.series("lr_factor/one_cycle")
    assert factors[0] == 1.0 and factors[-1] < 0.01
    assert logger.series("one_cycle/progress") and logger.series("batch_size/per_device")
    assert logger.series("samples_seen")[-1] == 400


@pytest.mark.parametrize(
    "case",
    ["accumulation", "max_per_device", "limit_train_batches", "drop_last"],
)
def test_exact_with_accumulation_max_per_device_limits_and_drop_last(case):
    kwargs, model, n, base = {}, {}, 100, 10
    callback = OneCycleBatchLR(min_batch_factor=0.4)
    shape = OneCycleBatchLRSchedule(min_batch_factor=0.4)
    drop_last = case == "drop_last"
    if case == "accumulation":
        kwargs, model = {"accumulate_grad_batches": 2}, {"acc": 2}
    elif case == "max_per_device":
        callback = OneCycleBatchLR(min_batch_factor=0.4, max_per_device=6)
        model = {"limit_pd": 6}
    elif case == "limit_train_batches":
        callback = OneCycleBatchLR(min_batch_factor=0.4, total_samples=120)
        kwargs, model = {"limit_train_batches": 5}, {"limit_batches": 5}
    loader = DataLoader(make_dataset(n), batch_size=base, shuffle=True, drop_last=drop_last)
    module, _ = fit(callback, loader, max_epochs=3, **kwargs)
    total = 120 if case == "limit_train_batches" else 300
    check(module, expected(n, base, 3, shape, total=total, drop_last=drop_last, **model))
    if case == "max_per_device":
        assert max(r[3] for r in module.records) <= 6 and {r[3] for r in module.records} >= {5, 4}


def test_a_stream_takes_the_schedule_per_step_with_total_samples():
    class LMRecorder(Recorder):
        def __init__(self):
            super().__init__(lr=LR)
            self.embed = torch.nn.Embedding(28, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.records.append((self.current_epoch, self.global_step, batch_idx, int(x.shape[0]), lr, 0.0))
            return torch.nn.functional.cross_entropy(self.layer(self.embed(x)).reshape(-1, 2), (y % 2).reshape(-1))

    dm = GeneratedTextDataModule(seq_len=6, batch_size=8, val_windows=4)
    module = LMRecorder()
    trainer = quiet_trainer(callbacks=[OneCycleBatchLR(total_samples=100)], max_steps=18, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    want = expected(10**9, 8, 1, SHAPE, total=100, max_steps=18)
    assert [(s, n) for _, s, _, n, _, _ in module.records] == [(s, n) for _, s, n, _ in want]
    assert [r[4] for r in module.records] == pytest.approx([w[3] for w in want], rel=1e-12)


def test_needs_total_samples_when_an_epoch_cannot_say_it_and_two_lr_owners_of_one_factor_refused():
    loader = DataLoader(make_dataset(40), batch_size=4)
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match=r"`total_samples`.*limit_train_batches"):
            quiet_trainer(callbacks=[OneCycleBatchLR()], max_epochs=2, limit_train_batches=3).fit(
                RecordingModule(), train_dataloaders=loader)
    with pytest.raises(ValueError, match="min_batch_factor"):
        OneCycleBatchLR(min_batch_factor=1.5)
    module = RecordingModule()
    trainer = quiet_trainer(callbacks=[OneCycleBatchLR(), LRWarmup(2)], max_epochs=1)
    trainer.fit(module, train_dataloaders=loader)  # a different factor composes
    assert module.records[0][4] == 0.0  # warmup from 0 x one-cycle's 1x


class Boom(Exception):
    pass


class Crashing(Recorder):
    def __init__(self, crash_at=None):
        super().__init__(lr=LR)
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == self.crash_at:
            raise Boom()
        return super().training_step(batch, batch_idx)


def test_a_mid_epoch_resume_continues_the_same_sizes_lrs_and_samples(tmp_path):
    def run(folder, crash_at=None, ckpt=None, seed=0):
        torch.manual_seed(seed)
        module = Crashing(crash_at)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = quiet_trainer(callbacks=[OneCycleBatchLR(max_per_device=8), checkpoint], max_epochs=3,
                                enable_checkpointing=True, default_root_dir=tmp_path / folder)
        try:
            trainer.fit(module, train_dataloaders=DataLoader(make_dataset(100), batch_size=10, shuffle=True),
                        ckpt_path=ckpt)
        except Boom:
            pass
        return module.records

    full = run("full")
    part = run("part", crash_at=(1, 3))
    resumed = run("part", ckpt=str(tmp_path / "part" / "last.ckpt"), seed=7)  # another global seed
    merged = part + resumed
    assert [r[:4] for r in merged] == [r[:4] for r in full]
    assert [r[4] for r in merged] == pytest.approx([r[4] for r in full], rel=1e-12)
    assert [r[5] for r in merged] == pytest.approx([r[5] for r in full])  # the very same samples


@pytest.mark.parametrize("config", list(CONFIGS))
def test_exact_in_every_configuration_of_the_engine_matrix(config):
    """The rows of tests/test_engine_matrix.py, with OneCycleBatchLR as the column (sizes and LRs)."""
    cfg = CONFIGS[config]
    t = {"max_epochs": 3, **cfg.trainer}
    module = MatrixModule(manual=cfg.manual)
    loader = DataLoader(ImageStream() if cfg.stream else images(), batch_size=LOADER_BATCH, shuffle=not cfg.stream)
    trainer = quiet_trainer(callbacks=[OneCycleBatchLR(total_samples=150)], **t)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(images(12), batch_size=12))
    want = expected(10**9 if cfg.stream else N, LOADER_BATCH, max(1, t["max_epochs"]), SHAPE, total=150,
                    acc=1 if cfg.manual else t.get("accumulate_grad_batches", 1),
                    limit_batches=t.get("limit_train_batches"), max_steps=t.get("max_steps"))
    assert [(e, s, n) for e, s, _, n, _, _ in module.records] == [w[:3] for w in want]
    assert [r[5] for r in module.records] == pytest.approx([w[3] for w in want], rel=1e-12)
