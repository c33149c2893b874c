"""MultiMetricEarlyStopping: several metrics, each with its own patience and rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from ._checks import ConfigurationError, check_bool, check_choice, check_int, check_str
from ._logging import log_metrics
from .best_weights import BestWeights
from .engine import cached_state_key
from .metric_tracking import MetricCriterion, MetricTracker, decide_stop
from .stop_notices import announce_restore, announce_stop, forget_notices

__all__ = ["MultiMetricEarlyStopping"]


class MultiMetricEarlyStopping(Callback):
    """Stop when several metrics, each with its own patience and rule, stop improving.

    Each entry of ``monitors`` builds a :class:`~epochwise.callbacks.metric_tracking.MetricCriterion`
    (keys ``mode``, ``patience``, ``min_delta``, ``min_delta_mode``, ``test``, ``window``,
    ``alpha``; defaults as there). Each check (once per epoch by default, like Lightning's
    ``EarlyStopping``) updates every metric's tracker; training stops when ``stop_when="all"``
    metrics are exhausted at the same check (``wait >= patience``), or when ``"any"`` is. A
    non-finite value stops at once when ``check_finite``. The decision is reduced across DDP ranks
    once per check (any rank stopping stops all). The test ``"ttest"`` replaces the fixed margin
    by a one-sided Welch t-test (``scipy.stats``) of the last ``window`` values against the
    ``window`` before them.

    ``restore_best_weights`` (``True`` = the first monitor, or a monitor's name) keeps the weights
    of that metric's best check in the shared
    :class:`~epochwise.callbacks.best_weights.BestWeights` store and loads them back at fit end
    (under DDP: rank 0's copy, broadcast once at restore; log the metric with ``sync_dist=True``).

    Every fit starts afresh (trackers, stop, weights copy are reset in ``setup``); a resumed fit
    gets them back from the checkpoint.

    Logged per check (straight to the loggers, rank 0): ``early_stopping/<metric>_wait`` and
    ``early_stopping/<metric>_best`` for every metric, and ``early_stopping/<metric>_p_value`` for
    ``"ttest"`` metrics once the test runs; ``log_prefix`` replaces ``early_stopping``.

    Attributes:
        trackers: ``{metric: MetricTracker}`` (best, best_epoch, wait, history).
        stopped_epoch: epoch at which training was stopped (0 if not stopped).
        stopping_reason_message: why training stopped, ``None`` if it did not.
        restored_epoch: epoch whose weights were restored at fit end, else ``None``.

    Args:
        monitors: ``{metric_name: {criterion options}}``; not modified.
        stop_when: ``"all"`` or ``"any"``.
        restore_best_weights: ``False``, ``True`` (first monitor) or the name of a monitor.
        strict: raise if a monitored metric is missing at a check (else skip that metric).
        check_finite: stop when a monitored value is NaN or infinite.
        start_from_epoch: checks at epochs ``< start_from_epoch`` (0-based) are ignored.
        check_on_train_epoch_end: as in Lightning (``None``: after the training epoch when
            validation runs once per epoch, else after each validation; decided for every fit).
        verbose: log the decisions at INFO level.
        log_prefix: prefix of the logged keys.

    Raises:
        ConfigurationError: for an invalid ``monitors`` entry or argument, naming it and the allowed values.

    Example:
        >>> cb = MultiMetricEarlyStopping(
        ...     monitors={"val_loss": {"patience": 5, "mode": "min"},
        ...               "val_acc": {"patience": 10, "mode": "max", "min_delta": 0.005}},
        ...     stop_when="all", restore_best_weights="val_loss")
        >>> sorted(cb.trackers)
        ['val_acc', 'val_loss']
    """

    _OPTIONS = ("mode", "patience", "min_delta", "min_delta_mode", "test", "window", "alpha")

    def __init__(
        self,
        monitors: Mapping[str, Mapping[str, Any]],
        stop_when: Literal["all", "any"] = "all",
        restore_best_weights: bool | str = False,
        strict: bool = True,
        check_finite: bool = True,
        start_from_epoch: int = 0,
        check_on_train_epoch_end: bool | None = None,
        verbose: bool = False,
        log_prefix: str = "early_stopping",
    ) -> None:
        super().__init__()
        self.criteria = tuple(self._criteria(monitors))
        check_choice("stop_when", stop_when, ("all", "any"))
        names = [c.monitor for c in self.criteria]
        if restore_best_weights is True:
            restore_from: str | None = names[0]
        elif restore_best_weights is False or restore_best_weights is None:
            restore_from = None
        elif isinstance(restore_best_weights, str) and restore_best_weights in names:
            restore_from = restore_best_weights
        else:
            raise ConfigurationError(
                f"`restore_best_weights` must be a bool or one of the monitors {names}, got {restore_best_weights!r}"
            )
        check_bool("strict", strict)
        check_bool("check_finite", check_finite)
        check_int("start_from_epoch", start_from_epoch, minimum=0)
        if check_on_train_epoch_end is not None:
            check_bool("check_on_train_epoch_end", check_on_train_epoch_end)
        check_bool("verbose", verbose)
        check_str("log_prefix", log_prefix)
        if log_prefix.endswith("/"):
            raise ConfigurationError(f"`log_prefix` must not end with '/', got {log_prefix!r}")
        self.stop_when = stop_when
        self.restore_from = restore_from
        self.strict = strict
        self.check_finite = check_finite
        self.start_from_epoch = start_from_epoch
        self.verbose = verbose
        self.log_prefix = log_prefix
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.best_weights = BestWeights()
        self._reset()
        self._check_on_train_epoch_end = bool(check_on_train_epoch_end)

    @classmethod
    def _criteria(cls, monitors: Any) -> list[MetricCriterion]:
        if not isinstance(monitors, Mapping) or not monitors:
            raise ConfigurationError(
                f"`monitors` must be a non-empty mapping {{metric: {{option: value}}}}, got {monitors!r}"
            )
        criteria = []
        for name, spec in monitors.items():
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"`monitors` keys must be non-empty metric names, got {name!r}")
            spec = {} if spec is None else spec
            if not isinstance(spec, Mapping):
                raise ConfigurationError(f"`monitors[{name!r}]` must be a mapping of options, got {spec!r}")
            unknown = sorted(set(spec) - set(cls._OPTIONS))
            if unknown:
                raise ConfigurationError(
                    f"`monitors[{name!r}]` has unknown option(s) {unknown}; allowed: {', '.join(cls._OPTIONS)}"
                )
            criteria.append(MetricCriterion(name, **dict(spec)))
        return criteria

    def _reset(self) -> None:
        self.trackers: dict[str, MetricTracker] = {c.monitor: MetricTracker(c) for c in self.criteria}
        self.stopped_epoch = 0
        self.stopping_reason_message: str | None = None
        self.restored_epoch: int | None = None

    @property
    def state_key(self) -> str:
        return cached_state_key(self, monitors=[c.monitor for c in self.criteria], stop_when=self.stop_when)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        self.best_weights.setup(trainer)
        forget_notices(self)
        if self.check_on_train_epoch_end is None:
            # Lightning's rule: after the training epoch only when validation runs once per epoch.
            self._check_on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
        else:
            self._check_on_train_epoch_end = self.check_on_train_epoch_end

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or bool(trainer.fast_dev_run)
            or trainer.current_epoch < self.start_from_epoch
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._check_on_train_epoch_end and not self._should_skip(trainer):
            self._check(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._check_on_train_epoch_end and not self._should_skip(trainer):
            self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        epoch = trainer.current_epoch
        metrics: dict[str, float] = {}
        should_stop, reason = False, None
        new_best = non_finite = False
        for name, tracker in self.trackers.items():
            value = logs.get(name)
            if value is None:
                if self.strict:
                    raise RuntimeError(
                        f"MultiMetricEarlyStopping monitors `{name}`, which is not logged; available:"
                        f" {', '.join(sorted(logs)) or '(none)'}. Log it or pass strict=False."
                    )
                continue
            v = float(value.squeeze()) if isinstance(value, Tensor) else float(value)  # once per epoch
            before = tracker.best_epoch
            tracker.update(v, epoch)
            new_best = new_best or (name == self.restore_from and tracker.best_epoch != before)
            metrics[f"{self.log_prefix}/{name}_wait"] = float(tracker.wait)
            metrics[f"{self.log_prefix}/{name}_best"] = float(tracker.best)
            if tracker.last_p_value is not None:
                metrics[f"{self.log_prefix}/{name}_p_value"] = float(tracker.last_p_value)
            if self.check_finite and not math.isfinite(v) and not should_stop:
                should_stop = non_finite = True
                reason = f"Monitored metric {name} = {v} is not finite. Signaling Trainer to stop."
        if not should_stop:  # a metric missing so far (strict=False) is not exhausted
            should_stop, reason = decide_stop(list(self.trackers.values()), self.stop_when)
        if new_best:  # rank 0's copy decides (see BestWeights): no collective needed
            self.best_weights.snapshot(trainer.lightning_module, epoch)
        # Any rank stopping stops all (as Lightning's EarlyStopping): one collective per check.
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = epoch
            self.stopping_reason_message = reason or "Another rank signalled to stop."
            announce_stop(self, epoch, self.stopping_reason_message, no_improvement=not non_finite)
        log_metrics(trainer, metrics)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_from is None:
            return
        self.restored_epoch = self.best_weights.restore(trainer, pl_module)
        if self.restored_epoch is not None:
            tracker = self.trackers[self.restore_from]
            announce_restore(self, self.restored_epoch, f"{self.restore_from} {tracker.best:.6g}")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "trackers": {name: t.state_dict() for name, t in self.trackers.items()},
            "stopped_epoch": self.stopped_epoch,
            "stopping_reason_message": self.stopping_reason_message,
        }
        state.update(self.best_weights.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trackers = state_dict.get("trackers", {})
        for name, tracker in self.trackers.items():
            if name in trackers:
                tracker.load_state_dict(trackers[name])
        self.stopped_epoch = int(state_dict.get("stopped_epoch", self.stopped_epoch))
        self.stopping_reason_message = state_dict.get("stopping_reason_message", self.stopping_reason_message)
        self.best_weights.load_state_dict(state_dict)
