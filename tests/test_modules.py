"""Backbones, LARS and the ImageClassifier."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from epochwise.datamodules import DigitsDataModule
from epochwise.modules import (
    MLP,
    ImageClassifier,
    SimpleCNN,
    build_backbone,
    resnet18,
    resnet20,
)

from conftest import quiet_trainer


@pytest.mark.parametrize("size", [8, 13, 32])
def test_backbones_accept_any_resolution(size):
    assert SimpleCNN()(torch.zeros(2, 1, size, size)).shape == (2, 10)
    assert MLP(input_size=8)(torch.zeros(2, 1, size, size)).shape == (2, 10)
    assert resnet20(in_channels=1, num_classes=7)(torch.zeros(2, 1, size, size)).shape == (2, 7)


def test_backbone_arguments():
    assert SimpleCNN(in_channels=3, num_classes=4)(torch.zeros(1, 3, 28, 28)).shape == (1, 4)
    assert resnet18()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert sum(p.numel() for p in resnet20().parameters()) == pytest.approx(272_474, rel=0.01)
    assert isinstance(build_backbone("mlp", input_size=8), MLP)
    with pytest.raises(ValueError, match="name"):
        build_backbone("vgg")
    with pytest.raises(ValueError, match="num_classes"):
        SimpleCNN(num_classes=0)


@pytest.mark.parametrize("kwargs,match", [(dict(optimizer="rmsprop"), "optimizer"),
                                          (dict(scheduler="exp"), "scheduler"), (dict(lr=0), "lr")])
def test_classifier_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)


@pytest.mark.parametrize(
    "optimizer,scheduler",
    [("adam", None), ("sgd", "step"), ("adamw", "cosine"), ("lars", "onecycle"), ("sgd", "plateau")],
)
def test_classifier_trains_with_every_optimizer_and_scheduler(optimizer, scheduler):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=128, image_size=8)
    model = ImageClassifier(backbone=MLP(input_size=8, hidden=(32,)), optimizer=optimizer, lr=0.05 if optimizer != "adam" else 1e-2,
                            scheduler=scheduler)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert key in metrics
    assert model.hparams.lr == model.lr


def test_classifier_learns_digits_and_logs_test_metrics():
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, image_size=8)
    model = ImageClassifier(backbone=MLP(input_size=8, hidden=(64,)), lr=1e-2)
    trainer = quiet_trainer(max_epochs=4)
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert result["test_acc"] > 0.85 and "test_loss" in result


def test_tuner_conventions_find_lr_and_batch_size():
    from lightning.pytorch.utilities.parsing import lightning_hasattr

    model = ImageClassifier(lr=0.01)
    dm = DigitsDataModule(batch_size=32)
    trainer = quiet_trainer()
    trainer.fit_loop  # noqa: B018 - the trainer attaches the datamodule on fit; emulate the lookup
    model.trainer = trainer
    trainer.datamodule = dm  # type: ignore[misc]
    assert lightning_hasattr(model, "lr") and lightning_hasattr(model, "batch_size")
