"""Streams (IterableDataset): the resizable sampler drives how many items each batch pulls.

The streaming language-model example: a causal LM on generated text with step-unit batch-size
warmup, LR scaling and LR warmup, exact at every step; what a stream cannot do is refused.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from epochwise.callbacks import BatchSizeWarmup, LRScaling, LRWarmup, SampleBasedLRSchedule
from epochwise.datamodules.text import GeneratedTextDataModule, TokenStream
from epochwise.modules.language_model import CausalLM

from conftest import MemoryLogger, quiet_trainer


class RecordingLM(CausalLM):
    def __init__(self):
        super().__init__(vocab_size=28, d_model=16, num_layers=1, num_heads=2, max_len=64, lr=1e-3)
        self.records: list[tuple[int, int, int, float]] = []

    def training_step(self, batch, batch_idx):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.records.append((self.current_epoch, self.global_step, int(batch[0].shape[0]), lr))
        return super().training_step(batch, batch_idx)


def lm_callbacks():
    return [BatchSizeWarmup(2, 16, factor=2, interval=3, unit="step"), LRScaling("sqrt"),
            LRWarmup(4, unit="step", start_factor=0.25)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_step_warmup_drives_an_endless_stream_exactly(num_workers):
    dm = GeneratedTextDataModule(seq_len=12, batch_size=2, num_workers=num_workers, val_windows=8)
    module = RecordingLM()
    logger = MemoryLogger()
    trainer = quiet_trainer(callbacks=lm_callbacks(), max_steps=14, logger=logger, log_every_n_steps=1,
                            limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    warmup = BatchSizeWarmup(2, 16, factor=2, interval=3, unit="step").schedule
    assert [(step, n) for _, step, n, _ in module.records] == [(s, warmup(s)) for s in range(14)]
    for _, step, n, lr in module.records:
        expected = 1e-3 * (n / 2) ** 0.5 * min(1.0, 0.25 + 0.75 * step / 4)
        assert lr == pytest.approx(expected), step
    for key in ("batch_size/per_device", "batch_size/global", "samples_seen", "lr/group0", "train_loss_step"):
        assert logger.series(key), key
    assert logger.series("samples_seen")[-1] == sum(n for *_, n, _ in module.records)


def test_a_stream_with_a_length_takes_epoch_units():
    dm = GeneratedTextDataModule(seq_len=8, batch_size=4, train_windows=40, val_windows=8)
    module = RecordingLM()
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(4, 16, interval=1), LRScaling("linear")], max_epochs=3,
                            limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    per_epoch: dict[int, list[int]] = {}
    for epoch, _, n, _ in module.records:
        per_epoch.setdefault(epoch, []).append(n)
    assert per_epoch == {0: [4] * 10, 1: [8] * 5, 2: [16, 16, 8]}


@pytest.mark.parametrize(
    "callbacks, match",
    [
        (lambda: [BatchSizeWarmup(2, 8)], r"unit='epoch'.*stream without __len__.*unit='step'"),
        (lambda: [LRWarmup(2, unit="epoch")], r"LRWarmup\(unit='epoch'\).*LRWarmup\(unit='step'\)"),
        (lambda: [SampleBasedLRSchedule("cosine")], r"`total_samples`"),
    ],
)
def test_what_an_endless_stream_cannot_do_is_refused(callbacks, match):
    dm = GeneratedTextDataModule(seq_len=8, batch_size=2, val_windows=8)
    module = RecordingLM()
    trainer = quiet_trainer(callbacks=callbacks(), max_steps=5, limit_val_batches=0)
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match=match):
            trainer.fit(module, datamodule=dm)
    assert module.records == []


def test_sample_based_schedule_on_a_stream_with_total_samples():
    dm = GeneratedTextDataModule(seq_len=8, batch_size=4, val_windows=8)
    module = RecordingLM()
    trainer = quiet_trainer(callbacks=[SampleBasedLRSchedule("linear", total_samples=40)], max_steps=10,
                            limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert [lr for *_, lr in module.records] == pytest.approx([1e-3 * (1 - 4 * i / 40) for i in range(10)])


def test_token_stream_shards_workers_and_ranks_and_counts_windows():
    stream = TokenStream(seq_len=6, num_windows=10)
    windows = list(stream)
    assert len(windows) == len(stream) == 10
    other_rank = list(TokenStream(seq_len=6, num_windows=10, rank=1, world_size=2))
    first_rank = list(TokenStream(seq_len=6, num_windows=10, rank=0, world_size=2))
    assert len(other_rank) == len(first_rank) == 5
    assert not torch.equal(first_rank[0][0], other_rank[0][0])
