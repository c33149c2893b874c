"""Early stopping: Lightning's EarlyStopping plus best-weight restore, and a multi-metric variant.

The decisions are pure functions and small dataclasses (:func:`improved`,
:func:`significant_improvement`, :class:`MetricCriterion`, :class:`MetricTracker`,
:func:`decide_stop`) that the two callbacks call; they are tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import EarlyStopping as _LightningEarlyStopping
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from ._logging import log_scalars

__all__ = [
    "EarlyStopping",
    "MultiMetricEarlyStopping",
    "MetricCriterion",
    "MetricTracker",
    "improved",
    "improvement_margin",
    "welch_t_test",
    "student_t_cdf",
    "significant_improvement",
    "decide_stop",
]

Mode = Literal["min", "max"]
DeltaMode = Literal["abs", "rel"]
TestName = Literal["delta", "ttest"]


# --------------------------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------------------------
def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def improvement_margin(best: float, min_delta: float, min_delta_mode: DeltaMode = "abs") -> float:
    """The amount by which a value must beat ``best`` to count as an improvement.

    ``"abs"``: ``min_delta``. ``"rel"``: ``min_delta * |best|`` (0 while ``best`` is not finite, i.e.
    before the first value, so the first finite value always improves).

    Example:
        >>> improvement_margin(0.5, 0.1, "abs"), improvement_margin(-2.0, 0.1, "rel")
        (0.1, 0.2)
    """
    if min_delta_mode == "abs":
        return float(min_delta)
    if min_delta_mode == "rel":
        return float(min_delta) * abs(best) if math.isfinite(best) else 0.0
    raise ValueError(f"`min_delta_mode` must be 'abs' or 'rel', got {min_delta_mode!r}")


def improved(
    current: float,
    best: float,
    mode: Mode = "min",
    min_delta: float = 0.0,
    min_delta_mode: DeltaMode = "abs",
) -> bool:
    """Whether ``current`` improves on ``best`` by strictly more than the margin.

    This is Lightning's rule (``current < best - min_delta`` in ``"min"`` mode: a change of
    ``min_delta`` or less is no improvement) with the margin from :func:`improvement_margin`.
    A non-finite ``current`` never improves; a non-finite ``best`` (no value yet) is beaten by any
    finite ``current``.

    Example:
        >>> improved(0.9, 1.0, "min", min_delta=0.05)
        True
        >>> improved(0.96, 1.0, "min", min_delta=0.05, min_delta_mode="rel")
        False
        >>> improved(0.81, 0.8, "max")
        True
    """
    _check_choice("mode", mode, ("min", "max"))
    if not math.isfinite(current):
        return False
    margin = improvement_margin(best, min_delta, min_delta_mode)
    if mode == "min":
        return current < best - margin
    return current > best + margin


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, var


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t statistic for ``mean(a) - mean(b)`` and its Welch-Satterthwaite degrees of freedom.

    Both samples need at least two values. When both variances are zero the statistic is ``0``
    (equal means) or ``+-inf`` and the degrees of freedom are ``len(a) + len(b) - 2``.

    Example:
        >>> t, dof = welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
        >>> round(t, 4), round(dof, 4)
        (-3.6742, 4.0)
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"both samples need >= 2 values, got len(a)={len(a)}, len(b)={len(b)}")
    mean_a, var_a = _mean_var(a)
    mean_b, var_b = _mean_var(b)
    sa, sb = var_a / len(a), var_b / len(b)
    se2 = sa + sb
    diff = mean_a - mean_b
    if se2 == 0.0:
        t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        return t, float(len(a) + len(b) - 2)
    dof = se2**2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    return diff / math.sqrt(se2), dof


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4).
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, dof: float) -> float:
    """CDF of Student's t distribution with ``dof`` (> 0, may be fractional) degrees of freedom.

    Exact (to ~1e-12), through the regularized incomplete beta function:
    ``P(T <= t) = 1 - I_x(dof/2, 1/2) / 2`` for ``t > 0`` with ``x = dof / (dof + t^2)``.

    Example:
        >>> student_t_cdf(0.0, 3.0)
        0.5
        >>> round(student_t_cdf(2.0, 10.0), 6)
        0.963306
    """
    if not dof > 0:
        raise ValueError(f"`dof` must be > 0, got {dof!r}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def significant_improvement(
    recent: Sequence[float],
    previous: Sequence[float],
    mode: Mode = "min",
    alpha: float = 0.05,
    min_delta: float = 0.0,
    min_delta_mode: DeltaMode = "abs",
) -> tuple[bool, float]:
    """One-sided Welch t-test: is the mean of ``recent`` better than the mean of ``previous``?

    Returns ``(significant, p_value)``. ``significant`` needs ``p_value < alpha`` *and* the mean
    of ``recent`` to improve on the mean of ``previous`` by more than the :func:`improved` margin.
    In ``"min"`` mode the alternative hypothesis is ``mean(recent) < mean(previous)``.

    Example:
        >>> significant_improvement([0.50, 0.48, 0.47], [0.70, 0.66, 0.64], "min")[0]
        True
        >>> significant_improvement([0.50, 0.70, 0.47], [0.52, 0.66, 0.49], "min")[0]
        False
    """
    _check_choice("mode", mode, ("min", "max"))
    t, dof = welch_t_test(recent, previous)
    p = student_t_cdf(t, dof) if mode == "min" else student_t_cdf(-t, dof)
    if math.isnan(p):
        return False, math.nan
    mean_recent = math.fsum(recent) / len(recent)
    mean_previous = math.fsum(previous) / len(previous)
    better = improved(mean_recent, mean_previous, mode, min_delta, min_delta_mode)
    return bool(p < alpha and better), p


@dataclass(frozen=True)
class MetricCriterion:
    """When one monitored metric counts as improving, and how long to wait for it.

    Args:
        monitor: the metric name in ``trainer.callback_metrics``.
        mode: ``"min"`` or ``"max"``.
        patience: checks without improvement before the metric is exhausted (>= 0).
        min_delta: improvement margin (>= 0), see :func:`improved`.
        min_delta_mode: ``"abs"`` or ``"rel"`` (margin = ``min_delta * |best|``).
        test: ``"delta"``: a check improves when the value beats the best by the margin (Lightning's
            rule). ``"ttest"``: a check improves when the last ``window`` values are significantly
            better (one-sided Welch t-test at level ``alpha``, and by the margin in mean) than the
            ``window`` values before them; until ``2 * window`` values exist every check counts as
            improving, so a ``"ttest"`` metric cannot be exhausted before ``2 * window + patience``
            checks.
        window: values per side of the t-test (>= 2).
        alpha: significance level of the t-test, in (0, 1).

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
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"`monitor` must be a non-empty str, got {self.monitor!r}")
        _check_choice("mode", self.mode, ("min", "max"))
        if not _is_int(self.patience) or self.patience < 0:
            raise ValueError(f"`patience` must be an int >= 0, got {self.patience!r} for {self.monitor!r}")
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) or not (
            math.isfinite(self.min_delta) and self.min_delta >= 0
        ):
            raise ValueError(f"`min_delta` must be a finite number >= 0, got {self.min_delta!r} for {self.monitor!r}")
        _check_choice("min_delta_mode", self.min_delta_mode, ("abs", "rel"))
        _check_choice("test", self.test, ("delta", "ttest"))
        if not _is_int(self.window) or self.window < 2:
            raise ValueError(f"`window` must be an int >= 2, got {self.window!r} for {self.monitor!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha < 1.0:
            raise ValueError(f"`alpha` must be in (0, 1), got {self.alpha!r} for {self.monitor!r}")


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
    _check_choice("stop_when", stop_when, ("all", "any"))
    if not trackers:
        return False, None
    exhausted = [t for t in trackers if t.exhausted]
    stop = bool(exhausted) if stop_when == "any" else len(exhausted) == len(trackers)
    if not stop:
        return False, None
    detail = "; ".join(t.describe() for t in exhausted)
    return True, f"Stopping ({stop_when} of {len(trackers)} metrics exhausted): {detail}"


# --------------------------------------------------------------------------------------------
# Best weights, kept in memory
# --------------------------------------------------------------------------------------------
def _cpu_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _check_log_prefix(log_prefix: str) -> None:
    if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
        raise ValueError(f"`log_prefix` must be a non-empty str without a trailing '/', got {log_prefix!r}")


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------
class EarlyStopping(_LightningEarlyStopping):
    """Lightning's ``EarlyStopping`` (same arguments, behaviour and checkpoint key) plus best-weight
    restore, a relative ``min_delta`` and a warm-up of ignored epochs.

    Everything Lightning's callback does is kept: ``stopping_threshold``, ``divergence_threshold``,
    ``check_finite``, the check after the training epoch or after validation, the stop decision
    reduced across DDP ranks (any rank stopping stops all), ``stopped_epoch``, ``stopping_reason``
    (an ``EarlyStoppingReason``) and the readable ``stopping_reason_message``.

    Added:

    - ``restore_best_weights``: at every new best an in-memory CPU copy of the LightningModule's
      ``state_dict`` is taken (no checkpoint on disk needed); at the end of ``fit`` (whether it
      stopped early or ran to ``max_epochs``) the copy is loaded back into the module, so a
      following ``trainer.test(model)`` sees the best weights. The copy is part of this callback's
      ``state_dict``, so a resumed run can still restore it (checkpoints grow by one model). Under
      DDP every rank holds the same weights and restores its own copy; the "new best" decision is
      reduced across ranks (any rank) so all ranks copy at the same epoch (log the monitored
      metric with ``sync_dist=True`` so that this epoch is the best one on every rank). Costs one
      device-to-host copy of the weights per improvement. Not for sharded strategies
      (FSDP/DeepSpeed), where ``state_dict`` is sharded.
    - ``min_delta_mode="rel"``: an improvement must exceed ``min_delta * |best|``.
    - ``start_from_epoch``: checks at epochs ``< start_from_epoch`` (0-based) are ignored: no
      best score, no patience, no thresholds.

    Logged per check (straight to the Trainer's loggers, rank 0, at ``trainer.global_step``):
    ``early_stopping/<monitor>_wait`` (checks without improvement) and
    ``early_stopping/<monitor>_best`` (best score so far); ``log_prefix`` replaces
    ``early_stopping``.

    Attributes:
        best_epoch: epoch (0-based) of the best score, ``-1`` before the first check.
        restored_epoch: epoch whose weights were restored at fit end, else ``None``.
        stopping_reason_message: why training stopped (Lightning's), ``None`` if it did not.

    Args:
        monitor, min_delta, patience, verbose, mode, strict, check_finite, stopping_threshold,
            divergence_threshold, check_on_train_epoch_end, log_rank_zero_only: as in Lightning
            (``min_delta >= 0``, ``patience >= 0``; ``mode`` ``"min"``/``"max"``).
        min_delta_mode: ``"abs"`` (Lightning's) or ``"rel"``.
        restore_best_weights: load the best epoch's weights into the module at fit end.
        start_from_epoch: first epoch (0-based) whose check counts.
        log_prefix: prefix of the logged keys.

    Raises:
        ValueError: for an argument out of range, naming it and the allowed values.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> es = EarlyStopping("val_loss", patience=5, min_delta=0.01, min_delta_mode="rel",
        ...                    restore_best_weights=True, start_from_epoch=2)
        >>> trainer = Trainer(callbacks=[es], max_epochs=50, logger=False)
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        min_delta_mode: DeltaMode = "abs",
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        log_prefix: str = "early_stopping",
    ) -> None:
        # Same checks as MetricCriterion, raised as ValueError before Lightning's own.
        MetricCriterion(monitor, mode, patience, min_delta, min_delta_mode)  # type: ignore[arg-type]
        if not _is_int(start_from_epoch) or start_from_epoch < 0:
            raise ValueError(f"`start_from_epoch` must be an int >= 0, got {start_from_epoch!r}")
        _check_log_prefix(log_prefix)
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.min_delta_mode = min_delta_mode
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_epoch = start_from_epoch
        self.log_prefix = log_prefix
        self._min_delta_arg = float(min_delta)
        self.best_epoch = -1
        self.best_state: dict[str, Tensor] | None = None
        self.restored_epoch: int | None = None
        self._evaluated = False
        self._new_best = False

    # -- Lightning's private extension points ---------------------------------------------------
    # Both are private in Lightning 2.6 (`_run_early_stopping_check(trainer)`,
    # `_evaluate_stopping_criteria(current) -> (should_stop, reason)`); tests/test_stopping.py
    # pins their signatures so an upgrade that changes them fails loudly.
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if trainer.current_epoch < self.start_from_epoch:
            return
        self._evaluated = self._new_best = False
        super()._run_early_stopping_check(trainer)
        if not self._evaluated:  # metric missing (strict=False) or fast_dev_run: nothing decided
            return
        new_best = self._new_best
        if self.restore_best_weights:
            new_best = trainer.strategy.reduce_boolean_decision(new_best, all=False)
        if new_best:
            self.best_epoch = trainer.current_epoch
            if self.restore_best_weights:
                self.best_state = _cpu_copy(trainer.lightning_module)
        log_scalars(
            trainer,
            {
                f"{self.log_prefix}/{self.monitor}_wait": float(self.wait_count),
                f"{self.log_prefix}/{self.monitor}_best": float(self.best_score),
            },
        )

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        # Lightning tests `monitor_op(current - self.min_delta, best_score)` with a signed min_delta;
        # set that margin from the pure helper for this comparison (it depends on best in "rel"
        # mode), so thresholds, NaN checks, reasons and messages all stay Lightning's.
        self._evaluated = True
        sign = 1.0 if self.mode == "max" else -1.0
        self.min_delta = sign * improvement_margin(float(self.best_score), self._min_delta_arg, self.min_delta_mode)
        previous_best = self.best_score
        result = super()._evaluate_stopping_criteria(current)
        self._new_best = self.best_score is not previous_best
        return result

    # -- hooks ------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best_weights and self.best_state is not None:
            pl_module.load_state_dict(self.best_state)
            self.restored_epoch = self.best_epoch
            if self.verbose:
                rank_zero_info(f"EarlyStopping: restored the weights of epoch {self.best_epoch} ({self.monitor}).")

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["best_epoch"] = self.best_epoch
        if self.restore_best_weights and self.best_state is not None:
            state["best_state"] = self.best_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning's loader needs every key; fill the missing ones from the current state.
        super().load_state_dict({**super().state_dict(), **state_dict})
        self.best_epoch = int(state_dict.get("best_epoch", self.best_epoch))
        best_state = state_dict.get("best_state")
        if self.restore_best_weights and best_state is not None:
            self.best_state = dict(best_state)


class MultiMetricEarlyStopping(Callback):
    """Stop when several metrics, each with its own patience and rule, stop improving.

    Each entry of ``monitors`` builds a :class:`MetricCriterion` (keys ``mode``, ``patience``,
    ``min_delta``, ``min_delta_mode``, ``test``, ``window``, ``alpha``; defaults as there). Each
    check (once per epoch by default, like Lightning's ``EarlyStopping``) updates every metric's
    :class:`MetricTracker`; training stops when ``stop_when="all"`` metrics are exhausted at the
    same check (``wait >= patience``), or when ``"any"`` is. A non-finite value stops at once when
    ``check_finite``. The decision is reduced across DDP ranks (any rank stopping stops all).
    The test ``"ttest"`` replaces the fixed margin by a one-sided Welch t-test of the last
    ``window`` values against the ``window`` before them (see :class:`MetricCriterion`).

    ``restore_best_weights`` (``True`` = the first monitor, or a monitor's name) keeps an in-memory
    CPU copy of the module's weights at that metric's best check and loads it back at fit end, as
    :class:`EarlyStopping` does (the copy is checkpointed; under DDP the copy decision is reduced
    across ranks, so log the metric with ``sync_dist=True``).

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
            validation runs once per epoch, else after each validation).
        verbose: log the decisions at INFO level.
        log_prefix: prefix of the logged keys.

    Raises:
        ValueError: for an invalid ``monitors`` entry or argument, naming it and the allowed values.

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
        if not isinstance(monitors, Mapping) or not monitors:
            raise ValueError(
                f"`monitors` must be a non-empty mapping {{metric: {{option: value}}}}, got {monitors!r}"
            )
        criteria: list[MetricCriterion] = []
        for name, spec in monitors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"`monitors` keys must be non-empty metric names, got {name!r}")
            if spec is None:
                spec = {}
            if not isinstance(spec, Mapping):
                raise ValueError(f"`monitors[{name!r}]` must be a mapping of options, got {spec!r}")
            unknown = sorted(set(spec) - set(self._OPTIONS))
            if unknown:
                raise ValueError(
                    f"`monitors[{name!r}]` has unknown option(s) {unknown}; allowed: {', '.join(self._OPTIONS)}"
                )
            criteria.append(MetricCriterion(name, **dict(spec)))
        _check_choice("stop_when", stop_when, ("all", "any"))
        names = [c.monitor for c in criteria]
        if restore_best_weights is True:
            restore_from: str | None = names[0]
        elif restore_best_weights is False or restore_best_weights is None:
            restore_from = None
        elif isinstance(restore_best_weights, str) and restore_best_weights in names:
            restore_from = restore_best_weights
        else:
            raise ValueError(
                f"`restore_best_weights` must be a bool or one of the monitors {names}, got {restore_best_weights!r}"
            )
        if not _is_int(start_from_epoch) or start_from_epoch < 0:
            raise ValueError(f"`start_from_epoch` must be an int >= 0, got {start_from_epoch!r}")
        _check_log_prefix(log_prefix)
        self.criteria = tuple(criteria)
        self.stop_when = stop_when
        self.restore_from = restore_from
        self.strict = strict
        self.check_finite = check_finite
        self.start_from_epoch = start_from_epoch
        self.verbose = verbose
        self.log_prefix = log_prefix
        self._check_on_train_epoch_end = check_on_train_epoch_end
        self.trackers: dict[str, MetricTracker] = {c.monitor: MetricTracker(c) for c in criteria}
        self.stopped_epoch = 0
        self.stopping_reason_message: str | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.best_state_epoch = -1
        self.restored_epoch: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitors=[c.monitor for c in self.criteria], stop_when=self.stop_when)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._check_on_train_epoch_end is None:
            # Lightning's rule: after the training epoch only when validation runs once per epoch.
            self._check_on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

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
        new_best = False
        for name, tracker in self.trackers.items():
            value = logs.get(name)
            if value is None:
                if self.strict:
                    raise RuntimeError(
                        f"MultiMetricEarlyStopping monitors `{name}`, which is not logged; available:"
                        f" {', '.join(sorted(logs)) or '(none)'}. Log it or pass strict=False."
                    )
                continue
            v = float(value.squeeze()) if isinstance(value, Tensor) else float(value)
            before = tracker.best_epoch
            tracker.update(v, epoch)
            if name == self.restore_from and tracker.best_epoch != before:
                new_best = True
            metrics[f"{self.log_prefix}/{name}_wait"] = float(tracker.wait)
            metrics[f"{self.log_prefix}/{name}_best"] = float(tracker.best)
            if tracker.last_p_value is not None:
                metrics[f"{self.log_prefix}/{name}_p_value"] = float(tracker.last_p_value)
            if self.check_finite and not math.isfinite(v) and not should_stop:
                should_stop = True
                reason = f"Monitored metric {name} = {v} is not finite. Signaling Trainer to stop."
        if not should_stop:  # a metric missing so far (strict=False) is not exhausted
            should_stop, reason = decide_stop(list(self.trackers.values()), self.stop_when)
        if self.restore_from is not None:
            new_best = trainer.strategy.reduce_boolean_decision(new_best, all=False)
            if new_best:
                self.best_state = _cpu_copy(trainer.lightning_module)
                self.best_state_epoch = epoch
        # Any rank stopping stops all (as Lightning's EarlyStopping).
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = epoch
            self.stopping_reason_message = reason or "Another rank signalled to stop."
            if self.verbose:
                rank_zero_info(self.stopping_reason_message)
        log_scalars(trainer, metrics)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)
            self.restored_epoch = self.best_state_epoch
            if self.verbose:
                rank_zero_info(f"MultiMetricEarlyStopping: restored the weights of epoch {self.best_state_epoch}.")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "trackers": {name: t.state_dict() for name, t in self.trackers.items()},
            "stopped_epoch": self.stopped_epoch,
            "stopping_reason_message": self.stopping_reason_message,
            "best_state_epoch": self.best_state_epoch,
        }
        if self.best_state is not None:
            state["best_state"] = self.best_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trackers = state_dict.get("trackers", {})
        for name, tracker in self.trackers.items():
            if name in trackers:
                tracker.load_state_dict(trackers[name])
        self.stopped_epoch = int(state_dict.get("stopped_epoch", self.stopped_epoch))
        self.stopping_reason_message = state_dict.get("stopping_reason_message", self.stopping_reason_message)
        self.best_state_epoch = int(state_dict.get("best_state_epoch", self.best_state_epoch))
        if state_dict.get("best_state") is not None:
            self.best_state = dict(state_dict["best_state"])
