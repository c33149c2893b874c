"""Resume from any step: a fit interrupted at batch k of epoch e and resumed from the checkpoint
saved there continues exactly as the uninterrupted fit (sizes, LRs, samples, weights).

The resumed fit runs under a different global seed than the interrupted one, so a shuffle seed
that was not taken from the checkpoint shows up as a different order.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from epochwise.callbacks import BatchSizeWarmup, LRScaling, LRWarmup, SampleBasedLRSchedule

from conftest import MemoryLogger, RecordingModule, quiet_trainer


def indexed_dataset(n: int = 100) -> TensorDataset:
    """Inputs whose first feature is the sample's index, so a batch says which samples it holds."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return TensorDataset(x, torch.randint(0, 2, (n,), generator=g))


class Boom(Exception):
    pass


class IndexRecorder(RecordingModule):
    """Records (epoch, step, batch_idx, size, lr, sample indices); optionally crashes at a batch."""

    def __init__(self, crash_at=None, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.layer(x[:, 1:])

    def training_step(self, batch, batch_idx):
        if self.crash_at == (self.current_epoch, batch_idx):
            raise Boom()
        x, y = batch
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.records.append((self.current_epoch, self.global_step, batch_idx, int(x.shape[0]), lr,
                             tuple(int(i) for i in x[:, 0].tolist())))
        return torch.nn.functional.cross_entropy(self(x), y)


def make_loader(kind: str, num_workers: int):
    kwargs = dict(batch_size=7, shuffle=True, num_workers=num_workers, persistent_workers=num_workers > 0)
    if kind == "stateful":
        stateful = pytest.importorskip("torchdata.stateful_dataloader")
        return stateful.StatefulDataLoader(indexed_dataset(), **kwargs)
    return DataLoader(indexed_dataset(), **kwargs)


def run(tmp_path, callbacks_factory, crash_at=None, ckpt_path=None, seed=0, kind="plain", num_workers=0,
        accumulate=1, max_epochs=5):
    torch.manual_seed(seed)
    module = IndexRecorder(crash_at=crash_at, scheduler="step")
    logger = MemoryLogger()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = quiet_trainer(callbacks=[*callbacks_factory(), ckpt], max_epochs=max_epochs, logger=logger,
                            log_every_n_steps=1, enable_checkpointing=True, default_root_dir=tmp_path,
                            accumulate_grad_batches=accumulate)
    try:
        trainer.fit(module, train_dataloaders=make_loader(kind, num_workers), ckpt_path=ckpt_path)
    except Boom:
        pass
    return module, logger


def warmup_and_scaling():
    return [BatchSizeWarmup(4, 32, factor=2, interval=1), LRScaling("sqrt")]


def step_warmup_with_lr():
    return [BatchSizeWarmup(4, 32, factor=2, interval=3, unit="step", max_per_device=16), LRScaling("linear"),
            LRWarmup(5, unit="step", start_factor=0.2)]


def sample_schedule_only():
    return [SampleBasedLRSchedule("cosine"), LRWarmup(1.5, unit="epoch")]


def check_resume(tmp_path, factory, crash_at, exact_samples=True, **kwargs):
    full, full_log = run(tmp_path / "full", factory, **kwargs)
    part, _ = run(tmp_path / "part", factory, crash_at=crash_at, **kwargs)
    resumed, res_log = run(tmp_path / "part", factory, ckpt_path=str(tmp_path / "part" / "last.ckpt"), seed=123,
                           **kwargs)
    merged = part.records + resumed.records
    assert resumed.records[0][:3] == full.records[len(part.records)][:3]  # continues at the next batch
    assert [r[:4] for r in merged] == [r[:4] for r in full.records]  # epochs, steps, batch indices, sizes
    assert [r[4] for r in merged] == pytest.approx([r[4] for r in full.records], rel=1e-12)  # LRs
    if exact_samples:
        assert [r[5] for r in merged] == [r[5] for r in full.records]  # the very same samples
        epoch = crash_at[0]
        seen = sorted(i for r in merged if r[0] == epoch for i in r[5])
        assert seen == list(range(100))  # the interrupted epoch trains on each sample exactly once
        for a, b in zip(full.parameters(), resumed.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    samples = {step: m["samples_seen"] for step, m in full_log.rows if "samples_seen" in m}
    resumed_samples = {step: m["samples_seen"] for step, m in res_log.rows if "samples_seen" in m}
    for step, value in resumed_samples.items():
        assert samples[step] == value, step


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_is_exact(tmp_path, num_workers):
    check_resume(tmp_path, warmup_and_scaling, crash_at=(2, 3), num_workers=num_workers)


def test_mid_epoch_resume_step_unit_with_accumulation_and_warmup(tmp_path):
    check_resume(tmp_path, step_warmup_with_lr, crash_at=(1, 4), accumulate=2)


def test_resume_at_the_first_batch_of_an_epoch(tmp_path):
    check_resume(tmp_path, warmup_and_scaling, crash_at=(3, 0))


def test_sample_based_schedule_without_a_controller_continues_its_curve(tmp_path):
    # Without a batch-size controller epochwise does not own the loader: a plain shuffled loader
    # resumed at an epoch boundary draws another order (Lightning's rule), but the LR curve, which
    # depends only on the samples seen, continues exactly.
    check_resume(tmp_path, sample_schedule_only, crash_at=(2, 0), exact_samples=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_with_a_stateful_dataloader(tmp_path, num_workers):
    check_resume(tmp_path, warmup_and_scaling, crash_at=(2, 3), kind="stateful", num_workers=num_workers)
