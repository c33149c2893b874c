"""ImageClassifier: the reference LightningModule (cross-entropy, accuracy, optimizer/scheduler)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .backbones import SimpleCNN
from .optim import LARS

__all__ = ["ImageClassifier"]

OptimizerName = Literal["adam", "sgd", "adamw", "lars"]
SchedulerName = Literal["step", "cosine", "onecycle", "plateau"]


class ImageClassifier(pl.LightningModule):
    """Classifier over any backbone with the usual optimizer and LR-scheduler choices.

    Logs per epoch ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and
    ``test_acc``. ``lr`` is a hyperparameter (``self.lr``/``self.hparams.lr``), so Lightning's LR
    finder works; batch size lives on the DataModule, where the batch-size tuner finds it.

    Args:
        backbone: any ``nn.Module`` mapping images to logits; default ``SimpleCNN``.
        num_classes: number of classes (used for the default backbone and the metrics).
        in_channels: image channels of the default backbone.
        optimizer: ``"adam"``, ``"sgd"``, ``"adamw"`` or ``"lars"`` (LARS wraps SGD momentum).
        lr, weight_decay, momentum: optimizer settings (momentum for SGD/LARS).
        scheduler: ``None``, ``"step"`` (x``step_gamma`` every ``step_size`` epochs),
            ``"cosine"`` (over ``max_epochs``), ``"onecycle"`` (over the estimated optimizer
            steps, max LR = ``lr``) or ``"plateau"`` (ReduceLROnPlateau on ``val_loss``).
        step_size, step_gamma: StepLR settings.
        plateau_factor, plateau_patience: ReduceLROnPlateau settings.
        label_smoothing: cross-entropy label smoothing.
        per_sample_loss: ``training_step`` returns ``{"loss": mean, "per_sample_loss": losses}``
            (each sample's loss, detached), for callbacks that score samples by their own loss
            (``CurriculumSampling(difficulty="loss")``); no extra computation.

    Example:
        >>> model = ImageClassifier(optimizer="sgd", lr=0.1, scheduler="cosine")
        >>> model.hparams.lr
        0.1
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_classes: int = 10,
        in_channels: int = 1,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerName | None = None,
        step_size: int = 10,
        step_gamma: float = 0.1,
        plateau_factor: float = 0.5,
        plateau_patience: int = 3,
        label_smoothing: float = 0.0,
        per_sample_loss: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd", "adamw", "lars"):
            raise ValueError(f"`optimizer` must be 'adam', 'sgd', 'adamw' or 'lars', got {optimizer!r}")
        if scheduler not in (None, "step", "cosine", "onecycle", "plateau"):
            raise ValueError(
                f"`scheduler` must be None, 'step', 'cosine', 'onecycle' or 'plateau', got {scheduler!r}"
            )
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone if backbone is not None else SimpleCNN(in_channels, num_classes)
        self.lr = lr
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _shared_step(self, batch: Any, stage: str, per_sample: list[Tensor] | None = None) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        if per_sample is None:
            loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        else:  # the same mean, keeping each sample's loss
            losses = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing, reduction="none")
            per_sample.append(losses.detach())
            loss = losses.mean()
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        n = x.shape[0]
        # batch_size is given explicitly: it changes during fit when the batch size is scheduled.
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if not self.hparams.get("per_sample_loss", False):
            return self._shared_step(batch, "train")
        losses: list[Tensor] = []
        loss = self._shared_step(batch, "train", losses)
        return {"loss": loss, "per_sample_loss": losses[0]}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0]).softmax(-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = LARS(params, lr=self.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.scheduler is None:
            return opt
        if hp.scheduler == "step":
            sched: Any = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.step_gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.scheduler == "cosine":
            t_max = max(1, int(self.trainer.max_epochs or 1))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.scheduler == "onecycle":
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=max(total, 2))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=hp.plateau_factor, patience=hp.plateau_patience
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "epoch", "monitor": "val_loss"},
        }
