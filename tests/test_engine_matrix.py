"""The compatibility matrix: every engine callback x every Trainer configuration a user may set.

Each cell either runs and must match, batch by batch, an independent plain-Python model of
Lightning's loop (per-step sizes, image sizes, LRs, optimizer steps and validation runs), or is
refused before the first training step with an error that names the flag (catchable as
``MisconfigurationException`` and ``ValueError``). The model below is written from Lightning's
documented rules and the callbacks' docstrings, not from the engine's code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from epochwise.callbacks import (
    AdaptiveBatchSize,
    BatchSizeSchedule,
    BatchSizeWarmup,
    GradientNoiseScale,
    LRScaling,
    LRWarmup,
    ProgressiveResizing,
    SampleBasedLRSchedule,
)

from conftest import quiet_trainer

N, LOADER_BATCH, LR = 60, 6, 0.1


# -- the data and the module ------------------------------------------------------------------------
def images(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g))


class ImageStream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(1, 8, 8, generator=g), torch.randint(0, 2, (), generator=g)


class MatrixModule(pl.LightningModule):
    """Records (epoch, global_step, batch_idx, batch size, image side, LR) from inside training_step."""

    def __init__(self, manual: bool = False, with_val: bool = True):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        self.automatic_optimization = not manual
        self.with_val = with_val
        self.records: list[tuple] = []
        self.val_runs: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.records.append((self.current_epoch, self.global_step, batch_idx, int(x.shape[0]), int(x.shape[-1]), lr))
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def on_validation_start(self):
        if not self.trainer.sanity_checking:
            self.val_runs.append((self.current_epoch, len(self.records)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


# -- the model of Lightning's loop ------------------------------------------------------------------
@dataclass
class Column:
    """An engine callback and what it asks for, in the words of its docstring."""

    make: Callable[[], list]
    size: Callable[[int, int], int] | None = None  # (epoch, optimizer step) -> per-device size
    step_unit: bool = False
    image: Callable[[int], int] = lambda epoch: 8
    factors: list[Callable[[dict], float]] = field(default_factory=list)  # LR factors from the batch context
    max_per_device: int | None = None


def scaling(rule: str) -> Callable[[dict], float]:
    def factor(ctx: dict) -> float:
        k = ctx["global"] / ctx["base_global"]
        return k if rule == "linear" else math.sqrt(k)

    return factor


class FixedNoise(AdaptiveBatchSize):
    """AdaptiveBatchSize that always measures B_simple = 100: from 6 it doubles every epoch up to 24
    (also with accumulation 2: a target of 50 per device). Its real measurement: tests/test_adaptive.py."""

    def measured_noise_scale(self, trainer):
        return 100.0


def fixed_noise(*extra):
    return lambda: [FixedNoise(6, 24, start=6, noise_scale=GradientNoiseScale()), *extra]


COLUMNS: dict[str, Column] = {
    "BatchSizeWarmup(epoch)": Column(lambda: [BatchSizeWarmup(6, 24, interval=1)], lambda e, s: min(24, 6 * 2**e)),
    "BatchSizeWarmup(step)": Column(lambda: [BatchSizeWarmup(3, 24, interval=2, unit="step")],
                                    lambda e, s: min(24, 3 * 2 ** (s // 2)), step_unit=True),
    "BatchSizeWarmup(max_per_device)": Column(lambda: [BatchSizeWarmup(6, 24, interval=1, max_per_device=6)],
                                              lambda e, s: min(24, 6 * 2**e), max_per_device=6),
    "BatchSizeSchedule": Column(lambda: [BatchSizeSchedule({1: 12})], lambda e, s: LOADER_BATCH if e < 1 else 12),
    "ProgressiveResizing": Column(lambda: [ProgressiveResizing(stages=[(0, 4), (1, 8)])],
                                  lambda e, s: 24 if e < 1 else 6, image=lambda e: 4 if e < 1 else 8),
    "LRScaling": Column(lambda: [LRScaling("linear")], factors=[scaling("linear")]),
    "BatchSizeWarmup+LRScaling": Column(lambda: [BatchSizeWarmup(6, 24, interval=1), LRScaling("sqrt")],
                                        lambda e, s: min(24, 6 * 2**e), factors=[scaling("sqrt")]),
    "AdaptiveBatchSize": Column(fixed_noise(), lambda e, s: min(24, 6 * 2**e)),
    "AdaptiveBatchSize+LRScaling": Column(lambda: fixed_noise(LRScaling("sqrt"))(), lambda e, s: min(24, 6 * 2**e),
                                          factors=[scaling("sqrt")]),
    "LRWarmup(epoch)": Column(lambda: [LRWarmup(1.5, unit="epoch")],
                              factors=[lambda c: min(1.0, (c["epoch"] + c["i"] / c["length"]) / 1.5)]),
    "LRWarmup(step)": Column(lambda: [LRWarmup(5, unit="step")], factors=[lambda c: min(1.0, c["step"] / 5)]),
    "SampleBasedLRSchedule": Column(lambda: [SampleBasedLRSchedule("linear", total_samples=400)],
                                    factors=[lambda c: 1 - c["samples"] / 400]),
}


@dataclass
class Config:
    trainer: dict[str, Any] = field(default_factory=dict)
    manual: bool = False
    stream: bool = False
    refuse: dict[str, str] = field(default_factory=dict)  # column -> message pattern


CONFIGS: dict[str, Config] = {
    "defaults": Config(),
    "reload_dataloaders_every_n_epochs=1": Config({"reload_dataloaders_every_n_epochs": 1}),
    "val_check_interval=2": Config({"val_check_interval": 2}),
    "val_check_interval=4": Config(
        {"val_check_interval": 4},
        refuse={c: r"val_check_interval=4.*check_val_every_n_epoch=None" for c in (
            "BatchSizeWarmup(epoch)", "BatchSizeWarmup(step)", "BatchSizeWarmup+LRScaling", "ProgressiveResizing",
            "AdaptiveBatchSize", "AdaptiveBatchSize+LRScaling")},
    ),
    "val_check_interval=4, check_val_every_n_epoch=None": Config(
        {"val_check_interval": 4, "check_val_every_n_epoch": None}),
    "val_check_interval=0.5": Config({"val_check_interval": 0.5}),
    "check_val_every_n_epoch=2": Config({"check_val_every_n_epoch": 2}),
    "limit_train_batches=3": Config({"limit_train_batches": 3}),
    "limit_train_batches=0.5": Config({"limit_train_batches": 0.5}),
    "max_steps=7": Config({"max_steps": 7, "max_epochs": 10}),
    "accumulate_grad_batches=2": Config({"accumulate_grad_batches": 2}),
    "manual optimization": Config(manual=True, refuse={
        "BatchSizeWarmup(max_per_device)": r"automatic_optimization=False.*max_per_device=None"}),
    "IterableDataset stream": Config(
        {"max_steps": 9, "max_epochs": -1}, stream=True,
        refuse={
            "BatchSizeWarmup(epoch)": r"unit='epoch'.*unit='step'",
            "BatchSizeWarmup(max_per_device)": r"unit='epoch'.*unit='step'",
            "BatchSizeSchedule": r"unit='epoch'.*unit='step'",
            "BatchSizeWarmup+LRScaling": r"unit='epoch'.*unit='step'",
            "ProgressiveResizing": r"stream without __len__.*couple_batch_size=False",
            "LRWarmup(epoch)": r"LRWarmup\(unit='epoch'\).*unit='step'",
            "AdaptiveBatchSize": r"stream without __len__.*BatchSizeWarmup\(unit='step'\)",
            "AdaptiveBatchSize+LRScaling": r"stream without __len__.*BatchSizeWarmup\(unit='step'\)",
        },
    ),
}


def split(size: int, max_per_device: int | None) -> tuple[int, int]:
    if max_per_device is None or size <= max_per_device:
        return size, 1
    k = math.ceil(size / max_per_device)
    while size % k:
        k += 1
    return size // k, k


def expected(config: Config, column: Column) -> tuple[list[tuple], list[tuple[int, int]]]:
    """What Lightning's loop does with this callback, batch by batch."""
    t = {"max_epochs": 3, **config.trainer}
    max_epochs, max_steps = t["max_epochs"], t.get("max_steps", -1)
    user_acc = 1 if config.manual else t.get("accumulate_grad_batches", 1)
    limit = t.get("limit_train_batches", 1.0)
    interval = t.get("val_check_interval", 1.0)
    every = t.get("check_val_every_n_epoch", 1)
    records, val_runs = [], []
    step, samples, total_batches, base_global = 0, 0, 0, None
    epoch = 0
    while (max_epochs < 0 or epoch < max_epochs) and (max_steps < 0 or step < max_steps):
        first_step = step
        request = column.size(epoch, first_step) if column.size and not column.step_unit else LOADER_BATCH
        micro, extra = split(request, column.max_per_device)
        acc = user_acc * extra
        # the epoch's batches: sizes as scheduled, the last one short
        planned, remaining, i = [], (math.inf if config.stream else N), 0
        while remaining > 0 and (not config.stream or len(planned) < 10_000):
            s = column.size(epoch, first_step + i // acc) if column.step_unit else micro
            planned.append(min(s, remaining))
            remaining -= s
            i += 1
        length = len(planned) if not config.stream else math.inf
        limited = min(length, limit) if isinstance(limit, int) else (int(length * limit) if not config.stream else length)
        for i in range(int(min(limited, len(planned)))):
            if max_steps >= 0 and step >= max_steps:
                break
            size = planned[i]
            scheduled = column.size(epoch, step) if column.step_unit else (micro if column.size else LOADER_BATCH)
            glob = scheduled * acc
            base_global = base_global or glob
            ctx = {"epoch": epoch, "i": i, "length": limited, "step": step, "samples": samples,
                   "global": glob, "base_global": base_global}
            lr = LR * math.prod(f(ctx) for f in column.factors)
            records.append((epoch, step, i, size, column.image(epoch), lr))
            samples += size
            total_batches += 1
            last = i == limited - 1
            if config.manual:
                step += 1
            elif (i + 1) % acc == 0 or last:
                step += 1
            # validation, Lightning's rules
            if every is not None and (epoch + 1) % every != 0:
                continue
            if isinstance(interval, int):
                counter = total_batches if every is None else i + 1
                if counter % interval == 0:
                    val_runs.append((epoch, len(records)))
            elif interval == 1.0:
                if last:
                    val_runs.append((epoch, len(records)))
            elif (i + 1) % max(1, int(limited * interval)) == 0:
                val_runs.append((epoch, len(records)))
        epoch += 1
    return records, val_runs


def run(config: Config, column: Column) -> MatrixModule:
    module = MatrixModule(manual=config.manual)
    data = ImageStream() if config.stream else images()
    loader = DataLoader(data, batch_size=LOADER_BATCH, shuffle=not config.stream)
    val = DataLoader(images(12), batch_size=12)
    trainer = quiet_trainer(callbacks=column.make(), **{"max_epochs": 3, **config.trainer})
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val)
    return module


@pytest.mark.parametrize("column", sorted(COLUMNS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cell(config, column):
    cfg, col = CONFIGS[config], COLUMNS[column]
    if column in cfg.refuse:
        module = MatrixModule(manual=cfg.manual)
        for kind in (MisconfigurationException, ValueError):
            with pytest.raises(kind, match=cfg.refuse[column]):
                trainer = quiet_trainer(callbacks=col.make(), **{"max_epochs": 3, **cfg.trainer})
                data = ImageStream() if cfg.stream else images()
                trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=LOADER_BATCH),
                            val_dataloaders=DataLoader(images(12), batch_size=12))
        assert module.records == []  # refused before the first training step
        return
    module = run(cfg, col)
    want_records, want_val = expected(cfg, col)
    got = [r[:5] for r in module.records]
    assert got == [r[:5] for r in want_records]
    assert [r[5] for r in module.records] == pytest.approx([r[5] for r in want_records], rel=1e-9)
    assert module.val_runs == want_val


def matrix_markdown() -> str:
    """The matrix as a table (for the docs): exact or refused, per cell."""
    header = "| configuration | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, cfg in CONFIGS.items():
        cells = ["refused" if c in cfg.refuse else "exact" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Crash(Exception):
    pass


class CrashingMatrixModule(MatrixModule):
    def __init__(self, crash_at=None, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == self.crash_at:
            raise Crash()
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("column", sorted(COLUMNS))
def test_cell_resumed_mid_epoch(column, tmp_path):
    """The 'resume mid-epoch' row: crash at batch 1 of epoch 1, resume from the checkpoint saved at
    the last step; the two fits together must be the uninterrupted fit of the model above."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    col = COLUMNS[column]
    modules = []
    for crash_at, ckpt_path in (((1, 1), None), (None, str(tmp_path / "last.ckpt"))):
        torch.manual_seed(len(modules))  # a different global seed for the resumed fit
        module = CrashingMatrixModule(crash_at=crash_at)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = quiet_trainer(callbacks=[*col.make(), checkpoint], max_epochs=3, enable_checkpointing=True,
                                default_root_dir=tmp_path)
        try:
            trainer.fit(module, train_dataloaders=DataLoader(images(), batch_size=LOADER_BATCH, shuffle=True),
                        ckpt_path=ckpt_path)
        except Crash:
            pass
        modules.append(module)
    first, resumed = modules[0].records, modules[1].records
    start = (resumed[0][0], resumed[0][2])  # batches after the last checkpoint are trained again
    merged = [r for r in first if (r[0], r[2]) < start] + resumed
    want, _ = expected(Config(), col)
    assert [r[:5] for r in merged] == [r[:5] for r in want]
    assert [r[5] for r in merged] == pytest.approx([r[5] for r in want], rel=1e-9)
