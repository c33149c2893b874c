"""Two CPU processes (gloo): every rank takes the same batch size at the same step, the same LR,
trains on its own half of every epoch, ends with the same weights; and no epochwise callback makes
a collective call in a per-step hook.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import epochwise.callbacks
from epochwise.callbacks import (
    BatchSizeWarmup,
    EarlyStopping,
    LearningCurveMonitor,
    LRScaling,
    LRWarmup,
    SampleBasedLRSchedule,
    TrainingBudget,
    batch_state,
)

from conftest import RecordingModule, quiet_trainer

EPOCHWISE = os.path.realpath(Path(epochwise.callbacks.__file__).parent)
PER_STEP_HOOKS = {
    "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_before_zero_grad", "training_step", "optimizer_step",
}
COLLECTIVES = ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "barrier",
               "reduce", "gather", "gather_object", "scatter", "all_to_all", "reduce_scatter")


def indexed(n: int = 96) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return TensorDataset(x, torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(1)))


class CollectiveCounter(Callback):
    """Wraps torch.distributed's collectives in this process; records which code called each one."""

    def __init__(self):
        self.calls: list[dict] = []

    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None or getattr(original, "_counted", False):
                continue

            def counted(*args, _original=original, _name=name, **kwargs):
                self.calls.append(self._describe(_name))
                return _original(*args, **kwargs)

            counted._counted = True
            setattr(dist, name, counted)

    @staticmethod
    def _describe(name: str) -> dict:
        frame, hooks, epochwise_frames = sys._getframe(2), [], []
        while frame is not None:
            code = frame.f_code
            if code.co_name in PER_STEP_HOOKS:
                hooks.append(code.co_name)
            if os.path.realpath(code.co_filename).startswith(EPOCHWISE):  # installed through a link, too
                epochwise_frames.append(code.co_name)
            frame = frame.f_back
        return {"collective": name, "per_step": hooks, "epochwise": epochwise_frames}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:  # proves the counter sees per-step calls
            trainer.strategy.barrier("probe")


class RankRecorder(RecordingModule):
    def __init__(self, out_dir: str, counter: CollectiveCounter):
        super().__init__(lr=0.1)
        self.out_dir = out_dir
        self.counter = counter
        self.rows: list[list] = []

    def training_step(self, batch, batch_idx):
        state = batch_state(self.trainer)
        x, _ = batch
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append([self.current_epoch, self.global_step, batch_idx, int(x.shape[0]), state.global_batch, lr,
                          state.samples_seen, [int(i) for i in x[:, 0]]])
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def teardown(self, stage):  # after the callbacks' teardown: what the fit gave back
        weights = [p.detach().tolist() for p in self.parameters()]
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"rows": self.rows, "world": self.trainer.world_size, "weights": weights,
                       "accumulation": self.trainer.accumulate_grad_batches, "calls": self.counter.calls}, f)


@pytest.mark.slow
def test_two_process_ddp_same_plan_lr_samples_weights_and_no_per_step_collectives(tmp_path):
    loader = DataLoader(indexed(96), batch_size=5, shuffle=True)
    counter = CollectiveCounter()
    module = RankRecorder(str(tmp_path), counter)
    trainer = quiet_trainer(
        strategy="ddp_spawn", devices=2, max_epochs=3, accumulate_grad_batches=1,
        callbacks=[counter, BatchSizeWarmup(4, 16, factor=2, interval=1, max_per_device=8), LRScaling("linear"),
                   LRWarmup(3, unit="step"), SampleBasedLRSchedule("cosine"), TrainingBudget(max_samples=10**9),
                   LearningCurveMonitor(dirpath=str(tmp_path)),
                   EarlyStopping("train_loss", patience=100, restore_best_weights=True, check_on_train_epoch_end=True)],
    )
    trainer.fit(module, train_dataloaders=loader)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    r0, r1 = ranks[0]["rows"], ranks[1]["rows"]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # the same plan, global batch and LR at every step on both ranks
    assert [r[:7] for r in r0] == [r[:7] for r in r1]
    sizes = {}
    for epoch, _, _, n, glob, _, _, _ in r0:
        sizes.setdefault(epoch, []).append(n)
        assert glob == 2 * {0: 4, 1: 8, 2: 16}[epoch]  # 16 = 2 micro-batches of 8 per rank
    assert sizes == {0: [4] * 12, 1: [8] * 6, 2: [8] * 6}
    # each epoch, the ranks train on disjoint halves that together are the whole data set
    for epoch in range(3):
        a = [i for r in r0 if r[0] == epoch for i in r[7]]
        b = [i for r in r1 if r[0] == epoch for i in r[7]]
        assert sorted(a + b) == list(range(96)), epoch
    assert r0[-1][6] == 3 * 96  # samples_seen counts both ranks
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["accumulation"] == 1  # the user's accumulation, given back
    # collectives: the probe's per-step barrier is seen, and no epochwise code makes one per step
    for rank in ranks:
        calls = rank["calls"]
        assert any(c["collective"] == "barrier" and "on_train_batch_end" in c["per_step"] for c in calls)
        assert any(c["epochwise"] for c in calls)  # epochwise code is seen where it does communicate
        assert [c for c in calls if c["epochwise"] and c["per_step"]] == []
