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

from epochwise.callbacks._checks import ConfigurationError
from epochwise.callbacks.budget import (
    TRAINING_FLOPS_PER_FORWARD_FLOP,
    TrainingBudget,
    budget_fractions,
    input_shape_key,
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
        ({"max_samples": 0}, "`max_samples` must be None or an int >= 1, got 0"),
        ({"max_samples": 10.5}, "`max_samples` must be None or an int >= 1, got 10.5"),
        ({"max_optimizer_steps": True}, "`max_optimizer_steps` must be None or an int >= 1, got True"),
        ({"max_flops": -1.0}, "`max_flops` must be None or a finite number > 0, got -1.0"),
        ({"max_flops": float("inf")}, "`max_flops` must be None or a finite number > 0, got inf"),
        ({"max_samples": 5, "flops_per_sample": 0}, "`flops_per_sample` must be None or a finite number > 0"),
        ({"max_samples": 5, "verbose": "yes"}, "`verbose` must be True or False, got 'yes'"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
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


def test_flops_measured_on_the_first_batch_of_a_shape():
    budget = TrainingBudget(max_flops=TRAINING_FLOPS_PER_FORWARD_FLOP * FORWARD_FLOPS_PER_SAMPLE * 50)
    counter = BatchCounter()
    make_trainer(callbacks=[budget, counter]).fit(Tiny())
    assert budget.flops_per_sample == 3 * FORWARD_FLOPS_PER_SAMPLE
    assert budget.flops_per_sample_by_shape == {((10,), ()): 3 * FORWARD_FLOPS_PER_SAMPLE}
    assert budget.samples_seen == 50 and len(counter.sizes) == 5
    assert budget.flops == pytest.approx(3 * FORWARD_FLOPS_PER_SAMPLE * 50)
    assert budget._counter is None  # the dispatch mode is not left active


class TinyConv(pl.LightningModule):
    """Conv -> global pool -> linear, trained on pre-built batches whose image size changes."""

    def __init__(self, batches) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.batches = batches

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def conv_training_flops(side: int) -> float:
    # forward per sample: conv 2 x 4 x 1 x 9 multiply-adds per pixel, linear 2 x 4 x 3; x3 for training
    return 3.0 * (72 * side * side + 24)


def test_defect5_flops_counted_per_input_shape():
    # progressive resizing in miniature: every epoch two batches of 8x8 images, then two of 32x32
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, side, side, generator=g), torch.randint(0, 3, (4,), generator=g))
               for side in (8, 8, 32, 32)]
    epoch_flops = 4 * (2 * conv_training_flops(8) + 2 * conv_training_flops(32))
    budget = TrainingBudget(max_flops=2_000_000)
    counter = BatchCounter()
    make_trainer(callbacks=[budget, counter]).fit(TinyConv(batches))
    assert budget.flops_per_sample_by_shape == {((1, 8, 8), ()): conv_training_flops(8),
                                                ((1, 32, 32), ()): conv_training_flops(32)}
    # epoch 0 (1.88 M) + two 8x8 batches (1.99 M) + one 32x32 batch: 2.88 M >= 2 M after 7 batches.
    # Measuring once, on the first (8x8) batch, would count 16x too little and stop after 36.
    assert len(counter.sizes) == 7 and budget.stopped
    assert budget.flops == epoch_flops + 4 * (2 * conv_training_flops(8) + conv_training_flops(32))


def test_input_shape_key():
    batch = {"image": torch.zeros(2, 3, 4, 5), "label": torch.zeros(2), "meta": ["a", "b"]}
    assert input_shape_key(batch) == ((3, 4, 5), ())


def test_defect5_no_collective_in_any_step():
    budget = TrainingBudget(max_samples=120, max_flops=1e12)
    trainer = make_trainer(callbacks=[budget])
    calls = []
    original = trainer.strategy.reduce_boolean_decision

    def counting(decision, all=True):  # noqa: A002 - Lightning's argument name
        calls.append(decision)
        return original(decision, all=all)

    trainer.strategy.reduce_boolean_decision = counting
    trainer.fit(Tiny())
    assert budget.stopped and budget.samples_seen == 120
    assert calls == []  # the decision is taken from counts every rank holds, never reduced


def test_flops_per_sample_given_skips_measurement():
    budget = TrainingBudget(max_flops=1000.0, flops_per_sample=100.0)
    make_trainer(callbacks=[budget]).fit(Tiny())
    assert budget.flops_per_sample == 100.0 and budget.samples_seen == 10
    assert budget.flops_per_sample_by_shape == {}


class LoggingTiny(Tiny):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("probe", 1.0, on_step=True, on_epoch=False)
        return loss


def test_logs_at_lightnings_cadence_and_at_the_stop():
    logger = MemoryLogger()
    budget = TrainingBudget(max_samples=205, max_flops=1e9)
    make_trainer(callbacks=[budget], logger=logger, log_every_n_steps=3).fit(LoggingTiny())
    logged = [m for _, m in logger.rows if "budget/samples" in m]
    assert {"budget/samples", "budget/optimizer_steps", "budget/flops", "budget/fraction_used"} <= set(logged[-1])
    assert logged[-1]["budget/samples"] == 210 and logged[-1]["budget/fraction_used"] == 210 / 205
    steps = [s for s, m in logger.rows if "budget/samples" in m]
    lightning_steps = [s for s, m in logger.rows if "probe" in m]  # where Lightning logs self.log
    # every 3rd step, and the step of the stop (batch 21), where Lightning logs because should_stop is set
    assert steps == lightning_steps == [2, 5, 8, 11, 14, 17, 20]


def test_defect7_second_fit_gets_a_new_budget():
    budget = TrainingBudget(max_samples=100, max_flops=1e12)
    first = BatchCounter()
    make_trainer(callbacks=[budget, first]).fit(Tiny())
    second = BatchCounter()
    make_trainer(callbacks=[budget, second]).fit(Tiny())
    assert len(first.sizes) == len(second.sizes) == 10 and budget.samples_seen == 100
    assert budget.flops == pytest.approx(3 * FORWARD_FLOPS_PER_SAMPLE * 100)


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
    assert budget.samples_seen == 7 and budget.flops is None
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
