"""The one LR path: every epochwise callback that moves the learning rate sets a factor on it.

``lr = scheduler_lr x product(factors)`` in every param group, where ``scheduler_lr`` (the
*unscaled* LR) is what the optimizer would have without epochwise: its initial LR as moved by its
LR schedulers and by the user's own code. So scaling, warmup, a sample-based schedule and a
snapshot ensemble's cycle compose in any order, with each other and with any scheduler, and a
factor of 0 (warmup from zero) loses nothing.

Schedulers keep working on their own, unscaled values: while a fit runs, each scheduler in
Lightning's ``trainer.lr_scheduler_configs`` is stood in for by a :class:`ScaledScheduler`, which
puts the unscaled LRs back into the optimizer, steps the user's scheduler and applies the factors
again. The user's scheduler object itself is never changed (same class, picklable), and Lightning's
config gets it back at the end of the fit. A chainable scheduler (StepLR, ReduceLROnPlateau) thus
never compounds a factor, and a closed-form one (OneCycleLR, LambdaLR) is never overridden.

:class:`LRFactorCallback` is the base class of every LR callback: it computes its factor from
trainer state before each training batch; the path logs the LR actually used, once per optimizer
step, at Lightning's cadence and whenever a factor that moves in jumps (batch-size scaling) changes.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning.pytorch as pl
from torch.optim import Optimizer
from typing_extensions import override

from ._checks import ConfigurationError
from ._lightning_internals import is_logging_step, logging_step
from ._logging import log_metrics
from .engine import FitScopedCallback, FitState, fit_state, release_fit_state

__all__ = ["LRPath", "ScaledScheduler", "LRFactorCallback", "LRMonitor", "lr_tags"]


def lr_tags(trainer: pl.Trainer) -> list[tuple[str, Optimizer, int]]:
    """``(tag, optimizer, group index)`` of every param group: ``lr/group{j}``, or ``lr/opt{i}_group{j}``
    with several optimizers: the one name of an LR in TensorBoard, whoever logs it."""
    optimizers = trainer.optimizers
    many = len(optimizers) > 1
    return [
        (f"lr/opt{i}_group{j}" if many else f"lr/group{j}", opt, j)
        for i, opt in enumerate(optimizers)
        for j in range(len(opt.param_groups))
    ]


class ScaledScheduler:
    """Stands in for a user's LR scheduler in Lightning's config while a fit runs.

    ``step()`` puts the unscaled LRs back, steps the wrapped scheduler, records its new unscaled
    LRs and applies the factors again. Everything else (``state_dict``, ``optimizer``,
    ``get_last_lr`` ...) is the wrapped scheduler's own, so checkpoints hold the scheduler's state
    exactly as without epochwise.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> path = LRPath(); path.bind([opt]); path.set_factor("scaling", 4.0); path.apply()
        >>> wrapped = ScaledScheduler(sched, path)
        >>> opt.step(); wrapped.step(); opt.param_groups[0]["lr"], sched.get_last_lr()
        (2.0, [0.5])
    """

    def __init__(self, scheduler: Any, path: LRPath, jumps: bool = False) -> None:
        self.scheduler = scheduler
        self.path = path
        self.jumps = jumps  # stepped once per epoch (or on a plateau): its changes are jumps

    def step(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = self.scheduler.optimizer
        self.path.unapply(optimizer)
        try:
            return self.scheduler.step(*args, **kwargs)
        finally:
            self.path.reapply(optimizer, jump=self.jumps)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        if name in ("scheduler", "path"):  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.scheduler, name)


class LRPath:
    """The single place where epochwise changes learning rates (one per fit, see the module doc).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> path = LRPath(); path.bind([opt])
        >>> path.set_factor("warmup", 0.5); path.set_factor("scaling", 2.0); path.apply()
        >>> opt.param_groups[0]["lr"], path.unscaled[(0, 0)]
        (0.1, 0.1)
    """

    def __init__(self) -> None:
        self.factors: dict[str, float] = {}
        self.discrete: set[str] = set()
        self.members: dict[str, str] = {}  # factor name -> callback class name
        self.unscaled: dict[tuple[int, int], float] = {}
        self.written: dict[tuple[int, int], float] = {}
        self.optimizers: list[Optimizer] = []
        self.attached = False
        self._logged_step = -1
        self._checked_step = -1
        self._logged_discrete: dict[str, float] = {}
        self._jumped = False
        self._applied_product: float | None = None

    # -- membership -----------------------------------------------------------------------------
    def register(self, name: str, owner: str, discrete: bool = False) -> None:
        """Claim factor ``name`` for this fit; two callbacks cannot set the same factor."""
        if name in self.members:
            raise ConfigurationError(
                f"two LR callbacks set the LR factor {name!r} ({self.members[name]} and {owner}); keep one"
            )
        self.members[name] = owner
        if discrete:
            self.discrete.add(name)

    @property
    def product(self) -> float:
        return math.prod(self.factors.values()) if self.factors else 1.0

    def set_factor(self, name: str, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"LR factor {name!r} must be finite and >= 0, got {value}")
        self.factors[name] = float(value)

    # -- binding to the fit ---------------------------------------------------------------------
    def bind(self, optimizers: list[Optimizer]) -> None:
        """Work on these optimizers (a plain loop's way in; Lightning fits use :meth:`attach`)."""
        self.optimizers = list(optimizers)

    def attach(self, trainer: pl.Trainer, state: FitState, saved: dict[str, Any] | None = None) -> None:
        """Bind to the Trainer's optimizers and stand in for its LR schedulers (once per fit).

        ``saved`` is a checkpointed :meth:`state_dict`: the optimizers then hold the scaled LRs of
        the interrupted run, and the unscaled ones are taken from it.
        """
        if self.attached:
            return
        self.attached = True
        self.bind(trainer.optimizers)
        if saved:
            self.load_state_dict(saved)
        for config in trainer.lr_scheduler_configs:
            original = config.scheduler
            if isinstance(original, ScaledScheduler):  # left over from a fit that crashed uncleanly
                original = original.scheduler
            jumps = config.interval == "epoch" or bool(config.reduce_on_plateau)
            config.scheduler = ScaledScheduler(original, self, jumps=jumps)

            def give_back(config: Any = config, original: Any = original) -> None:
                config.scheduler = original

            state.on_release("LR scheduler in Lightning's config", give_back)
        state.on_release("LR path", self._detach)

    def _detach(self) -> None:
        self.optimizers = []
        self.attached = False

    def _groups(self, only: Optimizer | None = None):
        for i, opt in enumerate(self.optimizers):
            if only is not None and opt is not only:
                continue
            for j, group in enumerate(opt.param_groups):
                yield (i, j), group

    # -- writing LRs ----------------------------------------------------------------------------
    def sync_unscaled(self, only: Optimizer | None = None) -> None:
        """Adopt an LR changed behind epochwise's back (user code) as the new unscaled value."""
        for key, group in self._groups(only):
            if key not in self.unscaled or group["lr"] != self.written.get(key):
                self.unscaled[key] = float(group["lr"])

    def apply(self) -> None:
        """Write ``unscaled x product`` into every param group (nothing to do when no factor and
        no LR changed since the last write: the common case, checked cheaply every batch)."""
        product = self.product
        if product == self._applied_product and self._as_written():
            return
        self.sync_unscaled()
        for key, group in self._groups():
            group["lr"] = self.written[key] = self.unscaled[key] * product
        self._applied_product = product

    def _as_written(self) -> bool:
        """Every param group still holds the LR the path wrote (one optimizer: a flat scan)."""
        written = self.written
        if len(self.optimizers) == 1:
            return all(group["lr"] == written.get((0, j)) for j, group in enumerate(self.optimizers[0].param_groups))
        return all(group["lr"] == written.get(key) for key, group in self._groups())

    def unapply(self, optimizer: Optimizer) -> None:
        """Put the unscaled LRs back into ``optimizer`` (around a scheduler step)."""
        self.sync_unscaled(optimizer)
        for key, group in self._groups(optimizer):
            group["lr"] = self.unscaled[key]

    def reapply(self, optimizer: Optimizer, jump: bool = False) -> None:
        """After a scheduler step: record the new unscaled LRs and scale them again.

        ``jump``: the step was an epoch-level (or plateau) change, logged at the next step.
        """
        product = self.product
        for key, group in self._groups(optimizer):
            before = self.unscaled.get(key)
            self.unscaled[key] = float(group["lr"])
            group["lr"] = self.written[key] = self.unscaled[key] * product
            self._jumped = self._jumped or (jump and before != self.unscaled[key])

    # -- logging --------------------------------------------------------------------------------
    def log(self, trainer: pl.Trainer) -> None:
        """Log the LRs in use and the factors, once per optimizer step: at Lightning's cadence, and
        at once when a factor that moves in jumps has changed since the last log."""
        if not trainer.loggers:
            return
        step = logging_step(trainer)
        if step == self._checked_step:  # several LR callbacks ask at every step: decide once
            return
        self._checked_step = step
        jumped = (
            self._jumped
            or self._logged_step < 0  # the LRs a fit starts with
            or any(self._logged_discrete.get(n) != self.factors.get(n) for n in self.discrete)
        )
        if not (jumped or is_logging_step(trainer)):
            return
        self._logged_step = step
        self._jumped = False
        self._logged_discrete = {n: self.factors[n] for n in self.discrete if n in self.factors}
        metrics = {tag: float(opt.param_groups[j]["lr"]) for tag, opt, j in lr_tags(trainer)}
        metrics.update({f"lr_factor/{name}": value for name, value in self.factors.items()})
        log_metrics(trainer, metrics, step)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "factors": dict(self.factors),
            "unscaled": [[i, j, v] for (i, j), v in self.unscaled.items()],
            "written": [[i, j, v] for (i, j), v in self.written.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factors.update(state.get("factors", {}))
        self.unscaled.update({(int(i), int(j)): float(v) for i, j, v in state.get("unscaled", [])})
        self.written.update({(int(i), int(j)): float(v) for i, j, v in state.get("written", [])})


class LRFactorCallback(FitScopedCallback):
    """Base class of every callback that moves the LR: one named factor on the fit's LR path.

    Subclasses set ``factor_name`` (and ``discrete = True`` for a factor that changes in jumps)
    and implement :meth:`lr_factor` from trainer state. Before every training batch the factor is
    set and applied; before every optimizer step the path logs the LR used (``lr/group{j}``) and
    the factors (``lr_factor/<name>``), at Lightning's cadence and at every jump of a discrete
    factor. State: the path's unscaled LRs, so a resumed fit continues from the right values.

    Example:
        >>> class Halve(LRFactorCallback):
        ...     factor_name = "halve"
        ...     def lr_factor(self, trainer, batch_idx):
        ...         return 0.5
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[Halve()], max_epochs=1, logger=False)
    """

    factor_name: ClassVar[str | None] = "factor"
    discrete: ClassVar[bool] = False

    def __init__(self) -> None:
        self._fit: FitState | None = None
        self._path: LRPath | None = None
        self._saved_path: dict[str, Any] | None = None
        self._last_state: dict[str, Any] | None = None

    def lr_factor(self, trainer: pl.Trainer, batch_idx: int) -> float:
        """This callback's LR factor for training batch ``batch_idx`` of the current epoch."""
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._saved_path = None  # per fit; a checkpoint's state is loaded after setup
        self._fit = state = fit_state(trainer)
        self._path = state.lr_path()  # type: ignore[union-attr]
        if self.factor_name is not None:
            self._path.register(self.factor_name, type(self).__name__, self.discrete)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._path.attach(trainer, self._fit, self._saved_path)  # type: ignore[union-attr, arg-type]
        self._saved_path = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.factor_name is None:
            return
        path = self._path
        path.set_factor(self.factor_name, self.lr_factor(trainer, batch_idx))  # type: ignore[union-attr]
        path.apply()  # type: ignore[union-attr]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._path.log(trainer)  # type: ignore[union-attr]

    @override
    def _end_fit(self, trainer: pl.Trainer) -> None:
        super()._end_fit(trainer)
        if self._path is not None:
            self._last_state = self.state_dict()["lr_path"]
        self._path = self._fit = None
        release_fit_state(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._path is not None:
            return {"lr_path": self._path.state_dict()}
        return {"lr_path": self._last_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_path = state_dict.get("lr_path")


class LRMonitor(LRFactorCallback):
    """Logs the learning rates under epochwise's one tag scheme, with or without other LR callbacks.

    ``lr/group{j}`` (``lr/opt{i}_group{j}`` with several optimizers): the LR each param group
    actually used, at Lightning's ``log_every_n_steps`` cadence and at the step of every jump
    (an epoch-level or plateau scheduler step, a batch-size rescaling). Use it instead of
    Lightning's ``LearningRateMonitor`` (``lr-Adam``...) so that runs with and without epochwise's
    LR callbacks overlay in TensorBoard; with LR callbacks present it changes nothing (the LR path
    logs once per step whoever asks).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LRMonitor()], max_epochs=1, logger=False)
    """

    factor_name = None
