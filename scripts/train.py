"""Train an image classifier with LightningCLI. ``python scripts/train.py fit`` runs the default recipe.

Recipes are YAML files in ``scripts/configs/`` (``--config scripts/configs/warmup.yaml``), merged
over ``scripts/configs/default.yaml``. Any LightningDataModule works as data (``--data
epochwise.datamodules.MNISTDataModule``, or your own by import path); the model is
:class:`~epochwise.modules.ImageClassifier` with a backbone from the project's registry
(``--model.backbone resnet20``), sized for the DataModule's channels and classes. Optimizer and LR
scheduler are chosen with ``--model.optimizer`` / ``--model.scheduler`` (one way; LightningCLI's
generic ``--optimizer``/``--lr_scheduler`` are switched off). After ``fit`` the best checkpoint is
tested and a summary says where the logs, the checkpoint and the learning-curve PNG went and why
the fit stopped.

A mistake in a recipe or a flag ends with one line naming the key (exit status 2); set
``EPOCHWISE_TRACEBACK=1`` or pass ``--traceback`` for the traceback. Set
``EPOCHWISE_NO_MALLOC_TUNING=1`` to keep glibc's default malloc thresholds (for comparison).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # the run's wall time counts the imports too (run_summary.json)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from epochwise.modules.runtime import tune_malloc  # noqa: E402

# Before any tensor is allocated: see tune_malloc's docstring for why.
MALLOC_TUNED = tune_malloc() if not os.environ.get("EPOCHWISE_NO_MALLOC_TUNING") else False

import lightning.pytorch as pl  # noqa: E402
from cli_common import (  # noqa: E402
    LoudAgain,
    OneLineParser,
    print_summary,
    quiet_lightning,
    run_cli,
    write_run_summary,
)
from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from epochwise.callbacks import LearningCurveMonitor  # noqa: E402
from epochwise.callbacks.stop_notices import stop_reasons  # noqa: E402
from epochwise.modules import ImageClassifier  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def _channels(data: pl.LightningDataModule) -> int:
    return int(getattr(data, "num_channels", 1))


def _classes(data: pl.LightningDataModule) -> int:
    return int(getattr(data, "num_classes", 10))


class EpochwiseCLI(LightningCLI):
    """LightningCLI for image classifiers: any DataModule, one-line errors, test and summary after fit."""

    def init_parser(self, **kwargs):  # noqa: ANN001, ANN201 - LightningCLI's signature
        self.parser_class = OneLineParser
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        # The model is built for the DataModule's images: its channels and classes, read from the
        # instantiated DataModule (a CIFAR-10 DataModule gets a 3-channel model).
        parser.link_arguments("data", "model.in_channels", compute_fn=_channels, apply_on="instantiate")
        parser.link_arguments("data", "model.num_classes", compute_fn=_classes, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # Lightning's default logger, without the hp_metric placeholder it writes once as -1
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):
            save_dir = config.trainer.default_root_dir or os.getcwd()
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=save_dir, name="lightning_logs", default_hp_metric=False),
            )

    def before_fit(self) -> None:
        self.trainer.callbacks.insert(0, LoudAgain())  # Lightning info lines again once the fit starts
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if isinstance(ckpt, ModelCheckpoint) else ""
        fit_seconds = time.perf_counter() - getattr(self, "_fit_started", time.perf_counter())
        tested: list[dict[str, float]] = []
        if not trainer.interrupted:
            tested = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=True)
        curves = next((c for c in trainer.callbacks if isinstance(c, LearningCurveMonitor)), None)
        stopped = stop_reasons(trainer) or "max_epochs/max_steps reached"
        extra = {"stopped": stopped, "malloc tuning": "on" if MALLOC_TUNED else "off"}
        print_summary(self, best, getattr(curves, "png_path", None), extra)
        write_run_summary(trainer, {
            "argv": sys.argv[1:], "fit_seconds": round(fit_seconds, 2), "epochs_trained": trainer.current_epoch,
            "run_seconds": round(time.perf_counter() - STARTED, 2),  # imports, setup, fit and test
            "stopped": stopped if isinstance(stopped, list) else [stopped],
            "test": {k: float(v) for k, v in (tested[0] if tested else {}).items()},
        })


def build(args: list[str] | None = None, run: bool = True) -> EpochwiseCLI:
    """Build (and with ``run`` run) the CLI; ``args`` as on the command line.

    With ``run=False`` the CLI only parses and instantiates (no subcommand in ``args``).
    """
    defaults = {"default_config_files": [str(CONFIGS / "default.yaml")]}
    return EpochwiseCLI(
        ImageClassifier,
        pl.LightningDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        # run=False has no subcommands: the default recipe then applies to the one parser
        parser_kwargs=({"fit": defaults, "description": __doc__} if run else {**defaults, "description": __doc__}),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None, run: bool = True) -> EpochwiseCLI:
    """The command line entry point: :func:`build` with one-line errors (exit status 2).

    Lightning's info lines ("GPU available", "Seed set") are held back until the fit starts, so a
    mistake found before (in a recipe, a flag, the data files) is the only line on stderr.
    """
    quiet_lightning()
    return run_cli(lambda argv: build(argv, run=run), args)


if __name__ == "__main__":
    main()
