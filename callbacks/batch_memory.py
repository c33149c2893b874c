"""Training memory as a function of the batch size: a fast estimate, and a finder that measures.

:func:`find_max_batch_size` is what ``max_per_device="auto"`` of the batch-size controllers runs:
real training steps (forward, backward, optimizer step) at growing sizes, then a binary search, for
the largest batch whose peak memory leaves a given headroom free. The estimate
(:func:`estimate_training_memory`) is its fast first guess on a GPU.

Plain functions over an ``nn.Module``; usable without Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._batches import first_tensor, repeat_rows, template_batch
from ._checks import check_choice, check_int, check_number
from ._device_memory import MemoryMeter, available_bytes, is_out_of_memory
from ._size_search import grow_and_bisect
from ._snapshot import everything_restored

__all__ = [
    "OPTIMIZER_STATE_COPIES",
    "MemoryEstimate",
    "estimate_training_memory",
    "estimate_max_batch_size",
    "probe_max_per_device",
    "BatchSizeSearch",
    "find_max_batch_size",
    "search_max_batch_size",
    "is_out_of_memory",
    "CPU_SEARCH_CAP",
    "GPU_SEARCH_CAP",
]


#: Optimizer state held per parameter, in parameter-sized copies.
OPTIMIZER_STATE_COPIES: dict[str, int] = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2, "lars": 1}


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory split into a fixed part and a per-sample part (bytes).

    ``fixed_bytes`` = parameters + gradients + optimizer state;
    ``per_sample_bytes`` = ``activation_factor`` x (the input and every leaf module's outputs for
    one sample).

    Example:
        >>> est = MemoryEstimate(400, 400, 800, activation_bytes_per_sample=100.0, activation_factor=2.0)
        >>> est.bytes_for(10), est.max_batch_size(4_000)
        (3600.0, 12)
    """

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes_per_sample: float
    activation_factor: float

    @property
    def fixed_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def per_sample_bytes(self) -> float:
        return self.activation_factor * self.activation_bytes_per_sample

    def bytes_for(self, batch_size: int) -> float:
        """Estimated training memory at ``batch_size``."""
        return self.fixed_bytes + batch_size * self.per_sample_bytes

    def max_batch_size(self, memory_bytes: float) -> int:
        """Largest batch whose estimate fits in ``memory_bytes`` (0 if not even the fixed part fits)."""
        free = memory_bytes - self.fixed_bytes
        if free <= 0 or self.per_sample_bytes <= 0:
            return 0
        return int(free // self.per_sample_bytes)


def _tensor_bytes(obj: object) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


@torch.no_grad()
def _activation_bytes(model: nn.Module, x: Tensor) -> int:
    total = 0

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        total += _tensor_bytes(output)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # same shapes as in training, without touching BatchNorm statistics
        model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return total + _tensor_bytes(x)


def estimate_training_memory(
    model: nn.Module,
    sample_shape: Sequence[int],
    optimizer: str = "adam",
    activation_factor: float = 2.0,
    probe_batch_size: int = 2,
    dtype: torch.dtype | None = None,
) -> MemoryEstimate:
    """Measure the parts of :class:`MemoryEstimate` for ``model`` on inputs of ``sample_shape``.

    Parameters, gradients (one copy per trainable parameter) and optimizer state
    (:data:`OPTIMIZER_STATE_COPIES`: Adam keeps two moments, SGD with momentum one) are counted
    exactly from the parameters. Activations are measured: one forward pass of
    ``probe_batch_size`` random samples (under ``no_grad``, in eval mode, on the model's device)
    with a hook on every leaf module summing the bytes of its outputs, plus the input, divided by
    the probe batch size.

    The approximation: autograd keeps roughly the leaf outputs for the backward pass, and the
    backward pass adds their gradients, hence ``activation_factor=2`` by default. In-place ops
    (``ReLU(inplace=True)``) are counted as new tensors, and functional ops inside ``forward``
    that are not modules are not counted; the allocator's fragmentation, the CUDA context and
    framework workspaces are not included. Check the estimate on GPU with
    ``torch.cuda.max_memory_allocated`` and leave headroom.

    Example:
        >>> from torch import nn
        >>> est = estimate_training_memory(nn.Linear(10, 5), (10,), optimizer="sgd")
        >>> est.param_bytes, est.grad_bytes, est.optimizer_bytes, est.activation_bytes_per_sample
        (220, 220, 0, 60.0)
    """
    if optimizer not in OPTIMIZER_STATE_COPIES:
        raise ValueError(f"`optimizer` must be one of {sorted(OPTIMIZER_STATE_COPIES)}, got {optimizer!r}")
    if not (isinstance(activation_factor, (int, float)) and activation_factor > 0):
        raise ValueError(f"`activation_factor` must be > 0, got {activation_factor!r}")
    check_int("probe_batch_size", probe_batch_size, minimum=1)
    if not sample_shape or any(not isinstance(d, int) or d < 1 for d in sample_shape):
        raise ValueError(f"`sample_shape` must be a non-empty sequence of ints >= 1, got {sample_shape!r}")
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    first = params[0] if params else None
    device = first.device if first is not None else torch.device("cpu")
    dtype = dtype or (first.dtype if first is not None and first.is_floating_point() else torch.float32)
    x = torch.randn(probe_batch_size, *sample_shape, device=device, dtype=dtype)
    activations = _activation_bytes(model, x) / probe_batch_size
    return MemoryEstimate(
        param_bytes=param_bytes,
        grad_bytes=trainable_bytes,
        optimizer_bytes=OPTIMIZER_STATE_COPIES[optimizer] * trainable_bytes,
        activation_bytes_per_sample=activations,
        activation_factor=float(activation_factor),
    )


def estimate_max_batch_size(
    model: nn.Module,
    sample_shape: Sequence[int],
    memory_bytes: float,
    optimizer: str = "adam",
    activation_factor: float = 2.0,
    safety_fraction: float = 0.9,
    probe_batch_size: int = 2,
) -> int:
    """Largest batch size whose estimated training memory fits in ``safety_fraction * memory_bytes``.

    Uses :func:`estimate_training_memory` (see there for what is counted and the approximation).
    Returns 0 when not even parameters, gradients and optimizer state fit.

    Example:
        >>> from torch import nn
        >>> estimate_max_batch_size(nn.Linear(10, 5), (10,), memory_bytes=10_000, optimizer="sgd",
        ...                         safety_fraction=1.0)
        79
    """
    if not (isinstance(memory_bytes, (int, float)) and memory_bytes > 0):
        raise ValueError(f"`memory_bytes` must be > 0, got {memory_bytes!r}")
    if not 0.0 < safety_fraction <= 1.0:
        raise ValueError(f"`safety_fraction` must be in (0, 1], got {safety_fraction!r}")
    est = estimate_training_memory(model, sample_shape, optimizer, activation_factor, probe_batch_size)
    return est.max_batch_size(safety_fraction * memory_bytes)


def _optimizer_kind(optimizer: torch.optim.Optimizer | None) -> str:
    """The :data:`OPTIMIZER_STATE_COPIES` key of an optimizer (Adam when unknown)."""
    name = type(optimizer).__name__.lower() if optimizer is not None else "adam"
    if "adamw" in name or "adam" in name or "lars" in name:
        return "adamw" if "adamw" in name else "adam" if "adam" in name else "lars"
    return "sgd_momentum" if optimizer is not None and optimizer.defaults.get("momentum") else "sgd"


def probe_max_per_device(
    module: torch.nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer | None = None,
    safety_fraction: float = 0.8,
) -> int:
    """Largest per-device batch whose *estimated* training memory (:func:`estimate_max_batch_size`,
    one forward pass on the loader's first sample) fits in the device's free memory: the fast guess.
    ``max_per_device="auto"`` measures with :func:`find_max_batch_size` instead.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(4, 3)), batch_size=2)
        >>> probe_max_per_device(torch.nn.Linear(3, 2), loader) > 1000
        True
    """
    x = first_tensor(template_batch(loader))
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_bytes()
    try:
        return estimate_max_batch_size(
            module, tuple(x.shape[1:]), free, optimizer=_optimizer_kind(optimizer), safety_fraction=safety_fraction
        )
    except NotImplementedError as err:  # a LightningModule without forward()
        raise RuntimeError(
            f"the memory estimate runs the module's forward() on one batch: {err}. Define forward(), or pass "
            "max_per_device as an int."
        ) from err


# -- the finder: measure real training steps ------------------------------------------------------

#: The largest size a search tries on CPU unless told otherwise: every trial is a real training
#: step, and a search towards a whole host's memory would take minutes and starve its neighbours.
CPU_SEARCH_CAP = 4096
#: The largest size a search tries on a GPU unless told otherwise.
GPU_SEARCH_CAP = 1 << 22

_AUTOCAST = {"16-mixed": torch.float16, "16": torch.float16, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}
_CAST = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "64-true": torch.float64, "64": torch.float64}
_PRECISIONS = ("32-true", "32", *_AUTOCAST, *_CAST)


@dataclass(frozen=True)
class BatchSizeSearch:
    """What :func:`search_max_batch_size` measured.

    ``size``: the largest batch whose measured peak (``peak_bytes``) stays within ``budget_bytes``
    = ``(1 - headroom) x capacity_bytes`` (0: not even one sample). ``trials``: ``(size, peak)`` in
    the order tried, peak ``None`` for out of memory or (CPU) a size not run because its peak,
    extrapolated from the two largest fits, was over budget. ``capped``: stopped at
    ``max_batch_size``. ``total_bytes``: the device's whole memory.

    Example:
        >>> s = BatchSizeSearch(8, 700, 850, 1000, 1000, "cpu", ((4, 500), (8, 700), (16, 1200)), False)
        >>> s.size, s.peak_fraction
        (8, 0.7)
    """

    size: int
    peak_bytes: int | None
    budget_bytes: int
    capacity_bytes: int
    total_bytes: int
    device: str
    trials: tuple[tuple[int, int | None], ...]
    capped: bool

    @property
    def peak_fraction(self) -> float | None:
        """The answer's peak as a fraction of the device's whole memory."""
        return None if self.peak_bytes is None else self.peak_bytes / self.total_bytes


def _output_loss(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out.float().mean() if out.is_floating_point() else out.new_zeros((), dtype=torch.float32)
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    losses = [_output_loss(o) for o in items if isinstance(o, (Tensor, dict, list, tuple))]
    if not losses:
        raise TypeError(f"forward() returned no tensor ({type(out).__name__})")
    return torch.stack(losses).sum()


def forward_step(module: nn.Module, batch: Any) -> Tensor:
    """The default trial step: ``module(first tensor of the batch)``, reduced to a scalar loss."""
    return _output_loss(module(first_tensor(batch)))


def search_max_batch_size(
    module: nn.Module,
    data: Any,
    optimizer: torch.optim.Optimizer | None = None,
    headroom: float = 0.15,
    precision: str | int = "32-true",
    *,
    step: Callable[[nn.Module, Any], Tensor] | None = None,
    max_batch_size: int | None = None,
    start: int | None = None,
    capacity_bytes: int | None = None,
    processes: int = 1,
) -> BatchSizeSearch:
    """:func:`find_max_batch_size`, returning everything it measured (see there for the arguments)."""
    check_number("headroom", headroom, 0.0, 1.0, high_inclusive=False)
    precision = check_choice("precision", str(precision), _PRECISIONS)
    check_int("max_batch_size", max_batch_size, minimum=1, optional=True)
    check_int("start", start, minimum=1, optional=True)
    check_int("capacity_bytes", capacity_bytes, minimum=1, optional=True)
    check_int("processes", processes, minimum=1)
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    meter = MemoryMeter(device, processes)
    cap = max_batch_size or (GPU_SEARCH_CAP if meter.cuda else CPU_SEARCH_CAP)
    autocast = _AUTOCAST.get(precision)
    run_step = step or forward_step
    trials: list[tuple[int, int | None]] = []
    with everything_restored(module, optimizer) as put_weights_back:
        template = template_batch(data)
        module.train()
        capacity = capacity_bytes or meter.capacity()
        budget = int((1.0 - headroom) * capacity)

        def trial(size: int) -> int | None:
            batch = repeat_rows(template, size, device, _CAST.get(precision))
            meter.start()
            failed = False
            try:
                with torch.autocast(device.type, dtype=autocast) if autocast else nullcontext():
                    loss = run_step(module, batch)
                loss.backward()
                if optimizer is not None:
                    optimizer.step()
                peak: int | None = meter.peak()
            except NotImplementedError as err:  # a LightningModule without forward()
                raise RuntimeError(
                    f"find_max_batch_size runs forward() on the first tensor of a batch: {err}. Define "
                    "forward(), pass step=..., or give max_per_device as an int."
                ) from err
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err):
                    raise
                failed = True  # handled outside the except block, which holds the failed step's frames
            loss = batch = None  # type: ignore[assignment]
            module.zero_grad(set_to_none=True)
            put_weights_back()
            meter.release(collect=failed and meter.cuda)  # a GPU step's tensors may sit in a cycle
            return None if failed else peak

        if optimizer is not None and any(p not in optimizer.state for g in optimizer.param_groups for p in g["params"]):
            trial(min(2, cap))  # allocate the optimizer's state first: later steps of the fit hold it
        guess = start or (_estimate_guess(module, template, optimizer, budget) if meter.cuda else 2)
        size = grow_and_bisect(trial, trials, min(guess, cap), cap, budget, predict=not meter.cuda)
    peak = dict(trials).get(size) if size else None
    capped = size == cap
    return BatchSizeSearch(size, peak, budget, capacity, meter.total(), device.type, tuple(trials), capped)


def _estimate_guess(module: nn.Module, template: Any, optimizer: Any, budget: int) -> int:
    try:
        shape = tuple(first_tensor(template).shape[1:])
        kind = _optimizer_kind(optimizer)
        return max(1, estimate_training_memory(module, shape, kind).max_batch_size(budget))
    except Exception:  # the guess only saves trials
        return 1


def find_max_batch_size(
    module: nn.Module,
    data: Any,
    optimizer: torch.optim.Optimizer | None = None,
    headroom: float = 0.15,
    precision: str | int = "32-true",
    *,
    step: Callable[[nn.Module, Any], Tensor] | None = None,
    max_batch_size: int | None = None,
    start: int | None = None,
    capacity_bytes: int | None = None,
    processes: int = 1,
) -> int:
    """The largest batch size whose real training step leaves ``headroom`` of the memory free.

    Each trial runs a training step (``step(module, batch)`` -> loss, ``backward()``,
    ``optimizer.step()``) on the data's first sample repeated to one size; sizes double until a
    step runs out of memory or peaks over ``(1 - headroom)`` of the capacity, then a bisection
    between the last fit and the first failure finds the exact size.

    - GPU: peak ``torch.cuda.max_memory_allocated``; capacity the free memory plus what this
      process's allocator holds; the cache is emptied between trials; the memory estimate
      (:func:`estimate_training_memory`) is the first size tried.
    - CPU: peak the process's resident memory during the step (``VmHWM``, reset per trial);
      capacity its resident memory plus what is available (``MemAvailable``, a cgroup limit,
      shared by ``processes`` ranks); sizes start at 2, a size whose extrapolated peak is over
      budget is not run, and the search stops at ``max_batch_size`` (:data:`CPU_SEARCH_CAP`).

    The module (weights, buffers, gradients, train/eval modes), the optimizer (state,
    hyperparameters) and the torch, CUDA, Python and NumPy random states are exactly as before
    (the snapshot is kept on the host). Under DDP every rank calls it and the ranks take the
    minimum (as the batch-size controllers do for ``max_per_device="auto"``).

    Args:
        module: the model (a LightningModule is measured through its ``forward``).
        data: a DataLoader (its dataset's first sample, collated by its ``collate_fn``; a stream's
            first batch) or a batch (tensor, tuple, list or dict; its first row is used).
        optimizer: stepped in every trial (its state is allocated before the first measured
            trial, as during training); ``None`` measures forward and backward only.
        headroom: fraction of the capacity the peak must leave free, in ``[0, 1)``.
        precision: Lightning's precision string: ``"16-mixed"``/``"bf16-mixed"`` run the step
            under autocast, ``"16-true"``/``"bf16-true"``/``"64-true"`` cast floating inputs.
        step: ``(module, batch) -> loss``; default: the mean of ``module(first tensor)``.
        max_batch_size: the largest size tried (default :data:`GPU_SEARCH_CAP` /
            :data:`CPU_SEARCH_CAP`).
        start: the first size tried (default: the estimate on a GPU, 2 on CPU: BatchNorm needs
            two samples).
        capacity_bytes: the memory to measure against instead of the device's.
        processes: processes sharing this device's memory (DDP ranks on one CPU host).

    Raises:
        RuntimeError: when not even one sample fits.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> opt = torch.optim.Adam(model.parameters())
        >>> before = [p.clone() for p in model.parameters()]
        >>> find_max_batch_size(model, torch.zeros(1, 64), opt, max_batch_size=512)
        512
        >>> all(torch.equal(a, b) for a, b in zip(before, model.parameters())), len(opt.state)
        (True, 0)
    """
    found = search_max_batch_size(
        module, data, optimizer, headroom, precision, step=step, max_batch_size=max_batch_size, start=start,
        capacity_bytes=capacity_bytes, processes=processes,
    )
    if found.size == 0:
        peak = dict(found.trials).get(1)
        raise RuntimeError(
            f"find_max_batch_size: not even a batch of 1 fits on {found.device}: its peak is "
            f"{'out of memory' if peak is None else f'{peak / 2**20:.0f} MiB'} against a budget of "
            f"{found.budget_bytes / 2**20:.0f} MiB ({1 - headroom:.0%} of {found.capacity_bytes / 2**20:.0f} MiB)."
        )
    return found.size
