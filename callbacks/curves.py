"""Learning curves: the per-epoch history of train/val loss and accuracy, and the one plotting path.

The diagnosis (:func:`diagnose`, :func:`ema_series`) is pure and lives in :mod:`.curve_diagnosis`;
the callback records the history, calls it once per epoch and logs the result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from ._checks import ConfigurationError, check_str
from ._logging import log_dir_of, log_metrics
from .curve_diagnosis import (
    DIAGNOSES,
    DIAGNOSIS_CODES,
    argbest,
    check_diagnosis_args,
    diagnose,
    ema_series,
    is_finite,
)
from .curve_plot import plot_learning_curves
from .engine import cached_state_key
from .stop_notices import fit_stop

__all__ = [
    "LearningCurveMonitor",
    "plot_learning_curves",
    "diagnose",
    "ema_series",
    "DIAGNOSES",
    "DIAGNOSIS_CODES",
]


class LearningCurveMonitor(Callback):
    """Record train/val loss and accuracy every epoch, diagnose the curve, and write
    ``learning_curves.png`` at fit end.

    The PNG goes into the Trainer logger's run folder (read from the logger itself, never through
    ``trainer.log_dir``, which under DDP is a collective the other ranks would not join), or
    ``dirpath`` if given; it shows the smoothed val loss (dashed) and the last diagnosis in its
    title. ``history`` holds the per-epoch values and is checkpointed, so a resumed run's plot
    covers the whole run; everything derived from it (EMA, diagnoses) is recomputed on load. Every
    fit starts a new history (reset in ``setup``).

    A validation metric (a name starting with ``val``) is recorded only for epochs whose
    validation ran (``check_val_every_n_epoch > 1``, ``limit_val_batches=0``...); the other epochs
    get NaN, not the stale value ``trainer.callback_metrics`` still holds.

    At the end of each epoch with validation it derives from the history (the derived quantities
    read the ``train_loss``, ``val_loss``, ``train_acc`` and ``val_acc`` entries) and logs straight to
    the Trainer's loggers (rank 0, once per epoch), each key only when computable:

    - ``curves/gap_loss``: generalisation gap ``val_loss - train_loss``;
    - ``curves/gap_acc``: ``train_acc - val_acc``;
    - ``curves/val_loss_ema``: val loss smoothed by :func:`ema_series` with ``ema_alpha``;
    - ``curves/val_loss_ema_slope``: its change since the previous epoch with validation
      (negative = improving);
    - ``curves/best_epoch``: the epoch (0-based, as ``trainer.current_epoch``) of the lowest val loss;
    - ``curves/diagnosis``: :func:`diagnose`'s label as an integer, :data:`DIAGNOSIS_CODES`:
      ``0`` underfitting, ``1`` improving, ``2`` plateau, ``3`` overfitting. The rule is
      documented in :func:`diagnose`; in short, ``overfitting`` once the smoothed val loss has
      stayed more than ``overfit_margin`` above its minimum for ``overfit_epochs`` epochs while
      the train loss is lower than at that minimum, never before the val loss turns up.

    Attributes:
        history: ``{metric: [per-epoch value]}`` (NaN where missing or not validated).
        epochs: the ``trainer.current_epoch`` of each recorded entry.
        val_loss_ema: the smoothed val loss per entry.
        diagnoses, diagnosis_reasons: the label and its reason per entry (``None`` for an epoch
            without a finite val loss).
        diagnosis: the latest label (``None`` before the first).
        png_path: the PNG written at fit end.

    Args:
        dirpath: folder for the PNG (default: the logger's run folder).
        filename: PNG file name.
        metrics: the per-epoch metric names to record from ``trainer.callback_metrics`` (one name or several).
        ema_alpha, overfit_margin, overfit_epochs, plateau_tol, underfit_ratio: the diagnosis
            settings, see :func:`diagnose`.

    Raises:
        ConfigurationError: for an argument out of range, naming it.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = LearningCurveMonitor(ema_alpha=0.5, overfit_margin=0.02, overfit_epochs=3)
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=3, logger=False)
        >>> monitor.validation_metrics
        ('val_loss', 'val_acc')
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "learning_curves.png",
        metrics: Sequence[str] = ("train_loss", "val_loss", "train_acc", "val_acc"),
        ema_alpha: float = 0.5,
        overfit_margin: float = 0.02,
        overfit_epochs: int = 3,
        plateau_tol: float = 0.01,
        underfit_ratio: float = 0.5,
    ) -> None:
        check_str("dirpath", dirpath, optional=True)
        check_str("filename", filename)
        if not filename.endswith(".png"):
            raise ConfigurationError(f"`filename` must end with '.png', got {filename!r}")
        if isinstance(metrics, str):
            metrics = (metrics,)  # one metric name, not a sequence of characters
        if not metrics:
            raise ConfigurationError(f"`metrics` must name at least one metric, got {metrics!r}")
        for name in metrics:
            check_str("metrics", name)
        check_diagnosis_args(ema_alpha, overfit_margin, overfit_epochs, plateau_tol, underfit_ratio)
        self.dirpath = dirpath
        self.filename = filename
        self.metrics = tuple(metrics)
        self.diagnosis_kwargs: dict[str, Any] = {
            "ema_alpha": ema_alpha,
            "overfit_margin": overfit_margin,
            "overfit_epochs": overfit_epochs,
            "plateau_tol": plateau_tol,
            "underfit_ratio": underfit_ratio,
        }
        self._reset()

    def _reset(self) -> None:
        self.controlled: dict[str, list[float]] = {}
        self.history: dict[str, list[float]] = {m: [] for m in self.metrics}
        self.epochs: list[int] = []
        self.val_loss_ema: list[float] = []
        self.diagnoses: list[str | None] = []
        self.diagnosis_reasons: list[str | None] = []
        self.png_path: str | None = None
        self._validated_epoch = -1

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        """The metrics recorded only for epochs whose validation ran (names starting with ``val``)."""
        return tuple(m for m in self.metrics if m.startswith("val"))

    @property
    def state_key(self) -> str:
        return cached_state_key(self, filename=self.filename)

    @property
    def diagnosis(self) -> str | None:
        """The latest diagnosis label, ``None`` before the first."""
        return next((d for d in reversed(self.diagnoses) if d is not None), None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new history per fit; a resume loads the checkpointed one after this
            self._reset()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # In Lightning 2.x this runs after the epoch's validation, so train and val are both final.
        metrics = trainer.callback_metrics
        validated = self._validated_epoch == trainer.current_epoch
        self.epochs.append(trainer.current_epoch)
        for name in self.metrics:
            value = metrics.get(name)
            stale = name in self.validation_metrics and not validated
            self.history[name].append(float(value) if value is not None and not stale else math.nan)  # once per epoch
        self.val_loss_ema = ema_series(self.history.get("val_loss", []), self.diagnosis_kwargs["ema_alpha"])
        label, reason = self._diagnose(self.history)
        self.diagnoses.append(label)
        self.diagnosis_reasons.append(reason)
        self._record_controlled(trainer)
        log_metrics(trainer, self._last_scalars())

    def _record_controlled(self, trainer: pl.Trainer) -> None:
        """The batch size, LR and image size this epoch trained with (a panel of the figure)."""
        values: dict[str, float] = {}
        if trainer.optimizers:
            values["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            report = getattr(callback, "controlled_values", None)
            if callable(report):
                values.update(report())
        count = len(self.epochs) - 1
        for name, value in values.items():
            self.controlled.setdefault(name, [math.nan] * count).append(value)
        for series in self.controlled.values():
            if len(series) < len(self.epochs):
                series.append(math.nan)

    def _diagnose(self, history: Mapping[str, Sequence[float]]) -> tuple[str | None, str | None]:
        val = history.get("val_loss", [])
        if not val or not is_finite(val[-1]):  # no new validation this epoch: nothing new to diagnose
            return None, None
        return diagnose(history, **self.diagnosis_kwargs)

    def _last_scalars(self) -> dict[str, float]:
        def last(name: str) -> float:
            values = self.history.get(name, [])
            return values[-1] if values else math.nan

        out: dict[str, float] = {}
        gap_loss = last("val_loss") - last("train_loss")
        gap_acc = last("train_acc") - last("val_acc")
        if is_finite(gap_loss):
            out["curves/gap_loss"] = gap_loss
        if is_finite(gap_acc):
            out["curves/gap_acc"] = gap_acc
        if not is_finite(last("val_loss")):
            return out
        ema = self.val_loss_ema
        out["curves/val_loss_ema"] = ema[-1]
        previous = [e for e, v in zip(ema[:-1], self.history["val_loss"][:-1], strict=True) if is_finite(v)]
        if previous:
            out["curves/val_loss_ema_slope"] = ema[-1] - previous[-1]
        best = argbest(self.history.get("val_loss", []), minimize=True)
        if best is not None:
            out["curves/best_epoch"] = float(self.epochs[best])
        if self.diagnoses and self.diagnoses[-1] is not None:
            out["curves/diagnosis"] = float(DIAGNOSIS_CODES[self.diagnoses[-1]])
        return out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop = fit_stop(trainer)
        self._agree_with_the_stop(trainer)
        self.png_path = self._write(trainer)

    def _agree_with_the_stop(self, trainer: pl.Trainer) -> None:
        """A stop because the monitored value stopped improving is never diagnosed "improving"
        (the stopping callback decides after this callback's epoch-end hook, so it is settled here)."""
        stop = self._stop
        if stop is None or not stop[2] or not self.diagnoses or self.diagnoses[-1] != "improving":
            return
        self.diagnoses[-1] = "plateau"
        self.diagnosis_reasons[-1] = f"the fit stopped because {stop[1]}"
        log_metrics(trainer, {"curves/diagnosis": float(DIAGNOSIS_CODES["plateau"])})

    @rank_zero_only
    def _write(self, trainer: pl.Trainer) -> str | None:
        if not self.epochs:
            return None
        folder = self.dirpath or log_dir_of(trainer)  # never trainer.log_dir: a collective under DDP
        history: dict[str, Sequence[float]] = dict(self.history)
        title = None
        if self.val_loss_ema:
            history["val_loss_ema"] = self.val_loss_ema
        if self.diagnosis is not None:
            title = f"diagnosis after epoch {self.epochs[-1]}: {self.diagnosis}"
        best = argbest(self.history.get("val_loss", []), minimize=True)
        best_mark = (self.epochs[best], f"val_loss {self.history['val_loss'][best]:.4g}") if best is not None else None
        stop = getattr(self, "_stop", None)
        return plot_learning_curves(
            history, os.path.join(folder, self.filename), title=title, epochs=self.epochs,
            controlled=self.controlled, best=best_mark, stop=(stop[0], stop[1]) if stop else None,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "epochs": list(self.epochs),
                "controlled": {k: list(v) for k, v in self.controlled.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict.get("history", {})
        self.history = {m: list(history.get(m, [])) for m in self.metrics}
        self.epochs = list(state_dict.get("epochs", []))
        self.controlled = {k: list(v) for k, v in state_dict.get("controlled", {}).items()}
        # Derive, don't store: the EMA and each epoch's diagnosis are functions of the history.
        self.val_loss_ema = ema_series(self.history.get("val_loss", []), self.diagnosis_kwargs["ema_alpha"])
        derived = [self._diagnose({k: v[:i] for k, v in self.history.items()}) for i in range(1, len(self.epochs) + 1)]
        self.diagnoses = [label for label, _ in derived]
        self.diagnosis_reasons = [reason for _, reason in derived]
