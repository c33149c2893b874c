"""The one argument-checking helper of epochwise (callbacks, modules, DataModules), and its error.

It lives here because ``epochwise.datamodules`` is the one package the other two may both import
(callbacks never import modules). Every bad argument, and every Trainer configuration a callback
cannot honour exactly, raises :class:`ConfigurationError`, which Lightning users catch as ``MisconfigurationException`` (what
Lightning's own callbacks raise) and everyone else as ``ValueError``. Messages name the argument,
what is allowed and what was given: ``` `rule` must be 'linear', 'sqrt' or 'none', got 'squareroot' ```.

Booleans are never accepted where a number is expected (``True`` is an ``int`` in Python, and a
YAML ``yes`` would otherwise become a batch size of 1); NaN and infinities are refused wherever a
finite number is expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = [
    "ConfigurationError",
    "is_int",
    "is_number",
    "check_int",
    "check_number",
    "check_choice",
    "check_bool",
    "check_str",
]


class ConfigurationError(MisconfigurationException, ValueError):
    """A bad argument, or a Trainer configuration that epochwise refuses rather than get wrong.

    Catchable as Lightning's ``MisconfigurationException`` and as ``ValueError``.

    Example:
        >>> from lightning.pytorch.utilities.exceptions import MisconfigurationException
        >>> issubclass(ConfigurationError, MisconfigurationException), issubclass(ConfigurationError, ValueError)
        (True, True)
    """


def is_int(value: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)  # type: ignore[arg-type]


def _fmt(value: object) -> str:
    return repr(value)


def check_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None, optional: bool = False
) -> int | None:
    """``value`` as an ``int`` within ``[minimum, maximum]``; ``None`` passes when ``optional``.

    Integral floats (``2.0`` from a YAML file) are refused: a batch size or a count is an int.

    Example:
        >>> check_int("interval", 3, minimum=1)
        3
        >>> check_int("interval", True, minimum=1)
        Traceback (most recent call last):
        ...
        epochwise.datamodules._checks.ConfigurationError: `interval` must be an int >= 1, got True
    """
    if value is None and optional:
        return None
    ok = is_int(value)
    if ok and minimum is not None and value < minimum:  # type: ignore[operator]
        ok = False
    if ok and maximum is not None and value > maximum:  # type: ignore[operator]
        ok = False
    if not ok:
        raise ConfigurationError(f"`{name}` must be {_int_range(minimum, maximum, optional)}, got {_fmt(value)}")
    return int(value)  # type: ignore[arg-type]


def _int_range(minimum: int | None, maximum: int | None, optional: bool) -> str:
    text = "an int"
    if minimum is not None and maximum is not None:
        text = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        text = f"an int >= {minimum}"
    elif maximum is not None:
        text = f"an int <= {maximum}"
    return f"None or {text}" if optional else text


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    optional: bool = False,
) -> float | None:
    """``value`` as a finite ``float`` within the given bounds; ``None`` passes when ``optional``.

    Example:
        >>> check_number("start_factor", 0.5, 0.0, 1.0)
        0.5
        >>> check_number("duration", float("nan"), 0.0, low_inclusive=False)
        Traceback (most recent call last):
        ...
        epochwise.datamodules._checks.ConfigurationError: `duration` must be a finite number > 0, got nan
    """
    if value is None and optional:
        return None
    ok = is_number(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low  # type: ignore[operator]
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high  # type: ignore[operator]
    if not ok:
        raise ConfigurationError(
            f"`{name}` must be {_number_range(low, high, low_inclusive, high_inclusive, optional)}, got {_fmt(value)}"
        )
    return float(value)  # type: ignore[arg-type]


def _number_range(low: float | None, high: float | None, low_inc: bool, high_inc: bool, optional: bool) -> str:
    if low is not None and high is not None:
        text = f"a number in {'[' if low_inc else '('}{low:g}, {high:g}{']' if high_inc else ')'}"
    elif low is not None:
        text = f"a finite number {'>=' if low_inc else '>'} {low:g}"
    elif high is not None:
        text = f"a finite number {'<=' if high_inc else '<'} {high:g}"
    else:
        text = "a finite number"
    return f"None or {text}" if optional else text


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    Example:
        >>> check_choice("rule", "squareroot", ("linear", "sqrt", "none"))
        Traceback (most recent call last):
        ...
        epochwise.datamodules._checks.ConfigurationError: `rule` must be 'linear', 'sqrt' or 'none', got 'squareroot'
    """
    try:
        found = value in choices
    except TypeError:  # an unhashable value against a set of choices
        found = False
    if not found or isinstance(value, bool) and not any(c is value for c in choices):
        listed = [repr(c) for c in choices]
        allowed = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + f" or {listed[-1]}"
        raise ConfigurationError(f"`{name}` must be {allowed}, got {_fmt(value)}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (``0``/``1`` and strings are refused)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"`{name}` must be True or False, got {_fmt(value)}")
    return value


def check_str(name: str, value: object, optional: bool = False) -> str | None:
    """``value`` if it is a non-empty ``str``; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"`{name}` must be {'None or ' if optional else ''}a non-empty str, got {_fmt(value)}")
    return value
