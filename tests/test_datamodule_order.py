"""The training order is a function of (seed, epoch): continued by a resume, reshuffled by a reload.

Issue 11, reproduction 4: the shuffle's generator was re-created from the seed at every
``train_dataloader()`` call, so a run resumed at epoch 2 replayed epoch 0's order, and with
``reload_dataloaders_every_n_epochs=1`` every epoch saw the same order. These tests run without
epochwise callbacks (the batch-size callbacks keep the same order on their own).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from epochwise.datamodules import DigitsDataModule
from epochwise.modules import MLP, ImageClassifier

from conftest import quiet_trainer


class OrderRecorder(ImageClassifier):
    """Records, per epoch, an identity of every training sample in the order it came."""

    def __init__(self) -> None:
        super().__init__(MLP(input_size=8, hidden=(16,)), lr=0.01)
        self.seen: dict[int, list[tuple[int, float]]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        ids = list(zip(y.tolist(), x.flatten(1).sum(1).tolist()))  # label and pixel sum
        self.seen.setdefault(self.current_epoch, []).extend(ids)
        return super().training_step(batch, batch_idx)


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=128, image_size=8, seed=5)


def fit(epochs: int, tmp_path=None, ckpt_path: str | None = None, **kwargs: Any) -> OrderRecorder:
    model = OrderRecorder()
    callbacks = []
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1))
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, enable_checkpointing=bool(callbacks),
                            callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=digits(), ckpt_path=ckpt_path)
    return model


def test_train_loader_order_is_a_function_of_seed_and_epoch():
    orders = {}
    for _attempt in range(2):
        dm = digits()
        dm.setup("fit")
        for epoch in (0, 1, 2):
            loader = dm.train_dataloader()  # a fresh loader every time: a reload
            loader.sampler.set_epoch(epoch)
            orders.setdefault(epoch, []).append(torch.cat([y for _, y in loader]))
    for epoch in (0, 1, 2):
        assert torch.equal(orders[epoch][0], orders[epoch][1])
    assert not torch.equal(orders[0][0], orders[1][0]) and not torch.equal(orders[1][0], orders[2][0])
    other = DigitsDataModule(batch_size=128, image_size=8, seed=6)
    other.setup("fit")
    assert not torch.equal(torch.cat([y for _, y in other.train_dataloader()]), orders[0][0])


def test_resume_from_epoch_2_checkpoint_continues_the_order(tmp_path):
    full = fit(4, tmp_path / "full")
    orders = [full.seen[e] for e in range(4)]
    assert len({tuple(o) for o in orders}) == 4  # a new order every epoch
    assert all(sorted(o) == sorted(orders[0]) for o in orders)  # each a permutation of the same split
    resumed = fit(4, ckpt_path=str(tmp_path / "full" / "epoch=1.ckpt"))  # saved after epochs 0 and 1
    assert sorted(resumed.seen) == [2, 3]
    assert resumed.seen[2] == orders[2] and resumed.seen[3] == orders[3]


def test_reloading_the_loaders_every_epoch_reshuffles_as_without():
    steady = fit(3)
    reloaded = fit(3, reload_dataloaders_every_n_epochs=1)
    assert [reloaded.seen[e] for e in range(3)] == [steady.seen[e] for e in range(3)]
    assert reloaded.seen[0] != reloaded.seen[1] != reloaded.seen[2]
