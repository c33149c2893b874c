"""Backbones and the ImageClassifier: validation, checkpoints that reload, schedules that follow the
Trainer's horizon, losses that callbacks can monitor."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from epochwise.datamodules import DigitsDataModule
from epochwise.modules import (
    LARS,
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


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(optimizer="rmsprop"), "optimizer"), (dict(scheduler="exp"), "scheduler"), (dict(lr=0), "lr"),
     (dict(lr=float("nan")), "lr"), (dict(lr=True), "lr"), (dict(num_classes=True), "num_classes"),
     (dict(num_classes=1), "num_classes"), (dict(in_channels=0), "in_channels"),
     (dict(weight_decay=-0.1), "weight_decay"), (dict(momentum=1.0), "momentum"),
     (dict(step_size=0), "step_size"), (dict(step_gamma=0.0), "step_gamma"),
     (dict(plateau_factor=1.0), "plateau_factor"), (dict(plateau_patience=-1), "plateau_patience"),
     (dict(label_smoothing=1.0), "label_smoothing"), (dict(lars_clip=1), "lars_clip"),
     (dict(lars_trust_coefficient=float("nan")), "lars_trust_coefficient"),
     (dict(backbone="vgg"), "backbone"), (dict(backbone_kwargs=[1]), "backbone_kwargs"),
     (dict(backbone="mlp", backbone_kwargs={"num_classes": 3}), "backbone_kwargs"),
     (dict(backbone="mlp", backbone_kwargs={"depth": 3}), "backbone_kwargs"),
     (dict(backbone=MLP(), backbone_kwargs={"hidden": [3]}), "backbone_kwargs")],
)
def test_classifier_validation(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ImageClassifier(**kwargs)


def test_classifier_passes_lars_options():
    model = ImageClassifier("mlp", {"input_size": 8, "hidden": [8]}, optimizer="lars", lr=0.2,
                            lars_trust_coefficient=0.02, lars_clip=True)
    model.trainer = quiet_trainer()
    opt = model.configure_optimizers()
    assert isinstance(opt, LARS)
    group = opt.param_groups[0]
    assert (group["trust_coefficient"], group["clip"], group["lr"]) == (0.02, True, 0.2)


def tiny_loader(n: int = 32, batch_size: int = 8, channels: int = 1, size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, channels, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


# -- checkpoints reload (issue 11, reproduction 3) ----------------------------------------------
@pytest.mark.parametrize(
    "backbone,kwargs,channels",
    [("simple_cnn", None, 1), ("resnet20", None, 3), ("resnet18", None, 3), ("mlp", {"hidden": (256, 256)}, 1)],
)
def test_load_from_checkpoint_rebuilds_every_backbone(backbone, kwargs, channels, tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(backbone, kwargs, in_channels=channels, optimizer="sgd", lr=0.1, momentum=0.0)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=tiny_loader(n=8, channels=channels))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    torch.manual_seed(1)  # a different initialisation: only the checkpoint can make them equal
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.hparams.backbone == backbone and type(loaded.backbone) is type(model.backbone)
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(2, channels, 8, 8)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))


def test_backbone_module_must_be_passed_again_to_load(tmp_path):
    model = ImageClassifier(MLP(input_size=8, hidden=(16,)))
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=tiny_loader(n=8))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"backbone module \(MLP\).*load_from_checkpoint\(path, backbone="):
        ImageClassifier.load_from_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path, backbone=MLP(input_size=8, hidden=(16,)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# -- schedules follow the Trainer's horizon (issue 11, reproduction 2) -------------------------
class LRRecorder(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = trainer.should_stop or len(self.lrs) >= 40  # a guard: never run unbounded


def fit_lrs(scheduler: str, **trainer_kwargs) -> list[float]:
    model = ImageClassifier(MLP(input_size=8, hidden=(8,)), optimizer="sgd", lr=0.1, scheduler=scheduler)
    rec = LRRecorder()
    kwargs = dict(max_epochs=None, limit_val_batches=0, callbacks=[rec])
    kwargs.update(trainer_kwargs)
    quiet_trainer(**kwargs).fit(model, train_dataloaders=tiny_loader())  # 4 batches per epoch
    return rec.lrs


def cosine(k: int, total: int) -> float:
    return 0.05 * (1 + math.cos(math.pi * k / total))


def test_cosine_with_max_steps_anneals_per_step_over_max_steps():
    # old code: T_max = max_epochs or 1 -> 0.1, 0.0, 0.1 by epoch, no annealing
    lrs = fit_lrs("cosine", max_steps=10)
    assert lrs == pytest.approx([cosine(k, 10) for k in range(10)], abs=1e-12)


def test_cosine_with_both_limits_spans_the_shorter():
    assert fit_lrs("cosine", max_epochs=2, max_steps=100) == pytest.approx([cosine(k, 8) for k in range(8)])
    assert fit_lrs("cosine", max_epochs=5, max_steps=6) == pytest.approx([cosine(k, 6) for k in range(6)])


def test_cosine_with_max_epochs_anneals_per_epoch():
    lrs = fit_lrs("cosine", max_epochs=3)
    assert lrs == pytest.approx([cosine(e, 3) for e in range(3) for _ in range(4)], abs=1e-12)


def test_onecycle_spans_the_estimated_steps():
    lrs = fit_lrs("onecycle", max_epochs=2, accumulate_grad_batches=2)
    sched = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                                                max_lr=0.1, total_steps=4)
    want = []
    for _ in range(4):  # one LR per optimizer step, two batches each
        want += [sched.get_last_lr()[0]] * 2
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx(want)


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
@pytest.mark.parametrize("limits", [dict(max_epochs=-1), dict(max_epochs=-1, max_time={"seconds": 5})])
def test_unbounded_run_raises_naming_the_flags(scheduler, limits):
    with pytest.raises(ValueError, match=r"`max_epochs`.*`max_steps`.*got max_epochs=-1 and max_steps=-1"):
        fit_lrs(scheduler, **limits)


# -- monitored losses: label smoothing trains, plain cross-entropy is monitored ----------------
def test_val_and_test_loss_are_plain_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    model = ImageClassifier(MLP(input_size=8, hidden=(16,)), lr=0.05, label_smoothing=0.3)
    loader = tiny_loader(n=40, batch_size=16)  # batches of 16, 16, 8: a weighted mean
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    model.eval()
    with torch.no_grad():
        x, y = loader.dataset.tensors
        logits = model(x)
    plain, smoothed = F.cross_entropy(logits, y).item(), F.cross_entropy(logits, y, label_smoothing=0.3).item()
    assert smoothed - plain > 0.1
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(plain, rel=1e-5)
    result = trainer.test(model, dataloaders=loader, verbose=False)[0]
    assert result["test_loss"] == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize(
    "optimizer,scheduler",
    [("adam", None), ("sgd", "step"), ("adamw", "cosine"), ("lars", "onecycle"), ("sgd", "plateau")],
)
def test_classifier_trains_with_every_optimizer_and_scheduler(optimizer, scheduler):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=128, image_size=8)
    model = ImageClassifier("mlp", {"input_size": 8, "hidden": [32]}, optimizer=optimizer,
                            lr=0.05 if optimizer != "adam" else 1e-2, scheduler=scheduler)
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
