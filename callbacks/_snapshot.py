"""Everything a measurement may disturb, put back exactly: weights, buffers, gradients, train/eval
modes, optimizer state and hyperparameters, and the torch, CUDA, Python and NumPy random states.

The snapshot is kept on the host, so it takes no device memory while the device is measured.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["everything_restored"]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


@contextmanager
def everything_restored(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[Callable[[], None]]:
    """Snapshot ``module`` and ``optimizer`` and every RNG; yield a function that puts the weights
    and buffers back (between trials); restore everything on exit, errors included.

    Gradients are set aside (``None`` inside the block) and given back; optimizer state tensors
    that existed are refilled in place (whoever holds one keeps it), state created inside the block
    is dropped.

    Example:
        >>> model, rng = nn.Linear(2, 2), torch.get_rng_state()
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
        >>> w = model.weight.clone()
        >>> with everything_restored(model, opt):
        ...     model(torch.randn(4, 2)).sum().backward(); opt.step()
        >>> torch.equal(model.weight, w), len(opt.state), torch.equal(torch.get_rng_state(), rng)
        (True, 0, True)
    """
    tensors = [(t, t.detach().to("cpu", copy=True)) for t in [*module.parameters(), *module.buffers()]]
    grads = [(p, p.grad) for p in module.parameters()]
    modes = {m: m.training for m in module.modules()}
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        rng["numpy"] = numpy.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    state = groups = None
    if optimizer is not None:
        state = {p: {k: (v.device, _to_cpu(v)) if isinstance(v, Tensor) else (None, copy.deepcopy(v))
                     for k, v in s.items()} for p, s in optimizer.state.items()}
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    @torch.no_grad()
    def put_weights_back() -> None:
        for live, saved in tensors:
            live.copy_(saved)

    for p, _ in grads:
        p.grad = None
    try:
        yield put_weights_back
    finally:
        put_weights_back()
        for p, g in grads:
            p.grad = g
        for m, mode in modes.items():
            m.training = mode
        if optimizer is not None:
            _restore_optimizer(optimizer, state, groups)  # type: ignore[arg-type]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            import numpy

            numpy.random.set_state(rng["numpy"])


@torch.no_grad()
def _restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, groups: list[dict]) -> None:
    for p in list(optimizer.state):
        if p not in state:  # created by the search
            del optimizer.state[p]
    for p, saved in state.items():
        live = optimizer.state[p]
        for key in [k for k in live if k not in saved]:
            del live[key]
        for key, (device, value) in saved.items():
            current = live.get(key)
            if isinstance(value, Tensor) and isinstance(current, Tensor) and current.shape == value.shape \
                    and current.dtype == value.dtype:
                current.copy_(value)  # in place: whoever holds the state tensor keeps it
            else:
                live[key] = value.to(device) if isinstance(value, Tensor) else value
    for group, saved_group in zip(optimizer.param_groups, groups):
        group.update(saved_group)
