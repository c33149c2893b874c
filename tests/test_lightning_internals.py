"""Fails loudly when Lightning changes an internal that epochwise relies on (LIGHTNING-NOTES.md)."""

from __future__ import annotations

import lightning
import pytest
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from epochwise.callbacks._lightning_internals import (
    restart_train_iterator,
    set_train_epoch_length,
    train_dataloaders,
)

from conftest import RecordingModule, make_dataset, quiet_trainer


class Probe(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_start(self, trainer, pl_module):
        fit_loop = trainer.fit_loop
        # Note 2: the first iterator already exists before on_train_start
        self.seen["fetcher_has_iterator"] = getattr(fit_loop._data_fetcher, "iterator", None) is not None
        self.seen["loaders"] = train_dataloaders(trainer)
        self.seen["cached_len"] = trainer.num_training_batches
        loader = self.seen["loaders"][0]
        loader.batch_sampler.batch_size = 4  # a plain BatchSampler reads batch_size when iterated
        set_train_epoch_length(trainer, len(loader.batch_sampler))
        restart_train_iterator(trainer)
        self.seen["new_len"] = trainer.num_training_batches
        self.seen["limits"] = list(fit_loop._combined_loader.limits)


def test_internals_used_by_the_engine_still_behave():
    loader = DataLoader(make_dataset(40), batch_size=10, num_workers=1)
    module, probe = RecordingModule(), Probe()
    quiet_trainer(callbacks=[probe], max_epochs=1).fit(module, loader)
    assert probe.seen["fetcher_has_iterator"], "Lightning no longer creates the train iterator in setup_data"
    assert probe.seen["loaders"][0] is loader
    assert probe.seen["cached_len"] == 4
    assert probe.seen["new_len"] == 10 and probe.seen["limits"] == [10]
    # without the restart, the batch prefetched at size 10 would have leaked into step 0
    assert module.sizes_by_epoch()[0] == [4] * 10


def test_stale_length_without_update_is_what_the_notes_say():
    """Note 3: the epoch length is cached at setup; changing the sampler alone leaves it stale."""

    class OnlySampler(Callback):
        def on_train_start(self, trainer, pl_module):
            train_dataloaders(trainer)[0].batch_sampler.batch_size = 4
            self.cached = trainer.num_training_batches

    loader = DataLoader(make_dataset(40), batch_size=10, num_workers=1)
    cb = OnlySampler()
    module = RecordingModule()
    quiet_trainer(callbacks=[cb], max_epochs=1).fit(module, loader)
    assert cb.cached == 4
    # with workers, the first batches were prefetched at the old size and leak into the epoch
    assert module.sizes_by_epoch()[0][0] == 10


def test_lightning_version_is_one_we_checked():
    major, minor = (int(p) for p in lightning.__version__.split(".")[:2])
    if (major, minor) != (2, 6):
        pytest.fail(
            f"epochwise's Lightning internals were checked on 2.6, found {lightning.__version__}: "
            "re-run this file and update callbacks/_lightning_internals.py"
        )
