"""AdaptiveBatchSize: the batch size follows the measured gradient noise scale, epoch by epoch.

The responsive batch sizing of the tutorial: grow the batch while gradients are noisy (a large
``B_simple``: many samples are needed to see the gradient), shrink it when they are consistent.
The measurement is :class:`~epochwise.callbacks.GradientNoiseScale`'s; the batch size is the
engine's (:class:`~epochwise.callbacks.controller.BatchSizeController`), so the twin loader,
accumulation above ``max_per_device``, resume and :class:`~epochwise.callbacks.LRScaling` work as
for any schedule.

Why epochs: the engine lays out each epoch before it starts (its length fixes Lightning's progress
bar, epoch end and ``val_check_interval``, and the loader's workers produce index batches ahead of
training), so a size decided at an epoch boundary is exact from the epoch's first batch, on every
rank. A decision is made when the epoch is planned, from the noise scale measured up to the last
step of the previous epoch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import IterableDataset
from typing_extensions import override

from ._checks import ConfigurationError, check_int, check_number, is_number
from ._logging import log_metrics
from .controller import BatchSizeController
from .engine import length_or_none
from .gradient_noise import GradientNoiseScale

__all__ = ["AdaptiveBatchSize", "next_batch_size", "MIN_POW2_HYSTERESIS"]

#: The smallest hysteresis with which power-of-two steps never oscillate on a constant target:
#: a grow from ``c`` to ``2c`` needs ``target > c (1 + h)``, the shrink back ``target < 2c / (1 + h)``,
#: both hold only if ``(1 + h)^2 < 2``.
MIN_POW2_HYSTERESIS = math.sqrt(2.0) - 1.0


def next_batch_size(
    current: int,
    target: float | None,
    min_size: int,
    max_size: int,
    step: Literal["pow2"] | float = "pow2",
    hysteresis: float = 0.5,
) -> int:
    """The next batch size: one step from ``current`` toward ``target``, or ``current``.

    Nothing moves while ``target`` is within ``[current / (1 + h), current (1 + h)]`` (``h`` the
    hysteresis), or is ``None`` or NaN (``+inf`` grows, ``0`` shrinks). Outside it the size doubles or halves
    (``step="pow2"``, halving rounds half up), or moves toward the target by a factor of at most
    ``step`` without passing it (a bounded ratio, ``step > 1``: rounded down when growing, up
    when shrinking). The result is clamped to ``[min_size, max_size]``.

    A constant target never makes the size oscillate: a bounded-ratio step never passes it, and a
    power-of-two step with ``h >= sqrt(2) - 1`` (:data:`MIN_POW2_HYSTERESIS`) cannot grow then shrink.

    Example:
        >>> [next_batch_size(32, t, 8, 256) for t in (40.0, 100.0, 24.0, 10.0)]
        [32, 64, 32, 16]
        >>> next_batch_size(32, 100.0, 8, 256, step=1.5), next_batch_size(32, 40.0, 8, 256, step=1.5, hysteresis=0.1)
        (48, 40)
    """
    if target is None or math.isnan(target):
        return current
    target = max(0.0, target)
    band = 1.0 + hysteresis
    if target > current * band:
        if step == "pow2":
            new = current * 2
        else:
            new = max(current, math.floor(current * min(float(step), target / current)))
    elif target < current / band:
        if step == "pow2":
            new = math.floor(current / 2 + 0.5)
        else:
            ratio = current / target if target > 0 else math.inf
            new = min(current, math.ceil(current / min(float(step), ratio)))
    else:
        return current
    return int(min(max_size, max(min_size, new)))


class AdaptiveBatchSize(BatchSizeController):
    """Move the batch size toward the measured noise scale at epoch boundaries.

    Every ``every_n_epochs`` epochs, when the epoch is planned, the target per-device batch is
    ``target_scale x B_simple / (world size x accumulation)`` (``B_simple`` is a global batch:
    :class:`~epochwise.callbacks.GradientNoiseScale`'s smoothed value, measured up to the last step
    of the previous epoch) and the size takes one step toward it (:func:`next_batch_size`: power
    of two or bounded ratio, with hysteresis). Before the first measurement the size is ``start``.

    - **LR**: :class:`~epochwise.callbacks.LRScaling` reads the engine's plan, so it follows.
    - **DDP**: every rank holds the same ``B_simple`` (the noise scale is all-reduced with the
      gradients); the decision is also broadcast from rank 0 at the epoch boundary (never in a
      per-step hook), so every rank plans the same epoch.
    - **Resume**: the size of every planned epoch is checkpointed and, with the noise scale's
      own state, a resumed fit makes the same decisions.
    - **Refused** (``ConfigurationError``): no ``GradientNoiseScale`` in the Trainer; a step
      scheduler with a fixed horizon (the number of steps is not known ahead: use
      :class:`~epochwise.callbacks.SampleBasedLRSchedule`); an integer ``val_check_interval`` or a
      fractional ``limit_train_batches`` that an epoch at ``max_size`` could not honour.
      ``trainer.estimated_stepping_batches`` is Lightning's own (the first epoch x ``max_epochs``).

    Args:
        min_size, max_size: bounds of the per-device batch size.
        start: per-device size of the first epoch (default: the loader's, within the bounds).
        every_n_epochs: epochs between decisions.
        step: ``"pow2"`` (double or halve) or a float ``> 1``, the largest factor of one move.
        hysteresis: dead band ``h`` around the current size (see :func:`next_batch_size`); at
            least ``sqrt(2) - 1`` with ``step="pow2"``.
        target_scale: the target global batch as a multiple of ``B_simple``.
        noise_scale: the :class:`GradientNoiseScale` to follow (default: the one in the Trainer's callbacks).
        max_per_device, seed: as in :class:`~epochwise.callbacks.BatchSizeWarmup`.

    Logged (rank 0, at each decision): ``batch_size/target`` (per device); the sizes themselves as
    every controller logs them (``batch_size/per_device`` ...).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from epochwise.callbacks import GradientNoiseScale
        >>> adaptive = AdaptiveBatchSize(min_size=16, max_size=512, start=32)
        >>> trainer = Trainer(callbacks=[GradientNoiseScale(), adaptive], max_epochs=20, logger=False)
        >>> adaptive.next_size(32, b_simple=200.0)  # one step toward a target of 200 samples
        64
    """

    adaptive = True

    def __init__(
        self,
        min_size: int,
        max_size: int,
        start: int | None = None,
        every_n_epochs: int = 1,
        step: Literal["pow2"] | float = "pow2",
        hysteresis: float = 0.5,
        target_scale: float = 1.0,
        noise_scale: GradientNoiseScale | None = None,
        max_per_device: int | Literal["auto"] | None = None,
        seed: int | None = None,
    ) -> None:
        self.min_size = int(check_int("min_size", min_size, minimum=1))  # type: ignore[arg-type]
        self.max_size = int(check_int("max_size", max_size, minimum=self.min_size))  # type: ignore[arg-type]
        self.start = check_int("start", start, minimum=self.min_size, maximum=self.max_size, optional=True)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        if step != "pow2":
            check_number("step", step, 1.0, low_inclusive=False)
        self.step = step
        low = MIN_POW2_HYSTERESIS if step == "pow2" else 0.0
        if not (is_number(hysteresis) and hysteresis >= low):  # type: ignore[operator]
            raise ConfigurationError(
                f"`hysteresis` must be a number >= {low:.4f} with step={step!r} (a smaller dead band lets the "
                f"size oscillate between two values), got {hysteresis!r}"
            )
        self.hysteresis = float(hysteresis)  # type: ignore[arg-type]
        self.target_scale = check_number("target_scale", target_scale, 0.0, low_inclusive=False)
        if noise_scale is not None and not isinstance(noise_scale, GradientNoiseScale):
            raise ConfigurationError(f"`noise_scale` must be a GradientNoiseScale or None, got {noise_scale!r}")
        self.noise_scale = noise_scale
        super().__init__(unit="epoch", max_per_device=max_per_device, seed=seed)

    def next_size(self, current: int, b_simple: float | None, world_size: int = 1, accumulation: int = 1) -> int:
        """The size after ``current`` for a measured (global) ``B_simple`` (:func:`next_batch_size`)."""
        target = None if b_simple is None else self.target_scale * b_simple / (world_size * accumulation)
        return next_batch_size(current, target, self.min_size, self.max_size, self.step, self.hysteresis)

    @property
    def decisions(self) -> dict[int, int]:
        """The per-device size of every epoch planned in this fit, or in the last one (``{epoch: size}``)."""
        if self._fit is None:
            return {int(e): int(n) for e, n in ((self._last_state or {}).get("decisions") or {}).items()}
        return dict(self._decisions)

    def largest_batch_size(self) -> int:
        return self.max_size

    def _wrap_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        if isinstance(getattr(loader, "dataset", None), IterableDataset) and length_or_none(loader.dataset) is None:
            raise ConfigurationError(
                f"{type(self).__name__} decides a size per epoch and needs epochs of known length, but the train "
                "data is a stream without __len__ (an IterableDataset): give the dataset a __len__, or schedule "
                "the size per step with BatchSizeWarmup(unit='step')."
            )
        return super()._wrap_loader(trainer, loader)

    # -- per fit -------------------------------------------------------------------------------
    def _reset_fit(self) -> None:
        super()._reset_fit()
        self._decisions: dict[int, int] = {}
        self._trainer: pl.Trainer | None = None
        self._noise: GradientNoiseScale | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._trainer = trainer
        self._noise = self.noise_scale or next(
            (c for c in trainer.callbacks if isinstance(c, GradientNoiseScale)), None  # type: ignore[attr-defined]
        )
        if self._noise is None:
            raise ConfigurationError(
                f"{type(self).__name__} follows the gradient noise scale: add GradientNoiseScale() to the "
                "Trainer's callbacks (or pass noise_scale=...)."
            )

    def measured_noise_scale(self, trainer: pl.Trainer) -> float | None:
        """The smoothed ``B_simple`` now (one device read), ``None`` before any measurement.

        When noise swamps the gradient the smoothed ``|G|^2`` estimate can be 0 or negative while
        ``tr(Sigma)`` is positive: the batch should grow, so that reads as ``inf``. A ``tr(Sigma)``
        estimate at or below 0 (no noise detected) reads as 0: the batch may shrink.
        """
        if self._noise is None:
            return None
        values = self._noise.estimator.values()
        grad_sq, trace = values["grad_sq_norm"], values["trace_cov"]
        if values["measurements"] == 0 or math.isnan(grad_sq) or math.isnan(trace):
            return None
        if trace <= 0:
            return 0.0
        return trace / grad_sq if grad_sq > 0 else math.inf

    # -- the schedule: decided once per epoch, when the engine plans it ------------------------
    def scheduled_batch_size(self, epoch: int, step: int) -> int:
        size = self._decisions.get(epoch)
        if size is not None:
            return size
        earlier = [e for e in self._decisions if e < epoch]
        if not earlier:
            size = self._first_size()
        else:
            size = self._decisions[max(earlier)]
            if epoch % self.every_n_epochs == 0 and self._trainer is not None:
                size = self._decide(self._trainer, size)
        self._decisions[epoch] = size
        return size

    def _first_size(self) -> int:
        if self.start is not None:
            return self.start
        return int(min(self.max_size, max(self.min_size, self._loader_batch_size or self.min_size)))

    def _decide(self, trainer: pl.Trainer, current: int) -> int:
        b_simple = self.measured_noise_scale(trainer)
        new = self.next_size(current, b_simple, self._world_size, self._base_accumulation)
        new = int(trainer.strategy.broadcast(new, src=0))  # epoch boundary: every rank plans the same epoch
        if b_simple is not None:
            target = self.target_scale * b_simple / (self._world_size * self._base_accumulation)
            log_metrics(trainer, {"batch_size/target": float(target)})
        return new

    @override
    def _end_fit(self, trainer: pl.Trainer) -> None:
        self._trainer = None
        super()._end_fit(trainer)

    # -- checkpointing -------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._fit is not None:
            state["decisions"] = {str(e): int(n) for e, n in self._decisions.items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._decisions = {int(e): int(n) for e, n in (state_dict.get("decisions") or {}).items()}
