"""Train the small causal language model on a token stream with LightningCLI.

``python scripts/train_lm.py fit --config scripts/configs/stream_lm.yaml`` runs the streaming recipe:
:class:`~epochwise.modules.language_model.CausalLM` on generated text
(:class:`~epochwise.datamodules.text.GeneratedTextDataModule`, an endless ``IterableDataset``), with
step-unit batch-size warmup, LR scaling and LR warmup. Any LightningDataModule of token windows
works as data; the model's vocabulary is taken from the DataModule's ``vocab_size``. Errors, help
and the end-of-run summary work as in ``scripts/train.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
from cli_common import LoudAgain, OneLineParser, print_summary, quiet_lightning, run_cli  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from epochwise.callbacks.stop_notices import stop_reasons  # noqa: E402
from epochwise.modules.language_model import CausalLM  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def _vocab(data: pl.LightningDataModule) -> int:
    return int(getattr(data, "vocab_size", 28))


class LanguageModelCLI(LightningCLI):
    """LightningCLI for :class:`CausalLM` on any token DataModule, with one-line errors."""

    def init_parser(self, **kwargs):  # noqa: ANN001, ANN201 - LightningCLI's signature
        self.parser_class = OneLineParser
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        parser.link_arguments("data", "model.vocab_size", compute_fn=_vocab, apply_on="instantiate")

    def before_fit(self) -> None:
        self.trainer.callbacks.insert(0, LoudAgain())

    def after_fit(self) -> None:
        print_summary(self, "", None, {"stopped": stop_reasons(self.trainer) or "max_epochs/max_steps reached"})


def build(args: list[str] | None = None, run: bool = True) -> LanguageModelCLI:
    """Build (and with ``run`` run) the CLI; ``args`` as on the command line."""
    return LanguageModelCLI(
        CausalLM,
        pl.LightningDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        parser_kwargs={"description": __doc__} if run else {"description": __doc__},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> LanguageModelCLI:
    """The command line entry point, with one-line errors (exit status 2)."""
    quiet_lightning()
    return run_cli(build, args)


if __name__ == "__main__":
    main()
