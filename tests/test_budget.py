"""TrainingBudget: exact stops at sample / optimizer-step / FLOP budgets, logging and resume."""

from __future__ import annotations

import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from epochwise.callbacks.budget import (
    TRAINING_FLOPS_PER_FORWARD_FLOP,
    TrainingBudget,
    budget_fractions,
)

from conftest import MemoryLogger, quiet_trainer

# forward FLOPs of one sample through Linear(10, 20) -> ReLU -> Linear(20, 3): 2 x multiply-adds
FORWARD_FLOPS_PER_SAMPLE = 2 * (10 * 20 + 20 * 3)


class Tiny(pl.LightningModule):
    def __init__(self, num_samples: int = 50, batch_size: int = 10, batch_sampler=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(num_samples, 10, generator=g), torch.randint(0, 3, (num_samples,), generator=g))
        self.batch_size = batch_size
        self.batch_sampler = batch_sampler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        if self.batch_sampler is not None:
            return DataLoader(self.data, batch_sampler=self.batch_sampler)
        return DataLoader(self.data, batch_size=self.batch_size)


class BatchCounter(Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sizes.append(len(batch[0]))


def make_trainer(tmp_path=None, max_epochs: int = 100, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, max_epochs=max_epochs, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "set at least one of `max_samples`, `max_optimizer_steps`, `max_flops`"),
        ({"max_samples": 0}, "`max_samples` must be an int >= 1 or None, got 0"),
        ({"max_samples": 10.5}, "`max_samples` must be an int >= 1 or None, got 10.5"),
        ({"max_optimizer_steps": True}, "`max_optimizer_steps` must be an int >= 1 or None, got True"),
        ({"max_flops": -1.0}, "`max_flops` must be a finite number > 0 or None, got -1.0"),
        ({"max_flops": float("inf")}, "`max_flops` must be a finite number > 0 or None, got inf"),
        ({"max_samples": 5, "flops_per_sample": 0}, "`flops_per_sample` must be a finite number > 0"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingBudget(**kwargs)


def test_budget_fractions():
    assert budget_fractions({"a": 5, "b": 2, "c": 0}, {"a": 10, "b": None, "c": 4}) == {"a": 0.5, "c": 0.0}


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_max_optimizer_steps_is_exact(accumulate):
    budget = TrainingBudget(max_optimizer_steps=7)
    counter = BatchCounter()
    trainer = make_trainer(callbacks=[budget, counter], accumulate_grad_batches=accumulate)
    trainer.fit(Tiny())
    assert trainer.global_step == 7 and budget.optimizer_steps == 7
    assert budget.stopped and "optimizer_steps 7 >= 7" in budget.stopping_reason_message
    # 5 batches per epoch; Lightning also steps on an epoch's last batch (partial accumulation)
    steps_per_epoch = -(-5 // accumulate)
    epochs, rest = divmod(7, steps_per_epoch)
    assert len(counter.sizes) == epochs * 5 + rest * accumulate
    assert budget.samples_seen == sum(counter.sizes)


# 60 samples per epoch: batches of 10 reach 100 exactly; 32, 28, 32, 28 reach 120; 7 x 8 + 4 = 60,
# then 67, ..., 102
@pytest.mark.parametrize("batch_size, expected_samples", [(10, 100), (32, 120), (7, 102)])
def test_max_samples_stops_at_first_batch_reaching_it(batch_size, expected_samples):
    budget = TrainingBudget(max_samples=100)
    counter = BatchCounter()
    make_trainer(callbacks=[budget, counter]).fit(Tiny(num_samples=60, batch_size=batch_size))
    assert budget.samples_seen == sum(counter.sizes) == expected_samples
    assert expected_samples - 100 < batch_size  # overshoot below one batch, none when it divides


def test_changing_batch_sizes_are_counted_as_seen():
    sizes = [4, 8, 16, 2, 20]  # one "epoch" of batches of varying size (50 samples)
    batches, start = [], 0
    for n in sizes:
        batches.append(list(range(start, start + n)))
        start += n
    budget = TrainingBudget(max_samples=120)
    counter = BatchCounter()
    make_trainer(callbacks=[budget, counter]).fit(Tiny(batch_sampler=batches))
    # 50 + 50 + 4 + 8 + 16 = 128 is the first cumulative count >= 120
    assert counter.sizes == sizes + sizes + [4, 8, 16]
    assert budget.samples_seen == 128


def test_flops_measured_once_on_first_batch():
    budget = TrainingBudget(max_flops=TRAINING_FLOPS_PER_FORWARD_FLOP * FORWARD_FLOPS_PER_SAMPLE * 50)
    counter = BatchCounter()
    make_trainer(callbacks=[budget, counter]).fit(Tiny())
    assert budget.flops_per_sample == 3 * FORWARD_FLOPS_PER_SAMPLE
    assert budget.samples_seen == 50 and len(counter.sizes) == 5
    assert budget.flops == pytest.approx(3 * FORWARD_FLOPS_PER_SAMPLE * 50)
    assert budget._counter is None  # the dispatch mode is not left active


def test_flops_per_sample_given_skips_measurement():
    budget = TrainingBudget(max_flops=1000.0, flops_per_sample=100.0)
    make_trainer(callbacks=[budget]).fit(Tiny())
    assert budget.flops_per_sample == 100.0 and budget.samples_seen == 10


def test_logged_keys():
    logger = MemoryLogger()
    budget = TrainingBudget(max_samples=200, max_flops=1e9)
    make_trainer(callbacks=[budget], logger=logger, log_every_n_steps=2).fit(Tiny())
    logged = [m for _, m in logger.rows if "budget/samples" in m]
    assert {"budget/samples", "budget/optimizer_steps", "budget/flops", "budget/fraction_used"} <= set(logged[-1])
    assert logged[-1]["budget/samples"] == 200 and logged[-1]["budget/fraction_used"] == 1.0
    steps = [s for s, m in logger.rows if "budget/samples" in m]
    assert steps[:-1] == list(range(2, 20, 2)) and steps[-1] == 20


def test_resume_continues_the_count(tmp_path):
    full = TrainingBudget(max_samples=230, max_optimizer_steps=40)
    make_trainer(callbacks=[full]).fit(Tiny())

    first = TrainingBudget(max_samples=230, max_optimizer_steps=40)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, max_epochs=2, callbacks=[first, ckpt], enable_checkpointing=True).fit(Tiny())
    assert first.samples_seen == 100 and not first.stopped
    resumed = TrainingBudget(max_samples=230, max_optimizer_steps=40)
    trainer = make_trainer(tmp_path, callbacks=[resumed])
    trainer.fit(Tiny(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.samples_seen == full.samples_seen == 230
    assert trainer.global_step == 23 and resumed.optimizer_steps == 23


def test_state_dict_tolerant_and_pickle():
    budget = TrainingBudget(max_samples=10)
    budget.load_state_dict({})
    budget.load_state_dict({"samples_seen": 7})
    assert budget.samples_seen == 7 and budget.flops_per_sample is None
    clone = pickle.loads(pickle.dumps(budget))
    assert clone.samples_seen == 7 and clone.state_key == budget.state_key
    assert TrainingBudget(max_samples=20).state_key != budget.state_key


class RankDump(Callback):
    """Writes what each rank saw to ``rank<r>.json`` (ddp_spawn runs the fit in child processes)."""

    def __init__(self, out_dir: str, budget: TrainingBudget) -> None:
        self.out_dir = out_dir
        self.budget = budget
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sizes.append(len(batch[0]))

    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        payload = {"samples": self.budget.samples_seen, "step": trainer.global_step, "sizes": self.sizes,
                   "world": trainer.world_size, "stopped": self.budget.stopped}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(payload, f)


@pytest.mark.slow
def test_two_process_ddp_counts_all_ranks_and_stops_together(tmp_path):
    import json

    budget = TrainingBudget(max_samples=70)
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_epochs=5,
                            callbacks=[budget, RankDump(str(tmp_path), budget)])
    trainer.fit(Tiny(num_samples=100, batch_size=5))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        # 2 ranks x 5 samples per step: 70 samples is exactly step 7, mid-epoch (10 steps per epoch)
        assert rank["world"] == 2 and rank["stopped"]
        assert rank["samples"] == 70 and rank["step"] == 7 and rank["sizes"] == [5] * 7
