"""SequenceLengthWarmup: training sequences cut to the scheduled length at every optimizer step, the
coupled batch keeping the tokens of a step within 5% of a full-length step, validation at full
length; on the streaming language-model example and on a map-style token data set."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from epochwise.callbacks import (
    SequenceLengthSchedule,
    SequenceLengthWarmup,
    coupled_batch_for_length,
)
from epochwise.datamodules.text import GeneratedTextDataModule, TokenStream
from epochwise.modules.language_model import CausalLM

from conftest import MemoryLogger, quiet_trainer

FULL = 32


class ShapeLM(CausalLM):
    """Records (epoch, optimizer step, batch_idx, inputs shape, targets shape, first window) of each
    training batch and the shapes of the validation batches."""

    def __init__(self, crash_at=None):
        super().__init__(vocab_size=28, d_model=16, num_layers=1, num_heads=2, max_len=64, lr=1e-3)
        self.records: list[tuple] = []
        self.val_shapes: list[tuple[int, int]] = []
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == self.crash_at:
            raise RuntimeError("boom")
        x, y = batch
        self.records.append((self.current_epoch, self.global_step, batch_idx, tuple(x.shape), tuple(y.shape),
                             tuple(x[0].tolist())))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.val_shapes.append(tuple(batch[0].shape))
        return super().validation_step(batch, batch_idx)


def token_windows(n: int = 48) -> TensorDataset:
    windows = list(TokenStream(seq_len=FULL, seed=4, num_windows=n))
    return TensorDataset(torch.stack([x for x, _ in windows]), torch.stack([y for _, y in windows]))


def check_steps(module, schedule, base, accumulation=1):
    """Each micro-batch has its step's length and coupled batch; tokens per step within 5%."""
    tokens: dict[int, int] = {}
    for _, step, _, xs, ys, _ in module.records:
        length = schedule(step)
        assert xs == ys == (coupled_batch_for_length(base, schedule.end_len, length), length), step
        tokens[step] = tokens.get(step, 0) + xs[0] * xs[1]
    full = base * schedule.end_len * accumulation
    complete = list(tokens.values())[:-1]  # the very last step of an epoch may be short
    assert all(abs(t - full) / full <= 0.05 for t in complete), tokens
    return tokens


def test_a_stream_warms_up_with_level_tokens_per_step_and_validates_at_full_length():
    dm = GeneratedTextDataModule(seq_len=FULL, batch_size=8, val_windows=8)
    module, logger = ShapeLM(), MemoryLogger()
    warmup = SequenceLengthWarmup(start_len=8, end_len=FULL, warmup_steps=6, increment=8)
    trainer = quiet_trainer(callbacks=[warmup], max_steps=9, accumulate_grad_batches=2, logger=logger,
                            log_every_n_steps=1, val_check_interval=4, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    schedule = SequenceLengthSchedule(8, FULL, 6, 8)
    tokens = check_steps(module, schedule, base=8, accumulation=2)
    assert sorted(tokens) == list(range(9)) and [schedule(s) for s in (0, 2, 4, 6)] == [8, 16, 24, 32]
    assert module.records[0][3] == (32, 8) and tokens[4] == 2 * 11 * 24  # 8 x 32 / 8; 8 x 32 / 24 -> 11
    assert set(module.val_shapes) == {(8, FULL)}  # validation untouched
    assert logger.series("seq_len/length")[0] == 8 and logger.series("seq_len/tokens_per_step")[0] == 512
    assert logger.series("batch_size/per_device")[0] == 32


def test_a_map_style_token_dataset_every_window_once_per_epoch_and_truncated_in_place():
    data = token_windows(48)
    module = ShapeLM()
    warmup = SequenceLengthWarmup(start_len=8, end_len=FULL, warmup_steps=4, increment=8)
    trainer = quiet_trainer(callbacks=[warmup], max_epochs=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=4, shuffle=True))
    schedule = SequenceLengthSchedule(8, FULL, 4, 8)
    for _, step, _, xs, _, first in module.records:
        assert xs[1] == schedule(step)
        assert any(tuple(w[: xs[1]].tolist()) == first for w in data.tensors[0])  # the window's first tokens
    sizes = {}
    for epoch, _, _, xs, _, _ in module.records:
        sizes.setdefault(epoch, []).append(xs[0])
    assert sum(sizes[0]) == sum(sizes[1]) == 48 and sizes[0][:2] == [16, 16] and set(sizes[1]) == {4}


def test_uncoupled_keeps_the_batch_and_crop_takes_a_seeded_window():
    positions = torch.arange(FULL).repeat(12, 1) % 28  # token = its position in the window (mod vocab)
    data = TensorDataset(positions, (positions + 1) % 28)
    module = ShapeLM()
    warmup = SequenceLengthWarmup(8, FULL, warmup_steps=3, increment=8, couple_batch_size=False, mode="crop", seed=0)
    trainer = quiet_trainer(callbacks=[warmup], max_epochs=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=4))
    offsets = []
    for _, step, _, xs, ys, first in module.records:
        length = SequenceLengthSchedule(8, FULL, 3, 8)(step)
        assert xs == ys == (4, length)
        assert list(first) == [(first[0] + j) % 28 for j in range(length)]  # one contiguous window
        offsets.append(first[0])
    assert len(set(offsets[:3])) > 1 and offsets[-1] == 0  # random while short, whole at full length


def test_a_mid_run_resume_continues_the_same_lengths_batches_and_windows(tmp_path):
    def run(folder, crash_at=None, ckpt=None):
        module = ShapeLM(crash_at)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1, save_top_k=0)
        warmup = SequenceLengthWarmup(8, FULL, duration=0.5, max_per_device=12)
        trainer = quiet_trainer(callbacks=[warmup, checkpoint], max_steps=12, enable_checkpointing=True,
                                limit_val_batches=0, default_root_dir=tmp_path / folder)
        try:
            trainer.fit(module, train_dataloaders=DataLoader(token_windows(48), batch_size=4, shuffle=True),
                        ckpt_path=ckpt)
        except RuntimeError:
            pass
        return module.records

    full = run("full")
    part = run("part", crash_at=(0, 4))
    resumed = run("part", ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert [r[:5] for r in part + resumed] == [r[:5] for r in full]
    assert [r[5] for r in part + resumed] == [r[5] for r in full]
    assert max(r[3][0] for r in full) <= 12  # max_per_device: 16 -> 2 x 8 with accumulation


def test_refusals_and_the_five_percent_warning():
    module = ShapeLM()
    with pytest.raises(ValueError, match="fewer than end_len"):
        quiet_trainer(callbacks=[SequenceLengthWarmup(8, 64, warmup_steps=2)], max_steps=2, limit_val_batches=0).fit(
            module, train_dataloaders=DataLoader(token_windows(8), batch_size=4))
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match=r"duration.*max_steps"):
            quiet_trainer(callbacks=[SequenceLengthWarmup(8, 32, duration=0.5)], max_epochs=1).fit(
                module, train_dataloaders=DataLoader(token_windows(8), batch_size=4))
    with pytest.raises(ValueError, match="one of `warmup_steps` and `duration`"):
        SequenceLengthWarmup(8, 32)
    with pytest.warns(UserWarning, match="more or fewer tokens"):
        quiet_trainer(callbacks=[SequenceLengthWarmup(8, 32, warmup_steps=3, increment=4)], max_steps=1,
                      limit_val_batches=0).fit(ShapeLM(), train_dataloaders=DataLoader(token_windows(8), batch_size=2))
    warmup = SequenceLengthWarmup(8, 32, warmup_steps=2)
    with pytest.raises(TypeError, match="tuple"):
        warmup.cut((torch.zeros(2, 32), torch.zeros(2, 32)), 8)
