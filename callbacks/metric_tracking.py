"""Per-metric patience for :class:`~epochwise.callbacks.multi_metric_stopping.MultiMetricEarlyStopping`.

:class:`MetricCriterion` says when one metric counts as improving (a margin, or a t-test over
windows), :class:`MetricTracker` keeps its patience state, :func:`decide_stop` combines several.
All pure: no Trainer here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._checks import ConfigurationError, check_choice, check_int, check_number, check_str
from .significance import significant_improvement
from .stopping_rules import DeltaMode, Mode, improved

__all__ = ["MetricCriterion", "MetricTracker", "decide_stop"]

TestName = Literal["delta", "ttest"]


@dataclass(frozen=True)
class MetricCriterion:
    """When one monitored metric counts as improving, and how long to wait for it.

    Args:
        monitor: the metric name in ``trainer.callback_metrics``.
        mode: ``"min"`` or ``"max"``.
        patience: checks without improvement before the metric is exhausted (>= 0).
        min_delta: improvement margin (>= 0), see :func:`~epochwise.callbacks.stopping_rules.improved`.
        min_delta_mode: ``"abs"`` or ``"rel"`` (margin = ``min_delta * |best|``).
        test: ``"delta"``: a check improves when the value beats the best by the margin (Lightning's
            rule). ``"ttest"``: a check improves when the last ``window`` values are significantly
            better (one-sided Welch t-test at level ``alpha``, and by the margin in mean) than the
            ``window`` values before them; until ``2 * window`` values exist every check counts as
            improving, so a ``"ttest"`` metric cannot be exhausted before ``2 * window + patience``
            checks.
        window: values per side of the t-test (>= 2).
        alpha: significance level of the t-test, in (0, 1).

    Raises:
        ConfigurationError: for an argument out of range, naming it and the monitor.

    Example:
        >>> MetricCriterion("val_acc", mode="max", patience=10, min_delta=0.005).patience
        10
    """

    monitor: str
    mode: Mode = "min"
    patience: int = 3
    min_delta: float = 0.0
    min_delta_mode: DeltaMode = "abs"
    test: TestName = "delta"
    window: int = 5
    alpha: float = 0.05

    def __post_init__(self) -> None:
        check_str("monitor", self.monitor)
        try:
            check_choice("mode", self.mode, ("min", "max"))
            check_int("patience", self.patience, minimum=0)
            check_number("min_delta", self.min_delta, low=0.0)
            check_choice("min_delta_mode", self.min_delta_mode, ("abs", "rel"))
            check_choice("test", self.test, ("delta", "ttest"))
            check_int("window", self.window, minimum=2)
            check_number("alpha", self.alpha, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        except ConfigurationError as err:
            raise ConfigurationError(f"{err} (monitor {self.monitor!r})") from None


@dataclass
class MetricTracker:
    """Patience state of one :class:`MetricCriterion`; :meth:`update` once per check.

    ``best``/``best_epoch`` follow the best raw value (for restoring weights and for logging): in
    ``"delta"`` mode only values that improve by the margin become the best (Lightning's rule); in
    ``"ttest"`` mode any strictly better value does. ``wait`` counts checks since the last
    improvement as defined by the criterion's ``test``.

    Example:
        >>> tr = MetricTracker(MetricCriterion("val_loss", patience=2))
        >>> [tr.update(v, epoch=i) for i, v in enumerate([1.0, 0.9, 0.95, 0.97])]
        [True, True, False, False]
        >>> tr.wait, tr.exhausted, tr.best, tr.best_epoch
        (2, True, 0.9, 1)
    """

    criterion: MetricCriterion
    best: float = field(default=math.nan)
    best_epoch: int = -1
    wait: int = 0
    history: list[float] = field(default_factory=list)
    last_p_value: float | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.best):
            self.best = math.inf if self.criterion.mode == "min" else -math.inf

    @property
    def exhausted(self) -> bool:
        """``wait >= patience``: the metric has not improved for ``patience`` checks."""
        return self.wait >= self.criterion.patience

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` (checked at ``epoch``); return whether this check counts as an improvement."""
        c = self.criterion
        value = float(value)
        self.history.append(value)
        if c.test == "delta":
            better = improved(value, self.best, c.mode, c.min_delta, c.min_delta_mode)
            if better:
                self.best, self.best_epoch = value, epoch
        else:
            if improved(value, self.best, c.mode):
                self.best, self.best_epoch = value, epoch
            if len(self.history) < 2 * c.window:
                better, self.last_p_value = True, None
            else:
                recent = self.history[-c.window :]
                previous = self.history[-2 * c.window : -c.window]
                better, self.last_p_value = significant_improvement(
                    recent, previous, c.mode, c.alpha, c.min_delta, c.min_delta_mode
                )
        self.wait = 0 if better else self.wait + 1
        return better

    def describe(self) -> str:
        c = self.criterion
        rule = f"t-test over {c.window}+{c.window} checks at alpha={c.alpha}" if c.test == "ttest" else "delta"
        return (
            f"{c.monitor}: {self.wait} checks without improvement (patience {c.patience}, {rule});"
            f" best {self.best:.6g} at epoch {self.best_epoch}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "history": list(self.history),
            "last_p_value": self.last_p_value,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state.get("best", self.best))
        self.best_epoch = int(state.get("best_epoch", self.best_epoch))
        self.wait = int(state.get("wait", self.wait))
        self.history = [float(v) for v in state.get("history", self.history)]
        self.last_p_value = state.get("last_p_value", self.last_p_value)


def decide_stop(trackers: Sequence[MetricTracker], stop_when: Literal["all", "any"] = "all") -> tuple[bool, str | None]:
    """Combine per-metric patience: stop when ``"all"`` (or ``"any"``) metrics are exhausted.

    Returns ``(should_stop, reason)``; ``reason`` names the exhausted metrics (``None`` if not
    stopping).

    Example:
        >>> a = MetricTracker(MetricCriterion("val_loss", patience=0))
        >>> b = MetricTracker(MetricCriterion("val_acc", mode="max", patience=5))
        >>> decide_stop([a, b], "all")[0], decide_stop([a, b], "any")[0]
        (False, True)
    """
    check_choice("stop_when", stop_when, ("all", "any"))
    if not trackers:
        return False, None
    exhausted = [t for t in trackers if t.exhausted]
    stop = bool(exhausted) if stop_when == "any" else len(exhausted) == len(trackers)
    if not stop:
        return False, None
    detail = "; ".join(t.describe() for t in exhausted)
    return True, f"Stopping ({stop_when} of {len(trackers)} metrics exhausted): {detail}"
