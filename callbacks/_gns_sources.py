"""The measuring ends of GradientNoiseScale's "split" and "ddp" sources (see ``gradient_noise.py``).

- :func:`split_training_step`: the module's ``training_step`` on a measured step, run once per part
  of the batch, each part's gradient taken with ``torch.autograd.grad`` (zeroed by Lightning before
  its own backward: ``docs/LIGHTNING.md`` fact 8);
- :func:`gns_allreduce_hook` and its state :class:`DDPNorms`: DDP's averaging all-reduce, which on
  a measured step also averages this rank's squared gradient norm over the ranks (fact 10).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from ._lightning_internals import amp_grad_scale
from .engine import batch_length

__all__ = ["split_training_step", "DDPNorms", "gns_allreduce_hook"]


# -- the "split" source -------------------------------------------------------------------------
def split_training_step(gns: Any, training_step: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    """The module's ``training_step``, run once per part of the batch on a measured step."""
    if not (gns._measuring and gns._step_source == "split"):
        return training_step(batch, *args, **kwargs)
    n = batch_length(batch)
    k = gns.micro_batches
    if n < k:
        gns._measuring = False
        return training_step(batch, *args, **kwargs)
    sizes = [n // k + (1 if j < n % k else 0) for j in range(k)]
    trainer = gns._module.trainer  # type: ignore[union-attr]
    scale = amp_grad_scale(trainer)
    params = gns._params
    total: Tensor | None = None
    output: Any = None
    start = 0
    for size in sizes:
        part = _slice_batch(batch, n, start, start + size)
        start += size
        output = training_step(part, *args, **kwargs)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            gns._measuring = False  # the step skips (None) or has no graph: nothing to measure
            return output
        with torch.autocast(device_type=loss.device.type, enabled=False):  # backward outside autocast, as Lightning's
            scaled = loss * scale if scale is not None else loss
            grads = torch.autograd.grad(scaled, params, retain_graph=True, allow_unused=True)
        present = [g for g in grads if g is not None]
        if present:
            gns._add_small(torch.nn.utils.get_total_norm(present, norm_type=2.0).double().pow(2))
        del grads, present
        weighted = loss * (size / n)
        total = weighted if total is None else total + weighted
    gns._sizes = sizes
    if isinstance(output, Mapping):
        return {**output, "loss": total}
    return total


def _slice_batch(batch: Any, n: int, start: int, stop: int) -> Any:
    def cut(t: Tensor) -> Tensor:
        return t[start:stop] if t.ndim and t.shape[0] == n else t

    return apply_to_collection(batch, Tensor, cut)


# -- the "ddp" source ---------------------------------------------------------------------------
class DDPNorms:
    """State of the communication hook: this step's local squared norm, and the mean over ranks."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group
        self.active = True
        self.measuring = False
        self.local: Tensor | None = None
        self.mean_local: Tensor | None = None

    def start(self, measuring: bool) -> None:
        self.measuring, self.local, self.mean_local = measuring and self.active, None, None

    def take(self) -> Tensor | None:
        value, self.mean_local, self.local = self.mean_local, None, None
        return value

    def release(self) -> None:
        self.active = self.measuring = False
        self.local = self.mean_local = None


def gns_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations only
    """DDP's averaging all-reduce; on a measured step it also averages this rank's squared norm.

    ``(state: DDPNorms, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]``.

    Each bucket's local squared norm is added up before its all-reduce; the last bucket (DDP
    all-reduces buckets in order) carries the total as one extra element of the same all-reduce.
    """
    if not state.measuring:
        return default_hooks.allreduce_hook(state.process_group, bucket)
    buffer = bucket.buffer()
    sq = buffer.detach().pow(2).sum()
    state.local = sq if state.local is None else state.local + sq
    if not bucket.is_last():
        return default_hooks.allreduce_hook(state.process_group, bucket)
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    n = buffer.numel()
    packed = torch.empty(n + 1, dtype=buffer.dtype, device=buffer.device)
    packed[:n].copy_(buffer)
    packed[n] = state.local
    packed.div_(world)
    future = dist.all_reduce(packed, group=group, async_op=True).get_future()

    def unpack(fut: torch.futures.Future[Any]) -> Tensor:
        value = fut.value()
        out = value[0] if isinstance(value, list) else value
        state.mean_local = out[n].clone().to(torch.float64)
        return out[:n]

    return future.then(unpack)
