"""Out-of-memory recovery that keeps the trajectory: a batch that does not fit is retried in parts.

:class:`AutoMicroBatch` wraps the module's ``training_step`` and ``backward`` for the fit. When a
training step raises ``torch.OutOfMemoryError``, the same batch is run again as micro-batches
(halving their size until they fit) whose gradients add up to the whole batch's, so the effective
batch, the LR scaling, the optimizer step count and the weights are those of a run that never ran
out of memory. How the parts add up to the whole (a per-sample mean loss of ``n`` samples, a part
of ``n_i`` samples, ``accumulate_grad_batches = a``, GradScaler scale ``s``)::

    whole batch (Lightning):   backward of  s * L / a
    part i:                    backward of  s * (n_i / n) * L_i / a    ->  sum_i (n_i / n) L_i = L

Lightning runs ``training_step``, then ``zero_grad`` (first batch of an accumulation cycle), then
``backward`` (docs/LIGHTNING.md fact 8). So the parts before the last run forward and backward
inside ``training_step`` and their gradients are set aside; the last part's loss is returned to
Lightning and its backward is the step's one backward, with the set-aside gradients put back first.
Under DDP that backward is the one whose hooks all-reduce the gradient: the earlier parts' backward
runs inside DDP's forward, where DDP does not reduce (fact 21), so every rank joins the same
all-reduces whatever its split.

Steps that fit cost nothing extra: the loss is returned as a detached copy (the backward of the
real graph runs in the wrapped ``backward``, from the copy's gradient, so an out-of-memory error in
the backward frees the whole graph before the retry), no host-device sync, no collective.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from ._batches import balanced_sizes, split_rows
from ._checks import ConfigurationError, check_choice, check_int
from ._device_memory import is_out_of_memory
from ._logging import CadenceLog
from .engine import FitScopedCallback, batch_length, fit_state, release_fit_state

__all__ = ["AutoMicroBatch"]

_KEYS = ("micro_batch/size", "micro_batch/parts", "micro_batch/ooms")


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("loss")
    return None


def _with_loss(output: Any, loss: Tensor) -> Any:
    return loss if isinstance(output, Tensor) else {**output, "loss": loss}


class AutoMicroBatch(FitScopedCallback):
    """Retry a training step that runs out of device memory as micro-batches, keeping the trajectory.

    On ``torch.OutOfMemoryError`` (or the CPU allocator's out-of-memory error) in a training step,
    in the forward or the backward, the same batch is split into parts of at most ``size`` samples
    (``size`` halves on every failure, starting from the batch) whose gradients add up to the
    whole batch's. The size is kept for later steps (and checkpointed); after ``grow_after``
    batches without an error it doubles again (an error right at a grown size doubles the wait);
    below ``min_per_device`` it raises ``torch.OutOfMemoryError`` saying what to change.

    Exact for a loss that is the mean over the batch's samples (``reduction="mean"``: parts are
    weighted by their share of the batch) or their sum (``"sum"``), computed per sample. As with
    gradient accumulation, layers that mix samples (BatchNorm) see each part on its own, and a
    part's ``self.log(on_step=True)`` value is that of the last part (epoch means are weighted by
    the ``batch_size`` given to ``self.log``). An error in the backward comes after the whole
    batch's ``training_step`` ran: the retry's ``self.log`` calls are dropped (the whole batch's
    stand), but torchmetrics objects updated in ``training_step`` count that batch twice.

    Works with any LightningModule in automatic optimization (manual optimization is refused),
    under gradient accumulation, with the batch-size controllers (which split a request above
    ``max_per_device`` before this ever sees it) and under DDP: a rank that runs out of memory
    re-splits its own batch at once (no collective: the step's gradient is exact whatever each
    rank's split, see the module docstring), and at the start of every epoch the ranks agree on
    the smallest size (one all-gather per epoch, never per step). An error in the backward of a
    step whose gradients DDP all-reduces cannot be retried (the other ranks are inside the
    all-reduce): that raises as without this callback.

    Logged at Lightning's cadence and when the size changes: ``micro_batch/size`` (samples per
    part; the batch's size when whole), ``micro_batch/parts``, ``micro_batch/ooms`` (errors
    recovered in this fit).

    Args:
        min_per_device: the smallest part (samples per device) before giving up.
        grow_after: batches without an error before the size doubles again.
        reduction: how ``training_step``'s loss reduces over samples: ``"mean"`` or ``"sum"``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[AutoMicroBatch(min_per_device=4)], logger=False)
        >>> AutoMicroBatch().parts_for(100), AutoMicroBatch(min_per_device=8).min_per_device
        (1, 8)
    """

    def __init__(self, min_per_device: int = 1, grow_after: int = 100, reduction: str = "mean") -> None:
        self.min_per_device = check_int("min_per_device", min_per_device, minimum=1)
        self.grow_after = check_int("grow_after", grow_after, minimum=1)
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self._log = CadenceLog(watch=("micro_batch/size",))
        self._last_state: dict[str, Any] = {}
        self._reset_fit()

    # -- the split ----------------------------------------------------------------------------
    def _reset_fit(self) -> None:
        self.size: int | None = None  # samples per part; None: whole batches
        self._wait = self.grow_after
        self._good = 0  # batches without an error since the size last changed
        self._grown = False  # the size was reached by growing
        self.ooms = 0
        self._module: Any = None
        self._trainer: Any = None
        self._ddp: DistributedDataParallel | None = None
        self._params: list[Tensor] = []
        self._step_fn: Any = None
        self._backward_fn: Any = None
        self._call: tuple[tuple, dict] | None = None  # the current training_step call
        self._n = 0
        self._parts = 1
        self._pending: Tensor | None = None  # the graph whose backward the wrapped backward runs
        self._leaf: Tensor | None = None  # the detached copy of it returned to Lightning
        self._stash: list[Tensor | None] | None = None  # gradients of the parts before the last
        self._log.reset()

    def parts_for(self, n: int) -> int:
        """Parts a batch of ``n`` samples is split into under the current size."""
        return 1 if self.size is None or self.size >= n else math.ceil(n / self.size)

    def _shrink(self, n: int, where: str) -> None:
        current = self.size if self.size is not None and self.size < n else n
        smaller = current // 2
        rank = getattr(self._trainer, "global_rank", 0)
        if smaller < self.min_per_device:
            raise torch.OutOfMemoryError(
                f"AutoMicroBatch: out of memory (in the {where}) with parts of {current} sample(s) of a batch of "
                f"{n} on rank {rank}, and min_per_device={self.min_per_device} forbids halving again. Lower "
                "the batch size (or max_per_device), use precision='bf16-mixed' or '16-mixed', or a smaller model."
            )
        if self._grown:
            self._wait *= 2  # the grown size did not fit: wait longer before the next try
        self.size, self._good, self._grown = smaller, 0, False
        self.ooms += 1
        warnings.warn(
            f"AutoMicroBatch: out of memory in the {where} of a batch of {n} on rank {rank}; retrying it as "
            f"{self.parts_for(n)} parts of at most {smaller}.",
            RuntimeWarning,
            stacklevel=2,
        )
        if self._params and self._params[0].is_cuda:
            torch.cuda.empty_cache()

    # -- setup: refuse what cannot be honoured, install the wrappers --------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_fit()
        if not pl_module.automatic_optimization:
            raise ConfigurationError(
                "AutoMicroBatch retries Lightning's automatic training step; under manual optimization "
                "(automatic_optimization=False) split the batch in your training_step, or remove AutoMicroBatch."
            )
        if type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ConfigurationError(
                f"AutoMicroBatch is proven on a single device and under DDP, not under "
                f"strategy={type(trainer.strategy).__name__}: use one of those, or remove AutoMicroBatch."
            )
        if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise ConfigurationError("AutoMicroBatch needs training_step(batch, ...), not training_step(dataloader_iter)")
        self._module, self._trainer = pl_module, trainer
        state = fit_state(trainer)
        self._step_fn, undo_step = _wrap(pl_module, "training_step", self._training_step)
        state.on_release("AutoMicroBatch: the module's training_step", undo_step)  # type: ignore[union-attr]
        self._backward_fn, undo_backward = _wrap(pl_module, "backward", self._backward)
        state.on_release("AutoMicroBatch: the module's backward", undo_backward)  # type: ignore[union-attr]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.strategy.model
        self._ddp = model if isinstance(model, DistributedDataParallel) else None
        self._params = [p for p in pl_module.parameters() if p.requires_grad]

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        # Every rank joins: the smallest size of any rank, the longest wait, counted afresh.
        mine = torch.tensor([self.size or 0, self._wait], device=pl_module.device)
        gathered = trainer.strategy.all_gather(mine).reshape(-1, 2).tolist()
        sizes = [int(s) for s, _ in gathered if s > 0]
        self.size = min(sizes) if sizes else None
        self._wait, self._good = max(int(w) for _, w in gathered), 0

    # -- the wrapped training_step --------------------------------------------------------------
    def _training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs["batch"]
        n = batch_length(batch)
        self._call, self._n = (args, kwargs), n
        self._pending = self._leaf = self._stash = None
        while True:
            parts = self.parts_for(n)
            try:
                self._parts = parts
                if parts == 1:
                    return self._defer(self._step_fn(*args, **kwargs))
                return self._split(parts, factor=None)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err):
                    raise
            self._shrink(n, "forward")  # out of the except block: its traceback holds the failed step

    def _defer(self, output: Any) -> Any:
        """Return ``output`` with its loss detached: the wrapped backward runs the real graph."""
        loss = _loss_of(output)
        if loss is None or not loss.requires_grad:
            return output
        if self._ddp is not None and self._ddp.require_backward_grad_sync:
            return output  # DDP reduces in this backward: its own graph must be the one Lightning sees
        self._pending, self._leaf = loss, loss.detach().requires_grad_()
        return _with_loss(output, self._leaf)

    def _split(self, parts: int, factor: Tensor | None) -> Any:
        """Run the batch as ``parts`` parts. ``factor=None`` (in ``training_step``): the parts before
        the last go backward now, the last one's loss is returned; else (in ``backward``, after an
        error there) every part goes backward with ``factor``, the gradient Lightning gave the loss."""
        (args, kwargs), n = self._call, self._n  # type: ignore[misc]
        sizes = balanced_sizes(n, parts)
        chunks = split_rows(args[0] if args else kwargs["batch"], sizes)
        base = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        total: Tensor | None = None
        done = False
        try:
            for i, (chunk, size) in enumerate(zip(chunks, sizes)):
                call_args, call_kwargs = ((chunk, *args[1:]), kwargs) if args else (args, {**kwargs, "batch": chunk})
                output = self._step_fn(*call_args, **call_kwargs)
                loss = _loss_of(output)
                if loss is None:
                    continue
                weighted = loss * (size / n) if self.reduction == "mean" else loss
                total = weighted.detach() if total is None else total + weighted.detach()
                if factor is None and i == len(sizes) - 1:
                    self._stash = [p.grad for p in self._params]
                    return self._defer(_with_loss(output, weighted + (total - weighted.detach())))
                self._backward_part(weighted, factor)
                output = loss = weighted = None
            done = True
            return None
        finally:  # in training_step the parts' gradients are in the stash; after an error, dropped
            self._merge(base, [p.grad for p in self._params] if done else None)

    def _backward_part(self, weighted: Tensor, factor: Tensor | None) -> None:
        if factor is None:  # what Lightning does to the returned loss: / accumulation, x GradScaler scale
            scaled = weighted / self._trainer.accumulate_grad_batches
            scaler = getattr(self._trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                scaled = scaler.scale(scaled)
        else:
            scaled = weighted * factor
        with torch.autocast(weighted.device.type, enabled=False):
            self._backward_fn(scaled)

    def _merge(self, base: list[Tensor | None], new: list[Tensor | None] | None) -> None:
        """``p.grad = base + new`` (``new=None``: put ``base`` back)."""
        for p, b, g in zip(self._params, base, new or [None] * len(base)):
            p.grad = b if g is None else g if b is None else b.add_(g)

    # -- the wrapped backward -------------------------------------------------------------------
    def _backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        stash, pending, leaf = self._stash, self._pending, self._leaf
        self._stash = self._pending = self._leaf = None
        if pending is None:  # DDP all-reduces in this backward: the parts' gradients go in first
            if stash is not None:
                self._merge([p.grad for p in self._params], stash)
            return self._backward_fn(loss, *args, **kwargs)
        self._backward_fn(loss, *args, **kwargs)  # reaches only the detached copy
        factor = leaf.grad  # type: ignore[union-attr]
        if factor is None:  # a backward() override that did not run the loss's backward
            return None
        base = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        try:
            torch.autograd.backward(pending, factor)
            if stash is not None:
                self._merge(stash, [p.grad for p in self._params])
            self._merge(base, [p.grad for p in self._params])
            return None
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
        self._merge(base, None)  # the partial gradients are dropped with the graph
        pending = leaf = stash = None
        self._retry_in_backward(factor)  # type: ignore[arg-type]

    def _retry_in_backward(self, factor: Tensor) -> None:
        while True:
            self._shrink(self._n, "backward")
            self._parts = self.parts_for(self._n)
            try:
                with self._trainer.precision_plugin.train_step_context(), _no_logging(self._module):
                    self._split(self._parts, factor)
                return
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err):
                    raise

    # -- after each batch -----------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._call = None
        self._good += 1
        if self.size is not None and self._good >= self._wait:
            grown = 2 * self.size
            self.size = None if grown >= self._n else grown
            self._good, self._grown = 0, True
        if trainer.loggers:
            self._log(trainer, {"micro_batch/size": float(min(self.size or self._n, self._n)),
                                "micro_batch/parts": float(self._parts), "micro_batch/ooms": float(self.ooms)})

    @override
    def _end_fit(self, trainer: pl.Trainer) -> None:
        super()._end_fit(trainer)
        if self._module is None:
            return
        self._last_state = self.state_dict()
        release_fit_state(trainer)
        size, wait, ooms = self.size, self._wait, self.ooms
        self._reset_fit()
        self.size, self._wait, self.ooms = size, wait, ooms  # readable after the fit

    # -- checkpointing ----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._module is None and self._last_state:
            return dict(self._last_state)
        return {"size": self.size, "wait": self._wait, "good": self._good, "grown": self._grown, "ooms": self.ooms}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_state = dict(state_dict)
        size = state_dict.get("size")
        self.size = int(size) if size is not None else None
        self._wait = int(state_dict.get("wait", self.grow_after))
        self._good = int(state_dict.get("good", 0))
        self._grown = bool(state_dict.get("grown", False))
        self.ooms = int(state_dict.get("ooms", 0))


def _wrap(module: pl.LightningModule, name: str, run: Any) -> tuple[Any, Any]:
    """Put ``run`` in place of ``module.<name>`` (an instance attribute that keeps the original's
    signature, ``batch_idx`` included: docs/LIGHTNING.md fact 22); return the original and the
    function that puts it back."""
    had = name in module.__dict__
    original = getattr(module, name)
    wrapper = functools.wraps(original)(lambda *args, **kwargs: run(*args, **kwargs))
    setattr(module, name, wrapper)

    def undo() -> None:
        if module.__dict__.get(name) is wrapper:
            if had:
                setattr(module, name, original)
            else:
                delattr(module, name)

    return original, undo


@contextmanager
def _no_logging(module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside (a retry must not log the batch twice)."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    for name in saved:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)
