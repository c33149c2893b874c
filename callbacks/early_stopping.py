"""EarlyStopping: a drop-in for Lightning's, plus restore of the best weights, Keras' ``baseline``,
a relative ``min_delta`` and ignored warm-up epochs.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping as _LightningEarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ._checks import (
    ConfigurationError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
)
from ._logging import log_metrics
from .best_weights import BestWeights
from .engine import cached_state_key
from .stop_notices import announce_restore, announce_stop, forget_notices
from .stopping_rules import CheckOutcome, beats, evaluate_check, improvement_margin

__all__ = ["EarlyStopping"]


def _number(name: str, value: Any, optional: bool = False) -> Any:
    """``value`` unchanged if Lightning gives it a meaning: any real number but NaN (``inf`` = never)."""
    if value is None and optional:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isinf(value):
        return value
    check_number(name, value, optional=optional)
    return value


def _flag(name: str, value: Any, optional: bool = False) -> Any:
    """A bool, or an int >= 0 as Lightning (and Keras' ``verbose=1``) read it: by its truth."""
    if value is None and optional:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return value
    return check_bool(name, value)


class EarlyStopping(_LightningEarlyStopping):
    """Lightning's ``EarlyStopping``, exactly, plus best-weight restore, ``baseline``, a relative
    ``min_delta`` and ignored warm-up epochs.

    **Drop-in.** With the added arguments at their defaults, every check decides as Lightning
    2.6's does on the same metric stream: same arguments and meanings (a negative ``min_delta``
    tolerates a worsening of that size, ``patience=2.0`` is 2, ``inf`` thresholds never fire),
    same order of rules (non-finite, ``stopping_threshold``, ``divergence_threshold``,
    improvement, patience), same ``best_score``, ``wait_count``, ``stopped_epoch``,
    ``stopping_reason`` and ``stopping_reason_message``, the same check after the training epoch
    or after validation, and the stop reduced across DDP ranks (any rank stopping stops all).
    ``min_delta`` reads as Lightning stores it (negated in ``"min"`` mode) and is never rewritten.
    The checkpoint state has Lightning's key and keys, so a checkpoint of either callback resumes
    the other. As in Lightning, a second ``fit`` with the same instance keeps ``best_score``,
    ``wait_count`` and ``stopped_epoch``. Bad arguments raise
    :class:`~epochwise.callbacks._checks.ConfigurationError`, which is both Lightning's
    ``MisconfigurationException`` and ``ValueError``.

    **Added.**

    - ``restore_best_weights``: keep an in-memory CPU copy of the weights at the best check and
      load it back at the end of ``fit`` (stopped early or not). The best check follows the
      callback's own rule, whichever rule stopped the fit: a check is the best when its value is
      finite and beats the best so far by ``min_delta`` -- also when it reached
      ``stopping_threshold`` (Lightning's chain does not move ``best_score`` then, so
      ``best_epoch`` may be later than ``best_score``'s epoch). The copy lives in one
      :class:`~epochwise.callbacks.best_weights.BestWeights` store (under DDP, on rank 0 only,
      broadcast once at restore), is checkpointed with the callback, and belongs to one fit: a
      later fit whose checks never beat the carried-over ``best_score`` restores nothing (and
      warns) rather than load another fit's weights.
    - ``baseline`` (Keras): the wait restarts only at a check that improves on the best *and*
      beats ``baseline`` (by ``min_delta``); if no check beats it, training stops after
      ``patience`` checks with ``stopping_reason`` ``PATIENCE_EXHAUSTED``. The weights restored
      are the best ones whether or not they beat the baseline (as in Keras 3).
    - ``min_delta_mode="rel"``: the margin is ``min_delta * |best|``.
    - ``start_from_epoch`` (Keras): checks at epochs ``< start_from_epoch`` (0-based) are ignored.

    **Differences that remain.** Values meaningless in both libraries are refused where
    Lightning would accept and misuse them: a NaN ``min_delta``, ``patience`` or threshold, an
    infinite ``min_delta``, a bool ``patience``, a string for a flag, a non-string ``monitor``.
    From Keras: ``mode="auto"`` is refused (as in Lightning), ``monitor`` has no default, and
    ``patience`` defaults to Lightning's 3, not Keras' 0.

    Logged at every check (straight to the loggers, rank 0, at Lightning's step):
    ``early_stopping/<monitor>_wait`` and ``early_stopping/<monitor>_best`` (``best_score``);
    ``log_prefix`` replaces ``early_stopping``.

    Attributes:
        best_epoch: epoch (0-based) of the best check by the rule above, ``-1`` before one.
        restored_epoch: epoch whose weights were restored at the end of the last fit, else ``None``.
        best_weights: the :class:`~epochwise.callbacks.best_weights.BestWeights` store.

    Args:
        monitor, min_delta, patience, verbose, mode, strict, check_finite, stopping_threshold,
            divergence_threshold, check_on_train_epoch_end, log_rank_zero_only: as in Lightning.
        baseline: value to beat (by ``min_delta``) within ``patience`` checks, or ``None``.
        min_delta_mode: ``"abs"`` (Lightning's) or ``"rel"``.
        restore_best_weights: load the best check's weights into the module at fit end.
        start_from_epoch: first epoch (0-based) whose check counts.
        log_prefix: prefix of the logged keys.

    Raises:
        ConfigurationError: for an argument meaningless in Lightning (e.g. ``mode="auto"``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> es = EarlyStopping("val_loss", patience=5, restore_best_weights=True, baseline=0.9)
        >>> es.patience, es.baseline, es.best_epoch
        (5, 0.9, -1)
        >>> trainer = Trainer(callbacks=[es], max_epochs=50, logger=False)
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int | float = 3,
        verbose: bool = False,
        mode: Literal["min", "max"] = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        baseline: float | None = None,
        min_delta_mode: Literal["abs", "rel"] = "abs",
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        log_prefix: str = "early_stopping",
    ) -> None:
        check_str("monitor", monitor)
        check_choice("mode", mode, ("min", "max"))
        check_number("min_delta", min_delta)
        _number("patience", patience)
        for name, value in (("stopping_threshold", stopping_threshold), ("divergence_threshold", divergence_threshold)):
            _number(name, value, optional=True)
        for name, value in (("verbose", verbose), ("strict", strict), ("check_finite", check_finite),
                            ("log_rank_zero_only", log_rank_zero_only)):
            _flag(name, value)
        _flag("check_on_train_epoch_end", check_on_train_epoch_end, optional=True)
        check_choice("min_delta_mode", min_delta_mode, ("abs", "rel"))
        check_bool("restore_best_weights", restore_best_weights)
        check_int("start_from_epoch", start_from_epoch, minimum=0)
        check_str("log_prefix", log_prefix)
        if log_prefix.endswith("/"):
            raise ConfigurationError(f"`log_prefix` must not end with '/', got {log_prefix!r}")
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,  # type: ignore[arg-type]
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.baseline = _number("baseline", baseline, optional=True)
        self.min_delta_mode = min_delta_mode
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.log_prefix = log_prefix
        self._min_delta_arg = min_delta  # the user's value; Lightning's `min_delta` is signed
        self.best_epoch = -1
        self.restored_epoch: int | None = None
        self.best_weights = BestWeights()
        self._rule_best: Tensor = self.best_score  # best by the callback's rule (see class docstring)
        self._outcome: CheckOutcome | None = None
        self._rule_is_new_best = False

    # -- the decision -------------------------------------------------------------------------
    def _margin(self, best: Tensor) -> float:
        if self.min_delta_mode == "abs":
            return float(self._min_delta_arg)
        return improvement_margin(float(best), self._min_delta_arg, "rel")

    # Lightning 2.6 calls `_evaluate_stopping_criteria(current) -> (should_stop, reason)` from
    # `_run_early_stopping_check(trainer)` (both private; tests pin their signatures).
    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        outcome = evaluate_check(
            current,
            self.best_score,
            self.wait_count,
            mode=self.mode,  # type: ignore[arg-type]
            min_delta=self._margin(self.best_score),
            patience=self.patience,
            check_finite=bool(self.check_finite),
            stopping_threshold=self.stopping_threshold,
            divergence_threshold=self.divergence_threshold,
            baseline=self.baseline,
        )
        reason = self._reason(outcome, current)
        self.best_score, self.wait_count = outcome.best, outcome.wait  # type: ignore[assignment]
        self._outcome = outcome
        self._rule_is_new_best = bool(torch.isfinite(current)) and beats(
            current, self._rule_best, self.mode, self._margin(self._rule_best)  # type: ignore[arg-type]
        )
        if self._rule_is_new_best:
            self._rule_best = current
        return outcome.should_stop, reason

    def _reason(self, outcome: CheckOutcome, current: Tensor) -> str | None:
        """Lightning's message (and ``stopping_reason``) for the branch; read before the state moves."""
        order = self.order_dict[self.mode]
        if outcome.branch == "non_finite":
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            return (
                f"Monitored metric {self.monitor} = {current} is not finite."
                f" Previous best value was {self.best_score:.3f}. Signaling Trainer to stop."
            )
        if outcome.branch == "stopping_threshold":
            self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD
            return (
                f"Stopping threshold reached: {self.monitor} = {current} {order} {self.stopping_threshold}."
                " Signaling Trainer to stop."
            )
        if outcome.branch == "divergence_threshold":
            self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
            return (
                f"Divergence threshold reached: {self.monitor} = {current} {order} {self.divergence_threshold}."
                " Signaling Trainer to stop."
            )
        if outcome.should_stop:
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            if outcome.below_baseline:
                return (
                    f"Monitored metric {self.monitor} did not beat the baseline {self.baseline} in the last"
                    f" {outcome.wait} records. Best score: {outcome.best:.3f}. Signaling Trainer to stop."
                )
            return (
                f"Monitored metric {self.monitor} did not improve in the last {outcome.wait} records."
                f" Best score: {outcome.best:.3f}. Signaling Trainer to stop."
            )
        if outcome.branch == "improved":
            message = self._improvement_message(current)
            return message + (f" (baseline {self.baseline} not beaten yet)" if outcome.below_baseline else "")
        return None

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if trainer.current_epoch < self.start_from_epoch:
            return
        self._outcome = None
        super()._run_early_stopping_check(trainer)
        if self._outcome is None:  # metric missing (strict=False) or fast_dev_run: nothing decided
            return
        if self._outcome.should_stop and self.stopping_reason_message:
            patience = self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
            announce_stop(self, trainer.current_epoch, self.stopping_reason_message, no_improvement=patience)
        if self._rule_is_new_best:
            self.best_epoch = trainer.current_epoch
            if self.restore_best_weights:
                self.best_weights.snapshot(trainer.lightning_module, trainer.current_epoch)
        log_metrics(
            trainer,
            {
                f"{self.log_prefix}/{self.monitor}_wait": float(self.wait_count),
                f"{self.log_prefix}/{self.monitor}_best": float(self.best_score),
            },
        )

    # -- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # Lightning's counters carry over (drop-in); the weights copy does not
            self.best_weights.setup(trainer)
            self.restored_epoch = None
            forget_notices(self)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.restore_best_weights:
            return
        self.restored_epoch = self.best_weights.restore(trainer, pl_module)
        if self.restored_epoch is None and self.best_epoch >= 0:
            rank_zero_warn(
                f"EarlyStopping: the best {self.monitor} ({float(self._rule_best):.6g}, epoch {self.best_epoch})"
                " comes from before this fit (an earlier fit, or a checkpoint without weights) and no check of"
                " this fit beat it; the weights were not restored."
            )
        elif self.restored_epoch is not None:
            announce_restore(self, self.restored_epoch, f"{self.monitor} {float(self._rule_best):.6g}")

    # -- state ------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # Lightning's key (monitor, mode), built once: Lightning reads it at every hook call
        return cached_state_key(self, monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # Lightning's keys, so Lightning's callback can load it
        state["best_epoch"] = self.best_epoch
        state["rule_best_score"] = self._rule_best
        if self.restore_best_weights:
            state.update(self.best_weights.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning's loader needs every one of its keys; fill the missing ones from the current state.
        super().load_state_dict({**super().state_dict(), **state_dict})
        self.best_epoch = int(state_dict.get("best_epoch", self.best_epoch))
        # From a Lightning checkpoint: the best by our rule is Lightning's best_score.
        self._rule_best = state_dict.get("rule_best_score", state_dict.get("best_score", self._rule_best))
        if self.restore_best_weights:
            self.best_weights.load_state_dict(state_dict)
