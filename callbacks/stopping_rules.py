"""Pure early-stopping decisions: what counts as an improvement, and Lightning's check chain.

:func:`improvement_margin` and :func:`improved` are the float rules :class:`MetricTracker` uses;
:func:`evaluate_check` is Lightning 2.6's ``EarlyStopping`` decision, on the same tensors and with
the same torch comparisons (so float32 edge cases decide as Lightning's do), plus Keras'
``baseline``. :class:`~epochwise.callbacks.early_stopping.EarlyStopping` is a thin callback
around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._checks import check_choice

__all__ = ["improvement_margin", "improved", "beats", "evaluate_check", "CheckOutcome", "Branch"]

Mode = Literal["min", "max"]
DeltaMode = Literal["abs", "rel"]
#: Which link of the chain decided a check, in Lightning's order.
Branch = Literal["non_finite", "stopping_threshold", "divergence_threshold", "improved", "not_improved"]

_OPS = {"min": torch.lt, "max": torch.gt}


def improvement_margin(best: float, min_delta: float, min_delta_mode: DeltaMode = "abs") -> float:
    """The amount by which a value must beat ``best`` to count as an improvement.

    ``"abs"``: ``min_delta``. ``"rel"``: ``min_delta * |best|`` (0 while ``best`` is not finite, i.e.
    before the first value, so the first finite value always improves). A negative ``min_delta``
    keeps its sign, as in Lightning: it tolerates a worsening of that size.

    Example:
        >>> improvement_margin(0.5, 0.1, "abs"), improvement_margin(-2.0, 0.1, "rel")
        (0.1, 0.2)
    """
    check_choice("min_delta_mode", min_delta_mode, ("abs", "rel"))
    if min_delta_mode == "abs":
        return float(min_delta)
    return float(min_delta) * abs(best) if math.isfinite(best) else 0.0


def improved(
    current: float,
    best: float,
    mode: Mode = "min",
    min_delta: float = 0.0,
    min_delta_mode: DeltaMode = "abs",
) -> bool:
    """Whether ``current`` improves on ``best`` by strictly more than the margin.

    Lightning's rule (``current < best - min_delta`` in ``"min"`` mode: a change of ``min_delta``
    or less is no improvement) with the margin from :func:`improvement_margin`. A non-finite
    ``current`` never improves; a non-finite ``best`` (no value yet) is beaten by any finite one.

    Example:
        >>> improved(0.9, 1.0, "min", min_delta=0.05)
        True
        >>> improved(0.96, 1.0, "min", min_delta=0.05, min_delta_mode="rel")
        False
        >>> improved(0.81, 0.8, "max")
        True
    """
    check_choice("mode", mode, ("min", "max"))
    if not math.isfinite(current):
        return False
    margin = improvement_margin(best, min_delta, min_delta_mode)
    return current < best - margin if mode == "min" else current > best + margin


def _signed(min_delta: float, mode: str) -> float:
    # Lightning stores min_delta negated in "min" mode and tests `op(current - min_delta, best)`.
    return min_delta * (1 if mode == "max" else -1)


def beats(current: Tensor, reference: Tensor | float, mode: Mode, min_delta: float = 0.0) -> bool:
    """Lightning's improvement test on tensors: ``op(current - signed_min_delta, reference)``.

    Example:
        >>> beats(torch.tensor(0.5), torch.tensor(0.6), "min", 0.05), beats(torch.tensor(0.58), 0.6, "min", 0.05)
        (True, False)
    """
    ref = reference.to(current.device) if isinstance(reference, Tensor) else reference
    return bool(_OPS[mode](current - _signed(min_delta, mode), ref))


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one check: the branch that decided it and the state after it.

    Attributes:
        branch: the link of the chain that decided (see :data:`Branch`).
        should_stop: whether this check asks the Trainer to stop.
        best: the best score after the check (Lightning's ``best_score``).
        wait: checks without improvement after the check (Lightning's ``wait_count``).
        below_baseline: the check improved on the best but not on ``baseline``, so the wait
            was not reset (Keras' rule).
    """

    branch: Branch
    should_stop: bool
    best: Tensor
    wait: float
    below_baseline: bool = False


def evaluate_check(
    current: Tensor,
    best: Tensor,
    wait: float,
    *,
    mode: Mode,
    min_delta: float,
    patience: float,
    check_finite: bool = True,
    stopping_threshold: float | None = None,
    divergence_threshold: float | None = None,
    baseline: float | None = None,
) -> CheckOutcome:
    """One early-stopping check, exactly as Lightning 2.6 decides it, plus Keras' ``baseline``.

    The first rule that holds decides: (1) ``check_finite`` and ``current`` is NaN/inf: stop;
    (2) ``current`` beats ``stopping_threshold``: stop; (3) ``current`` is worse than
    ``divergence_threshold``: stop; (4) ``current`` improves on ``best`` by more than
    ``min_delta`` (signed as in Lightning: a negative value tolerates a worsening): it becomes
    the best and the wait restarts, unless ``baseline`` is set and not beaten (by the same
    margin), in which case the wait goes on (Keras 3: "if no epoch improves on baseline,
    training will run for patience epochs"); (5) otherwise the wait grows by one. Patience is
    spent when ``wait >= patience``. Thresholds never move ``best`` (Lightning's chain).

    Example:
        >>> t = torch.tensor
        >>> o = evaluate_check(t(0.05), t(0.3), 0, mode="min", min_delta=0.0, patience=3, stopping_threshold=0.1)
        >>> o.branch, o.should_stop, float(o.best)
        ('stopping_threshold', True, 0.30000001192092896)
        >>> o = evaluate_check(t(0.8), t(0.9), 2, mode="min", min_delta=0.0, patience=3, baseline=0.5)
        >>> o.branch, o.should_stop, o.wait, o.below_baseline
        ('improved', True, 3, True)
    """
    op = _OPS[mode]
    if check_finite and not torch.isfinite(current):
        return CheckOutcome("non_finite", True, best, wait)
    if stopping_threshold is not None and op(current, stopping_threshold):
        return CheckOutcome("stopping_threshold", True, best, wait)
    if divergence_threshold is not None and op(-current, -divergence_threshold):
        return CheckOutcome("divergence_threshold", True, best, wait)
    if beats(current, best, mode, min_delta):
        if baseline is None or beats(current, baseline, mode, min_delta):
            return CheckOutcome("improved", False, current, 0)
        wait = wait + 1
        return CheckOutcome("improved", wait >= patience, current, wait, below_baseline=True)
    wait = wait + 1
    return CheckOutcome("not_improved", wait >= patience, best, wait)
