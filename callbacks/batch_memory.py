"""Training memory as a function of the batch size: a fast estimate, and the probe behind
``max_per_device="auto"`` of the batch-size controllers.

Plain functions over an ``nn.Module``; usable without Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import check_int

__all__ = [
    "OPTIMIZER_STATE_COPIES",
    "MemoryEstimate",
    "estimate_training_memory",
    "estimate_max_batch_size",
    "probe_max_per_device",
]


def _check_int(name: str, value: object, minimum: int) -> None:
    check_int(name, value, minimum=minimum)


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
    _check_int("probe_batch_size", probe_batch_size, 1)
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


def probe_max_per_device(
    module: torch.nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer | None = None,
    safety_fraction: float = 0.8,
) -> int:
    """Largest per-device batch whose estimated training memory fits in the device's free memory.

    The per-sample activation memory is measured with one forward pass on inputs shaped like the
    loader's first sample (:func:`~epochwise.callbacks.epoch_math.estimate_max_batch_size`); free
    memory is ``torch.cuda.mem_get_info`` on a GPU, else the available physical memory.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(4, 3)), batch_size=2)
        >>> probe_max_per_device(torch.nn.Linear(3, 2), loader) > 1000
        True
    """
    sample = loader.dataset[0]
    x = sample[0] if isinstance(sample, (list, tuple)) else sample
    if isinstance(x, dict):
        x = next(v for v in x.values() if isinstance(v, torch.Tensor))
    if not isinstance(x, torch.Tensor):
        raise RuntimeError("max_per_device='auto' needs samples whose first element is a tensor")
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    name = type(optimizer).__name__.lower() if optimizer is not None else "adam"
    kind = "adamw" if "adamw" in name else "adam" if "adam" in name else "lars" if "lars" in name else (
        "sgd_momentum" if optimizer is not None and optimizer.defaults.get("momentum") else "sgd")
    try:
        return estimate_max_batch_size(module, tuple(x.shape), free, optimizer=kind, safety_fraction=safety_fraction)
    except NotImplementedError as err:  # a LightningModule without forward()
        raise RuntimeError(
            f"max_per_device='auto' runs the module's forward() on one batch to measure memory: {err}. "
            "Define forward() or pass max_per_device as an int."
        ) from err
