"""Two CPU processes (gloo): ImageClassifier's monitored values, LRs and weights agree on both ranks.

Issue 11, reproduction 1: without synchronised losses each rank monitored its own half of the
validation set, ``ReduceLROnPlateau`` cut the LR at different epochs on different ranks and the
weights drifted apart.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from epochwise.datamodules import DigitsDataModule
from epochwise.modules import MLP, ImageClassifier

from conftest import quiet_trainer

MONITORED = ("train_loss", "train_acc", "val_loss", "val_acc")


class RankRecorder(Callback):
    """Per epoch: the LR the epoch ran with and every monitored value; at the end, the weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.epochs: list[dict] = []
        self._lr = float("nan")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.epochs.append({"lr": self._lr, **{k: float(metrics[k]) for k in MONITORED}})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        payload = {
            "world": trainer.world_size,
            "epochs": self.epochs,
            "final_lr": trainer.optimizers[0].param_groups[0]["lr"],
            "best_model_score": float(ckpt.best_model_score),
            "weights": {k: v.detach().flatten().tolist() for k, v in pl_module.state_dict().items()},
        }
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(payload, f)


@pytest.mark.slow
def test_two_process_ddp_plateau_same_monitored_values_lrs_and_weights(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=32, image_size=8)
    # The default recipe's optimizer and scheduler, with patience 0 (and a larger LR, so the LR is
    # cut within a few epochs).
    model = ImageClassifier(MLP(input_size=8, hidden=(32,)), optimizer="adam", lr=0.02,
                            scheduler="plateau", plateau_factor=0.5, plateau_patience=0)
    trainer = quiet_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=6,
        enable_checkpointing=True,
        callbacks=[RankRecorder(str(tmp_path)),
                   ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", mode="min", save_top_k=1)],
    )
    trainer.fit(model, datamodule=dm)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and len(r0["epochs"]) == 6
    # identical, not merely close: every rank computes the same reduction of the same numbers
    assert r0["epochs"] == r1["epochs"]
    assert r0["best_model_score"] == r1["best_model_score"]
    assert r0["final_lr"] == r1["final_lr"]
    assert r0["weights"] == r1["weights"]
    lrs = [e["lr"] for e in r0["epochs"]] + [r0["final_lr"]]
    assert lrs[0] == 0.02 and min(lrs) < 0.02  # the plateau scheduler did cut the LR
    # the monitored val_loss is the whole validation set's, not one rank's half
    dm.setup("fit")
    model.load_state_dict({k: torch.tensor(v).view_as(p) for (k, v), p in
                           zip(r0["weights"].items(), model.state_dict().values())})
    model.eval()
    with torch.no_grad():
        x, y = dm.val_set.gather(range(len(dm.val_set)))
        true_val_loss = F.cross_entropy(model(x), y).item()
    assert r0["epochs"][-1]["val_loss"] == pytest.approx(true_val_loss, rel=1e-5)
