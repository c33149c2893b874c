"""Argument checks shared by the models, optimizers and DataModules: one ``ValueError`` wording.

Messages name the argument, what is allowed and what was given, as the callbacks' checks do:
``` `lr` must be a finite number > 0, got nan ```. Booleans are never accepted where a number is
expected (``True`` is an ``int`` in Python, and a YAML ``yes`` would otherwise become a batch size
of 1); NaN and infinities are refused wherever a number is expected. (``epochwise.callbacks`` has
its own copy raising its ``ConfigurationError``; modules and DataModules must not import it.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

__all__ = ["check_int", "check_number", "check_choice", "check_bool"]


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]`` (``bool`` and floats refused).

    Example:
        >>> check_int("batch_size", 64, minimum=1)
        64
        >>> check_int("batch_size", True, minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: `batch_size` must be an int >= 1, got True
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:  # type: ignore[operator]
        ok = False
    if ok and maximum is not None and value > maximum:  # type: ignore[operator]
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            allowed = f"an int in [{minimum}, {maximum}]"
        elif minimum is not None:
            allowed = f"an int >= {minimum}"
        elif maximum is not None:
            allowed = f"an int <= {maximum}"
        else:
            allowed = "an int"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a finite ``float`` within the given bounds (``bool`` and NaN refused).

    Example:
        >>> check_number("lr", 0.1, 0.0, low_inclusive=False)
        0.1
        >>> check_number("lr", float("nan"), 0.0, low_inclusive=False)
        Traceback (most recent call last):
        ...
        ValueError: `lr` must be a finite number > 0, got nan
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)  # type: ignore[arg-type]
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low  # type: ignore[operator]
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high  # type: ignore[operator]
    if not ok:
        if low is not None and high is not None:
            allowed = f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        elif low is not None:
            allowed = f"a finite number {'>=' if low_inclusive else '>'} {low:g}"
        elif high is not None:
            allowed = f"a finite number {'<=' if high_inclusive else '<'} {high:g}"
        else:
            allowed = "a finite number"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    Example:
        >>> check_choice("optimizer", "rmsprop", ("adam", "sgd"))
        Traceback (most recent call last):
        ...
        ValueError: `optimizer` must be 'adam' or 'sgd', got 'rmsprop'
    """
    try:
        found = value in choices
    except TypeError:  # an unhashable value
        found = False
    if not found or isinstance(value, bool) and not any(c is value for c in choices):
        listed = [repr(c) for c in choices]
        allowed = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + f" or {listed[-1]}"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (``0``/``1`` and strings are refused).

    Example:
        >>> check_bool("clip", 1)
        Traceback (most recent call last):
        ...
        ValueError: `clip` must be True or False, got 1
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value
