"""AdaptiveBatchSize: the decision rule, a larger batch on a noisier task, the LR following, exact
resume, the same decisions on both DDP ranks, and what it refuses."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import epochwise.callbacks
from epochwise.callbacks import (
    AdaptiveBatchSize,
    ConfigurationError,
    GradientNoiseScale,
    LRScaling,
    next_batch_size,
)
from epochwise.callbacks.adaptive import MIN_POW2_HYSTERESIS

from _noise_tasks import LinearRegression, regression_data
from conftest import RecordingModule, make_dataset, quiet_trainer
from test_ddp import PER_STEP_HOOKS, CollectiveCounter


# -- the rule ----------------------------------------------------------------------------------------
def test_next_batch_size_steps_band_and_bounds():
    assert next_batch_size(32, 48.0, 8, 256) == 32 and next_batch_size(32, 49.0, 8, 256) == 64  # band x1.5
    assert next_batch_size(32, 21.5, 8, 256) == 32 and next_batch_size(32, 21.0, 8, 256) == 16
    assert next_batch_size(256, 1e9, 8, 256) == 256 and next_batch_size(8, 1.0, 8, 256) == 8  # clamped
    assert next_batch_size(24, 1e9, 8, 40) == 40 and next_batch_size(9, 1.0, 1, 64) == 5  # halving rounds half up
    for target in (None, float("nan")):
        assert next_batch_size(32, target, 8, 256) == 32
    assert next_batch_size(32, float("inf"), 8, 256) == 64 and next_batch_size(32, float("inf"), 8, 256, 1.5) == 48
    assert next_batch_size(32, 0.0, 8, 256) == 16 and next_batch_size(32, -3.0, 8, 256, 1.5) == 22
    # bounded ratio: at most x step, never past the target (down when growing, up when shrinking)
    assert next_batch_size(32, 1000.0, 8, 512, step=1.5) == 48
    assert next_batch_size(32, 41.0, 8, 512, step=1.5, hysteresis=0.1) == 41
    assert next_batch_size(32, 10.0, 8, 512, step=1.5) == 22  # ceil(32 / 1.5)
    assert next_batch_size(32, 25.0, 8, 512, step=2.0, hysteresis=0.2) == 25


@pytest.mark.parametrize("step, hysteresis", [("pow2", MIN_POW2_HYSTERESIS), ("pow2", 0.5), (1.5, 0.0), (3.0, 0.1)])
def test_a_constant_target_never_makes_the_size_oscillate(step, hysteresis):
    for start in (1, 3, 8, 24, 100, 256):
        for target in [0.5 * 1.1**k for k in range(80)]:
            sizes = [start]
            for _ in range(30):
                sizes.append(next_batch_size(sizes[-1], target, 1, 4096, step, hysteresis))
            moves = [b - a for a, b in zip(sizes, sizes[1:]) if b != a]
            assert all(m > 0 for m in moves) or all(m < 0 for m in moves), (start, target, sizes)


def test_argument_checks():
    for kwargs, pattern in (
        ({"min_size": 0, "max_size": 8}, "min_size"), ({"min_size": 16, "max_size": 8}, "max_size"),
        ({"min_size": 8, "max_size": 64, "start": 4}, "start"), ({"min_size": 8, "max_size": 64, "every_n_epochs": 0},
                                                                  "every_n_epochs"),
        ({"min_size": 8, "max_size": 64, "step": 1.0}, "step"), ({"min_size": 8, "max_size": 64, "hysteresis": 0.3},
                                                                 r"hysteresis.*0\.4142.*oscillate"),
        ({"min_size": 8, "max_size": 64, "step": 2.0, "hysteresis": -0.1}, "hysteresis"),
        ({"min_size": 8, "max_size": 64, "target_scale": 0}, "target_scale"),
        ({"min_size": 8, "max_size": 64, "noise_scale": object()}, "noise_scale"),
    ):
        with pytest.raises(ConfigurationError, match=pattern):
            AdaptiveBatchSize(**kwargs)


# -- in a fit ------------------------------------------------------------------------------------------
class LRRegression(LinearRegression):
    """Records (epoch, step, batch_idx, size) and the LR per batch as Lightning hands it over (the
    in-step split of GradientNoiseScale calls training_step with parts of it)."""

    def on_train_batch_start(self, batch, batch_idx):
        self.lrs = getattr(self, "lrs", [])
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.rows.append((self.current_epoch, self.global_step, batch_idx, int(batch[0].shape[0])))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self.linear(x).squeeze(-1) - y).pow(2).mean()


def adaptive_fit(sigma, epochs=6, n=2048, lr=0.01, extra=(), **trainer_kwargs):
    torch.manual_seed(0)
    module = LRRegression(lr=lr)
    gns = GradientNoiseScale(every_n_steps=1, ema_decay=0.95)
    adaptive = AdaptiveBatchSize(min_size=8, max_size=256, start=16)
    trainer = quiet_trainer(callbacks=[gns, adaptive, *extra], max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, DataLoader(regression_data(n=n, sigma=sigma), batch_size=16, shuffle=True))
    return module, adaptive


def sizes_by_epoch(rows):
    out: dict[int, set[int]] = {}
    for epoch, _, _, size in rows:
        out.setdefault(epoch, set()).add(size)
    return out


def test_a_noisier_task_ends_at_a_larger_batch_and_every_epoch_trains_at_its_decision():
    """Acceptance: label noise 3 (B_simple grows as the fit converges) vs none (B_simple ~ d + 1 = 9)."""
    noisy, noisy_adaptive = adaptive_fit(sigma=3.0)
    clean, clean_adaptive = adaptive_fit(sigma=0.0)
    high, low = noisy_adaptive.decisions, clean_adaptive.decisions
    assert high[5] >= 128 and low[5] <= 16 and high[5] >= 8 * low[5], (high, low)
    assert list(high.values()) == sorted(high.values())  # grows step by step (x2 per epoch at most)
    assert all(b in (a, 2 * a) for a, b in zip(list(high.values()), list(high.values())[1:]))
    for module, decisions in ((noisy, high), (clean, low)):
        by_epoch = sizes_by_epoch(module.rows)
        for epoch, sizes in by_epoch.items():
            assert max(sizes) == decisions[epoch]  # (a short last batch may be smaller)
        assert len(module.rows) == sum(math.ceil(2048 / decisions[e]) for e in range(6))


def test_lr_scaling_follows_the_decisions():
    module, adaptive = adaptive_fit(sigma=3.0, epochs=4, extra=[LRScaling("linear")], lr=0.001)
    sizes = [adaptive.decisions[epoch] for epoch, _, _, _ in module.rows]
    assert module.lrs == pytest.approx([0.001 * s / 16 for s in sizes], rel=1e-12)
    assert max(sizes) > 16


class Crash(Exception):
    pass


class CrashingRegression(LRRegression):
    def __init__(self, crash_at=None, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == self.crash_at:
            raise Crash()
        super().on_train_batch_start(batch, batch_idx)


def test_a_resumed_fit_continues_the_decisions_exactly(tmp_path):
    """Acceptance: interrupted in epoch 2 and resumed from the last step's checkpoint, the fit makes the
    decisions (and trains the batches, and ends at the weights) of the uninterrupted one."""
    runs = []
    # 512 samples: epoch 0 trains 64 steps of 8, epoch 1 32 steps of 16, epoch 2 starts at step 96
    for run, (crash_at, ckpt) in enumerate(((None, None), (100, None), (None, str(tmp_path / "1" / "last.ckpt")))):
        torch.manual_seed(run)  # the resumed fit must not depend on the global seed
        module = CrashingRegression(crash_at=crash_at, lr=0.01)
        gns = GradientNoiseScale(every_n_steps=1, ema_decay=0.9)
        adaptive = AdaptiveBatchSize(min_size=8, max_size=256, start=8, seed=3)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / str(run), save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = quiet_trainer(callbacks=[gns, adaptive, checkpoint], max_epochs=5, enable_checkpointing=True)
        try:
            trainer.fit(module, DataLoader(regression_data(n=512, sigma=2.0), batch_size=8, shuffle=True),
                        ckpt_path=ckpt)
        except Crash:
            runs.append(("crashed", module.rows, adaptive.decisions))
            continue
        runs.append((module, module.rows, adaptive.decisions))
    (whole, whole_rows, whole_decisions), (_, first_rows, first_decisions), (resumed, resumed_rows, decisions) = runs
    assert len(set(whole_decisions.values())) >= 3  # it did decide something
    assert decisions == whole_decisions
    assert min(epoch for epoch in first_decisions) == 0 and max(first_decisions) == 2  # crashed in epoch 2
    start = resumed_rows[0][1]  # the resumed fit starts at the step after the last checkpoint
    assert start == 100 and resumed_rows[0][0] == 2
    assert [r for r in first_rows if r[1] < start] + resumed_rows == whole_rows
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_refusals_before_training():
    loader = DataLoader(make_dataset(60), batch_size=6)
    cases = [
        ([AdaptiveBatchSize(8, 32)], {}, "add GradientNoiseScale"),
        ([GradientNoiseScale(), AdaptiveBatchSize(4, 24)], {"val_check_interval": 4},
         r"val_check_interval=4.*at its largest batch size, 24, an epoch has 3 batches"),
        ([GradientNoiseScale(), AdaptiveBatchSize(4, 60)], {"limit_train_batches": 0.5},
         r"limit_train_batches=0.5 leaves an epoch at the largest batch size with 0 batches"),
    ]
    for callbacks, kwargs, pattern in cases:
        module = RecordingModule()
        with pytest.raises(ConfigurationError, match=pattern):
            quiet_trainer(callbacks=callbacks, max_epochs=2, **kwargs).fit(
                module, loader, val_dataloaders=DataLoader(make_dataset(12), batch_size=6))
        assert module.records == []
    module = RecordingModule(scheduler="onecycle_steps")
    with pytest.raises(ConfigurationError, match=r"OneCycleLR\(total_steps=1000\).*SampleBasedLRSchedule"):
        quiet_trainer(callbacks=[GradientNoiseScale(), AdaptiveBatchSize(4, 24)], max_epochs=2).fit(module, loader)
    assert module.records == []


# -- DDP -------------------------------------------------------------------------------------------------
_FOLDERS = (str(Path(epochwise.callbacks.__file__).parent), str(Path(epochwise.callbacks.__file__).resolve().parent))


class Counter(CollectiveCounter):
    """test_ddp's collective counter, matching epochwise's frames by the path they were imported from
    (which may be a link to the source folder) as well as the resolved one."""

    @staticmethod
    def _describe(name):
        frame, hooks, ours = sys._getframe(2), [], []
        while frame is not None:
            if frame.f_code.co_name in PER_STEP_HOOKS:
                hooks.append(frame.f_code.co_name)
            if frame.f_code.co_filename.startswith(_FOLDERS):
                ours.append(frame.f_code.co_name)
            frame = frame.f_back
        return {"collective": name, "per_step": hooks, "epochwise": ours}


class RankRegression(LRRegression):
    def __init__(self, out_dir: str):
        super().__init__(lr=0.01)
        self.out_dir = out_dir

    def teardown(self, stage):
        adaptive = next(c for c in self.trainer.callbacks if isinstance(c, AdaptiveBatchSize))
        gns = next(c for c in self.trainer.callbacks if isinstance(c, GradientNoiseScale))
        counter = next(c for c in self.trainer.callbacks if isinstance(c, CollectiveCounter))
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"decisions": adaptive.decisions, "rows": self.rows, "noise": gns.estimator.values(),
                       "calls": counter.calls}, f)


@pytest.mark.slow
def test_decisions_are_identical_on_both_ddp_ranks(tmp_path):
    counter = Counter()
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_epochs=4, callbacks=[
        counter, GradientNoiseScale(every_n_steps=1, ema_decay=0.9), AdaptiveBatchSize(min_size=8, max_size=128, start=8)])
    trainer.fit(RankRegression(str(tmp_path)), DataLoader(regression_data(n=1024, sigma=3.0), batch_size=8, shuffle=True))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["decisions"] == ranks[1]["decisions"] and ranks[0]["noise"] == ranks[1]["noise"]
    decisions = {int(e): n for e, n in ranks[0]["decisions"].items()}
    assert decisions[3] > decisions[0]  # it grew, on both ranks alike
    for rank in ranks:
        assert [r[:2] + r[3:] for r in rank["rows"]] == [r[:2] + r[3:] for r in ranks[0]["rows"]]
        for epoch, sizes in sizes_by_epoch(rank["rows"]).items():
            assert max(sizes) == decisions[epoch]
        # the decisions' broadcast is at epoch boundaries; no epochwise collective in a per-step hook
        broadcasts = [c for c in rank["calls"] if c["collective"] == "broadcast_object_list" and "_decide" in c["epochwise"]]
        assert len(broadcasts) == 3  # epochs 1, 2, 3
        per_step = [c for c in rank["calls"] if c["epochwise"] and c["per_step"]]
        # only DDP's own gradient all-reduce, made by the comm hook in DDP's stead: one per step (one bucket)
        assert {(c["collective"], c["epochwise"][0]) for c in per_step} == {("all_reduce", "gns_allreduce_hook")}
        assert len(per_step) == len(rank["rows"])
