"""Nothing of a finished fit stays alive, and nothing of the user's stays changed."""

from __future__ import annotations

import gc
import pickle
import weakref

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from epochwise.callbacks import (
    AdaptiveBatchSize,
    AutoMicroBatch,
    BatchSizeSchedule,
    BatchSizeWarmup,
    CurriculumSampling,
    GradientNoiseScale,
    LRScaling,
    LRWarmup,
    OneCycleBatchLR,
    ProgressiveResizing,
    SampleBasedLRSchedule,
    engine,
)
from epochwise.callbacks._lightning_internals import detach_callback, train_dataloaders

from conftest import RecordingModule, make_dataset, quiet_trainer


class Grab(Callback):
    """Keeps weak references to what the fit created (and, like every epochwise callback, drops the
    module handles Lightning attaches to callbacks)."""

    def teardown(self, trainer, pl_module, stage):
        detach_callback(self)

    def on_exception(self, trainer, pl_module, exception):
        detach_callback(self)

    def on_train_start(self, trainer, pl_module):
        self.refs = {
            "module": weakref.ref(pl_module),
            "optimizer": weakref.ref(trainer.optimizers[0]),
            "train loader": weakref.ref(train_dataloaders(trainer)[0]),
            "parameter": weakref.ref(next(pl_module.parameters())),
        }


class ImageModule(RecordingModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.layer = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(1, 2))


def image_loader():
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 2, (32,)))
    return DataLoader(data, batch_size=4, shuffle=True)


class OutOfMemoryAbove5(RecordingModule):
    def training_step(self, batch, batch_idx):
        if len(batch[0]) > 5:
            raise torch.OutOfMemoryError("fake")
        return super().training_step(batch, batch_idx)


CASES = {
    "warmup+lr": (lambda: [BatchSizeWarmup(4, 16, interval=1, max_per_device=8), LRScaling(), LRWarmup(2)],
                  lambda: DataLoader(make_dataset(40), batch_size=4, shuffle=True), RecordingModule),
    "schedule+samples": (lambda: [BatchSizeSchedule({0: 8}), SampleBasedLRSchedule("cosine")],
                         lambda: DataLoader(make_dataset(40), batch_size=4, num_workers=2, persistent_workers=True),
                         RecordingModule),
    "noise+adaptive": (lambda: [GradientNoiseScale(every_n_steps=1), AdaptiveBatchSize(4, 16), LRScaling()],
                       lambda: DataLoader(make_dataset(40), batch_size=4, shuffle=True), RecordingModule),
    "noise(accumulation)": (lambda: [GradientNoiseScale(source="accumulation"), BatchSizeWarmup(4, 8, max_per_device=4)],
                            lambda: DataLoader(make_dataset(40), batch_size=4), RecordingModule),
    "resizing": (lambda: [ProgressiveResizing(stages=[(0, 4), (1, 8)]), LRScaling("sqrt")], image_loader,
                 ImageModule),
    "one-cycle": (lambda: [OneCycleBatchLR(max_per_device=4)],
                  lambda: DataLoader(make_dataset(40), batch_size=6, shuffle=True), RecordingModule),
    "curriculum": (lambda: [CurriculumSampling(list(range(40)), start_fraction=0.5)],
                   lambda: DataLoader(make_dataset(40), batch_size=4, num_workers=2, persistent_workers=True),
                   RecordingModule),
    "micro-batches": (lambda: [BatchSizeWarmup(4, 16, interval=1, max_per_device="auto"), AutoMicroBatch()],
                      lambda: DataLoader(make_dataset(40), batch_size=4), OutOfMemoryAbove5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nothing_of_a_finished_fit_stays_alive(case):
    make_callbacks, make_loader, make_module = CASES[case]
    callbacks, loader, grab = make_callbacks(), make_loader(), Grab()
    trainer = quiet_trainer(callbacks=[*callbacks, grab], max_epochs=2)
    module = make_module(scheduler="step")
    trainer.fit(module, train_dataloaders=loader)
    del trainer, module
    gc.collect()
    alive = [name for name, ref in grab.refs.items() if ref() is not None]
    assert alive == []  # the callbacks (still alive here) hold nothing of the fit
    assert len(engine._STATES) == 0
    for callback in callbacks:
        pickle.loads(pickle.dumps(callback))  # and stay reusable objects


def test_the_fit_state_is_released_on_exception():
    class Boom(Exception):
        pass

    class Crash(RecordingModule):
        def training_step(self, batch, batch_idx):
            raise Boom()

    grab = Grab()
    trainer = quiet_trainer(callbacks=[BatchSizeWarmup(4, 16), LRScaling(), grab], max_epochs=2)
    module = Crash()
    with pytest.raises(Boom):
        trainer.fit(module, train_dataloaders=DataLoader(make_dataset(40), batch_size=4))
    assert len(engine._STATES) == 0
    del trainer, module
    gc.collect()
    assert [name for name, ref in grab.refs.items() if ref() is not None] == []
