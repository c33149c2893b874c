"""GradientNoiseScale in a Lightning fit: the exact noise scale of a known task from each source
(DDP, accumulation, in-step split; fp32, bf16, fp16 with a grad scaler), logging at Lightning's
cadence, no host read outside it, training unchanged by the split, resume, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

import epochwise.callbacks
from epochwise.callbacks import ConfigurationError, GradientNoiseScale

from _noise_tasks import LinearRegression, exact_noise, regression_data
from conftest import MemoryLogger, RecordingModule, make_dataset, quiet_trainer

EPOCHWISE = (str(Path(epochwise.callbacks.__file__).parent), str(Path(epochwise.callbacks.__file__).resolve().parent))


def fit_regression(gns, batch_size, max_steps, **trainer_kwargs):
    data = regression_data()
    trainer = quiet_trainer(callbacks=[gns], max_steps=max_steps, max_epochs=-1, **trainer_kwargs)
    trainer.fit(LinearRegression(), DataLoader(data, batch_size=batch_size, shuffle=True))
    return trainer, exact_noise(data)


def assert_close_to_exact(values, exact, rel):
    for key in ("b_simple", "grad_sq_norm", "trace_cov"):
        assert values[key] == pytest.approx(exact[key], rel=rel), (key, values, exact)


# -- the exact answer, one device ----------------------------------------------------------------
SINGLE = {  # name: (trainer kwargs, per-device batch, source, tolerance)
    "split": ({}, 64, "split", 0.15),
    "accumulation": ({"accumulate_grad_batches": 4}, 16, "accumulation", 0.15),
    "split-bf16": ({"precision": "bf16-mixed"}, 64, "split", 0.25),
    "accumulation-bf16": ({"accumulate_grad_batches": 4, "precision": "bf16-mixed"}, 16, "accumulation", 0.25),
}


@pytest.mark.parametrize("case", list(SINGLE))
def test_exact_noise_scale_of_linear_regression_on_one_device(case):
    kwargs, batch, source, rel = SINGLE[case]
    gns = GradientNoiseScale(every_n_steps=1, ema_decay=0.99)
    trainer, exact = fit_regression(gns, batch, 500, **kwargs)
    assert gns.last_source == source
    assert float(trainer.callback_metrics["gns/b_simple"]) == pytest.approx(exact["b_simple"], rel=rel)
    assert_close_to_exact(gns.estimator.values(), exact, rel)
    assert int(gns.estimator.measurements) == 500


@pytest.mark.parametrize("accumulation", [1, 4])
def test_fp16_grad_scaler_is_divided_out(accumulation):
    """Under fp16 AMP the gradients are scaled by 2^12 here: the estimates are of the unscaled ones."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    gns = GradientNoiseScale(every_n_steps=1, ema_decay=0.99)
    _, exact = fit_regression(gns, 64 // accumulation, 400, plugins=[plugin], accumulate_grad_batches=accumulation)
    assert gns.last_source == ("split" if accumulation == 1 else "accumulation")
    assert_close_to_exact(gns.estimator.values(), exact, 0.25)


# -- the exact answer, two processes --------------------------------------------------------------
class RankRegression(LinearRegression):
    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def teardown(self, stage):  # after the callbacks' teardown
        gns = next(c for c in self.trainer.callbacks if isinstance(c, GradientNoiseScale))
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"values": gns.estimator.values(), "source": gns.last_source,
                       "metric": float(self.trainer.callback_metrics["gns/b_simple"]),
                       "sizes": sorted({r[3] for r in self.rows})}, f)


@pytest.mark.slow
@pytest.mark.parametrize("precision, accumulation, rel", [("32-true", 1, 0.15), ("bf16-mixed", 2, 0.25)])
def test_exact_noise_scale_under_two_process_ddp(tmp_path, precision, accumulation, rel):
    """Local (64 samples) vs all-reduced (128) gradients through the comm hook; bf16 also accumulates 2 x 32."""
    data = regression_data()
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=250, max_epochs=-1, precision=precision,
                            accumulate_grad_batches=accumulation,
                            callbacks=[GradientNoiseScale(every_n_steps=1, ema_decay=0.985)])
    trainer.fit(RankRegression(str(tmp_path)), DataLoader(data, batch_size=64 // accumulation, shuffle=True))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank holds the same estimate: decisions from it agree
    result = ranks[0]
    assert result["source"] == "ddp" and result["sizes"] == [64 // accumulation]
    exact = exact_noise(data)
    assert result["metric"] == pytest.approx(exact["b_simple"], rel=rel)
    assert_close_to_exact(result["values"], exact, rel)
    assert result["values"]["measurements"] == 250


# -- what is measured when --------------------------------------------------------------------------
def test_measured_steps_every_n_and_incomplete_accumulation_groups_skipped():
    # 40 samples in batches of 4 -> 10 batches per epoch; accumulation 4 -> steps of 4, 4, 2 batches
    loader = DataLoader(make_dataset(40), batch_size=4)
    every = GradientNoiseScale(every_n_steps=1)
    quiet_trainer(callbacks=[every], max_epochs=2, accumulate_grad_batches=4).fit(RecordingModule(), loader)
    assert int(every.estimator.measurements) == 4  # the 2-batch groups are not measured
    second = GradientNoiseScale(every_n_steps=2)  # steps 0..5; 2 and 5 are incomplete groups
    quiet_trainer(callbacks=[second], max_epochs=2, accumulate_grad_batches=4).fit(RecordingModule(), loader)
    assert int(second.estimator.measurements) == 2  # steps 0 and 4
    split = GradientNoiseScale()  # split: every 4th step by default; a batch under 4 samples cannot split
    quiet_trainer(callbacks=[split], max_epochs=1).fit(RecordingModule(), DataLoader(make_dataset(42), batch_size=4))
    assert int(split.estimator.measurements) == 3  # steps 0, 4, 8 of 11 (the 10th batch has 2 samples)


class Crash(Exception):
    pass


class ClassifierRecording(RecordingModule):
    """Returns a dict from training_step; can crash at a global step."""

    def __init__(self, crash_at=None, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_at:
            raise Crash()
        loss = super().training_step(batch, batch_idx)
        return {"loss": loss, "size": batch[0].shape[0]}


def test_split_leaves_the_training_unchanged_and_is_given_back():
    torch.manual_seed(0)
    plain = ClassifierRecording(lr=0.5)
    measured = ClassifierRecording(lr=0.5)
    measured.load_state_dict(plain.state_dict())
    loader = DataLoader(make_dataset(48), batch_size=8)
    quiet_trainer(max_epochs=2).fit(plain, loader)
    gns = GradientNoiseScale(every_n_steps=1, micro_batches=2)
    quiet_trainer(callbacks=[gns], max_epochs=2).fit(measured, loader)
    assert gns.last_source == "split" and int(gns.estimator.measurements) == 12
    for a, b in zip(plain.parameters(), measured.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the extra gradients never reached SGD
    # training_step saw each batch as two halves, each sample once per step
    assert [r[3] for r in measured.records] == [4] * 24 and [r[3] for r in plain.records] == [8] * 12
    halves = [measured.records[i][5] + measured.records[i + 1][5] for i in range(0, 24, 2)]
    assert halves == pytest.approx([r[5] for r in plain.records], rel=1e-5)
    assert "training_step" not in measured.__dict__  # the wrapper is gone
    assert all(not p._backward_hooks for p in measured.parameters())
    # someone else's wrapper of training_step, put there before the fit, is given back
    theirs = measured.training_step
    measured.training_step = theirs
    quiet_trainer(callbacks=[GradientNoiseScale(every_n_steps=1)], max_epochs=1).fit(measured, loader)
    assert measured.__dict__["training_step"] is theirs


def test_logged_at_lightnings_cadence_and_step_and_into_callback_metrics():
    class Probe(LinearRegression):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("probe", loss, on_step=True, on_epoch=False)
            return loss

    logger = MemoryLogger()
    gns = GradientNoiseScale(every_n_steps=2)
    trainer = quiet_trainer(callbacks=[gns], max_epochs=2, logger=logger, log_every_n_steps=3,
                            accumulate_grad_batches=2)
    trainer.fit(Probe(), DataLoader(regression_data(n=160), batch_size=8, shuffle=True))
    lightning_steps = [step for step, m in logger.rows if "probe" in m]
    gns_rows = [(step, m) for step, m in logger.rows if "gns/b_simple" in m]
    assert lightning_steps and [step for step, _ in gns_rows] == lightning_steps
    keys = {"gns/b_simple", "gns/grad_sq_norm", "gns/trace_cov", "gns/b_simple_raw", "gns/grad_sq_norm_raw",
            "gns/trace_cov_raw"}
    assert set(gns_rows[-1][1]) == keys
    assert float(trainer.callback_metrics["gns/b_simple"]) == pytest.approx(gns.value())


def test_no_host_read_in_a_step_outside_the_logging_cadence(monkeypatch):
    reads: list[int] = []
    state = {"training": False, "step": -1}

    class Steps(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["training"], state["step"] = True, trainer.global_step

        def on_train_end(self, trainer, pl_module):
            state["training"] = False

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if state["training"]:
                frame = sys._getframe(1)
                while frame is not None:
                    if frame.f_code.co_filename.startswith(EPOCHWISE):
                        reads.append(state["step"])
                        break
                    frame = frame.f_back
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for source_kwargs in ({}, {"accumulate_grad_batches": 2}):  # split, accumulation
        reads.clear()
        quiet_trainer(callbacks=[Steps(), GradientNoiseScale(every_n_steps=1)], max_epochs=2, **source_kwargs).fit(
            LinearRegression(lr=0.01), DataLoader(regression_data(n=128), batch_size=8))
        assert reads == []  # no logger, no progress bar: never read
        logger = MemoryLogger()
        quiet_trainer(callbacks=[Steps(), GradientNoiseScale(every_n_steps=1)], max_epochs=2, logger=logger,
                      log_every_n_steps=4, **source_kwargs).fit(
            LinearRegression(lr=0.01), DataLoader(regression_data(n=128), batch_size=8))
        logged = [step for step, m in logger.rows if "gns/b_simple" in m]
        assert len(reads) == len(logged) > 0  # one read per logging step


def test_monitorable_by_model_checkpoint_without_a_logger_and_shown_in_the_progress_bar(tmp_path):
    gns = GradientNoiseScale(every_n_steps=1, prog_bar=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="gns/b_simple", mode="max", save_top_k=1)
    trainer = quiet_trainer(callbacks=[gns, checkpoint], max_epochs=2, enable_checkpointing=True,
                            log_every_n_steps=4)
    trainer.fit(LinearRegression(lr=0.01), DataLoader(regression_data(n=256), batch_size=16))  # 32 steps
    assert checkpoint.best_model_score is not None and checkpoint.best_model_path
    # the bar shows the value read at the last logging step (31), which is the last measurement
    assert trainer.progress_bar_metrics["gns/b_simple"] == pytest.approx(gns.value())


def test_resumed_fit_continues_the_estimate_exactly(tmp_path):
    """Interrupted mid-epoch and resumed (the engine, here a constant BatchSizeSchedule, positions the
    data where the epoch stopped; Lightning alone restarts a plain loader's epoch)."""
    from epochwise.callbacks import BatchSizeSchedule

    results, steps = [], []
    for run, (crash_at, ckpt) in enumerate(((None, None), (7, None), (None, str(tmp_path / "1" / "last.ckpt")))):
        torch.manual_seed(0)
        module = ClassifierRecording(crash_at=crash_at, lr=0.2)
        gns = GradientNoiseScale(every_n_steps=1, ema_decay=0.8, micro_batches=2)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / str(run), save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = quiet_trainer(callbacks=[gns, BatchSizeSchedule({0: 8}), checkpoint], max_epochs=2,
                                enable_checkpointing=True)
        loader = DataLoader(make_dataset(64), batch_size=8, shuffle=True)
        try:
            trainer.fit(module, loader, ckpt_path=ckpt)
        except Crash:
            continue
        results.append(gns.estimator.values())
        steps.append(sorted({r[1] for r in module.records}))
    uninterrupted, resumed = results
    assert steps[1] == list(range(7, 16))  # the resumed fit trained steps 7..15 (measuring them)
    assert resumed == uninterrupted and uninterrupted["measurements"] == 16


def test_refusals():
    for kwargs, pattern in (({"every_n_steps": 0}, "every_n_steps"), ({"ema_decay": 1.0}, "ema_decay"),
                            ({"source": "local"}, "source"), ({"micro_batches": 1}, "micro_batches"),
                            ({"prog_bar": 1}, "prog_bar")):
        with pytest.raises(ConfigurationError, match=pattern):
            GradientNoiseScale(**kwargs)

    class Manual(RecordingModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    loader = DataLoader(make_dataset(16), batch_size=4)
    for module, gns, pattern in ((Manual(), GradientNoiseScale(), "automatic_optimization=False"),
                                 (RecordingModule(), GradientNoiseScale(source="ddp"), "source='ddp'")):
        with pytest.raises(MisconfigurationException, match=pattern):
            quiet_trainer(callbacks=[gns], max_epochs=1).fit(module, loader)
        assert module.records == []


def test_comm_hook_adds_every_bucket_and_refuses_a_second_hook(tmp_path):
    """One gloo process (world size 1, so the average is the local gradient): with buckets of about
    1 KB the model's gradient spans several buckets; the hook's total is the whole squared norm."""
    import types

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from epochwise.callbacks._gns_sources import DDPNorms, gns_allreduce_hook

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
        model = DistributedDataParallel(net, bucket_cap_mb=0.001)
        state = DDPNorms(model.process_group)
        buckets = []

        def counted(state, bucket):
            buckets.append(bucket.index())
            return gns_allreduce_hook(state, bucket)

        model.register_comm_hook(state, counted)
        x = torch.randn(8, 16)
        for measuring in (False, True, True):  # DDP rebuilds its buckets after the first backward
            buckets.clear()
            state.start(measuring)
            model.zero_grad()
            model(x).pow(2).mean().backward()
            grads = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
            expected = torch.autograd.grad(net(x).pow(2).mean(), list(net.parameters()))
            torch.testing.assert_close(grads, torch.cat([g.reshape(-1) for g in expected]))  # DDP's result intact
            total = state.take()
            if measuring:
                assert buckets == [0, 1]  # two buckets
                assert float(total) == pytest.approx(float(grads.pow(2).sum()), rel=1e-6)
            else:
                assert total is None
        gns = GradientNoiseScale(source="ddp")
        gns._params = list(net.parameters())
        with pytest.raises(ConfigurationError, match="communication hook"):
            gns._install_ddp(types.SimpleNamespace(strategy=types.SimpleNamespace(model=model)))
    finally:
        dist.destroy_process_group()
