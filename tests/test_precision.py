"""Mixed precision with every epochwise callback, on CPU.

``precision="bf16-mixed"`` runs on CPU as is. ``precision="16-mixed"`` on CPU is not refused by
torch (fp16 autocast and ``torch.amp.GradScaler("cpu")`` work in torch 2.14) but by Lightning, which
silently trains in bf16 instead (docs/LIGHTNING.md fact 20); the fp16 + GradScaler path is run here
through ``plugins=[MixedPrecision("16-mixed", "cpu")]``, which is exactly Lightning's plugin for
``"16-mixed"`` on a GPU. Every quantity that reads gradients (clipping, LARS, AutoMicroBatch's sum
of parts) must see them unscaled.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from epochwise.callbacks import (
    AutoMicroBatch,
    EarlyStopping,
    LearningCurveMonitor,
    MultiMetricEarlyStopping,
    SnapshotEnsemble,
    TrainingBudget,
)
from epochwise.modules.optim import LARS

from conftest import MemoryLogger, make_dataset, quiet_trainer
from test_engine_matrix import COLUMNS, Config, MatrixModule, expected, images
from test_micro_batch import OutOfMemoryModule, StepRecorder


def precision(name: str) -> dict[str, Any]:
    """Trainer arguments for ``name`` on CPU (a fresh GradScaler for every fit)."""
    if name == "16-mixed":  # init_scale: tiny test models overflow fp16 at the default 2**16
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=64.0))]}
    return {"precision": name}


PRECISIONS = ["16-mixed", "bf16-mixed"]
DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


# -- the engine's callbacks: exactly the sizes, images and LRs of the 32-bit matrix -------------------
@pytest.mark.parametrize("column", sorted(COLUMNS))
@pytest.mark.parametrize("name", PRECISIONS)
def test_engine_callbacks_under_mixed_precision(name, column):
    col = COLUMNS[column]
    module = MatrixModule()
    dtypes: set[torch.dtype] = set()
    module.net[-1].register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    trainer = quiet_trainer(callbacks=col.make(), max_epochs=3, **precision(name))
    trainer.fit(module, train_dataloaders=DataLoader(images(), batch_size=6, shuffle=True),
                val_dataloaders=DataLoader(images(12), batch_size=12))
    want, want_val = expected(Config(), col)
    assert [r[:5] for r in module.records] == [r[:5] for r in want]
    assert [r[5] for r in module.records] == pytest.approx([r[5] for r in want], rel=1e-9)
    assert module.val_runs == want_val
    assert dtypes == {DTYPES[name]}  # the steps ran under autocast


# -- the other callbacks -------------------------------------------------------------------------------
class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class LRRecorder(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def fit(name: str, *callbacks: Callback, epochs: int = 4, **kwargs: Any) -> tuple[Classifier, MemoryLogger]:
    module, logger = Classifier(), MemoryLogger()
    trainer = quiet_trainer(callbacks=list(callbacks), max_epochs=epochs, logger=logger, **precision(name), **kwargs)
    trainer.fit(module, train_dataloaders=DataLoader(make_dataset(40), batch_size=8),
                val_dataloaders=DataLoader(make_dataset(16, seed=2), batch_size=8))
    return module, logger


@pytest.mark.parametrize("name", PRECISIONS)
def test_stopping_and_curves_read_the_mixed_precision_losses(name, tmp_path):
    stopping, multi = EarlyStopping(monitor="val_loss", patience=1), MultiMetricEarlyStopping(
        {"val_loss": {"mode": "min", "patience": 1}})
    curves = LearningCurveMonitor(dirpath=str(tmp_path))
    _, logger = fit(name, stopping, multi, curves, epochs=6)
    val = logger.series("val_loss")
    assert val and all(torch.isfinite(torch.tensor(val)))
    assert float(stopping.best_score) == pytest.approx(min(val))
    assert len(curves.history["val_loss"]) == len(val) and (tmp_path / "learning_curves.png").exists()


@pytest.mark.parametrize("name", PRECISIONS)
def test_budget_and_snapshot_ensemble_do_exactly_what_they_do_in_32_bit(name, tmp_path):
    runs = {}
    for prec in ("32-true", name):
        budget, lrs = TrainingBudget(max_samples=100), LRRecorder()
        snapshots = SnapshotEnsemble(cycle_epochs=1, num_cycles=4, dirpath=str(tmp_path / prec))
        fit(prec, budget, snapshots, lrs, epochs=4)
        runs[prec] = (budget.samples_seen, budget.optimizer_steps, lrs.lrs, sorted(p.name for p in (tmp_path / prec).iterdir()))
    assert runs[name][:2] == runs["32-true"][:2] == (104, 13)
    assert runs[name][2] == pytest.approx(runs["32-true"][2], rel=1e-12)
    assert runs[name][3] == runs["32-true"][3] == ["snapshot_0.pt", "snapshot_1.pt", "snapshot_2.pt"]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("name", PRECISIONS)
def test_out_of_memory_recovery_under_mixed_precision(name, accumulation):
    runs = []
    for limit in (None, 5):
        module, recorder = OutOfMemoryModule(limit), StepRecorder()
        callbacks = [recorder] + ([AutoMicroBatch()] if limit else [])
        trainer = quiet_trainer(callbacks=callbacks, max_epochs=2, accumulate_grad_batches=accumulation,
                                **precision(name))
        trainer.fit(module, train_dataloaders=DataLoader(make_dataset(64), batch_size=16))
        runs.append((module, recorder))
    (reference, r_ref), (recovered, r_rec) = runs
    assert recovered.calls[:2] == [16, 8] and set(recovered.calls[2:]) == {4}
    assert r_rec.samples == r_ref.samples and r_rec.lrs == r_ref.lrs
    for a, b in zip(recovered.parameters(), reference.parameters()):  # parts round differently in 16 bits
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)


# -- gradients, as clipping, LARS and the optimizer read them --------------------------------------------
class RecordingLARS(LARS):
    """LARS that keeps the gradients it steps with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None  # Lightning's closure: forward and backward
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        super().step()
        return loss


class GradientsBeforeClipping(Callback):
    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.clone() for p in pl_module.parameters()])


class LARSModule(OutOfMemoryModule):
    def configure_optimizers(self) -> Any:
        return RecordingLARS(self.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("name", ["32-true", *PRECISIONS])
def test_clipping_lars_and_micro_batch_sums_see_unscaled_gradients(name):
    runs = {}
    for prec in ("32-true", name):
        for limit in (None, 5):
            module, before = LARSModule(limit), GradientsBeforeClipping()
            callbacks = [before] + ([AutoMicroBatch()] if limit else [])
            trainer = quiet_trainer(callbacks=callbacks, max_epochs=1, gradient_clip_val=0.05, **precision(prec))
            trainer.fit(module, train_dataloaders=DataLoader(make_dataset(64), batch_size=16))
            runs[prec, limit] = (before.grads, module.optimizers().optimizer.grads)
    reference = runs["32-true", None][0][0]  # the first step's gradient in 32 bits, before clipping
    for limit in (None, 5):
        before, at_step = runs[name, limit]
        assert len(before) == len(at_step) == 4
        for g, ref in zip(before[0], reference):  # unscaled: a GradScaler factor of 64 would show
            torch.testing.assert_close(g, ref, rtol=0.05, atol=2e-3)
        for pre, post in zip(before, at_step):  # clipping acted on the unscaled norm
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in pre]))
            assert norm > 0.05
            for g, h in zip(pre, post):
                torch.testing.assert_close(h, g * (0.05 / norm), rtol=1e-3, atol=1e-7)
