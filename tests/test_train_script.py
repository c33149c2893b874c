"""The training entry point end to end, the package layout, and the malloc tuning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from epochwise.datamodules import DigitsDataModule
from epochwise.modules.runtime import tune_malloc

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_installed_names_are_only_epochwise(tmp_path):
    code = (
        "import importlib.util, epochwise.callbacks, epochwise.modules, epochwise.datamodules\n"
        "print([n for n in ('modules', 'callbacks', 'datamodules', 'scripts', 'tests')"
        " if importlib.util.find_spec(n) is not None])"
    )
    result = run(["-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_library_respects_import_boundaries():
    for folder, banned in [("modules", ("callbacks", "scripts")), ("datamodules", ("callbacks", "scripts")),
                           ("callbacks", ("epochwise.modules", "scripts"))]:
        for path in (ROOT / folder).glob("*.py"):
            text = path.read_text()
            for name in banned:
                for pattern in (f"from epochwise.{name}", f"import epochwise.{name}", f"from {name}", f"import {name}"):
                    if name.startswith("epochwise."):
                        pattern = pattern.replace("epochwise.epochwise.", "epochwise.")
                    assert pattern not in text, f"{path.name} imports {name}"


def test_tune_malloc_applies_on_glibc():
    import platform

    applied = tune_malloc()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_help_documents_options(tmp_path):
    result = run([str(ROOT / "scripts" / "train.py"), "fit", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--trainer.max_epochs", "--model.lr", "--model.scheduler", "--data", "--config"):
        assert option in result.stdout
    data_help = run([str(ROOT / "scripts" / "train.py"), "fit", "--data.help", "DigitsDataModule"], cwd=tmp_path)
    assert data_help.returncode == 0, data_help.stderr
    for option in ("batch_size", "image_size", "val_fraction", "num_workers"):
        assert f"--data.{option}" in data_help.stdout


@pytest.mark.slow
def test_train_fit_end_to_end_writes_logs_checkpoint_and_curves(tmp_path):
    result = run(
        [str(ROOT / "scripts" / "train.py"), "fit", "--trainer.max_epochs", "3",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_acc" in result.stdout and "best checkpoint:" in result.stdout
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert (run_dir / "learning_curves.png").stat().st_size > 10_000
    ckpts = list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert len(ckpts) == 1
    from epochwise.modules import ImageClassifier

    loaded = ImageClassifier.load_from_checkpoint(ckpts[0])  # the architecture is in the checkpoint
    assert loaded.hparams.backbone == "simple_cnn" and loaded.hparams.in_channels == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"} <= tags
    assert len(events.Scalars("val_loss")) == 3


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "scripts" / "configs").glob("*.yaml")))
def test_every_recipe_builds(recipe, tmp_path, monkeypatch):
    """Each recipe parses and instantiates its model, data and callbacks (no training)."""
    import importlib.util

    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("epochwise_train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = [] if recipe == "default.yaml" else ["--config", str(ROOT / "scripts" / "configs" / recipe)]
    cli = module.main(args + ["--trainer.logger", "false"], run=False)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert "LearningCurveMonitor" in names or recipe == "progressive_resizing.yaml"
    if recipe == "warmup.yaml":
        assert {"BatchSizeWarmup", "LRScaling"} <= names
    if recipe == "batch_schedule.yaml":
        assert "BatchSizeSchedule" in names


class ThreeChannelDigits(DigitsDataModule):
    """Digits as 3-channel images with 12 classes: a DataModule the default model does not fit."""

    num_channels = 3
    num_classes = 12

    def load_arrays(self):
        arrays = super().load_arrays()
        arrays.train_images = arrays.train_images.repeat(1, 3, 1, 1)
        arrays.test_images = arrays.test_images.repeat(1, 3, 1, 1)
        return arrays


def test_model_takes_channels_and_classes_from_the_datamodule(tmp_path, monkeypatch):
    """Before the link, the default model (1 channel) failed on a 3-channel DataModule."""
    import importlib.util


    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("epochwise_train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cli = module.main(["--data", f"{__name__}.ThreeChannelDigits", "--data.image_size", "8",
                       "--trainer.logger", "false"], run=False)
    assert (cli.model.hparams.in_channels, cli.model.hparams.num_classes) == (3, 12)
    cli.datamodule.setup("fit")
    x, _ = next(iter(cli.datamodule.train_dataloader()))
    assert x.shape[1] == 3 and cli.model(x).shape == (len(x), 12)
    default = module.main(["--trainer.logger", "false"], run=False)
    assert (default.model.hparams.in_channels, default.model.hparams.num_classes) == (1, 10)
