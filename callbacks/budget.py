"""TrainingBudget: stop a fit at a compute budget (samples, optimizer steps or FLOPs).

The budget counts what was actually trained on, so it stays meaningful when the batch size or the
input size changes during training: samples are summed batch by batch, optimizer steps are read
from ``trainer.global_step``, and FLOPs are summed batch by batch from the per-sample training FLOPs
of the batch's input shape.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.flop_counter import FlopCounterMode

from ._checks import ConfigurationError, check_bool, check_int, check_number
from ._logging import CadenceLog
from .engine import cached_state_key
from .stop_notices import announce_stop, forget_notices

__all__ = ["TrainingBudget", "budget_fractions", "input_shape_key"]

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


def _batch_size(batch: Any) -> int:
    """``extract_batch_size(batch)``, without its walk over the batch for the usual ``[inputs, ...]``."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].ndim:
        return int(batch[0].shape[0])
    return extract_batch_size(batch)


def input_shape_key(batch: Any) -> tuple[tuple[int, ...], ...]:
    """The per-sample shapes of every tensor in ``batch`` (batch dimension dropped), in order.

    Batches with the same key cost the same FLOPs per sample; a new key (progressive resizing, a
    new sequence length) needs a new measurement. Reads shapes only: no device sync.

    Example:
        >>> import torch
        >>> input_shape_key((torch.zeros(8, 3, 16, 16), torch.zeros(8)))
        ((3, 16, 16), ())
    """
    shapes: list[tuple[int, ...]] = []
    apply_to_collection(batch, torch.Tensor, lambda t: shapes.append(tuple(t.shape[1:])))
    return tuple(shapes)


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
      training is counted as it was;
    - optimizer steps: ``trainer.global_step``;
    - FLOPs: each batch's samples times the training FLOPs per sample *of its input shape*
      (:func:`input_shape_key`), summed batch by batch. The per-sample figure is
      ``flops_per_sample`` if given, else measured on the first batch of every new input shape
      (so progressive resizing or a new sequence length is re-measured) by running the
      LightningModule's own ``training_step`` forward under
      ``torch.utils.flop_counter.FlopCounterMode`` (from ``on_train_batch_start`` until
      ``on_before_backward``: no extra pass, any module works), divided by the batch size and
      multiplied by 3 for forward + backward. FlopCounterMode counts matmul/convolution-type
      operations from shapes alone (no device sync); the factor 3 is the usual approximation.

    **DDP.** Every rank counts the same numbers by construction (samples from its batch size times
    the world size -- Lightning's ``DistributedSampler`` gives every rank equally sized batches --
    and ``trainer.global_step``), so every rank reaches the same decision at the same batch with no
    collective and no host sync in any step. FLOPs assume every rank trains on the same input shape
    at the same step (as a shared resizing schedule does).

    Every fit starts a new budget (counts reset in ``setup``); a resumed fit continues the
    checkpointed counts.

    Logged at Lightning's ``log_every_n_steps`` cadence and at the stop (straight to the loggers,
    rank 0): ``budget/samples``, ``budget/optimizer_steps``, ``budget/flops`` (when counted),
    ``budget/fraction_used`` (the largest fraction over the set budgets).

    Attributes:
        samples_seen: samples trained on (all ranks).
        optimizer_steps: optimizer steps taken (``trainer.global_step`` at the last batch).
        flops: training FLOPs counted (all ranks), ``None`` when FLOPs are not counted.
        flops_per_sample: the given figure, else the one measured for the latest input shape.
        flops_per_sample_by_shape: ``{input_shape_key: training FLOPs per sample}`` measured.
        stopped: whether this callback stopped the fit; ``stopping_reason_message`` says why.

    Args:
        max_samples: stop after this many training samples (int >= 1).
        max_optimizer_steps: stop after this many optimizer steps (int >= 1).
        max_flops: stop after this many training FLOPs (> 0).
        flops_per_sample: training FLOPs per sample (forward + backward), instead of measuring.
        verbose: log the stop at INFO level.

    Raises:
        ConfigurationError: when no budget is set or a value is out of range (naming it).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> budget = TrainingBudget(max_samples=50_000, max_optimizer_steps=2_000)
        >>> trainer = Trainer(callbacks=[budget], max_epochs=100, logger=False)
        >>> budget.fractions()
        {'samples': 0.0, 'optimizer_steps': 0.0}
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
        check_int("max_samples", max_samples, minimum=1, optional=True)
        check_int("max_optimizer_steps", max_optimizer_steps, minimum=1, optional=True)
        check_number("max_flops", max_flops, low=0.0, low_inclusive=False, optional=True)
        check_number("flops_per_sample", flops_per_sample, low=0.0, low_inclusive=False, optional=True)
        check_bool("verbose", verbose)
        if max_samples is None and max_optimizer_steps is None and max_flops is None:
            raise ConfigurationError(
                "set at least one of `max_samples`, `max_optimizer_steps`, `max_flops` (got all None)"
            )
        self.max_samples = max_samples
        self.max_optimizer_steps = max_optimizer_steps
        self.max_flops = None if max_flops is None else float(max_flops)
        self.verbose = verbose
        self._given_flops_per_sample = None if flops_per_sample is None else float(flops_per_sample)
        self._log = CadenceLog()
        self._counter: FlopCounterMode | None = None
        self._reset()

    def _reset(self) -> None:
        self.samples_seen = 0
        self.optimizer_steps = 0
        counting = self.max_flops is not None or self._given_flops_per_sample is not None
        self.flops: float | None = 0.0 if counting else None
        self.flops_per_sample: float | None = self._given_flops_per_sample
        self.flops_per_sample_by_shape: dict[tuple, float] = {}
        self.stopped = False
        self.stopping_reason_message: str | None = None
        self._shape: tuple | None = None
        self._measuring: tuple | None = None
        self._measured_batch_size = 0
        self._log.reset()

    @property
    def state_key(self) -> str:
        return cached_state_key(self, 
            max_samples=self.max_samples, max_optimizer_steps=self.max_optimizer_steps, max_flops=self.max_flops
        )

    def fractions(self) -> dict[str, float]:
        """Fraction used of each set budget."""
        return budget_fractions(
            {"samples": self.samples_seen, "optimizer_steps": self.optimizer_steps, "flops": self.flops or 0.0},
            {"samples": self.max_samples, "optimizer_steps": self.max_optimizer_steps, "flops": self.max_flops},
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new budget for every fit; a resume loads the counts after this
            self._reset()
            forget_notices(self)

    # -- FLOPs: measured on the first batch of every input shape ------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.flops is None or self._given_flops_per_sample is not None:
            return
        self._shape = input_shape_key(batch)
        if self._shape not in self.flops_per_sample_by_shape and self._counter is None:
            self._measuring, self._measured_batch_size = self._shape, extract_batch_size(batch)
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
                f"TrainingBudget: FlopCounterMode counted no FLOPs in a training_step (input shape {self._measuring});"
                " `max_flops` cannot be enforced for it. Pass `flops_per_sample`."
            )
        per_sample = TRAINING_FLOPS_PER_FORWARD_FLOP * forward / max(1, self._measured_batch_size)
        self.flops_per_sample_by_shape[self._measuring] = per_sample
        self.flops_per_sample = per_sample

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:  # never leave the dispatch mode pushed
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)

    # -- counting and the decision (local: every rank holds the same counts) -------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is not None:
            self._finish_measurement()  # a training_step without backward (e.g. returned None)
        samples = _batch_size(batch) * trainer.world_size
        self.samples_seen += samples
        self.optimizer_steps = trainer.global_step
        if self.flops is not None:
            per_sample = self._given_flops_per_sample
            if per_sample is None:
                per_sample = self.flops_per_sample_by_shape.get(self._shape, 0.0)
            self.flops += samples * per_sample
        if not (self.stopped or self._any_spent()):  # the common case: no fraction needed
            if not self._log.skip_step(trainer):
                self._log(trainer, self._metrics(self.fractions()))
            return
        fractions = self.fractions()
        spent = [name for name, f in fractions.items() if f >= 1.0]
        first_stop = bool(spent) and not self.stopped
        if first_stop:
            self.stopped = True
            detail = ", ".join(f"{n} {self._used(n):.6g} >= {self._limit(n):.6g}" for n in spent)
            self.stopping_reason_message = f"Training budget spent: {detail}. Signaling Trainer to stop."
            announce_stop(self, trainer.current_epoch, self.stopping_reason_message)
        if spent:  # again at every batch min_epochs/min_steps still make Lightning run
            trainer.should_stop = True
        if first_stop or not self._log.skip_step(trainer):  # the metrics are built only when logged
            self._log(trainer, self._metrics(fractions), force=first_stop)

    def _any_spent(self) -> bool:
        return (
            (self.max_samples is not None and self.samples_seen >= self.max_samples)
            or (self.max_optimizer_steps is not None and self.optimizer_steps >= self.max_optimizer_steps)
            or (self.max_flops is not None and (self.flops or 0.0) >= self.max_flops)
        )

    def _used(self, name: str) -> float:
        return {"samples": self.samples_seen, "optimizer_steps": self.optimizer_steps, "flops": self.flops or 0.0}[name]

    def _limit(self, name: str) -> float:
        return {"samples": self.max_samples, "optimizer_steps": self.max_optimizer_steps, "flops": self.max_flops}[name]

    def _metrics(self, fractions: dict[str, float]) -> dict[str, float]:
        metrics = {
            "budget/samples": float(self.samples_seen),
            "budget/optimizer_steps": float(self.optimizer_steps),
            "budget/fraction_used": max(fractions.values()),
        }
        if self.flops is not None:
            metrics["budget/flops"] = float(self.flops)
        return metrics

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "samples_seen": self.samples_seen,
            "optimizer_steps": self.optimizer_steps,
            "flops": self.flops,
            "flops_per_sample_by_shape": dict(self.flops_per_sample_by_shape),
            "stopped": self.stopped,
            "stopping_reason_message": self.stopping_reason_message,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = int(state_dict.get("samples_seen", self.samples_seen))
        self.optimizer_steps = int(state_dict.get("optimizer_steps", self.optimizer_steps))
        self.flops_per_sample_by_shape.update(state_dict.get("flops_per_sample_by_shape", {}))
        flops = state_dict.get("flops")
        old_figure = state_dict.get("flops_per_sample")  # a checkpoint from before per-shape counting
        if flops is None and old_figure is not None and self.flops is not None:
            flops = self.samples_seen * float(old_figure)
        if flops is not None and self.flops is not None:
            self.flops = float(flops)
        self.stopped = bool(state_dict.get("stopped", self.stopped))
        self.stopping_reason_message = state_dict.get("stopping_reason_message", self.stopping_reason_message)
