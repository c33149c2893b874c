"""TrainingBudget: stop a fit at a compute budget (samples, optimizer steps or FLOPs).

The budget counts what was actually trained on, so it stays meaningful when the batch size
changes during training: samples are summed batch by batch, optimizer steps are read from
``trainer.global_step``, and FLOPs are samples times the per-sample training FLOPs.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.flop_counter import FlopCounterMode

from ._logging import log_scalars

__all__ = ["TrainingBudget", "budget_fractions"]

#: Training FLOPs per forward FLOP: the backward pass costs about twice the forward pass
#: (gradients with respect to both inputs and weights), so forward + backward ~ 3 x forward.
TRAINING_FLOPS_PER_FORWARD_FLOP = 3.0


def budget_fractions(
    used: dict[str, float], limits: dict[str, float | int | None]
) -> dict[str, float]:
    """Fraction of each set budget used: ``{name: used[name] / limits[name]}`` for limits that are set.

    Example:
        >>> budget_fractions({"samples": 50, "optimizer_steps": 3}, {"samples": 100, "optimizer_steps": None})
        {'samples': 0.5}
    """
    return {name: used[name] / limit for name, limit in limits.items() if limit is not None}


class TrainingBudget(Callback):
    """Stop training once a compute budget is spent: samples, optimizer steps and/or FLOPs.

    The check runs in ``on_train_batch_end`` and sets ``trainer.should_stop``, which Lightning 2.6
    honours before the next batch (it then runs the epoch's validation and ends the fit, unless
    ``min_epochs``/``min_steps`` are not met yet). So the fit ends at the first batch at which a
    budget is reached: ``max_optimizer_steps`` stops with ``trainer.global_step ==
    max_optimizer_steps`` exactly (also with gradient accumulation: the step is counted when it is
    taken); ``max_samples`` and ``max_flops`` stop at the end of the batch that reaches them, so
    they overshoot by less than one global batch (none when the budget is a multiple of it).

    Counting:

    - samples: each training batch's size (``lightning.pytorch.utilities.data.extract_batch_size``)
      times ``trainer.world_size``, summed batch by batch, so a batch size that changes during
      training is counted as it was (every rank is assumed to see equally sized batches, as
      Lightning's ``DistributedSampler`` makes them);
    - optimizer steps: ``trainer.global_step``;
    - FLOPs: samples x training FLOPs per sample. The per-sample figure is ``flops_per_sample`` if
      given, else measured once, on the first training batch, by running the LightningModule's own
      ``training_step`` forward under ``torch.utils.flop_counter.FlopCounterMode`` (from
      ``on_train_batch_start`` until ``on_before_backward``, so no extra pass is made and any
      module works), divided by the batch size and multiplied by 3 for forward + backward. The
      factor 3 is the usual approximation (backward ~ 2 x forward); FlopCounterMode counts the
      matmul/convolution-type operations it knows (the loss and metrics add a little), not
      element-wise ones. Under DDP each rank measures the same figure on its own first batch.

    The stop decision is reduced across ranks (any rank stopping stops all); every rank computes
    the same counts by construction, so this costs one boolean all-reduce per step under DDP.

    Logged every ``trainer.log_every_n_steps`` optimizer steps and at the stop (straight to the
    loggers, rank 0): ``budget/samples``, ``budget/optimizer_steps``, ``budget/flops`` (once known),
    ``budget/fraction_used`` (the largest fraction over the set budgets).

    Attributes:
        samples_seen: samples trained on (all ranks).
        optimizer_steps: optimizer steps taken (``trainer.global_step`` at the last batch).
        flops_per_sample: training FLOPs per sample (given or measured), ``None`` before.
        flops: ``samples_seen * flops_per_sample`` (``None`` while unknown).
        stopped: whether this callback stopped the fit; ``stopping_reason_message`` says why.

    Args:
        max_samples: stop after this many training samples (int >= 1).
        max_optimizer_steps: stop after this many optimizer steps (int >= 1).
        max_flops: stop after this many training FLOPs (> 0).
        flops_per_sample: training FLOPs per sample (forward + backward), instead of measuring.
        verbose: log the stop at INFO level.

    Raises:
        ValueError: when no budget is set or a value is out of range (naming it).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> budget = TrainingBudget(max_samples=50_000, max_optimizer_steps=2_000)
        >>> trainer = Trainer(callbacks=[budget], max_epochs=100, logger=False)
        >>> # trainer.fit(...) ends at whichever budget is spent first
    """

    def __init__(
        self,
        max_samples: int | None = None,
        max_optimizer_steps: int | None = None,
        max_flops: float | None = None,
        flops_per_sample: float | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("max_samples", max_samples), ("max_optimizer_steps", max_optimizer_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be an int >= 1 or None, got {value!r}")
        for name, value in (("max_flops", max_flops), ("flops_per_sample", flops_per_sample)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"`{name}` must be a finite number > 0 or None, got {value!r}")
        if max_samples is None and max_optimizer_steps is None and max_flops is None:
            raise ValueError(
                "set at least one of `max_samples`, `max_optimizer_steps`, `max_flops` (got all None)"
            )
        self.max_samples = max_samples
        self.max_optimizer_steps = max_optimizer_steps
        self.max_flops = None if max_flops is None else float(max_flops)
        self.verbose = verbose
        self.flops_per_sample: float | None = None if flops_per_sample is None else float(flops_per_sample)
        self.samples_seen = 0
        self.optimizer_steps = 0
        self.stopped = False
        self.stopping_reason_message: str | None = None
        self._counter: FlopCounterMode | None = None
        self._counter_batch_size = 0
        self._last_logged_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            max_samples=self.max_samples, max_optimizer_steps=self.max_optimizer_steps, max_flops=self.max_flops
        )

    @property
    def flops(self) -> float | None:
        return None if self.flops_per_sample is None else self.samples_seen * self.flops_per_sample

    def fractions(self) -> dict[str, float]:
        """Fraction used of each set budget (FLOPs count as 0 while the per-sample figure is unknown)."""
        return budget_fractions(
            {"samples": self.samples_seen, "optimizer_steps": self.optimizer_steps, "flops": self.flops or 0.0},
            {"samples": self.max_samples, "optimizer_steps": self.max_optimizer_steps, "flops": self.max_flops},
        )

    # -- FLOPs measurement on the first batch -------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.max_flops is not None and self.flops_per_sample is None and self._counter is None:
            self._counter_batch_size = extract_batch_size(batch)
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._finish_measurement()

    def _finish_measurement(self) -> None:
        if self._counter is None:
            return
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        forward = counter.get_total_flops()
        if forward == 0:
            rank_zero_warn(
                "TrainingBudget: FlopCounterMode counted no FLOPs in the first training_step; `max_flops`"
                " cannot be enforced. Pass `flops_per_sample`."
            )
        self.flops_per_sample = TRAINING_FLOPS_PER_FORWARD_FLOP * forward / max(1, self._counter_batch_size)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:  # never leave the dispatch mode pushed
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)

    # -- counting and the decision -------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._finish_measurement()  # a training_step without backward (e.g. returned None)
        self.samples_seen += extract_batch_size(batch) * trainer.world_size
        self.optimizer_steps = trainer.global_step
        fractions = self.fractions()
        spent = [name for name, f in fractions.items() if f >= 1.0]
        should_stop = trainer.strategy.reduce_boolean_decision(bool(spent), all=False)
        if should_stop and not self.stopped:
            self.stopped = True
            detail = ", ".join(f"{n} {self._used(n):.6g} >= {self._limit(n):.6g}" for n in spent)
            self.stopping_reason_message = (
                f"Training budget spent: {detail}. Signaling Trainer to stop."
                if spent
                else "Another rank spent its training budget. Signaling Trainer to stop."
            )
            if self.verbose:
                rank_zero_info(self.stopping_reason_message)
        trainer.should_stop = trainer.should_stop or should_stop
        step = trainer.global_step
        if should_stop or (step != self._last_logged_step and step % max(1, trainer.log_every_n_steps) == 0):
            self._last_logged_step = step
            self._log(trainer, fractions)

    def _used(self, name: str) -> float:
        return {"samples": self.samples_seen, "optimizer_steps": self.optimizer_steps, "flops": self.flops or 0.0}[name]

    def _limit(self, name: str) -> float:
        return {"samples": self.max_samples, "optimizer_steps": self.max_optimizer_steps, "flops": self.max_flops}[name]

    def _log(self, trainer: pl.Trainer, fractions: dict[str, float]) -> None:
        metrics = {
            "budget/samples": float(self.samples_seen),
            "budget/optimizer_steps": float(self.optimizer_steps),
            "budget/fraction_used": max(fractions.values()),
        }
        if self.flops is not None:
            metrics["budget/flops"] = float(self.flops)
        log_scalars(trainer, metrics)

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "samples_seen": self.samples_seen,
            "optimizer_steps": self.optimizer_steps,
            "flops_per_sample": self.flops_per_sample,
            "stopped": self.stopped,
            "stopping_reason_message": self.stopping_reason_message,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = int(state_dict.get("samples_seen", self.samples_seen))
        self.optimizer_steps = int(state_dict.get("optimizer_steps", self.optimizer_steps))
        fps = state_dict.get("flops_per_sample", self.flops_per_sample)
        self.flops_per_sample = None if fps is None else float(fps)
        self.stopped = bool(state_dict.get("stopped", self.stopped))
        self.stopping_reason_message = state_dict.get("stopping_reason_message", self.stopping_reason_message)
