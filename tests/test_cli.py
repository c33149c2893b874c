"""The training CLI as a user meets it: any DataModule, one-line errors, short help, one tag scheme."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from epochwise.callbacks._lightning_internals import logging_step
from epochwise.callbacks.engine import fit_state

from _native_files import write_cifar10, write_mnist

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]
sys.path.insert(0, str(ROOT / "scripts"))


def cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def in_process(args: list[str], tmp_path: Path):
    import train

    return train.build(["fit", *args, "--trainer.default_root_dir", str(tmp_path)])


def test_a_users_own_datamodule_by_import_path_sizes_the_model(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    run = in_process(["--data", "cli_foreign.ForeignData", *FAST], tmp_path)
    model = run.model
    assert (model.hparams.in_channels, model.hparams.num_classes) == (3, 5)
    assert run.trainer.state.finished and "test_acc" in run.trainer.callback_metrics


@pytest.mark.parametrize("recipe, writer, folder", [
    ("mnist.yaml", write_mnist, "MNIST"),
    ("fashion_mnist.yaml", write_mnist, "FashionMNIST"),
    ("cifar10.yaml", write_cifar10, None),
])
def test_each_torchvision_recipe_on_files_in_their_native_format(recipe, writer, folder, tmp_path):
    data = tmp_path / "data"
    if folder is None:
        writer(data)
    else:
        writer(data, folder=folder)
    run = in_process(["--config", str(ROOT / "scripts" / "configs" / recipe), "--data.data_dir", str(data), *FAST],
                     tmp_path)
    assert run.trainer.state.finished and "test_acc" in run.trainer.callback_metrics
    assert run.model.hparams.in_channels == (3 if recipe == "cifar10.yaml" else 1)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


MISTAKES = {
    "bad choice": (lambda d: ["--config", str(write(d / "r.yaml", "trainer:\n  callbacks:\n"
                                                     "    - class_path: epochwise.callbacks.LRScaling\n"
                                                     "      init_args: {rule: squareroot}\n"))],
                   "error: trainer.callbacks[0] (LRScaling): rule must be 'linear', 'sqrt' or 'none', got 'squareroot'"),
    "bad type": (lambda d: ["--config", str(write(d / "r.yaml", "trainer:\n  callbacks:\n"
                                                   "    - class_path: epochwise.callbacks.BatchSizeWarmup\n"
                                                   "      init_args: {start: sixteen, end: 64}\n"))],
                 "error: trainer.callbacks[0] (BatchSizeWarmup): start must be an int, got 'sixteen'"),
    "out-of-range number": (lambda d: ["--data.batch_size", "0"],
                            "error: data (DigitsDataModule): batch_size must be an int >= 1, got 0"),
    "unknown key": (lambda d: ["--trainer.max_epoch", "3"], "error: unknown option --trainer.max_epoch 3"),
    "missing config file": (lambda d: ["--config", str(d / "nope.yaml")], "error: no such file: "),
    "missing data directory": (lambda d: ["--data", "epochwise.datamodules.MNISTDataModule", "--data.data_dir",
                                          str(d / "nowhere")], "error: MNISTDataModule: MNIST file(s) not found: "),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_common_mistakes_end_with_one_line_and_status_2(mistake, tmp_path):
    make_args, expected = MISTAKES[mistake]
    result = cli(["fit", *make_args(tmp_path), *FAST], cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert 1 <= len(lines) <= 3, lines
    assert lines[0].startswith(expected), lines[0]
    assert "Traceback" not in result.stderr


def test_the_traceback_on_request(tmp_path):
    result = cli(["fit", "--data.batch_size", "0", "--traceback"], cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_fit_help_is_short_and_shows_the_backbones_and_one_way_to_set_the_optimizer(tmp_path):
    result = cli(["fit", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < 300
    text = result.stdout
    assert "--model.backbone" in text and "resnet20" in text and "--model.optimizer {adam,sgd,adamw,lars}" in text
    assert "--optimizer " not in text and "--lr_scheduler " not in text  # one documented way
    assert "nn.Module" not in text


class StepProbe(Callback):
    """Records, at every training step, the scheduled per-device batch and Lightning's logging step."""

    def __init__(self):
        self.steps: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = fit_state(trainer, create=False)
        if state is not None and state.batch.owner is not None:
            self.steps.append((logging_step(trainer), float(state.batch.per_device)))


RECIPES = sorted(p.name for p in (ROOT / "scripts" / "configs").glob("*.yaml")
                 if p.name not in ("mnist.yaml", "fashion_mnist.yaml", "cifar10.yaml", "large_batch_cifar10.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_logs_one_lr_tag_and_every_batch_size_change_at_its_step(recipe, tmp_path):
    import train
    import train_lm

    language = "GeneratedTextDataModule" in (ROOT / "scripts" / "configs" / recipe).read_text()

    args = ["fit", "--config", str(ROOT / "scripts" / "configs" / recipe), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "conftest.MemoryLogger", "--trainer.logger.save_dir", str(tmp_path),
            "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks+", "test_cli.StepProbe"]
    if language:  # a stream: bounded by steps (validate once, at the end)
        args += ["--trainer.max_steps", "120", "--trainer.val_check_interval", "120"]
    built = (train_lm if language else train).build(args)
    probe = next(c for c in built.trainer.callbacks if type(c).__name__ == "StepProbe")
    rows = built.trainer.logger.rows
    keys = {k for _, m in rows for k in m}
    assert "lr/group0" in keys and not any(k.startswith("lr-") for k in keys), sorted(keys)
    assert "hp_metric" not in keys
    if probe.steps:  # a recipe with a batch-size controller
        logged = {step: m["batch_size/per_device"] for step, m in rows if "batch_size/per_device" in m}
        scheduled = dict(probe.steps)
        assert set(logged.values()) <= set(scheduled.values())  # no short last batch: no saw-tooth
        previous = None
        for step, size in probe.steps:
            if size != previous:
                assert logged.get(step) == size, (step, size)  # every change, at its step
            previous = size
        assert len({s for _, s in probe.steps}) > 1  # the recipe did change the batch size
