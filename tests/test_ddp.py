"""Two CPU processes (gloo): every rank takes the same batch size at the same step, no hang."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from epochwise.callbacks import BatchSizeWarmup, LRScaling, batch_state

from conftest import RecordingModule, make_dataset, quiet_trainer


class RankRecorder(RecordingModule):
    def __init__(self, out_dir: str):
        super().__init__(lr=0.1)
        self.out_dir = out_dir
        self.rows: list[list] = []

    def training_step(self, batch, batch_idx):
        state = batch_state(self.trainer)
        x, _ = batch
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append([self.current_epoch, self.global_step, int(x.shape[0]), state.global_batch, lr,
                          state.samples_seen])
        return super().training_step(batch, batch_idx)

    def on_train_end(self):
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"rows": self.rows, "world": self.trainer.world_size}, f)


@pytest.mark.slow
def test_two_process_ddp_same_sizes_global_batch_and_lr(tmp_path):
    loader = DataLoader(make_dataset(96), batch_size=5, shuffle=True)
    module = RankRecorder(str(tmp_path))
    trainer = quiet_trainer(
        strategy="ddp_spawn",
        devices=2,
        max_epochs=3,
        callbacks=[BatchSizeWarmup(4, 16, factor=2, interval=1), LRScaling("linear")],
    )
    trainer.fit(module, train_dataloaders=loader)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    r0, r1 = ranks[0]["rows"], ranks[1]["rows"]
    # same steps and per-device sizes on both ranks (48 samples per rank per epoch)
    assert [r[:3] for r in r0] == [r[:3] for r in r1]
    sizes = {}
    for epoch, _, n, glob, lr, _ in r0:
        sizes.setdefault(epoch, []).append(n)
        assert glob == 2 * {0: 4, 1: 8, 2: 16}[epoch]
        # LR scaling uses the global batch: base is 2 x 4 = 8 at the first step
        assert lr == pytest.approx(0.1 * glob / 8)
    assert sizes == {0: [4] * 12, 1: [8] * 6, 2: [16] * 3}
    # samples_seen counts both ranks
    assert r0[-1][5] == r1[-1][5] == 2 * 48 * 3
    assert torch.is_tensor(module.layer.weight)
