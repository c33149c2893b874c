"""Train with LightningCLI. ``python scripts/train.py fit`` runs the default recipe on digits.

Recipes are YAML files in ``scripts/configs/`` (``--config scripts/configs/warmup.yaml``); every
option is listed by ``python scripts/train.py fit --help``. After ``fit`` the best checkpoint is
tested and the script prints where the logs, the checkpoint and the learning-curve PNG went.

Set ``EPOCHWISE_NO_MALLOC_TUNING=1`` to keep glibc's default malloc thresholds (for comparison).
"""

from __future__ import annotations

import os
from pathlib import Path

from epochwise.modules.runtime import tune_malloc

# Before any tensor is allocated: see tune_malloc's docstring for why (about 1.35x on CPU here).
MALLOC_TUNED = tune_malloc() if not os.environ.get("EPOCHWISE_NO_MALLOC_TUNING") else False

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from epochwise.callbacks import LearningCurveMonitor  # noqa: E402
from epochwise.datamodules import InMemoryImageDataModule  # noqa: E402
from epochwise.modules import ImageClassifier  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


class EpochwiseCLI(LightningCLI):
    """LightningCLI that tests the best checkpoint after ``fit`` and reports where outputs went."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        # The model is built for the DataModule's images: its channels and classes, read from the
        # instantiated DataModule (a CIFAR-10 DataModule gets a 3-channel model). These two model
        # options are therefore not set on the command line.
        parser.link_arguments("data.num_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if isinstance(ckpt, ModelCheckpoint) else ""
        if not trainer.interrupted:
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=True)
        if trainer.is_global_zero:
            curves = next((c for c in trainer.callbacks if isinstance(c, LearningCurveMonitor)), None)
            print("\n== epochwise run ==")
            print(f"logs (TensorBoard): {trainer.log_dir}   ->  tensorboard --logdir {Path(trainer.log_dir).parent}")
            print(f"best checkpoint:    {best or '(none)'}")
            print(f"learning curves:    {getattr(curves, 'png_path', None) or '(none)'}")
            print(f"malloc tuning:      {'on' if MALLOC_TUNED else 'off'}")


def main(args: list[str] | None = None, run: bool = True) -> EpochwiseCLI:
    """Build the CLI; ``args`` as on the command line (default: ``sys.argv``).

    With ``run=False`` the CLI only parses and instantiates (no subcommand in ``args``).
    """
    return EpochwiseCLI(
        ImageClassifier,
        InMemoryImageDataModule,  # digits by default (default.yaml); CIFAR-10, MNIST, ... by class_path
        subclass_mode_model=False,
        subclass_mode_data=True,
        seed_everything_default=0,
        # run=False has no subcommands: the default recipe then applies to the one parser
        parser_kwargs=(
            {"fit": {"default_config_files": [str(CONFIGS / "default.yaml")]}, "description": __doc__}
            if run
            else {"default_config_files": [str(CONFIGS / "default.yaml")], "description": __doc__}
        ),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
