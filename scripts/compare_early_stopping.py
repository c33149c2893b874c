"""Lightning's EarlyStopping, epochwise's, and Keras 3's documented behaviour on 8 scripted streams.

Each stream is a sequence of ``val_loss`` values, one per epoch, logged by a tiny LightningModule
that trains a linear regression (so the weights differ every epoch). Lightning's and epochwise's
callbacks are *run* on it; Keras is not installed, so its column is data taken from the Keras 3
documentation (cited below), not a run. Epochs are 0-based (as ``trainer.current_epoch`` and the
``epoch`` argument of Keras' ``on_epoch_end``).

Run:  ./py scripts/compare_early_stopping.py        (prints the markdown table)
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from epochwise.callbacks.early_stopping import EarlyStopping

NAN = math.nan

#: Where the Keras column comes from (Keras 3 API reference, ``keras.callbacks.EarlyStopping``).
KERAS_DOCS = "https://keras.io/api/callbacks/early_stopping/"
#: What that page documents, paraphrased, for each behaviour the table relies on.
KERAS_RULES = {
    "patience": "patience: number of epochs with no improvement after which training will be stopped",
    "min_delta": "min_delta: an absolute change of less than min_delta counts as no improvement",
    "restore": "restore_best_weights: restore the weights of the epoch with the best value of the monitored"
    " quantity; an epoch is restored regardless of the performance relative to the baseline",
    "baseline": "baseline: training stops if the model doesn't show improvement over the baseline; if no epoch"
    " improves on baseline, training runs for patience epochs and restores the best epoch in that set",
    "start_from_epoch": "start_from_epoch: number of epochs to wait before starting to monitor improvement"
    " (a warm-up in which training is not stopped)",
    "nan": "not documented: Keras 3 has no check_finite (TerminateOnNaN is a separate callback); the cell"
    " assumes a NaN counts as no improvement, as any comparison with NaN is false",
    "absent": "no such argument in Keras 3",
}


@dataclass(frozen=True)
class Outcome:
    """What one early-stopping run did: stop epoch (``None``: ran to the end), reason, restored epoch."""

    stop: int | None
    reason: str
    restored: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Stream:
    """A scripted ``val_loss`` stream and the settings it exercises.

    ``lightning`` holds the arguments for Lightning's callback, ``None`` where Lightning has no
    such feature; ``extra`` the epochwise-only arguments; ``keras`` the documented Keras 3 outcome.
    """

    name: str
    values: tuple[float, ...]
    settings: dict[str, Any]
    lightning: bool
    keras: Outcome
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_epochs(self) -> int:
        return len(self.values)


PATIENCE = 3
STREAMS: tuple[Stream, ...] = (
    Stream("improve", (1.0, 0.9, 0.8, 0.7, 0.6, 0.5), {}, True,
           Outcome(None, "not stopped", 5, "patience, restore")),
    Stream("plateau", (1.0, 0.8, 0.7, 0.7, 0.71, 0.72, 0.69, 0.69), {}, True,
           Outcome(5, "patience", 2, "patience, min_delta, restore")),
    Stream("NaN", (1.0, 0.8, NAN, 0.9, 0.9, 0.9, 0.9, 0.9), {}, True,
           Outcome(4, "patience", 1, "nan")),
    Stream("threshold", (0.5, 0.3, 0.05, 0.04, 0.03, 0.02), {"stopping_threshold": 0.1}, True,
           Outcome(None, "n/a", None, "absent")),
    Stream("divergence", (1.0, 0.8, 0.9, 5.0, 0.5, 0.4), {"divergence_threshold": 2.0}, True,
           Outcome(None, "n/a", None, "absent")),
    Stream("baseline", (0.9, 0.8, 0.85, 0.7, 0.6, 0.4, 0.3), {}, False,
           Outcome(2, "baseline not beaten", 1, "baseline"), extra={"baseline": 0.5}),
    Stream("start_from_epoch", (0.5, 0.9, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8), {}, False,
           Outcome(6, "patience", 3, "start_from_epoch"), extra={"start_from_epoch": 1}),
    Stream("check_finite off", (1.0, 0.8, NAN, 0.9, 0.9, 0.9, 0.9, 0.9), {"check_finite": False}, True,
           Outcome(4, "patience", 1, "nan")),
)


class ScriptedLoss(pl.LightningModule):
    """Trains a tiny linear regression and logs ``values[epoch]`` as ``val_loss``."""

    def __init__(self, values: tuple[float, ...]) -> None:
        super().__init__()
        self.values = values
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", float(self.values[min(self.current_epoch, len(self.values) - 1)]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:8], self.y[:8]), batch_size=8)


class WeightRecorder(Callback):
    """The module's weights at the end of every training epoch (after validation)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def run(stream: Stream, callback: LightningEarlyStopping) -> tuple[ScriptedLoss, WeightRecorder, pl.Trainer]:
    """Fit :class:`ScriptedLoss` on ``stream`` with ``callback``; return the module, weights and Trainer."""
    model, recorder = ScriptedLoss(stream.values), WeightRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=stream.max_epochs, callbacks=[callback, recorder],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return model, recorder, trainer


def outcome(cb: LightningEarlyStopping, trainer: pl.Trainer, restored: int | None = None) -> Outcome:
    stopped = cb.stopping_reason_message is not None
    return Outcome(cb.stopped_epoch if stopped else None, cb.stopping_reason.name, restored)


def compare(stream: Stream) -> dict[str, Any]:
    """Run Lightning's callback (where it has the feature) and epochwise's on ``stream``."""
    kwargs = {"monitor": "val_loss", "patience": PATIENCE, **stream.settings}
    row: dict[str, Any] = {"stream": stream, "lightning": None, "lightning_cb": None}
    if stream.lightning:
        theirs = LightningEarlyStopping(**kwargs)
        _, _, trainer = run(stream, theirs)
        row["lightning"], row["lightning_cb"] = outcome(theirs, trainer), theirs
    ours = EarlyStopping(**kwargs, **stream.extra, restore_best_weights=True)
    model, recorder, trainer = run(stream, ours)
    row["epochwise"], row["epochwise_cb"] = outcome(ours, trainer, ours.restored_epoch), ours
    row["restored_weights_match"] = ours.restored_epoch is not None and all(
        torch.equal(v, recorder.weights[ours.restored_epoch][k]) for k, v in model.state_dict().items()
    )
    row["epochs_run"] = trainer.current_epoch
    return row


def _cell(o: Outcome | None, absent: str, restore: bool = True) -> str:
    if o is None:
        return absent
    stop = "runs to the end" if o.stop is None else f"stops at {o.stop}"
    text = f"{stop} · {o.reason}"
    return text + (f" · restores {'—' if o.restored is None else o.restored}" if restore else "")


def _values(stream: Stream) -> str:
    shown = ", ".join("nan" if math.isnan(v) else f"{v:g}" for v in stream.values)
    args = ", ".join(f"{k}={v}" for k, v in {**stream.settings, **stream.extra}.items())
    return f"[{shown}]" + (f"; {args}" if args else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table, with the Keras sources under it."""
    lines = [
        f"All runs: `monitor='val_loss', mode='min', patience={PATIENCE}`, epochwise with"
        " `restore_best_weights=True`; epochs are 0-based.",
        "",
        "| stream | val_loss per epoch; settings | Lightning 2.6 (run) | epochwise (run) | Keras 3 (documented) |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes: dict[str, int] = {}
    for row in rows:
        s: Stream = row["stream"]
        keras = s.keras
        mark = notes.setdefault(keras.note, len(notes) + 1)
        keras_cell = "no such argument" if keras.note == "absent" else _cell(keras, "")
        lines.append(
            f"| {s.name} | {_values(s)} | {_cell(row['lightning'], 'no such argument', restore=False)}"
            f" | {_cell(row['epochwise'], '')} | {keras_cell} [{mark}] |"
        )
    lines += ["", f"Keras 3 column, from the Keras 3 API reference ({KERAS_DOCS}):", ""]
    for note, mark in notes.items():
        rules = "; ".join(KERAS_RULES[k.strip()] for k in note.split(","))
        lines.append(f"- [{mark}] {rules}.")
    lines += ["", "Lightning has no `restore_best_weights`; the reasons are `stopping_reason` names."]
    return "\n".join(lines)


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(0, verbose=False)
    print(markdown([compare(s) for s in STREAMS]))


if __name__ == "__main__":
    main()
