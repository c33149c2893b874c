"""Pieces shared by ``scripts/noise_scale.py`` and ``scripts/critical_batch_size.py``: the digits
setup (SimpleCNN, Adam), a recorder of the training loss and the noise scale, full-data losses."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from epochwise.callbacks import GradientNoiseScale
from epochwise.datamodules import DigitsDataModule
from epochwise.modules import ImageClassifier


def digits(batch_size: int, image_size: int = 28, seed: int = 0) -> DigitsDataModule:
    """The embedded digits, split with ``seed`` (the train loader's shuffle follows it too)."""
    return DigitsDataModule(batch_size=batch_size, image_size=image_size, seed=seed)


def classifier(lr: float = 1e-3) -> ImageClassifier:
    """The default recipe's model (SimpleCNN, Adam) at a constant LR: no scheduler to confound batch effects."""
    return ImageClassifier(optimizer="adam", lr=lr, scheduler=None)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def load_average() -> float:
    """The 1-minute load average (timings on a shared machine are reported with it)."""
    return os.getloadavg()[0]


class NoiseRecorder(Callback):
    """After every optimizer step: step, epoch, samples seen, the step's training loss and the noise scale.

    Reads values back every step: a script's choice for a dense curve (the callback itself only reads
    at Lightning's logging cadence).
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._samples = 0
        self._step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += int(batch[0].shape[0])
        if trainer.global_step == self._step:  # a micro-batch of a step still accumulating
            return
        self._step = trainer.global_step
        gns = next((c for c in trainer.callbacks if isinstance(c, GradientNoiseScale)), None)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "samples": self._samples,
               "train_loss": float(loss) * int(trainer.accumulate_grad_batches)}
        if gns is not None:
            values = gns.estimator.values()
            row.update({k: values[k] for k in ("b_simple", "b_simple_raw", "grad_sq_norm", "trace_cov")})
        self.rows.append(row)


def ema(values: list[float], decay: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc, weight = decay * acc + (1 - decay) * v, decay * weight + (1 - decay)
        out.append(acc / weight)
    return out


@torch.no_grad()
def full_loss(model: ImageClassifier, dm: DigitsDataModule, split: str = "train") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) over a whole split."""
    dataset = dm.train_set if split == "train" else dm.val_set
    model.eval()
    n = len(dataset)
    # gather: the split's own transform (uint8 -> normalised float at image_size), one batch of 512 at a time
    logits = torch.cat([model(dataset.gather(range(i, min(i + 512, n)))[0]) for i in range(0, n, 512)])
    model.train()
    targets = dataset.targets
    return float(F.cross_entropy(logits, targets)), float((logits.argmax(-1) == targets).float().mean())


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
