"""AutoMicroBatch: a step that runs out of memory is retried in parts; the run equals one that never did."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from epochwise.callbacks import AutoMicroBatch, BatchSizeWarmup, LRScaling, LRWarmup
from epochwise.callbacks.engine import batch_length

from conftest import MemoryLogger, make_dataset, quiet_trainer


class _OutOfMemoryInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("fake out of memory in the backward")


class OutOfMemoryModule(pl.LightningModule):
    """A linear classifier whose steps on more than ``limit`` samples run out of memory, in the
    forward or the backward; ``calls`` records the size of every training_step call."""

    def __init__(self, limit: int | None = None, where: str = "forward", lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 3)
        self.limit, self.where, self.lr = limit, where, lr
        self.calls: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.calls.append(len(x))
        out = self.layer(x)
        if self.limit is not None and len(x) > self.limit:
            if self.where == "forward":
                raise torch.OutOfMemoryError(f"fake out of memory: {len(x)} > {self.limit}")
            out = _OutOfMemoryInBackward.apply(out)
        return F.cross_entropy(out, y % 3)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class StepRecorder(Callback):
    """Per optimizer step: samples trained on (over its micro-batches) and the LR the optimizer uses."""

    def __init__(self) -> None:
        self.samples: dict[int, int] = {}
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.samples[step] = self.samples.get(step, 0) + batch_length(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


def run(limit: int | None, where: str = "forward", callbacks: tuple = (), micro: AutoMicroBatch | None = None,
        n: int = 64, batch_size: int = 16, **trainer_kwargs: Any) -> tuple[OutOfMemoryModule, StepRecorder]:
    module, recorder = OutOfMemoryModule(limit, where), StepRecorder()
    extra = [micro] if micro is not None else ([AutoMicroBatch()] if limit is not None else [])
    trainer = quiet_trainer(callbacks=[*callbacks, recorder, *extra], **{"max_epochs": 2, **trainer_kwargs})
    trainer.fit(module, train_dataloaders=DataLoader(make_dataset(n), batch_size=batch_size))
    return module, recorder


def assert_same_run(a: tuple, b: tuple) -> None:
    (ma, ra), (mb, rb) = a, b
    assert ra.samples == rb.samples  # samples per optimizer step
    assert ra.lrs.keys() == rb.lrs.keys() and list(ra.lrs.values()) == pytest.approx(list(rb.lrs.values()), abs=1e-12)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_recovery_equals_a_run_that_never_ran_out_of_memory(where, accumulation):
    reference = run(None, accumulate_grad_batches=accumulation)
    recovered = run(5, where, accumulate_grad_batches=accumulation)
    assert_same_run(recovered, reference)
    module = recovered[0]
    # the first batch of 16 fails, then its first part of 8 fails, then 4 parts of 4 fit; the size is kept
    assert module.calls == [16, 8] + [4] * 4 * 8
    assert len(reference[0].calls) == 8 and len(reference[1].lrs) == 8 // accumulation


def test_recovery_under_the_engines_controllers_keeps_samples_and_lr_of_every_step():
    def callbacks():
        return (BatchSizeWarmup(4, 16, interval=1, max_per_device=8), LRScaling("linear"), LRWarmup(3, unit="step"))

    reference = run(None, callbacks=callbacks(), max_epochs=3, accumulate_grad_batches=2)
    recovered = run(3, callbacks=callbacks(), max_epochs=3, accumulate_grad_batches=2)
    assert_same_run(recovered, reference)
    calls = recovered[0].calls  # the warmup's first batch of 4 fails; parts of 2 from then on, 8s included
    assert calls[0] == 4 and set(calls[1:]) == {2} and len(calls) == 1 + sum(recovered[1].samples.values()) // 2


def test_a_part_that_cannot_halve_further_is_a_clear_error_and_the_module_is_given_back():
    module = OutOfMemoryModule(limit=3)
    trainer = quiet_trainer(callbacks=[AutoMicroBatch(min_per_device=4)], max_epochs=1)
    with pytest.raises(torch.OutOfMemoryError, match=r"parts of 4 sample\(s\) of a batch of 16 on rank 0, and "
                                                     r"min_per_device=4 forbids halving again"):
        trainer.fit(module, train_dataloaders=DataLoader(make_dataset(32), batch_size=16))
    assert module.calls == [16, 8, 4]
    assert "training_step" not in module.__dict__ and "backward" not in module.__dict__


def test_the_size_is_kept_grows_back_after_a_while_and_backs_off():
    micro = AutoMicroBatch(grow_after=2)
    module, _ = run(5, micro=micro, n=160, max_epochs=1)
    # batch 0: 16 -> 8 -> 4; after 2 good batches it grows to 8, fails, back to 4 and waits 4 batches;
    # then again, and waits 8
    assert module.calls == [16, 8, 4, 4, 4, 4] + [4] * 4 + [8, 4, 4, 4, 4] + [4] * 12 + [8, 4, 4, 4, 4] + [4] * 12
    assert micro.state_dict() == {"size": 4, "wait": 8, "good": 4, "grown": False, "ooms": 4}


def test_the_split_is_checkpointed_and_a_resumed_fit_continues_exactly(tmp_path):
    uninterrupted = run(5, max_epochs=2)
    first = OutOfMemoryModule(5)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(callbacks=[AutoMicroBatch(), ckpt], max_epochs=1, enable_checkpointing=True)
    trainer.fit(first, train_dataloaders=DataLoader(make_dataset(64), batch_size=16))
    resumed = OutOfMemoryModule(5)
    micro = AutoMicroBatch()
    trainer = quiet_trainer(callbacks=[micro], max_epochs=2)
    trainer.fit(resumed, train_dataloaders=DataLoader(make_dataset(64), batch_size=16), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.calls == [4] * 16  # no new failure: the checkpointed size is used from the first step
    for pa, pb in zip(resumed.parameters(), uninterrupted[0].parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5)
    micro.load_state_dict({})  # tolerant of missing keys
    assert micro.size is None and micro.ooms == 0


def test_steps_that_fit_call_training_step_once_and_logging_shows_every_change():
    logger = MemoryLogger()
    module, _ = run(None, micro=AutoMicroBatch(), logger=logger, log_every_n_steps=50)
    assert module.calls == [16] * 8
    assert logger.series("micro_batch/size") == [16.0]  # logged once: at the first step, no change after
    logger = MemoryLogger()
    run(5, logger=logger, log_every_n_steps=50)
    assert logger.series("micro_batch/size") == [4.0] and logger.series("micro_batch/parts") == [4.0]


def test_refusals():
    class Manual(OutOfMemoryModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    trainer = quiet_trainer(callbacks=[AutoMicroBatch()], max_epochs=1)
    with pytest.raises(ValueError, match="manual optimization"):
        trainer.fit(Manual(), train_dataloaders=DataLoader(make_dataset(8), batch_size=4))
    with pytest.raises(ValueError, match="`min_per_device` must be an int >= 1, got 0"):
        AutoMicroBatch(min_per_device=0)
    with pytest.raises(ValueError, match="`reduction` must be 'mean' or 'sum', got 'max'"):
        AutoMicroBatch(reduction="max")


class DictSumModule(OutOfMemoryModule):
    """Returns {"loss": summed loss, "n": ...}: parts of a sum add up without weights."""

    def training_step(self, batch: Any, batch_idx: int) -> dict:
        x, y = batch
        self.calls.append(len(x))
        if self.limit is not None and len(x) > self.limit:
            raise torch.OutOfMemoryError("fake")
        return {"loss": F.cross_entropy(self.layer(x), y % 3, reduction="sum"), "n": len(x)}


def test_dict_outputs_and_summed_losses():
    runs = []
    for limit in (None, 5):
        module = DictSumModule(limit)
        outputs: list = []

        class Outputs(Callback):
            def __init__(self, seen: list) -> None:
                self.seen = seen

            def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
                self.seen.append(float(out["loss"]))

        callbacks = [Outputs(outputs)] + ([AutoMicroBatch(reduction="sum")] if limit else [])
        quiet_trainer(callbacks=callbacks, max_epochs=1).fit(
            module, train_dataloaders=DataLoader(make_dataset(32), batch_size=16))
        runs.append((module, outputs))
    (reference, ref_out), (recovered, rec_out) = runs
    assert recovered.calls == [16, 8, 4, 4, 4, 4, 4, 4, 4, 4]
    assert rec_out == pytest.approx(ref_out, rel=1e-6)  # the loss Lightning reports is the whole batch's
    for a, b in zip(recovered.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
