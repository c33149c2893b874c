"""Checks of a fit against the batch-size plan, run by :class:`BatchSizeController` before training.

The controller simulates the whole fit from its schedule (:func:`plans.simulate_fit`) and refuses,
at setup or at ``on_train_start``, every Trainer configuration some epoch of the plan cannot honour:
a strategy it is not proven under, ``limit_train_batches`` that empties an epoch, an int
``val_check_interval`` longer than an epoch, a step-based LR scheduler that runs out before the
fit ends. Each error names the flag and the alternative (``docs/ENGINE.md``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from ._checks import ConfigurationError
from ._lightning_internals import validates_by_time
from .plans import FitStep, simulate_fit

if TYPE_CHECKING:
    from .controller import BatchSizeController

__all__ = ["check_trainer", "simulate", "total_steps", "validate_fit", "val_check_error"]


def check_trainer(controller: BatchSizeController, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse, at setup, a strategy or optimization mode the engine is not proven under."""
    name = type(controller).__name__
    strategy = trainer.strategy
    if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
        raise ConfigurationError(
            f"{name} is proven on a single device and under DDP (strategy='ddp', 'ddp_spawn', "
            f"...), not under strategy={type(strategy).__name__}: use one of those, or remove "
            f"{name}."
        )
    if not pl_module.automatic_optimization and controller.max_per_device is not None:
        raise ConfigurationError(
            f"{name}(max_per_device={controller.max_per_device!r}) keeps the effective batch with "
            "Trainer(accumulate_grad_batches), which Lightning ignores under manual optimization "
            "(automatic_optimization=False): pass max_per_device=None, or use automatic optimization."
        )
    if trainer.limit_train_batches == 0:
        raise ConfigurationError(f"{name}: limit_train_batches=0 trains nothing; remove {name} or the limit")


def simulate(controller: BatchSizeController, trainer: pl.Trainer, largest: bool = False) -> list[FitStep] | None:
    """The whole fit, epoch by epoch (``None`` when it cannot be known ahead); ``largest=True``:
    the fit at the largest size the schedule may ask for (an adaptive controller's shortest epochs)."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if (max_epochs is None or max_epochs < 0) and max_steps < 0:
        return None
    if controller._samples is None and max_steps < 0:
        return None
    if largest:
        size = controller.largest_batch_size()
        if size is None:
            return None
        return simulate_fit(
            lambda e, s: controller._make_plan(e, s, lambda *_: size), max_epochs, max_steps, trainer.limit_train_batches
        )
    if controller.adaptive:
        return None
    return simulate_fit(controller._make_plan, max_epochs, max_steps, trainer.limit_train_batches)

def total_steps(controller: BatchSizeController, trainer: pl.Trainer) -> int | None:
    """Optimizer steps of the whole fit (``None`` when the plan cannot know it ahead)."""
    fit = simulate(controller, trainer)
    if fit is None or any(math.isinf(f.steps) for f in fit):
        return None
    return int(sum(f.steps for f in fit))

def validate_fit(controller: BatchSizeController, trainer: pl.Trainer) -> None:
    """Refuse, before the first step, a configuration some epoch of the plan cannot honour."""
    name = type(controller).__name__
    fit = simulate(controller, trainer, largest=controller.adaptive)

    def where(f: FitStep) -> str:
        if controller.adaptive:
            return f"at its largest batch size, {controller.largest_batch_size()}, an epoch has {f.batches} batches"
        return f"epoch {f.epoch} has {f.batches} batches"

    for f in fit or []:
        if f.batches == 0:
            which = "an epoch at the largest batch size" if controller.adaptive else f"epoch {f.epoch}"
            raise ConfigurationError(
                f"{name}: limit_train_batches={trainer.limit_train_batches} leaves {which} "
                f"with 0 batches (its batch size is {f.first_size}); use an int limit or a larger fraction"
            )
    interval = trainer.val_check_interval
    if (
        isinstance(interval, int)
        and not validates_by_time(trainer)
        and trainer.check_val_every_n_epoch is not None
        and trainer.limit_val_batches != 0
    ):
        short = [f for f in fit or [] if f.batches < interval]
        if short:
            raise val_check_error(controller, interval, where(short[0]))
    total = total_steps(controller, trainer)
    for config in trainer.lr_scheduler_configs:
        scheduler = getattr(config.scheduler, "scheduler", config.scheduler)
        needed = getattr(scheduler, "total_steps", None)
        if config.interval != "step" or needed is None:
            continue
        if total is None or needed < total:
            raise ConfigurationError(
                f"{type(scheduler).__name__}(total_steps={needed}) would run out before the fit ends: "
                f"with {name} the fit takes {total if total is not None else 'an unknown number of'} "
                "optimizer steps. Size it from trainer.estimated_stepping_batches read in "
                "configure_optimizers (epochwise makes it exact), or use SampleBasedLRSchedule."
            )

def val_check_error(controller: BatchSizeController, interval: int, where: str) -> ConfigurationError:
    """The refusal of an int ``val_check_interval`` longer than some epoch of the plan."""
    return ConfigurationError(
        f"{type(controller).__name__}: val_check_interval={interval} batches is more than an epoch holds "
        f"once the batch size changes ({where}), so validation would silently stop. Use a float "
        "val_check_interval (a fraction of each epoch), or check_val_every_n_epoch=None to "
        "validate every N batches across epochs."
    )
