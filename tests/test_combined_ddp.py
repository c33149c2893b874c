"""Two CPU processes (gloo): OneCycleBatchLR and CurriculumSampling give every rank the same sizes, LRs
and global order, each rank its own shard; the one-cycle curve is the single-process model's with
the samples of both ranks; the curriculum's losses are shared once per epoch, never per step."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from test_one_cycle import expected
from torch.utils.data import DataLoader

import epochwise.callbacks
from epochwise.callbacks import (
    CurriculumPacing,
    CurriculumSampling,
    OneCycleBatchLR,
    OneCycleBatchLRSchedule,
    SequenceLengthSchedule,
    SequenceLengthWarmup,
    coupled_batch_for_length,
)
from epochwise.datamodules.text import GeneratedTextDataModule
from epochwise.modules.language_model import CausalLM

from conftest import RecordingModule, quiet_trainer
from test_ddp import PER_STEP_HOOKS, CollectiveCounter, indexed

EPOCHWISE = os.path.realpath(os.path.dirname(epochwise.callbacks.__file__))


class Counter(CollectiveCounter):
    """test_ddp's counter, telling epochwise's frames by their real path (the package may be imported
    through a link, e.g. an editable install or a worktree shim, and code objects keep that path)."""

    @staticmethod
    def _describe(name: str) -> dict:
        frame, hooks, ours = sys._getframe(2), [], []
        while frame is not None:
            code = frame.f_code
            if code.co_name in PER_STEP_HOOKS:
                hooks.append(code.co_name)
            if os.path.realpath(code.co_filename).startswith(EPOCHWISE):
                ours.append(code.co_name)
            frame = frame.f_back
        return {"collective": name, "per_step": hooks, "epochwise": ours}


class RankRows(RecordingModule):
    """Per rank: (epoch, step, batch_idx, size, lr, indices) of each batch, and per-sample losses."""

    def __init__(self, out_dir: str, counter: Counter, per_sample: bool = False):
        super().__init__(lr=0.1)
        self.out_dir, self.counter, self.per_sample = out_dir, counter, per_sample
        self.layer = torch.nn.Linear(3, 2)
        self.rows: list[list] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        indices = [int(i) for i in x[:, 0].tolist()]
        losses = torch.nn.functional.cross_entropy(self.layer(x[:, 1:]), y, reduction="none")
        self.rows.append([self.current_epoch, self.global_step, batch_idx, len(indices), lr, indices,
                          losses.detach().tolist()])
        return {"loss": losses.mean(), "per_sample_loss": losses} if self.per_sample else losses.mean()

    def teardown(self, stage):
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"rows": self.rows, "calls": self.counter.calls}, f)


def ddp_fit(tmp_path, callback, n, batch, epochs, per_sample=False):
    counter = Counter()
    module = RankRows(str(tmp_path), counter, per_sample)
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_epochs=epochs, callbacks=[counter, callback])
    trainer.fit(module, train_dataloaders=DataLoader(indexed(n), batch_size=batch, shuffle=True))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:  # no epochwise collective in a per-step hook
        assert [c for c in rank["calls"] if c["epochwise"] and c["per_step"]] == []
    return ranks


@pytest.mark.slow
def test_one_cycle_under_ddp_is_the_model_with_both_ranks_samples(tmp_path):
    ranks = ddp_fit(tmp_path, OneCycleBatchLR(min_batch_factor=0.4, max_per_device=8), n=96, batch=10, epochs=3)
    r0, r1 = ranks[0]["rows"], ranks[1]["rows"]
    assert [r[:5] for r in r0] == [r[:5] for r in r1]  # same sizes and LRs at every step
    want = expected(48, 10, 3, OneCycleBatchLRSchedule(min_batch_factor=0.4), total=3 * 96, limit_pd=8, world=2)
    assert [(e, s, n) for e, s, _, n, *_ in r0] == [w[:3] for w in want]
    assert [r[4] for r in r0] == pytest.approx([w[3] for w in want], rel=1e-12)
    for epoch in range(3):  # disjoint halves
        assert sorted(i for r in r0 + r1 if r[0] == epoch for i in r[5]) == list(range(96))


@pytest.mark.slow
def test_curriculum_by_loss_under_ddp_one_global_order_each_rank_its_shard(tmp_path):
    n, epochs = 50, 4
    pacing = CurriculumPacing(0.3, 0.7)
    callback = CurriculumSampling("loss", start_fraction=0.3, full_at=0.7, end_batch_size=4)
    ranks = ddp_fit(tmp_path, callback, n=n, batch=4, epochs=epochs, per_sample=True)
    r0, r1 = ranks[0]["rows"], ranks[1]["rows"]
    assert [r[:5] for r in r0] == [r[:5] for r in r1]
    scores = [math.inf] * n
    for epoch in range(epochs):
        pool = n if epoch == 0 else math.ceil(pacing.fraction(epoch / epochs) * n - 1e-9)
        want = sorted(range(n), key=lambda i: (scores[i], i))[:pool]
        shards = [[i for r in rows if r[0] == epoch for i in r[5]] for rows in (r0, r1)]
        assert len(shards[0]) == len(shards[1]) == math.ceil(pool / 2)
        assert sorted(set(shards[0] + shards[1])) == sorted(want), epoch  # the easiest pool, shared out
        # the scores the next epoch uses: each sample's loss at its place (not the padding's repeat)
        losses = [[v for r in rows if r[0] == epoch for v in r[6]] for rows in (r0, r1)]
        for rank in (0, 1):
            for j, (i, value) in enumerate(zip(shards[rank], losses[rank])):
                if rank + 2 * j < pool:
                    scores[i] = value
    gathers = [c for c in ranks[0]["calls"] if c["epochwise"] and c["collective"].startswith("all_gather")]
    assert gathers and all("on_train_epoch_end" in c["epochwise"] for c in gathers)


class RankLM(CausalLM):
    def __init__(self, out_dir: str, counter: Counter):
        super().__init__(vocab_size=28, d_model=16, num_layers=1, num_heads=2, max_len=64, lr=1e-3)
        self.out_dir, self.counter = out_dir, counter
        self.rows: list[list] = []

    def training_step(self, batch, batch_idx):
        self.rows.append([self.global_step, list(batch[0].shape), list(batch[1].shape)])
        return super().training_step(batch, batch_idx)

    def teardown(self, stage):
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"rows": self.rows, "calls": self.counter.calls}, f)


@pytest.mark.slow
def test_sequence_length_warmup_on_a_stream_under_ddp_same_length_and_coupled_batch_on_both_ranks(tmp_path):
    counter = Counter()
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=8, limit_val_batches=0,
                            callbacks=[counter, SequenceLengthWarmup(8, 32, warmup_steps=4, max_per_device=32)])
    trainer.fit(RankLM(str(tmp_path), counter), datamodule=GeneratedTextDataModule(seq_len=32, batch_size=16))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rows"] == ranks[1]["rows"]
    schedule, tokens = SequenceLengthSchedule(8, 32, 4, 8), {}
    for step, xs, ys in ranks[0]["rows"]:
        length = schedule(step)
        batch = coupled_batch_for_length(16, 32, length)
        # a stream's accumulation is fixed by its largest request (16 x 32 / 8 = 64 -> 2 x 32)
        assert xs == ys and xs[1] == length and xs[0] == math.floor(batch / 2 + 0.5), step
        tokens[step] = tokens.get(step, 0) + 2 * xs[0] * xs[1]  # both ranks
    assert sorted(tokens) == list(range(8))
    assert all(abs(t - 2 * 16 * 32) / (2 * 16 * 32) <= 0.05 for t in tokens.values()), tokens
    assert ranks[0]["rows"][0][1] == [32, 8] and tokens[3] == 2 * 2 * 11 * 24  # 21 -> 2 x 11 at length 24
    for rank in ranks:
        assert [c for c in rank["calls"] if c["epochwise"] and c["per_step"]] == []
