"""Verdicts computed from measurements: a claim's rule is a list of conditions on its numbers.

The rule, written down once for every claim (:func:`Rule.describe` prints it):

- ``"held"``: every condition holds;
- ``"held partly"``: some conditions hold, not all;
- ``"did not hold"``: no condition holds.

A condition compares one measured number (a median over seeds, a slope, a count...) with a
constant: ``numbers[key] <op> value``. A missing or NaN number fails its condition (nothing is
presumed). The functions here are pure: same numbers, same verdict.

    >>> rule = Rule((Condition("slope", "between", (-0.6, -0.4), "log-log slope near -1/2"),))
    >>> verdict({"slope": -0.52}, rule), verdict({"slope": -0.9}, rule)
    ('held', 'did not hold')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HELD, PARTLY, NOT_HELD = "held", "held partly", "did not hold"
#: The verdict of a claim whose measurement needs hardware this run did not have.
NOT_MEASURED_GPU = "not measured on a GPU"
VERDICTS = (HELD, PARTLY, NOT_HELD, NOT_MEASURED_GPU)

_OPS = {
    "<": lambda x, v: x < v,
    "<=": lambda x, v: x <= v,
    ">": lambda x, v: x > v,
    ">=": lambda x, v: x >= v,
    "==": lambda x, v: x == v,
    "between": lambda x, v: v[0] <= x <= v[1],
}


@dataclass(frozen=True)
class Condition:
    """``numbers[key] <op> value``, with what it means in words."""

    key: str
    op: str
    value: float | tuple[float, float]
    text: str

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"`op` must be one of {sorted(_OPS)}, got {self.op!r}")
        if self.op == "between" and not (isinstance(self.value, tuple) and len(self.value) == 2):
            raise ValueError(f"`between` needs a (low, high) pair, got {self.value!r}")

    def holds(self, numbers: Mapping[str, Any]) -> bool:
        """Whether the condition holds on ``numbers`` (a missing or NaN number: it does not)."""
        x = numbers.get(self.key)
        if isinstance(x, bool):
            x = float(x)
        if not isinstance(x, (int, float)) or math.isnan(x):
            return False
        return bool(_OPS[self.op](x, self.value))

    def describe(self) -> str:
        value = f"[{self.value[0]:g}, {self.value[1]:g}]" if isinstance(self.value, tuple) else f"{self.value:g}"
        op = "in" if self.op == "between" else self.op
        return f"{self.key} {op} {value} ({self.text})"


@dataclass(frozen=True)
class Rule:
    """The conditions of one claim; see the module docstring for how they give the verdict."""

    conditions: tuple[Condition, ...]

    def __post_init__(self) -> None:
        if not self.conditions:
            raise ValueError("a rule needs at least one condition")

    def describe(self) -> str:
        """The rule in words, e.g. for the JSON and docs/RESULTS.md."""
        listed = "; ".join(c.describe() for c in self.conditions)
        if len(self.conditions) == 1:
            return f"held if {listed}, else did not hold"
        return f"held if all of: {listed}; held partly if some; did not hold if none"


def verdict(numbers: Mapping[str, Any], rule: Rule) -> str:
    """``"held"`` / ``"held partly"`` / ``"did not hold"`` for ``numbers`` under ``rule``.

    Example:
        >>> r = Rule((Condition("a", ">", 0, "a positive"), Condition("b", "<", 1, "b below 1")))
        >>> verdict({"a": 1, "b": 0}, r), verdict({"a": 1, "b": 2}, r), verdict({"a": -1}, r)
        ('held', 'held partly', 'did not hold')
    """
    results = [c.holds(numbers) for c in rule.conditions]
    if all(results):
        return HELD
    return PARTLY if any(results) else NOT_HELD


def checked(numbers: Mapping[str, Any], rule: Rule) -> list[dict[str, Any]]:
    """Each condition with its measured value and whether it held (for the report)."""
    return [{"condition": c.describe(), "value": numbers.get(c.key), "held": c.holds(numbers)}
            for c in rule.conditions]
