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
            # the shortcut is Lightning's rule while the fit loop runs, in every per-step hook
            assert is_logging_step(trainer) == trainer._logger_connector.should_update_logs

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            assert is_logging_step(trainer) == trainer._logger_connector.should_update_logs

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert is_logging_step(trainer) == trainer._logger_connector.should_update_logs
            trainer.should_stop = batch_idx == 6  # and when stopping
            assert is_logging_step(trainer) == trainer._logger_connector.should_update_logs
            trainer.should_stop = False

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


# -- facts the gradient noise scale relies on (callbacks/gradient_noise.py) --------------------------
def test_fact_8_zero_grad_comes_after_training_step_and_before_backward_on_a_steps_first_micro_batch():
    events = []

    class Order(RecordingModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            loss.backward(retain_graph=True)  # a gradient made inside training_step...
            events.append(("training_step", batch_idx))
            return loss

        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            events.append(("zero_grad", batch_idx))
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

        def on_before_backward(self, loss):
            # ...is gone by the backward of a step's first micro-batch, and still there on the next
            events.append(("before_backward", self.layer.weight.grad is None))

    quiet_trainer(max_steps=2, accumulate_grad_batches=2).fit(Order(), DataLoader(make_dataset(20), batch_size=5))
    assert events == [("training_step", 0), ("zero_grad", 0), ("before_backward", True),
                      ("training_step", 1), ("before_backward", False),
                      ("training_step", 2), ("zero_grad", 2), ("before_backward", True),
                      ("training_step", 3), ("before_backward", False)]


def test_fact_23_loss_divided_by_accumulation_and_the_optimizer_step_hook_sees_unscaled_unclipped_grads():
    from lightning.pytorch.plugins import MixedPrecision

    seen: dict[str, list] = {"micro": [], "step": []}

    class Watch(RecordingModule):
        def on_train_start(self):
            self.layer.weight.register_hook(lambda g: seen["micro"].append(g.detach().clone()))

        def on_before_optimizer_step(self, optimizer):
            seen["step"].append(self.layer.weight.grad.detach().clone())

    data = make_dataset(40)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    module = Watch(lr=0.0)
    quiet_trainer(max_epochs=1, accumulate_grad_batches=3, plugins=[plugin], gradient_clip_val=1e-6).fit(
        module, DataLoader(data, batch_size=5))
    # reference gradients of each batch's mean loss, in float32
    reference = []
    for i in range(8):
        x, y = data.tensors[0][5 * i: 5 * i + 5], data.tensors[1][5 * i: 5 * i + 5]
        module.layer.zero_grad()
        torch.nn.functional.cross_entropy(module.layer(x), y).backward()
        reference.append(module.layer.weight.grad.clone())
    # each micro-batch's gradient is loss / 3 (x the loss scale), also in the last group of two
    for got, want in zip(seen["micro"], reference):
        torch.testing.assert_close(got / 2.0**10, want / 3, rtol=2e-2, atol=1e-4)
    # the step hook: the accumulated gradient, unscaled, before clipping (clip value 1e-6)
    groups = [reference[0:3], reference[3:6], reference[6:8]]
    for got, group in zip(seen["step"], groups):
        torch.testing.assert_close(got, sum(group) / 3, rtol=2e-2, atol=1e-4)
        assert float(got.norm()) > 1e-3


def test_amp_grad_scale_is_the_scalers_tensor_or_none():
    from lightning.pytorch.plugins import MixedPrecision

    from epochwise.callbacks._lightning_internals import amp_grad_scale

    scales = []

    class Read(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            scales.append(amp_grad_scale(trainer))

    loader = DataLoader(make_dataset(10), batch_size=5)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    quiet_trainer(callbacks=[Read()], max_steps=1, plugins=[plugin]).fit(RecordingModule(), loader)
    quiet_trainer(callbacks=[Read()], max_steps=1, precision="bf16-mixed").fit(RecordingModule(), loader)
    quiet_trainer(callbacks=[Read()], max_steps=1).fit(RecordingModule(), loader)
    assert isinstance(scales[0], torch.Tensor) and float(scales[0]) == 2.0**10
    assert scales[1:] == [None, None]


def test_fact_24_callback_metrics_is_a_dict_a_callback_can_fill_reset_at_each_fit():
    seen = []

    class Put(Callback):
        def on_fit_start(self, trainer, pl_module):
            seen.append("mine" in trainer.callback_metrics)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.callback_metrics["mine"] = torch.tensor(float(batch_idx))

        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["mine"]))

    class Logs(RecordingModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)  # Lightning's own results are merged in, ours stay
            return loss

    trainer = quiet_trainer(callbacks=[Put()], max_epochs=2)
    trainer.fit(Logs(), DataLoader(make_dataset(20), batch_size=5))
    assert float(trainer.callback_metrics["mine"]) == 3.0 and "train_loss" in trainer.callback_metrics
    trainer.fit_loop.max_epochs = 4
    trainer.fit(Logs(), DataLoader(make_dataset(20), batch_size=5))  # the next fit starts without it
    assert seen == [False, 3.0, 3.0, False, 3.0, 3.0]


class _CommProbe(Callback):
    """Registers a comm hook on the DDP wrapper that records each bucket before and after the all-reduce."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.rows = []
        model = trainer.strategy.model

        def hook(state, bucket):
            before = bucket.buffer().detach().clone()
            future = default_hooks.allreduce_hook(model.process_group, bucket)

            def after(fut):
                value = fut.value()[0] if isinstance(fut.value(), list) else fut.value()
                self.rows.append({"step": trainer.global_step, "last": bucket.is_last(),
                                  "before": before.tolist(), "after": value.tolist()})
                return value

            return future.then(after)

        model.register_comm_hook(None, hook)
        try:
            model.register_comm_hook(None, hook)
            self.second = "accepted"
        except RuntimeError as err:
            self.second = str(err)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rows.append({"step": trainer.global_step, "grad": torch.cat(
            [p.grad.reshape(-1) for p in pl_module.parameters()]).tolist()})

    def teardown(self, trainer, pl_module, stage):
        import json

        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"rows": self.rows, "second": self.second}, f)


@pytest.mark.slow
def test_fact_10_a_comm_hook_on_the_ddp_wrapper_sees_each_bucket_before_and_after_the_all_reduce(tmp_path):
    import json

    quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=2, accumulate_grad_batches=2,
                  callbacks=[_CommProbe(str(tmp_path))]).fit(RecordingModule(lr=0.0), DataLoader(make_dataset(40), batch_size=5))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "only be called once" in ranks[0]["second"]
    for step in (0, 1):
        hooked = [[row for row in rank["rows"] if row["step"] == step and "before" in row] for rank in ranks]
        # one all-reduce per optimizer step: the first micro-batch's backward runs under no_sync
        assert [len(h) for h in hooked] == [1, 1] and hooked[0][0]["last"]
        before0, before1 = torch.tensor(hooked[0][0]["before"]), torch.tensor(hooked[1][0]["before"])
        after = torch.tensor(hooked[0][0]["after"])
        assert not torch.allclose(before0, before1)  # each rank's own (accumulated) gradient...
        torch.testing.assert_close(after, (before0 + before1) / 2)  # ...and their average, on both ranks
        assert hooked[1][0]["after"] == hooked[0][0]["after"]
        grads = [row["grad"] for row in ranks[0]["rows"] if row["step"] == step and "grad" in row]
        assert sorted(grads[0]) == pytest.approx(sorted(hooked[0][0]["after"]))  # what the optimizer gets
