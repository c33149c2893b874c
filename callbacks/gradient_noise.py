"""GradientNoiseScale: the gradient noise scale of a Lightning fit, measured where Lightning already
computes gradients at two batch sizes (the estimator and its formulas: :mod:`.noise_scale`).

Where the two batch sizes come from (``source="auto"`` picks, at every step, the first that applies):

1. ``"ddp"`` (DDP with more than one process): each rank's local gradient (batch ``b``) and the
   all-reduced one (batch ``W b``). A communication hook on the DDP wrapper
   (``trainer.strategy.model``, ``docs/LIGHTNING.md`` fact 10) adds up each bucket's squared norm
   before the all-reduce and sends this rank's total along in the last bucket's all-reduce (one
   more element, no extra collective), so every rank holds the mean of the local norms and the
   same estimate. Free apart from one reduction over the gradient.
2. ``"accumulation"`` (``accumulate_grad_batches > 1`` on one device): each micro-batch's gradient
   (a hook on every parameter sees the gradient of each backward before it is accumulated, divided
   by the accumulation as Lightning divides the loss, fact 23) against the accumulated one. Free
   apart from one reduction over the gradient per micro-batch.
3. ``"split"`` (anything else on one device): on a measured step the module's ``training_step`` runs
   once per micro-batch of the batch (``micro_batches`` equal parts, the same samples, the same
   total forward work) and returns their size-weighted mean loss, so the step's gradient is the
   whole batch's; before returning it takes each part's gradient with ``torch.autograd.grad``.
   Lightning zeroes gradients after ``training_step`` and before its backward (fact 8), so these
   extra gradients never reach the optimizer. **Extra cost**: about one more backward pass on each
   measured step, hence at most ``1 / every_n_steps`` of a backward per step on average. On
   measured steps layers that couple the samples of a batch (BatchNorm) see the parts, and values
   the step logs with ``on_step=True`` are the last part's (epoch aggregates are unchanged).

The "big" squared norm is always the gradient the optimizer is about to use, read in
``on_before_optimizer_step``: accumulated, all-reduced, unscaled by the AMP grad scaler and not yet
clipped (fact 23). Small norms taken from scaled gradients are divided by the scale squared. Not
supported: fp16 AMP with an optimizer that unscales inside its own ``step()`` (a fused Adam):
Lightning then leaves the gradient scaled in ``on_before_optimizer_step``.

Free in step time: the running sums stay on the device (tensor operations only); the values are
read back (one transfer) only at Lightning's logging cadence, and by :meth:`GradientNoiseScale.value`
(for example when :class:`~epochwise.callbacks.AdaptiveBatchSize` decides, once per epoch).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ._checks import ConfigurationError, check_bool, check_choice, check_int, check_number
from ._gns_sources import DDPNorms, gns_allreduce_hook, split_training_step
from ._lightning_internals import amp_grad_scale, is_logging_step, logging_step
from ._logging import log_metrics
from .engine import FitScopedCallback, batch_length, fit_state, release_fit_state
from .noise_scale import GradientNoiseEstimator, averaged_batch_size, effective_batch_sizes

__all__ = ["GradientNoiseScale"]

Source = Literal["auto", "ddp", "accumulation", "split"]
_LOGGED = ("b_simple", "grad_sq_norm", "trace_cov", "b_simple_raw", "grad_sq_norm_raw", "trace_cov_raw")


class GradientNoiseScale(FitScopedCallback):
    """Measure the gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` during ``fit`` (McCandlish et al. 2018).

    ``B_simple`` is in samples per optimizer step over all devices (the global batch): training at a
    batch much smaller wastes steps, much larger wastes samples. See the module docstring for where
    the two batch sizes come from and what each source costs.

    Args:
        every_n_steps: measure on every n-th optimizer step. Default: every step for the free
            sources (``"ddp"``, ``"accumulation"``), every 4th for ``"split"`` (its extra backward).
        ema_decay: smoothing of the estimates, per measurement, in ``[0, 1)``.
        source: ``"auto"``, or one of ``"ddp"``, ``"accumulation"``, ``"split"`` to insist on it
            (``"accumulation"`` skips the steps without accumulation, with a warning).
        micro_batches: parts a batch is split into by the ``"split"`` source (>= 2).
        prog_bar: also show ``gns/b_simple`` in the progress bar (updated at the logging cadence).

    Logged at Lightning's cadence (``log_every_n_steps``, Lightning's step): ``gns/b_simple``,
    ``gns/grad_sq_norm``, ``gns/trace_cov`` (smoothed) and the same with ``_raw`` (the last
    measurement alone). ``gns/b_simple`` is also put in ``trainer.callback_metrics`` (a tensor on
    the device, updated at every measurement) so ``ModelCheckpoint``, ``EarlyStopping`` and other
    callbacks can monitor it, with or without a logger.

    Needs automatic optimization, and a single device or DDP.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> gns = GradientNoiseScale(every_n_steps=2, ema_decay=0.9)
        >>> trainer = Trainer(callbacks=[gns], max_epochs=1, logger=False)
        >>> gns.value() is None  # before any measurement
        True
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        ema_decay: float = 0.95,
        source: Source = "auto",
        micro_batches: int = 4,
        prog_bar: bool = False,
    ) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1, optional=True)
        self.ema_decay = check_number("ema_decay", ema_decay, 0.0, 1.0, high_inclusive=False)
        self.source = check_choice("source", source, ("auto", "ddp", "accumulation", "split"))
        self.micro_batches = check_int("micro_batches", micro_batches, minimum=2)
        self.prog_bar = check_bool("prog_bar", prog_bar)
        self._last_state: dict[str, Any] = {}
        self._reset_fit()

    # -- what the fit measured -----------------------------------------------------------------
    @property
    def estimator(self) -> GradientNoiseEstimator:
        """The running estimates (tensors on the training device during a fit)."""
        return self._estimator

    def value(self) -> float | None:
        """Smoothed ``B_simple`` as a float (one device read), ``None`` before the first measurement."""
        values = self._estimator.values()
        return values["b_simple"] if values["measurements"] > 0 else None

    @property
    def last_source(self) -> str | None:
        """The source of the last measured step (``"ddp"``, ``"accumulation"`` or ``"split"``)."""
        return self._last_source

    # -- per-fit state -------------------------------------------------------------------------
    def _reset_fit(self) -> None:
        self._estimator = GradientNoiseEstimator(self.ema_decay)
        self._training = False
        self._params: list[Tensor] = []
        self._ddp: DDPNorms | None = None
        self._step: int | None = None
        self._measuring = False
        self._step_source: str | None = None
        self._last_source: str | None = None
        self._sizes: list[int] = []  # micro-batch sizes of the step, in samples
        self._small: Tensor | None = None  # sum of the step's small squared norms (device)
        self._small_count = 0
        self._warned = False
        self._logged_step = -1
        self._handles: list[Any] = []
        self._module: pl.LightningModule | None = None
        self._step_wrapper: Any = None
        self._previous_step: Any = None

    def _every(self, source: str) -> int:
        return self.every_n_steps if self.every_n_steps is not None else (4 if source == "split" else 1)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_fit()
        name = type(self).__name__
        if type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ConfigurationError(
                f"{name} measures on a single device or under DDP, not under strategy="
                f"{type(trainer.strategy).__name__}: use one of those, or remove {name}."
            )
        if not pl_module.automatic_optimization:
            raise ConfigurationError(
                f"{name} measures in Lightning's automatic optimization; this module sets "
                "automatic_optimization=False. Remove the callback, or use automatic optimization."
            )
        distributed = trainer.world_size > 1
        if self.source == "ddp" and not distributed:
            raise ConfigurationError(f"{name}(source='ddp') needs DDP with more than one process; use source='auto'")
        if self.source in ("accumulation", "split") and distributed:
            raise ConfigurationError(
                f"{name}(source={self.source!r}) measures on one device; under DDP use source='ddp' or 'auto'"
            )
        fit_state(trainer).on_release(f"{name} hooks", self._uninstall)  # type: ignore[union-attr]

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._estimator.load_state_dict(state_dict.get("estimator", {}))
        self._last_state = dict(state_dict)

    @override
    def state_dict(self) -> dict[str, Any]:
        if not self._training:
            return dict(self._last_state)
        return {"estimator": self._estimator.state_dict()}

    # -- installing the measurement ------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True
        self._estimator.to(pl_module.device)
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        if trainer.world_size > 1:
            self._install_ddp(trainer)
            return
        if self.source in ("auto", "accumulation"):
            self._handles = [p.register_hook(self._micro_hook) for p in self._params]
        if self.source in ("auto", "split"):
            self._module = pl_module
            self._previous_step = pl_module.__dict__.get("training_step")  # someone else's wrapper, if any
            self._step_wrapper = functools.partial(split_training_step, self, pl_module.training_step)
            pl_module.training_step = self._step_wrapper

    def _install_ddp(self, trainer: pl.Trainer) -> None:
        from torch.nn.parallel import DistributedDataParallel

        name = type(self).__name__
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise ConfigurationError(f"{name}: the DDP strategy's model is not a DistributedDataParallel wrapper")
        odd = sorted({str(p.dtype) for p in self._params if p.dtype not in (torch.float32, torch.float64)})
        if odd:
            raise ConfigurationError(
                f"{name} under DDP reads float32/float64 gradients; this model has {', '.join(odd)} parameters "
                "(use precision='bf16-mixed' or '16-mixed' instead of a '-true' half precision)"
            )
        self._ddp = DDPNorms(model.process_group)
        try:
            model.register_comm_hook(self._ddp, gns_allreduce_hook)
        except RuntimeError as err:
            self._ddp = None
            raise ConfigurationError(
                f"{name} needs its own DDP communication hook, but one is registered already "
                f"(DDPStrategy(ddp_comm_hook=...)): remove it, or remove {name}. ({err})"
            ) from err

    def _uninstall(self) -> None:
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
        module = getattr(self, "_module", None)
        if module is not None and module.__dict__.get("training_step") is self._step_wrapper:
            if self._previous_step is None:
                del module.__dict__["training_step"]
            else:
                module.training_step = self._previous_step
        self._module = self._step_wrapper = self._previous_step = None
        if self._ddp is not None:
            self._ddp.release()  # the wrapper may outlive the fit: its hook becomes a plain all-reduce

    # -- one step ------------------------------------------------------------------------------
    def _resolve(self, trainer: pl.Trainer) -> str | None:
        if self._ddp is not None:
            return "ddp"
        accumulating = int(trainer.accumulate_grad_batches) > 1
        if self.source == "accumulation" and not accumulating:
            if not self._warned:
                self._warned = True
                rank_zero_warn(f"{type(self).__name__}(source='accumulation'): steps without accumulation are not measured")
            return None
        if accumulating and self.source in ("auto", "accumulation"):
            return "accumulation"
        if self.source == "split" and accumulating:
            return None
        return "split"

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._step:  # the first micro-batch of an optimizer step
            self._step = step
            source = self._resolve(trainer)
            self._step_source = source
            self._measuring = source is not None and step % self._every(source) == 0
            self._sizes, self._small, self._small_count = [], None, 0
            if self._ddp is not None:
                self._ddp.start(self._measuring)
        if self._measuring and self._step_source != "split":
            self._sizes.append(batch_length(batch))

    def _add_small(self, sq: Tensor, count: int = 1) -> None:
        sq = sq.detach().to(torch.float64)
        self._small = sq if self._small is None else self._small + sq
        self._small_count += count

    def _micro_hook(self, grad: Tensor) -> None:
        # accumulation source: each parameter's gradient of this backward, before it is accumulated
        if self._measuring and self._step_source == "accumulation":
            sq = grad.detach().float().pow(2).sum().to(torch.float64)
            self._small = sq if self._small is None else self._small + sq

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._measuring:
            return
        self._measuring = False
        source = self._step_source
        if source == "ddp":
            small = self._ddp.take()  # type: ignore[union-attr]
            sizes = self._sizes
            if small is None or len(sizes) != int(trainer.accumulate_grad_batches):
                return
            # the local gradient is the plain average of its micro-batches (every rank has the same sizes)
            b_small = averaged_batch_size(sizes)
            b_big = b_small * trainer.world_size
        elif source == "accumulation":
            accumulation = int(trainer.accumulate_grad_batches)
            if self._small is None or len(self._sizes) != accumulation:
                return  # the epoch's last, incomplete accumulation group: Lightning scales it differently
            small = self._small * accumulation  # sum_i |g_i / A|^2 x A^2 / A: the mean of |g_i|^2
            b_small, b_big = effective_batch_sizes(self._sizes, weighted=False)
        else:
            if self._small is None or len(self._sizes) < 2:
                return
            small = self._small / self._small_count
            b_small, b_big = effective_batch_sizes(self._sizes, weighted=True)
        if b_big <= b_small:
            return
        scale = amp_grad_scale(trainer)
        if scale is not None:
            small = small / scale.double().pow(2)
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        big = torch.nn.utils.get_total_norm(grads, norm_type=2.0).double().pow(2)
        self._estimator.update(small, b_small, big, b_big)
        self._last_source = source
        trainer.callback_metrics["gns/b_simple"] = self._estimator.b_simple

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not (trainer.loggers or self.prog_bar) or self._last_source is None:
            return
        step = logging_step(trainer)
        if step == self._logged_step or not is_logging_step(trainer):
            return
        self._logged_step = step
        values = self._estimator.values()  # the one device read, at the logging cadence
        metrics = {f"gns/{key}": values[key] for key in _LOGGED}
        if self.prog_bar:
            trainer.progress_bar_metrics["gns/b_simple"] = metrics["gns/b_simple"]
        log_metrics(trainer, metrics, step)

    # -- the end of the fit --------------------------------------------------------------------
    @override
    def _end_fit(self, trainer: pl.Trainer) -> None:
        super()._end_fit(trainer)
        if self._training:
            self._last_state = self.state_dict()
        self._uninstall()
        release_fit_state(trainer)
        estimator, source = self._estimator.to("cpu"), self._last_source  # kept, without device memory
        self._reset_fit()
        self._estimator, self._last_source = estimator, source
