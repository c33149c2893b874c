"""Batch size as a schedule: exact per-step sizes, workers, loaders, accumulation, Trainer flags.

Every test reads what happened from inside the fit (per-step sizes, accumulation, validation
counts, samples) and compares it with what the schedule and Lightning's rules say must happen.
"""

from __future__ import annotations

import copy
import os
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from epochwise.callbacks import (
    BatchSizeSchedule,
    BatchSizeWarmup,
    ConfigurationError,
    LRScaling,
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


def test_max_steps_is_respected():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = RecordingModule()
    trainer = fit(module, [BatchSizeWarmup(2, 64, interval=1)], loader, max_epochs=100, max_steps=60)
    assert trainer.global_step == 60 and len(module.records) == 60


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


def test_max_per_device_auto_probes_memory_and_is_checkpointed(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from epochwise.callbacks.batch_memory import probe_max_per_device

    loader = DataLoader(make_dataset(64), batch_size=8)
    module = RecordingModule()
    probed = probe_max_per_device(module, loader, torch.optim.SGD(module.parameters(), lr=0.1))
    assert probed > 1000  # a 4->2 linear layer fits millions of samples in host memory
    warmup = BatchSizeWarmup(8, 32, interval=1, max_per_device="auto")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(module, [warmup, ckpt], loader, max_epochs=1, enable_checkpointing=True)
    assert warmup.state_dict()["probed_max_per_device"] == 64  # measured, capped at the epoch's 64 samples
    # a resumed fit uses the checkpointed limit instead of probing again
    path = tmp_path / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    key = next(k for k in checkpoint["callbacks"] if k.startswith("BatchSizeWarmup"))
    checkpoint["callbacks"][key]["probed_max_per_device"] = 12
    torch.save(checkpoint, path)
    module = RecordingModule()
    fresh = BatchSizeWarmup(8, 32, interval=1, max_per_device="auto")
    trainer = quiet_trainer(callbacks=[fresh], max_epochs=2)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(path))
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


def test_user_accumulation_is_kept_and_multiplied_by_the_split():
    loader = DataLoader(make_dataset(128), batch_size=8)
    module, probe = RecordingModule(), AccumProbe()
    trainer = fit(module, [BatchSizeWarmup(8, 32, factor=2, interval=1, max_per_device=8), probe], loader,
                  max_epochs=3, accumulate_grad_batches=2)
    per_epoch = {e: (acc, glob) for e, acc, glob in probe.rows}
    assert per_epoch == {0: (2, 16), 1: (4, 32), 2: (8, 64)}
    steps = {}
    for epoch, step, *_ in module.records:
        steps.setdefault(epoch, set()).add(step)
    assert [len(s) for s in steps.values()] == [8, 4, 2]
    assert trainer.accumulate_grad_batches == 2  # the user's value, given back


def test_step_unit_walk_counts_the_users_accumulation():
    # 48 samples, user accumulation 2: steps 0-2 ask 4 (x 2 micro-batches = 24 samples), steps 3-4
    # ask 8: the epoch ends at step 4 and never reaches step 6's 16 > max_per_device, so the plan
    # needs no split (a walk that forgot the accumulation would reach step 6 and halve every batch)
    loader = DataLoader(make_dataset(48), batch_size=4)
    module, probe = RecordingModule(), AccumProbe()
    warmup = BatchSizeWarmup(4, 16, factor=2, interval=3, unit="step", max_per_device=8)
    fit(module, [warmup, probe], loader, max_epochs=1, accumulate_grad_batches=2)
    assert {acc for _, acc, _ in probe.rows} == {2}
    assert [n for *_, n, _, _ in module.records] == [4] * 6 + [8] * 3
    assert [step for _, step, *_ in module.records] == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_an_epoch_request_without_an_exact_split_takes_the_closest_micro_batch():
    # 131 is prime: no exact split under max_per_device=64, so ceil(131 / 64) = 3 micro-batches of
    # round(131 / 3) = 44 (43.67 floored would be 43: a smaller effective batch, 129)
    loader = DataLoader(make_dataset(264), batch_size=8)
    module, probe = RecordingModule(), AccumProbe()
    fit(module, [BatchSizeSchedule({0: 131}, max_per_device=64), probe], loader, max_epochs=1)
    assert module.sizes_by_epoch() == {0: [44] * 6}
    assert {(acc, glob) for _, acc, glob in probe.rows} == {(3, 132)}


def test_drop_last_keeps_a_final_batch_that_fits_exactly():
    loader = DataLoader(make_dataset(100), batch_size=10, drop_last=True)
    module, probe = RecordingModule(), EpochLengthProbe()
    fit(module, [BatchSizeWarmup(10, 40, factor=2, interval=1), probe], loader, max_epochs=3)
    # 100 = 10 x 10 = 5 x 20: nothing to drop; 100 = 2 x 40 + 20: the short one is dropped
    assert module.sizes_by_epoch() == {0: [10] * 10, 1: [20] * 5, 2: [40] * 2}
    assert probe.lengths == [10, 5, 2]


def test_logging_at_lightnings_cadence_and_at_every_change():
    logger = MemoryLogger()
    loader = DataLoader(make_dataset(40), batch_size=10)
    fit(RecordingModule(), [BatchSizeWarmup(5, 20, interval=1)], loader, max_epochs=3, logger=logger,
        log_every_n_steps=3)
    rows = [(step, m) for step, m in logger.rows if "batch_size/per_device" in m]
    steps = [step for step, _ in rows]
    # the first step, every 3rd step (Lightning's cadence: steps 2, 5, 8, 11) and each change (8, 12)
    assert steps == [0, 2, 5, 8, 11, 12]
    assert [m["batch_size/per_device"] for _, m in rows] == [5.0, 5.0, 5.0, 10.0, 10.0, 20.0]
    # a short last batch is not a change: the scheduled size is logged
    assert all(m["batch_size/global"] == m["batch_size/per_device"] for _, m in rows)
    assert [m["samples_seen"] for _, m in rows] == [5.0, 15.0, 30.0, 50.0, 80.0, 100.0]


def test_no_logger_means_no_logging_work():
    loader = DataLoader(make_dataset(40), batch_size=10)
    module = RecordingModule()
    fit(module, [BatchSizeWarmup(5, 20, interval=1)], loader, max_epochs=1, logger=False)
    assert module.sizes_by_epoch()[0] == [5] * 8


def test_two_owners_is_an_error_at_setup():
    loader = DataLoader(make_dataset(20), batch_size=5)
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match="two callbacks control the batch size"):
            fit(RecordingModule(), [BatchSizeWarmup(2, 8), BatchSizeSchedule({0: 4})], loader, max_epochs=1)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: BatchSizeWarmup(0, 8), "`start`"),
        (lambda: BatchSizeWarmup(8, 4), "`end`"),
        (lambda: BatchSizeWarmup(True, 8), "`start`"),
        (lambda: BatchSizeWarmup(2, 8, factor=float("nan")), "`factor`"),
        (lambda: BatchSizeWarmup(2, 8, unit="batch"), "`unit`"),
        (lambda: BatchSizeWarmup(2, 8, max_per_device=0), "`max_per_device`"),
        (lambda: BatchSizeWarmup(2, 8, max_per_device="max"), "`max_per_device`"),
        (lambda: BatchSizeWarmup(2, 8, seed=True), "`seed`"),
        (lambda: BatchSizeSchedule({0: -1}), "milestones"),
        (lambda: BatchSizeSchedule({0: True}), "milestones"),
        (lambda: BatchSizeSchedule({}), "milestones"),
    ],
)
def test_constructor_validation_names_the_argument(make, match):
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match=match):
            make()


def test_max_per_device_auto_is_accepted_by_the_signature():
    import inspect

    warmup = BatchSizeWarmup(2, 8, max_per_device="auto")
    assert warmup.max_per_device == "auto"
    annotation = str(inspect.signature(BatchSizeWarmup).parameters["max_per_device"].annotation)
    assert "auto" in annotation  # LightningCLI parses a recipe's "auto" from this annotation


# -- the Trainer configurations a user may set -----------------------------------------------------
class ValModule(RecordingModule):
    """Records the training step at which every validation run happens."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.val_runs: list[tuple[int, int]] = []

    def val_dataloader(self):
        return DataLoader(make_dataset(10, seed=7), batch_size=10)

    def on_validation_start(self):
        if not self.trainer.sanity_checking:
            self.val_runs.append((self.current_epoch, len(self.records)))


def test_reloaded_loaders_are_resized_every_epoch_and_see_every_sample_once():
    loader = DataLoader(make_dataset(100), batch_size=10, shuffle=True)
    module = RecordingModule()
    fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=4, reload_dataloaders_every_n_epochs=1)
    sizes = module.sizes_by_epoch()
    assert sizes == {0: [10] * 10, 1: [20] * 5, 2: [40, 40, 20], 3: [40, 40, 20]}
    # the same samples are trained on each epoch (each once), whatever the size
    inputs = make_dataset(100).tensors[0]
    for epoch in range(4):
        total = sum(r[5] for r in module.records if r[0] == epoch)
        assert total == pytest.approx(float(inputs.sum()), rel=1e-5)


def test_integer_val_check_interval_counts_batches_of_each_epoch():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = ValModule()
    fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=4, val_check_interval=3)
    # epochs of 10, 5, 3, 3 batches: validation after every 3rd batch of each epoch
    assert module.val_runs == [(0, 3), (0, 6), (0, 9), (1, 13), (2, 18), (3, 21)]


def test_integer_val_check_interval_longer_than_a_planned_epoch_is_refused():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = ValModule()
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match=r"val_check_interval=4 .*epoch 2 has 3 batches.*check_val_every_n_epoch=None"):
            fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=4, val_check_interval=4)
    assert module.records == []  # refused before the first training step


def test_integer_val_check_interval_across_epochs():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = ValModule()
    fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=4, val_check_interval=4,
        check_val_every_n_epoch=None)
    assert [n for _, n in module.val_runs] == [4, 8, 12, 16, 20]  # every 4 batches of the whole fit


def test_fractional_val_check_interval_follows_each_epoch():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = ValModule()
    fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=3, val_check_interval=0.5)
    # Lightning's rule per epoch: every int(batches x 0.5) batches -> 10: 5, 5: 2, 3: 1
    assert module.val_runs == [(0, 5), (0, 10), (1, 12), (1, 14), (2, 16), (2, 17), (2, 18)]


def test_check_val_every_n_epoch():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = ValModule()
    fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=4, check_val_every_n_epoch=2)
    assert module.val_runs == [(1, 15), (3, 21)]


@pytest.mark.parametrize("limit, expected", [(4, [4, 4, 3]), (0.5, [5, 2, 1])])
def test_limit_train_batches(limit, expected):
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = RecordingModule()
    fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=3, limit_train_batches=limit)
    assert [len(v) for v in module.sizes_by_epoch().values()] == expected
    assert [v[0] for v in module.sizes_by_epoch().values()] == [10, 20, 40]


def test_fractional_limit_that_empties_an_epoch_is_refused():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = RecordingModule()
    with pytest.raises(ConfigurationError, match=r"limit_train_batches=0.2 leaves epoch 2 with 0 batches"):
        fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=4, limit_train_batches=0.2)
    assert module.records == []


class OneCycleModule(RecordingModule):
    """Sizes OneCycleLR from trainer.estimated_stepping_batches, as Lightning's docs show."""

    def __init__(self, total_steps=None, **kwargs):
        super().__init__(**kwargs)
        self.total_steps = total_steps

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        self.estimate = int(self.trainer.estimated_stepping_batches)
        total = self.total_steps or self.estimate
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize(
    "schedule, trainer_kwargs, steps",
    [
        (lambda: BatchSizeSchedule({0: 20, 2: 5}), {"max_epochs": 4}, 5 + 5 + 20 + 20),  # shrinks
        (lambda: BatchSizeWarmup(10, 40, interval=1), {"max_epochs": 4}, 10 + 5 + 3 + 3),
        (lambda: BatchSizeWarmup(10, 40, interval=1, max_per_device=10), {"max_epochs": 3}, 10 + 5 + 3),
        (lambda: BatchSizeWarmup(10, 40, interval=1), {"max_epochs": 4, "max_steps": 12}, 12),
        (lambda: BatchSizeWarmup(10, 40, interval=1), {"max_epochs": 4, "accumulate_grad_batches": 2}, 5 + 3 + 2 + 2),
    ],
)
def test_estimated_stepping_batches_is_exact_from_configure_optimizers(schedule, trainer_kwargs, steps):
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = OneCycleModule()
    trainer = fit(module, [schedule()], loader, **trainer_kwargs)
    assert module.estimate == steps == trainer.global_step
    assert trainer.max_steps == trainer_kwargs.get("max_steps", -1)  # the user's value, given back
    # the one-cycle curve ran to its end exactly: the last step used the schedule's last LR
    assert module.records[-1][4] == pytest.approx(module.lr / 25 / 1e4, rel=1e-2)


def test_a_step_scheduler_too_short_for_the_plan_is_refused():
    loader = DataLoader(make_dataset(100), batch_size=20)
    module = OneCycleModule(total_steps=20)  # 5 steps per epoch at the loader's own size
    with pytest.raises(ConfigurationError, match=r"OneCycleLR\(total_steps=20\).*takes 50 optimizer steps"):
        fit(module, [BatchSizeSchedule({0: 20, 2: 5})], loader, max_epochs=4)
    assert module.records == []


def test_max_steps_with_a_growing_batch():
    loader = DataLoader(make_dataset(100), batch_size=10)
    module = RecordingModule()
    trainer = fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=10, max_steps=17)
    assert trainer.global_step == 17
    assert [len(v) for v in module.sizes_by_epoch().values()] == [10, 5, 2]


class ManualModule(RecordingModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_with_max_per_device_is_refused():
    loader = DataLoader(make_dataset(40), batch_size=10)
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match=r"automatic_optimization=False.*max_per_device=None"):
            fit(ManualModule(), [BatchSizeWarmup(10, 40, interval=1, max_per_device=10)], loader, max_epochs=2)


def test_manual_optimization_sizes_are_exact():
    loader = DataLoader(make_dataset(40), batch_size=10)
    module = ManualModule()
    fit(module, [BatchSizeWarmup(10, 40, interval=1)], loader, max_epochs=3)
    assert module.sizes_by_epoch() == {0: [10] * 4, 1: [20] * 2, 2: [40]}


class UnprovenStrategy(SingleDeviceStrategy):
    pass


def test_unproven_strategy_is_refused():
    loader = DataLoader(make_dataset(40), batch_size=10)
    strategy = UnprovenStrategy(device=torch.device("cpu"))
    with pytest.raises(ConfigurationError, match="single device and under DDP.*UnprovenStrategy"):
        fit(RecordingModule(), [BatchSizeWarmup(10, 40)], loader, max_epochs=1, strategy=strategy)


def test_custom_batch_sampler_and_batch_size_none_are_refused():
    class Bucketing(BatchSampler):
        pass

    custom = DataLoader(make_dataset(20), batch_sampler=Bucketing(SequentialSampler(range(20)), 4, False))
    with pytest.raises(ConfigurationError, match="plain torch.utils.data.BatchSampler.*Bucketing"):
        fit(RecordingModule(), [BatchSizeWarmup(2, 8)], custom, max_epochs=1)
    unbatched = DataLoader(make_dataset(20), batch_size=None)
    with pytest.raises(ConfigurationError, match="batch_size=None"):
        fit(RecordingModule(), [BatchSizeWarmup(2, 8)], unbatched, max_epochs=1)


# -- reuse and the user's objects ------------------------------------------------------------------
def test_reuse_in_a_second_fit_takes_the_new_loaders_size():
    schedule = BatchSizeSchedule({2: 16})
    first, second = RecordingModule(), RecordingModule()
    fit(first, [schedule], DataLoader(make_dataset(32), batch_size=4), max_epochs=3)
    fit(second, [schedule], DataLoader(make_dataset(32), batch_size=8), max_epochs=3)
    assert [v[0] for v in first.sizes_by_epoch().values()] == [4, 4, 16]
    assert [v[0] for v in second.sizes_by_epoch().values()] == [8, 8, 16]


def test_two_fits_on_one_trainer_do_not_compound_accumulation():
    warmup, probe = BatchSizeWarmup(8, 16, interval=1, max_per_device=8), AccumProbe()
    trainer = quiet_trainer(callbacks=[warmup, probe], max_epochs=2, accumulate_grad_batches=4)
    loader = DataLoader(make_dataset(64), batch_size=8)
    trainer.fit(RecordingModule(), train_dataloaders=loader)
    first = list(probe.rows)
    probe.rows.clear()
    trainer.fit_loop.max_epochs = 4
    trainer.fit(RecordingModule(), train_dataloaders=loader)
    assert [acc for _, acc, _ in first] == [4] * 8 + [8] * 8
    assert [acc for _, acc, _ in probe.rows] == [8] * 16  # epochs 2-3 at 16 = 2 x 8: not 4 x 8 x 2
    assert trainer.accumulate_grad_batches == 4


def pristine(loader):
    return (type(loader), type(loader.batch_sampler), loader.batch_size, loader.batch_sampler.batch_size,
            len(loader), loader.__dict__.get("_iterator"), sorted(loader.batch_sampler.__dict__))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_users_loader_is_never_changed(num_workers):
    loader = DataLoader(make_dataset(40), batch_size=5, shuffle=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    before = pristine(loader)
    sampler_state = dict(loader.sampler.__dict__)
    fit(RecordingModule(), [BatchSizeWarmup(5, 20, interval=1, max_per_device=10), LRScaling()], loader, max_epochs=3)
    assert pristine(loader) == before and loader.sampler.__dict__ == sampler_state
    pickle.loads(pickle.dumps(loader.batch_sampler))
    # a plain fit afterwards trains at the loader's own size
    module = RecordingModule()
    fit(module, [], loader, max_epochs=1)
    assert module.sizes_by_epoch()[0] == [5] * 8


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


def test_an_exception_gives_everything_back():
    loader = DataLoader(make_dataset(40), batch_size=5)
    before = pristine(loader)
    module = CrashingModule(crash_at=(1, 2), scheduler="step")
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(5, 20, interval=1, max_per_device=5), LRScaling()],
                            max_epochs=3, accumulate_grad_batches=3)
    with pytest.raises(Boom):
        trainer.fit(module, train_dataloaders=loader)
    assert pristine(loader) == before
    assert trainer.accumulate_grad_batches == 3
    assert "setup_data" not in trainer.fit_loop.__dict__
    assert "process_dataloader" not in trainer.strategy.__dict__
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR
    pickle.dumps(scheduler.state_dict())
    copy.deepcopy(scheduler)
