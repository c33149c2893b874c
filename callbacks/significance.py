"""Is a metric still improving? A one-sided Welch t-test between two windows, from ``scipy.stats``.

No distribution code lives here: the statistic, its Welch-Satterthwaite degrees of freedom and the
p-value are :func:`scipy.stats.ttest_ind` (``equal_var=False``) with the one-sided alternative.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

from scipy import stats

from ._checks import check_choice
from .stopping_rules import DeltaMode, improved

__all__ = ["welch_t_test", "significant_improvement"]


def welch_t_test(
    a: Sequence[float], b: Sequence[float], alternative: Literal["two-sided", "less", "greater"] = "two-sided"
) -> tuple[float, float, float]:
    """Welch's t-test of ``mean(a)`` against ``mean(b)``: ``(t, degrees_of_freedom, p_value)``.

    A thin wrapper of ``scipy.stats.ttest_ind(a, b, equal_var=False, alternative=...)``; both
    samples need at least two values. Constant samples give ``t = +-inf`` (different means, p 0 or
    1) or NaN (equal means); scipy's precision warning for them is silenced.

    Example:
        >>> t, dof, p = welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], alternative="less")
        >>> round(t, 4), round(dof, 4), round(p, 4)
        (-3.6742, 4.0, 0.0107)
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"both samples need >= 2 values, got len(a)={len(a)}, len(b)={len(b)}")
    check_choice("alternative", alternative, ("two-sided", "less", "greater"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "catastrophic cancellation" on constant windows
        result = stats.ttest_ind(list(a), list(b), equal_var=False, alternative=alternative)
    return float(result.statistic), float(result.df), float(result.pvalue)


def significant_improvement(
    recent: Sequence[float],
    previous: Sequence[float],
    mode: Literal["min", "max"] = "min",
    alpha: float = 0.05,
    min_delta: float = 0.0,
    min_delta_mode: DeltaMode = "abs",
) -> tuple[bool, float]:
    """One-sided Welch t-test: is the mean of ``recent`` better than the mean of ``previous``?

    Returns ``(significant, p_value)``. ``significant`` needs ``p_value < alpha`` *and* the mean
    of ``recent`` to improve on the mean of ``previous`` by more than the :func:`improved` margin.
    In ``"min"`` mode the alternative hypothesis is ``mean(recent) < mean(previous)``. Two constant
    windows with equal means give a NaN p-value: not significant.

    Example:
        >>> significant_improvement([0.50, 0.48, 0.47], [0.70, 0.66, 0.64], "min")[0]
        True
        >>> significant_improvement([0.50, 0.70, 0.47], [0.52, 0.66, 0.49], "min")[0]
        False
    """
    check_choice("mode", mode, ("min", "max"))
    _, _, p = welch_t_test(recent, previous, alternative="less" if mode == "min" else "greater")
    if math.isnan(p):
        return False, math.nan
    mean_recent = math.fsum(recent) / len(recent)
    mean_previous = math.fsum(previous) / len(previous)
    better = improved(mean_recent, mean_previous, mode, min_delta, min_delta_mode)
    return bool(p < alpha and better), p
