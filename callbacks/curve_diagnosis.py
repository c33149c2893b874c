"""Diagnosis of a learning curve: pure functions over a per-epoch history.

:func:`ema_series` smooths the val loss, :func:`diagnose` labels the latest epoch
(underfitting, improving, plateau, overfitting). No Trainer here; :class:`LearningCurveMonitor`
calls them once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from ._checks import check_int, check_number

__all__ = ["diagnose", "ema_series", "argbest", "DIAGNOSES", "DIAGNOSIS_CODES"]

Diagnosis = Literal["underfitting", "improving", "plateau", "overfitting"]
#: The diagnosis labels, in the order of their integer codes (logged as ``curves/diagnosis``).
DIAGNOSES: tuple[str, ...] = ("underfitting", "improving", "plateau", "overfitting")
#: ``{label: code}``: underfitting 0, improving 1, plateau 2, overfitting 3.
DIAGNOSIS_CODES: dict[str, int] = {label: code for code, label in enumerate(DIAGNOSES)}


def argbest(values: Sequence[float], minimize: bool) -> int | None:
    """Index of the lowest (``minimize``) or highest finite value, ``None`` if there is none."""
    finite = [(v, i) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if not finite:
        return None
    return (min(finite) if minimize else max(finite))[1]


def is_finite(value: float | None) -> bool:
    """Whether ``value`` is a number and finite (``None`` and NaN mark a missing value)."""
    return value is not None and math.isfinite(value)


def ema_series(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average ``e[i] = alpha * x[i] + (1 - alpha) * e[i-1]``, started at the
    first finite value; a non-finite value keeps the previous average (NaN before the first).

    Example:
        >>> ema_series([1.0, 0.0, float("nan"), 0.0], alpha=0.5)
        [1.0, 0.5, 0.5, 0.25]
    """
    check_number("alpha", alpha, 0.0, 1.0, low_inclusive=False)
    out: list[float] = []
    current = math.nan
    for v in values:
        if is_finite(v):
            current = float(v) if math.isnan(current) else alpha * float(v) + (1.0 - alpha) * current
        out.append(current)
    return out


def check_diagnosis_args(
    ema_alpha: float, overfit_margin: float, overfit_epochs: int, plateau_tol: float, underfit_ratio: float
) -> None:
    """Raise ``ConfigurationError`` for a diagnosis setting out of range (see :func:`diagnose`)."""
    check_number("ema_alpha", ema_alpha, 0.0, 1.0, low_inclusive=False)
    check_number("overfit_margin", overfit_margin, low=0.0)
    check_int("overfit_epochs", overfit_epochs, minimum=1)
    check_number("plateau_tol", plateau_tol, low=0.0)
    check_number("underfit_ratio", underfit_ratio, 0.0, 1.0, high_inclusive=False)


def diagnose(
    history: Mapping[str, Sequence[float]],
    ema_alpha: float = 0.5,
    overfit_margin: float = 0.02,
    overfit_epochs: int = 3,
    plateau_tol: float = 0.01,
    underfit_ratio: float = 0.5,
) -> tuple[Diagnosis, str]:
    """Diagnose the latest epoch of a learning curve; return ``(label, reason)``.

    Reads ``history["val_loss"]`` (required) and ``history["train_loss"]`` (optional), per-epoch
    lists where NaN marks a missing value. Only epochs with a finite val loss take part; ``e`` is
    their val loss smoothed by :func:`ema_series` with ``ema_alpha``, ``m`` the epoch of its
    minimum and ``t`` the train loss. The first rule that holds gives the label:

    1. ``overfitting``: the smoothed val loss has turned up from its minimum and stayed there:
       for each of the last ``overfit_epochs`` epochs (all after ``m``),
       ``e > e[m] + overfit_margin * |e[m]|``, it did not fall in the last epoch
       (``e[now] >= e[prev]``: a recovering val loss is not overfitting), *and* the train loss is
       still falling: ``t[now] < t[m]`` (checked when both are known). Since ``e`` only rises
       above its minimum after some raw val loss exceeded every earlier one, this never fires
       before the val loss has turned up.
    2. ``underfitting``: the train loss is still above ``underfit_ratio`` times its first value
       (the model has not yet learnt the training data; ``underfit_ratio=0`` disables the rule).
    3. ``plateau``: the smoothed val loss fell by less than ``plateau_tol`` (relative) in the last
       epoch, ``(e[now] - e[prev]) / |e[prev]| > -plateau_tol`` (this includes a val loss that rose
       but not yet enough, or not long enough, for rule 1); *or* no raw val loss of the last
       ``overfit_epochs`` epochs beat the best before them (what early stopping calls no
       improvement: a patience of ``overfit_epochs`` or more running out is never "improving").
    4. ``improving``: otherwise (the smoothed val loss falls by more than ``plateau_tol`` per
       epoch and a recent epoch set a new best, or there is only one epoch and rule 2 does not
       hold).

    Integer codes for logging: :data:`DIAGNOSIS_CODES` (underfitting 0, improving 1, plateau 2,
    overfitting 3).

    Args:
        history: per-epoch metric lists.
        ema_alpha: weight of the newest value in the EMA, in (0, 1] (1 = no smoothing).
        overfit_margin: relative rise of the smoothed val loss above its minimum (>= 0).
        overfit_epochs: epochs the rise must last (>= 1).
        plateau_tol: relative per-epoch fall below which the val loss counts as flat (>= 0).
        underfit_ratio: train-loss fraction of its first value above which the model underfits,
            in [0, 1).

    Raises:
        ValueError: if no finite ``val_loss`` is recorded.
        ConfigurationError: for an argument out of range (a ``ValueError`` too).

    Example:
        >>> hist = {"train_loss": [1.0, 0.4, 0.2, 0.1, 0.05, 0.03],
        ...         "val_loss":   [1.0, 0.5, 0.4, 0.6, 0.8, 0.9]}
        >>> [diagnose({k: v[: i + 1] for k, v in hist.items()}, ema_alpha=1.0, overfit_epochs=2)[0]
        ...  for i in range(6)]
        ['underfitting', 'improving', 'improving', 'plateau', 'overfitting', 'overfitting']
    """
    check_diagnosis_args(ema_alpha, overfit_margin, overfit_epochs, plateau_tol, underfit_ratio)
    val_all = list(history.get("val_loss", []))
    train_all = list(history.get("train_loss", []))
    idx = [i for i, v in enumerate(val_all) if is_finite(v)]
    if not idx:
        raise ValueError("`history` must hold at least one finite 'val_loss' value")
    val = [float(val_all[i]) for i in idx]
    train = [float(train_all[i]) if i < len(train_all) and is_finite(train_all[i]) else math.nan for i in idx]
    e = ema_series(val, ema_alpha)
    now = len(e) - 1
    m = min(range(len(e)), key=lambda i: e[i])

    # 1. overfitting
    if now - m >= overfit_epochs:
        threshold = e[m] + overfit_margin * abs(e[m])
        risen = all(e[j] > threshold for j in range(now - overfit_epochs + 1, now + 1))
        train_known = is_finite(train[now]) and is_finite(train[m])
        recovering = now > 0 and e[now] < e[now - 1]
        if risen and not recovering and (not train_known or train[now] < train[m]):
            detail = f", train loss {train[m]:.4g} -> {train[now]:.4g}" if train_known else ""
            return "overfitting", (
                f"smoothed val loss {e[now]:.4g} has stayed > {threshold:.4g} (min {e[m]:.4g} at epoch"
                f" {idx[m]}, +{overfit_margin:.0%}) for {overfit_epochs} epochs{detail}"
            )
    # 2. underfitting
    first_train = next((t for t in train if is_finite(t)), math.nan)
    if underfit_ratio > 0 and is_finite(train[now]) and train[now] > underfit_ratio * first_train:
        return "underfitting", (
            f"train loss {train[now]:.4g} is still above {underfit_ratio:g} x its first value {first_train:.4g}"
        )
    if now == 0:
        return "improving", "first epoch with a val loss"
    # 3. plateau / 4. improving
    slope = e[now] - e[now - 1]
    scale = abs(e[now - 1]) or 1.0
    rel = slope / scale
    if rel > -plateau_tol:
        return "plateau", f"smoothed val loss changed by {rel:+.2%} in the last epoch (> -{plateau_tol:.2%})"
    if now >= overfit_epochs and min(val[-overfit_epochs:]) >= min(val[:-overfit_epochs]):
        return "plateau", (
            f"no val loss of the last {overfit_epochs} epochs beat {min(val[:-overfit_epochs]):.4g}, the best before them"
        )
    return "improving", f"smoothed val loss fell by {-rel:.2%} in the last epoch (>= {plateau_tol:.2%})"
