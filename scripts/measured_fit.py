"""One measured fit: the data sets, models and the per-run figures the claims and the sweep share.

:func:`measured_fit` trains an :class:`ImageClassifier` with the given callbacks for a number of
epochs or of optimizer steps and returns what the evidence scripts compare: optimizer steps, wall
and process CPU seconds of the fit, the per-epoch history (train/val loss and accuracy), and the
final model's accuracy and loss on the whole train and validation splits, evaluated after the fit
in eval mode (so the generalisation gap ``train_acc - val_acc`` compares like with like).

Data (:func:`make_data`): the embedded digits at their native 8 px with a quarter of the non-test
images for validation (360 images, so one image is 0.28 points; the default tenth would be 144),
or MNIST / CIFAR-10 from ``data_dir`` when their files are present (:func:`data_available`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from epochwise.datamodules import (
    CIFAR10DataModule,
    DigitsDataModule,
    InMemoryImageDataModule,
    MNISTDataModule,
)
from epochwise.datamodules.memory import make_loader
from epochwise.modules import ImageClassifier

DATASETS = ("digits", "mnist", "cifar10")
#: validation share of the non-test digits used by the evidence scripts (see the module docstring)
DIGITS_VAL_FRACTION = 0.25


def data_available(name: str, data_dir: str = "data") -> bool:
    """Whether ``name``'s files are on disk (the digits always are: scikit-learn ships them)."""
    if name == "digits":
        return True
    if name == "mnist":
        raw = Path(data_dir) / "MNIST" / "raw"
        return all((raw / f).is_file() for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))
    if name == "cifar10":
        return (Path(data_dir) / "cifar-10-batches-py" / "test_batch").is_file()
    raise ValueError(f"`name` must be one of {DATASETS}, got {name!r}")


def make_data(name: str, batch: int, seed: int, data_dir: str = "data") -> InMemoryImageDataModule:
    """The DataModule of a data set, with the training ``seed`` (the splits never change with it)."""
    if name == "digits":
        return DigitsDataModule(batch_size=batch, image_size=8, val_fraction=DIGITS_VAL_FRACTION, seed=seed)
    if name == "mnist":
        return MNISTDataModule(data_dir, batch_size=batch, seed=seed)
    if name == "cifar10":
        return CIFAR10DataModule(data_dir, batch_size=batch, seed=seed)
    raise ValueError(f"`name` must be one of {DATASETS}, got {name!r}")


def make_model(name: str, optimizer: str, lr: float, **kwargs: Any) -> ImageClassifier:
    """An MLP for the digits and MNIST (at their native side), SimpleCNN for CIFAR-10."""
    if name == "cifar10":
        return ImageClassifier("simple_cnn", in_channels=3, optimizer=optimizer, lr=lr, **kwargs)
    side = 8 if name == "digits" else 28
    return ImageClassifier("mlp", {"input_size": side, "hidden": [256, 128]}, optimizer=optimizer, lr=lr, **kwargs)


def quiet_lightning() -> None:
    """Hold back Lightning's per-fit info lines and the known harmless warnings (one line per run
    is what the evidence scripts print)."""
    for name in ("lightning.pytorch", "lightning.fabric"):  # as scripts/cli_common.py does
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*LeafSpec.*", ".*does not have many workers.*", ".*The number of training batches.*"):
        warnings.filterwarnings("ignore", message=message)


class History(Callback):
    """Per validated epoch: ``epoch``, ``steps``, train/val loss and accuracy."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        if "val_loss" not in m or not self.rows or self.rows[-1]["epoch"] != trainer.current_epoch:
            return
        self.rows[-1].update(train_loss=float(m["train_loss"]), train_acc=float(m["train_acc"]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.rows.append({"epoch": trainer.current_epoch, "steps": trainer.global_step,
                          "val_loss": float(m["val_loss"]), "val_acc": float(m["val_acc"]),
                          "train_loss": math.nan, "train_acc": math.nan})


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Any, batch: int = 512) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on a whole in-memory split, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in make_loader(dataset, batch_size=batch):
        logits = model(x)
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    model.train(was_training)
    return correct / n, loss / n


def measured_fit(
    seed: int,
    batch: int,
    lr: float,
    optimizer: str = "sgd",
    epochs: int | None = None,
    max_steps: int | None = None,
    callbacks: Sequence[Callback] = (),
    data: str = "digits",
    data_dir: str = "data",
    validate_every_epoch: bool = True,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Train for ``epochs`` (or ``max_steps`` optimizer steps) and measure; see the module docstring.

    ``validate_every_epoch=False`` skips the per-epoch validation (the history is then empty):
    a run of many short epochs (a large batch for a fixed number of updates) would otherwise
    spend its time validating.
    """
    if (epochs is None) == (max_steps is None):
        raise ValueError(f"give exactly one of `epochs` and `max_steps`, got {epochs!r} and {max_steps!r}")
    pl.seed_everything(seed, verbose=False)
    dm = make_data(data, batch, seed, data_dir)
    model = make_model(data, optimizer, lr, **model_kwargs)
    history = History()
    trainer = pl.Trainer(
        max_epochs=epochs if epochs is not None else -1, max_steps=max_steps if max_steps is not None else -1,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=None if validate_every_epoch else 0,
        callbacks=[*callbacks, history],
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=dm)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    train_acc, train_loss = evaluate(model, dm.train_set)
    val_acc, val_loss = evaluate(model, dm.val_set)
    return {
        "seed": seed, "batch": batch, "lr": lr, "steps": trainer.global_step, "epochs": trainer.current_epoch,
        "num_train": len(dm.train_set), "wall_s": wall, "cpu_s": cpu, "train_acc": train_acc,
        "val_acc": val_acc, "train_loss": train_loss, "val_loss": val_loss, "gap_acc": train_acc - val_acc,
        "history": history.rows, "trainer": trainer, "model": model, "datamodule": dm,
    }


def public(run: dict[str, Any]) -> dict[str, Any]:
    """A run without its live objects (Trainer, model, DataModule): what goes into a JSON."""
    return {k: v for k, v in run.items() if k not in ("trainer", "model", "datamodule")}
