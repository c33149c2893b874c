"""Two CPU processes (gloo): max_per_device="auto" measured on every rank, the minimum agreed; a rank
that runs out of memory alone re-splits its own batch (no collective), both ranks end with the
weights of a run that never ran out of memory, and agree on the split at the next epoch.

Both ranks train on the same batches (``use_distributed_sampler=False``): DDP's average of their
gradients is then the gradient of one batch, so the run must equal one process that never ran out
of memory, while rank 1's gradient comes from parts and rank 0's from the whole batch."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from epochwise.callbacks import AutoMicroBatch, BatchSizeSchedule

from conftest import make_dataset, quiet_trainer
from test_ddp import CollectiveCounter
from test_micro_batch import OutOfMemoryModule

FORWARD_LIMIT = {0: 12, 1: 6}  # what find_max_batch_size finds on each rank (through forward)
STEP_LIMIT = {0: None, 1: 3}  # rank 1's training_step runs out of memory above 3 samples


class RankModule(OutOfMemoryModule):
    def __init__(self, out_dir: str, counter: CollectiveCounter) -> None:
        super().__init__(limit=None)
        self.out_dir, self.counter = out_dir, counter
        self.epochs: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > FORWARD_LIMIT[self.global_rank]:
            raise torch.OutOfMemoryError("fake")
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        self.limit = STEP_LIMIT[self.global_rank]
        self.epochs.append(self.current_epoch)
        return super().training_step(batch, batch_idx)

    def teardown(self, stage):
        schedule = next(c for c in self.trainer.callbacks if isinstance(c, BatchSizeSchedule))
        micro = next(c for c in self.trainer.callbacks if isinstance(c, AutoMicroBatch))
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"calls": list(zip(self.epochs, self.calls)), "weights": [p.tolist() for p in self.parameters()],
                       "probed": schedule.state_dict()["probed_max_per_device"], "micro": micro.state_dict(),
                       "calls_collective": self.counter.calls}, f)


@pytest.mark.slow
def test_two_processes_agree_on_max_per_device_and_recover_from_one_ranks_out_of_memory(tmp_path):
    counter = CollectiveCounter()
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_epochs=2, use_distributed_sampler=False,
                            callbacks=[counter, BatchSizeSchedule({0: 8}, max_per_device="auto"), AutoMicroBatch()])
    trainer.fit(RankModule(str(tmp_path), counter), train_dataloaders=DataLoader(make_dataset(64), batch_size=8))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # every rank measured; both took the smaller answer: a request of 8 runs as 2 x 4 with accumulation 2
    assert r0["probed"] == r1["probed"] == 6
    # rank 1 split its first batch at once, alone; from epoch 1 both ranks use its size
    assert r0["calls"] == [[0, 4]] * 16 + [[1, 2]] * 32
    assert r1["calls"] == [[0, 4], [0, 2], [0, 2]] + [[0, 2]] * 30 + [[1, 2]] * 32
    assert r0["micro"]["size"] == r1["micro"]["size"] == 2 and (r0["micro"]["ooms"], r1["micro"]["ooms"]) == (0, 1)
    # the weights of one process that never ran out of memory (the same plan: 2 x 4 per step)
    reference = OutOfMemoryModule(limit=None)
    quiet_trainer(max_epochs=2, accumulate_grad_batches=2).fit(
        reference, train_dataloaders=DataLoader(make_dataset(64), batch_size=4))
    for rank in (r0, r1):
        for got, want in zip(rank["weights"], reference.parameters()):
            torch.testing.assert_close(torch.tensor(got), want.detach(), rtol=0, atol=1e-5)
    # collectives with epochwise code on the stack: Lightning's own while it builds the loaders, the
    # agreement on max_per_device, the agreement on the split at each epoch start; none per step
    for rank in (r0, r1):
        ours = [c for c in rank["calls_collective"] if c["epochwise"]]
        assert [c for c in ours if c["per_step"]] == []
        assert {c["epochwise"][0] for c in ours} == {"setup_data", "measure_max_per_device", "on_train_epoch_start"}
