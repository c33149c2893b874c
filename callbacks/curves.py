"""Learning curves: per-epoch history of train/val loss and accuracy, and the one plotting path."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from ._logging import log_dir_of

__all__ = ["LearningCurveMonitor", "plot_learning_curves"]


def plot_learning_curves(
    history: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None
) -> str:
    """Write a two-panel PNG (loss | accuracy per epoch, train vs val) and return its path.

    ``history`` maps metric names (``train_loss``, ``val_loss``, ``train_acc``, ``val_acc``; others
    are ignored) to per-epoch values; NaN marks an epoch where a metric was missing. The file is
    written to a temporary name first and moved into place, so no half-written PNG is left behind.

    Example:
        >>> import tempfile, os
        >>> p = plot_learning_curves({"train_loss": [1.0, 0.5], "val_loss": [1.1, 0.7]},
        ...                          os.path.join(tempfile.mkdtemp(), "curves.png"))
        >>> os.path.getsize(p) > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = list(history.get(f"{split}_{kind}", []))
            if not values:
                continue
            epochs = range(1, len(values) + 1)
            ax.plot(epochs, values, style, markersize=3, label=f"{split}")
        if kind == "loss":
            best = _argbest(history.get("val_loss", []), minimize=True)
            if best is not None:
                ax.axvline(best + 1, color="grey", linestyle=":", label=f"best val (epoch {best + 1})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if kind == "loss" else "accuracy")
        ax.set_title("Loss" if kind == "loss" else "Accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _argbest(values: Sequence[float], minimize: bool) -> int | None:
    finite = [(v, i) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if not finite:
        return None
    return (min(finite) if minimize else max(finite))[1]


class LearningCurveMonitor(Callback):
    """Record train/val loss and accuracy every epoch and write ``learning_curves.png`` at fit end.

    The PNG goes into the Trainer logger's run folder (``trainer.log_dir``), or ``dirpath`` if
    given. ``history`` holds the per-epoch values and is checkpointed, so a resumed run's plot
    covers the whole run.

    Args:
        dirpath: folder for the PNG (default: the logger's run folder).
        filename: PNG file name.
        metrics: the per-epoch metric names to record from ``trainer.callback_metrics``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LearningCurveMonitor()], max_epochs=3, logger=False)
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "learning_curves.png",
        metrics: Sequence[str] = ("train_loss", "val_loss", "train_acc", "val_acc"),
    ) -> None:
        if not filename.endswith(".png"):
            raise ValueError(f"`filename` must end with '.png', got {filename!r}")
        if not metrics:
            raise ValueError("`metrics` must name at least one metric, got an empty sequence")
        self.dirpath = dirpath
        self.filename = filename
        self.metrics = tuple(metrics)
        self.history: dict[str, list[float]] = {m: [] for m in self.metrics}
        self.epochs: list[int] = []
        self.png_path: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # In Lightning 2.x this runs after the epoch's validation, so train and val are both final.
        metrics = trainer.callback_metrics
        self.epochs.append(trainer.current_epoch)
        for name in self.metrics:
            value = metrics.get(name)
            self.history[name].append(float(value) if value is not None else float("nan"))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.png_path = self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer) -> str | None:
        if not self.epochs:
            return None
        folder = self.dirpath or log_dir_of(trainer)
        return plot_learning_curves(self.history, os.path.join(folder, self.filename))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict.get("history", {})
        self.history = {m: list(history.get(m, [])) for m in self.metrics}
        self.epochs = list(state_dict.get("epochs", []))
