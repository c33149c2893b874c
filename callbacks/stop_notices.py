"""One-line notices when an epochwise callback ends a fit or restores the best weights.

A user should never have to guess why a fit ended early or which weights they hold. Every stopping
callback says it once, on rank zero, at the moment it happens (whatever ``verbose`` is), and
:func:`stop_reasons` collects the same lines for an end-of-run summary.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["announce_stop", "announce_restore", "stop_reasons", "fit_stop", "forget_notices"]


def announce_stop(callback: Any, epoch: int, reason: str, no_improvement: bool = False) -> str:
    """Say (rank zero) that ``callback`` ends the fit at ``epoch`` (0-based), and why; returns the line.

    ``no_improvement``: the stop is a patience running out (the monitored value stopped improving),
    which a learning-curve diagnosis must not contradict.
    """
    reason = reason.replace(" Signaling Trainer to stop.", "")
    line = f"{type(callback).__name__} stopped the fit at epoch {epoch}: {reason}"
    callback._stop_notice = line
    callback._stop_record = (epoch, reason, no_improvement)
    rank_zero_info(f"epochwise: {line}")
    return line


def announce_restore(callback: Any, epoch: int, what: str = "") -> str:
    """Say (rank zero) that ``callback`` restored the weights of ``epoch``; returns the line."""
    line = f"{type(callback).__name__} restored the weights of epoch {epoch}" + (f" ({what})" if what else "")
    callback._restore_notice = line
    rank_zero_info(f"epochwise: {line}")
    return line


def stop_reasons(trainer: pl.Trainer) -> list[str]:
    """The notices of this fit's callbacks, in callback order (for an end-of-run summary).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> stop_reasons(Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False))
        []
    """
    lines = []
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        for name in ("_stop_notice", "_restore_notice"):
            line = callback.__dict__.get(name)
            if line:
                lines.append(line)
    return lines


def fit_stop(trainer: pl.Trainer) -> tuple[int, str, bool] | None:
    """``(epoch, reason, no_improvement)`` of the first callback that stopped this fit, else ``None``."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        record = callback.__dict__.get("_stop_record")
        if record is not None:
            return record
    return None


def forget_notices(callback: Any) -> None:
    """A new fit: drop the notices of the last one (called from ``setup("fit")``)."""
    for name in ("_stop_notice", "_restore_notice", "_stop_record"):
        callback.__dict__.pop(name, None)
