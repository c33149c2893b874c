"""ImageClassifier: the reference LightningModule (cross-entropy, accuracy, optimizer/scheduler)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from epochwise.datamodules._checks import check_bool, check_choice, check_int, check_number

from .backbones import BACKBONE_NAMES, build_backbone
from .optim import LARS

__all__ = ["ImageClassifier", "schedule_horizon"]

OptimizerName = Literal["adam", "sgd", "adamw", "lars"]
SchedulerName = Literal["step", "cosine", "onecycle", "plateau"]
_OPTIMIZERS = ("adam", "sgd", "adamw", "lars")
_SCHEDULERS = (None, "step", "cosine", "onecycle", "plateau")
_CUSTOM_PREFIX = "module:"  # hparams record of a backbone passed as an nn.Module instance


def schedule_horizon(trainer: pl.Trainer, scheduler: str, steps_only: bool = False) -> tuple[int, str]:
    """The length of a run as ``(count, unit)``: what a cosine or one-cycle schedule spans.

    ``max_epochs`` alone gives ``(max_epochs, "epoch")``. With ``max_steps`` (alone or with
    ``max_epochs``), or when ``steps_only``, the unit is the optimizer step and the count is
    ``trainer.estimated_stepping_batches`` (the smaller of the two limits, after gradient
    accumulation and ``limit_train_batches``).

    Raises:
        ValueError: when the run has no finite horizon (``max_epochs=-1`` and no ``max_steps``,
            or only ``max_time``), naming both Trainer flags.

    Example:
        >>> trainer = pl.Trainer(max_epochs=12, logger=False, enable_checkpointing=False)
        >>> schedule_horizon(trainer, "cosine")
        (12, 'epoch')
    """
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    epochs_bounded = max_epochs is not None and max_epochs >= 0
    steps_bounded = max_steps is not None and max_steps >= 0
    if not epochs_bounded and not steps_bounded:
        raise ValueError(
            f"scheduler={scheduler!r} needs a finite horizon: set the Trainer's `max_epochs` (an int >= 1) "
            f"or `max_steps` (an int >= 1), got max_epochs={max_epochs!r} and max_steps={max_steps!r}"
        )
    if epochs_bounded and not steps_bounded and not steps_only:
        return max(1, int(max_epochs)), "epoch"  # type: ignore[arg-type]
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 1:
        raise ValueError(
            f"scheduler={scheduler!r} needs a finite number of optimizer steps: set the Trainer's "
            f"`max_steps` (an int >= 1), got max_steps={max_steps!r} (estimated steps: {total})"
        )
    return int(total), "step"


class ImageClassifier(pl.LightningModule):
    """Classifier over any backbone with the usual optimizer and LR-scheduler choices.

    Logs per epoch ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and
    ``test_acc``, synchronised across processes under DDP (losses with ``sync_dist=True``, the
    accuracies as torchmetrics objects), so every rank monitors the same values and a plateau
    scheduler, early stopping or a checkpoint decides the same on all of them. ``train_loss`` is
    the optimised objective (with ``label_smoothing``); ``val_loss`` and ``test_loss`` are the plain
    cross-entropy of the true class, comparable whatever the smoothing. ``lr`` is a hyperparameter
    (``self.lr``), so Lightning's LR finder works; the batch size lives on the DataModule.

    The architecture is part of the saved hyperparameters (``backbone`` name and
    ``backbone_kwargs``), so ``ImageClassifier.load_from_checkpoint(path)`` rebuilds it. A backbone
    passed as an ``nn.Module`` instance is not saved (only its class name is recorded): pass it
    again, ``load_from_checkpoint(path, backbone=MyNet(...))``.

    Args:
        backbone: a registry name (``"simple_cnn"``, ``"resnet20"``, ``"resnet18"``, ``"mlp"``),
            built with ``in_channels``, ``num_classes`` and ``backbone_kwargs``; or any
            ``nn.Module`` mapping images to logits.
        backbone_kwargs: further arguments of the named backbone, e.g. ``{"hidden": [256, 256]}``
            for ``"mlp"``.
        num_classes: number of classes (backbone output and metrics), >= 2.
        in_channels: image channels of a named backbone.
        optimizer: ``"adam"``, ``"sgd"``, ``"adamw"`` or ``"lars"`` (:class:`.LARS`).
        lr: learning rate (the peak LR for ``"onecycle"``).
        weight_decay: L2 weight decay of the optimizer.
        momentum: momentum of SGD and LARS.
        scheduler: ``None``, ``"step"`` (x``step_gamma`` every ``step_size`` epochs),
            ``"cosine"`` (to 0 over the run: over ``max_epochs`` per epoch, or per optimizer step
            over the estimated steps when ``max_steps`` is set), ``"onecycle"`` (per step over the
            estimated optimizer steps, max LR = ``lr``) or ``"plateau"`` (ReduceLROnPlateau on
            ``val_loss``). Cosine and one-cycle raise ``ValueError`` when the run is unbounded.
        step_size: epochs between LR cuts of the ``"step"`` scheduler.
        step_gamma: LR multiplier at each cut of the ``"step"`` scheduler.
        plateau_factor: LR multiplier of ReduceLROnPlateau.
        plateau_patience: epochs without improvement before ReduceLROnPlateau cuts the LR.
        label_smoothing: cross-entropy label smoothing of the training loss, in ``[0, 1)``.
        lars_trust_coefficient: LARS's ``trust_coefficient`` (eta).
        lars_clip: LARS's ``clip`` (the LARC mode: the local LR never above ``lr``).

    Example:
        >>> model = ImageClassifier("mlp", {"hidden": [64]}, optimizer="sgd", lr=0.1, scheduler="cosine")
        >>> model.hparams.backbone, model.hparams.backbone_kwargs, model.hparams.lr
        ('mlp', {'hidden': [64]}, 0.1)
    """

    def __init__(
        self,
        # Hinted as str, what the CLI accepts: with nn.Module in the hint, jsonargparse would list
        # every Module subclass in --help. An nn.Module instance is accepted too (documented).
        backbone: str = "simple_cnn",
        backbone_kwargs: dict[str, Any] | None = None,
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
        lars_trust_coefficient: float = 0.001,
        lars_clip: bool = False,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=2)
        check_int("in_channels", in_channels, minimum=1)
        check_choice("optimizer", optimizer, _OPTIMIZERS)
        check_number("lr", lr, 0.0, low_inclusive=False)
        check_number("weight_decay", weight_decay, 0.0)
        check_number("momentum", momentum, 0.0, 1.0, high_inclusive=False)
        check_choice("scheduler", scheduler, _SCHEDULERS)
        check_int("step_size", step_size, minimum=1)
        check_number("step_gamma", step_gamma, 0.0, 1.0, low_inclusive=False)
        check_number("plateau_factor", plateau_factor, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        check_int("plateau_patience", plateau_patience, minimum=0)
        check_number("label_smoothing", label_smoothing, 0.0, 1.0, high_inclusive=False)
        check_number("lars_trust_coefficient", lars_trust_coefficient, 0.0, low_inclusive=False)
        check_bool("lars_clip", lars_clip)
        if isinstance(backbone, nn.Module):
            if backbone_kwargs:
                raise ValueError(
                    f"`backbone_kwargs` must be None or empty with a backbone module, got {backbone_kwargs!r}"
                )
            self.save_hyperparameters(ignore=["backbone"])
            # Recorded so that a load_from_checkpoint without the module says what to pass.
            self.hparams["backbone"] = f"{_CUSTOM_PREFIX}{type(backbone).__name__}"
            self.backbone = backbone
        else:
            self.save_hyperparameters()
            self.backbone = self._build(backbone, backbone_kwargs, in_channels, num_classes)
        self.lr = lr
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @staticmethod
    def _build(name: Any, kwargs: Any, in_channels: int, num_classes: int) -> nn.Module:
        if isinstance(name, str) and name.startswith(_CUSTOM_PREFIX):
            raise ValueError(
                f"this model was built around a backbone module ({name[len(_CUSTOM_PREFIX):]}), which a "
                "checkpoint does not hold: pass it again, "
                "ImageClassifier.load_from_checkpoint(path, backbone=<the module>)"
            )
        if not isinstance(name, str) or name not in BACKBONE_NAMES:
            raise ValueError(
                f"`backbone` must be one of {', '.join(map(repr, BACKBONE_NAMES))} or an nn.Module, got {name!r}"
            )
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"`backbone_kwargs` must be None or a dict of keyword arguments, got {kwargs!r}")
        clash = sorted({"in_channels", "num_classes"} & set(kwargs))
        if clash:
            raise ValueError(
                f"`backbone_kwargs` must not set {', '.join(clash)} (ImageClassifier's own arguments), got {kwargs!r}"
            )
        try:
            return build_backbone(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
        except TypeError as err:
            raise ValueError(f"`backbone_kwargs` {kwargs!r} do not fit backbone {name!r}: {err}") from err

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        n = x.shape[0]
        # batch_size is given explicitly: it changes during fit when the batch size is scheduled.
        # sync_dist: every rank must monitor the same value (the reduction runs once per epoch,
        # since on_step=False); the accuracy objects synchronise themselves.
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n,
                 sync_dist=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

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
            opt = LARS(params, lr=self.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                       trust_coefficient=hp.lars_trust_coefficient, clip=hp.lars_clip)
        if hp.scheduler is None:
            return opt
        if hp.scheduler == "step":
            sched: Any = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.step_gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.scheduler == "cosine":
            total, unit = schedule_horizon(self.trainer, "cosine")
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": unit}}
        if hp.scheduler == "onecycle":
            total, _ = schedule_horizon(self.trainer, "onecycle", steps_only=True)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=max(total, 2))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=hp.plateau_factor, patience=hp.plateau_patience
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "epoch", "monitor": "val_loss"},
        }
