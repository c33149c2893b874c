"""Fails loudly when Lightning changes something epochwise relies on.

Each test checks one fact of ``docs/LIGHTNING.md`` (the fact's number is in the test's name) or
one function of ``callbacks/_lightning_internals.py``, on the installed Lightning.
"""

from __future__ import annotations

import lightning
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from epochwise.callbacks._lightning_internals import (
    detach_callback,
    intercept_train_dataloaders,
    is_logging_step,
    logging_step,
    override_stepping_estimate,
    pending_loader_states,
    replace_train_dataloader,
    restart_train_iterator,
    set_train_epoch_length,
    train_dataloaders,
    validates_by_time,
)

from conftest import RecordingModule, make_dataset, quiet_trainer


def test_lightning_version_is_one_we_checked():
    major, minor = (int(p) for p in lightning.__version__.split(".")[:2])
    if (major, minor) != (2, 6):
        pytest.fail(
            f"epochwise's Lightning internals were checked on 2.6, found {lightning.__version__}: "
            "re-run this file, update callbacks/_lightning_internals.py and docs/LIGHTNING.md"
        )


class Probe(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_start(self, trainer, pl_module):
        fit_loop = trainer.fit_loop
        self.seen["fetcher_has_iterator"] = getattr(fit_loop._data_fetcher, "iterator", None) is not None
        self.seen["loaders"] = train_dataloaders(trainer)
        self.seen["cached_len"] = trainer.num_training_batches
        loader = self.seen["loaders"][0]
        loader.batch_sampler.batch_size = 4  # a plain BatchSampler reads batch_size when iterated
        set_train_epoch_length(trainer, len(loader.batch_sampler))
        restart_train_iterator(trainer)
        self.seen["new_len"] = trainer.num_training_batches
        self.seen["limits"] = list(fit_loop._combined_loader.limits)
        self.seen["fetcher_length"] = fit_loop._data_fetcher.length


def test_facts_1_2_3_first_iterator_exists_early_length_is_cached_and_both_can_be_updated():
    loader = DataLoader(make_dataset(40), batch_size=10, num_workers=1)
    module, probe = RecordingModule(), Probe()
    quiet_trainer(callbacks=[probe], max_epochs=1).fit(module, loader)
    assert probe.seen["fetcher_has_iterator"], "Lightning no longer creates the train iterator in setup_data"
    assert probe.seen["loaders"][0] is loader
    assert probe.seen["cached_len"] == 4
    assert probe.seen["new_len"] == 10 and probe.seen["limits"] == [10] and probe.seen["fetcher_length"] == 10
    # without the restart, the batch prefetched at size 10 would have leaked into step 0
    assert module.sizes_by_epoch()[0] == [4] * 10


def test_fact_3_stale_length_without_update():
    class OnlySampler(Callback):
        def on_train_start(self, trainer, pl_module):
            train_dataloaders(trainer)[0].batch_sampler.batch_size = 4
            self.cached = trainer.num_training_batches

    loader = DataLoader(make_dataset(40), batch_size=10, num_workers=1)
    cb = OnlySampler()
    module = RecordingModule()
    quiet_trainer(callbacks=[cb], max_epochs=1).fit(module, loader)
    assert cb.cached == 4
    assert module.sizes_by_epoch()[0][0] == 10  # prefetched at the old size


class ReloadingModule(RecordingModule):
    def train_dataloader(self):
        return DataLoader(make_dataset(20), batch_size=5)


def test_facts_2_11_15_the_interception_sees_every_train_loader_before_it_is_measured_or_iterated():
    events = []

    class Install(Callback):
        def setup(self, trainer, pl_module, stage):
            def wrap(loader):
                events.append("wrap")
                return DataLoader(make_dataset(20), batch_size=2)  # what Lightning then measures and iterates

            self.undo = intercept_train_dataloaders(trainer, wrap, lambda: events.append("after"))

        def on_train_epoch_start(self, trainer, pl_module):
            events.append(f"epoch {trainer.current_epoch}: {trainer.num_training_batches} batches")

        def teardown(self, trainer, pl_module, stage):
            self.undo()
            assert "setup_data" not in trainer.fit_loop.__dict__
            assert "process_dataloader" not in trainer.strategy.__dict__

    class Estimating(ReloadingModule):
        def configure_optimizers(self):
            self.estimate = self.trainer.estimated_stepping_batches  # fact 15: builds the loader early
            return super().configure_optimizers()

    module = Estimating()
    quiet_trainer(callbacks=[Install()], max_epochs=3, reload_dataloaders_every_n_epochs=1).fit(module)
    # once for the estimate, then at every reload (fact 11), always before the epoch starts
    assert events == ["wrap", "after", "epoch 0: 10 batches", "wrap", "after", "epoch 1: 10 batches",
                      "wrap", "after", "epoch 2: 10 batches"]
    assert module.estimate == 30  # measured on the wrapped loader
    assert module.sizes_by_epoch() == {e: [2] * 10 for e in range(3)}  # no batch of the user's size leaked


def test_replace_train_dataloader():
    class Swap(Callback):
        def on_train_start(self, trainer, pl_module):
            old = train_dataloaders(trainer)[0]
            self.replaced = replace_train_dataloader(trainer, old, DataLoader(make_dataset(8), batch_size=8))
            self.missing = replace_train_dataloader(trainer, object(), None)
            restart_train_iterator(trainer)
            set_train_epoch_length(trainer, 1)

    module, swap = RecordingModule(), Swap()
    quiet_trainer(callbacks=[swap], max_epochs=1).fit(module, DataLoader(make_dataset(20), batch_size=5))
    assert swap.replaced and not swap.missing
    assert module.sizes_by_epoch()[0] == [8]


def test_fact_12_streams_have_a_batch_sampler_and_the_fetcher_pulls_its_size():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter([(torch.zeros(4), torch.tensor(0))] * 100)

    loader = DataLoader(Stream(), batch_size=3)
    assert type(loader.batch_sampler).__name__ == "BatchSampler"
    assert type(loader.batch_sampler.sampler).__name__ == "_InfiniteConstantSampler"
    loader.batch_sampler.batch_size = 7
    assert len(next(iter(loader))[0]) == 7
    with pytest.raises(TypeError):
        len(loader)


def test_fact_14_logging_cadence_and_step_are_lightnings():
    seen = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((is_logging_step(trainer), logging_step(trainer)))

    quiet_trainer(callbacks=[Watch()], max_epochs=1, log_every_n_steps=3, accumulate_grad_batches=2).fit(
        RecordingModule(), DataLoader(make_dataset(40), batch_size=5))
    # _batches_that_stepped counts optimizer steps; Lightning logs when (it + 1) % 3 == 0
    assert [step for _, step in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [flag for flag, _ in seen] == [False, False, False, False, True, True, False, False]


def test_fact_15_the_stepping_estimate_can_be_made_exact_until_undone():
    class Estimating(RecordingModule):
        def configure_optimizers(self):
            _ = self.trainer.estimated_stepping_batches  # builds the loader (as the engine's interception does)
            undo = override_stepping_estimate(self.trainer, 17)
            self.estimate = self.trainer.estimated_stepping_batches
            undo()
            self.after = self.trainer.estimated_stepping_batches
            return super().configure_optimizers()

    module = Estimating()
    quiet_trainer(max_epochs=2, accumulate_grad_batches=3).fit(module, DataLoader(make_dataset(40), batch_size=5))
    assert module.estimate == 17 and module.after == 6  # ceil(8 / 3) x 2


def test_facts_16_17_setup_comes_before_load_state_dict_and_stateful_loaders_are_checkpointed(tmp_path):
    order = []

    class Order(Callback):
        def setup(self, trainer, pl_module, stage):
            order.append("setup")

        def load_state_dict(self, state_dict):
            order.append("load_state_dict")

        def state_dict(self):
            return {"x": 1}

        def on_train_start(self, trainer, pl_module):
            order.append(("pending", pending_loader_states(trainer)))

    class StatefulLoader(DataLoader):
        def state_dict(self):
            return {"position": 3}

        def load_state_dict(self, state):
            order.append(("loader state", state["position"]))

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    loader = StatefulLoader(make_dataset(20), batch_size=5)
    quiet_trainer(callbacks=[Order(), ckpt], max_steps=2, enable_checkpointing=True).fit(RecordingModule(), loader)
    order.clear()
    quiet_trainer(callbacks=[Order()], max_epochs=1).fit(RecordingModule(), StatefulLoader(make_dataset(20), batch_size=5),
                                                         ckpt_path=str(tmp_path / "last.ckpt"))
    assert order[:2] == ["setup", "load_state_dict"]
    # a mid-epoch resume: Lightning saved the loader's own state and loaded it in setup_data
    assert order[2:] == [("loader state", 3), ("pending", False)]


def test_validates_by_time():
    assert validates_by_time(quiet_trainer(val_check_interval="00:00:00:05"))
    assert not validates_by_time(quiet_trainer(val_check_interval=0.5))


def test_lightning_attaches_module_handles_to_callbacks_and_detach_drops_them():
    class Keep(Callback):
        pass

    keep = Keep()
    quiet_trainer(callbacks=[keep], max_epochs=1).fit(RecordingModule(), DataLoader(make_dataset(10), batch_size=5))
    assert "log" in keep.__dict__ and "log_dict" in keep.__dict__  # Lightning's doing
    detach_callback(keep)
    assert "log" not in keep.__dict__ and "log_dict" not in keep.__dict__


def test_fact_20_16_mixed_on_cpu_is_bf16_unless_the_plugin_is_given():
    from lightning.pytorch.plugins import MixedPrecision

    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
        assert quiet_trainer(precision="16-mixed").precision == "bf16-mixed"
    trainer = quiet_trainer(plugins=[MixedPrecision("16-mixed", "cpu")])
    assert trainer.precision == "16-mixed" and isinstance(trainer.precision_plugin.scaler, torch.amp.GradScaler)
    with trainer.precision_plugin.train_step_context():  # torch runs fp16 autocast on CPU
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16


def test_fact_22_training_step_and_backward_are_looked_up_on_the_module_in_the_closures_order():
    import functools

    from lightning.pytorch.plugins import MixedPrecision

    events: list = []

    class Hooks(Callback):
        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            events.append("zero_grad")

        def on_before_backward(self, trainer, pl_module, loss):
            events.append("on_before_backward")

        def on_after_backward(self, trainer, pl_module):
            events.append("on_after_backward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            events.append(("on_before_optimizer_step", float(pl_module.layer.weight.grad.abs().sum())))

    module = RecordingModule()
    step, backward = module.training_step, module.backward

    def training_step(*args, **kwargs):  # a wrapper that keeps the original's signature
        events.append(("training_step", len(args), sorted(kwargs)))
        out = step(*args, **kwargs)
        events.append(("loss", float(out)))
        return out

    def wrapped_backward(loss, *args, **kwargs):
        events.append(("backward", float(loss)))
        backward(loss, *args, **kwargs)

    data = make_dataset(8)
    reference = torch.nn.Linear(4, 2)
    reference.load_state_dict(module.layer.state_dict())
    sum(torch.nn.functional.cross_entropy(reference(data.tensors[0][i:i + 4]), data.tensors[1][i:i + 4]) / 2
        for i in (0, 4)).backward()
    module.training_step = functools.wraps(step)(training_step)
    module.backward = wrapped_backward
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[Hooks()],
                            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=4))
    names = [e if isinstance(e, str) else e[0] for e in events]
    assert names == ["training_step", "loss", "zero_grad", "on_before_backward", "backward", "on_after_backward",
                     "training_step", "loss", "on_before_backward", "backward", "on_after_backward",
                     "on_before_optimizer_step"]
    assert events[0][1:] == (2, [])  # called with (batch, batch_idx): the wrapper kept `batch_idx`
    losses, backwards = [e[1] for e in events if e[0] == "loss"], [e[1] for e in events if e[0] == "backward"]
    assert backwards == pytest.approx([loss / 2 * 8.0 for loss in losses], rel=1e-3)  # / accumulation, x scale
    seen = [e[1] for e in events if isinstance(e, tuple) and e[0] == "on_before_optimizer_step"][0]
    assert seen == pytest.approx(float(reference.weight.grad.abs().sum()), rel=2e-2)  # unscaled by then
