"""``max_per_device="auto"`` of the batch-size controllers: measured on every rank, the minimum agreed.

Kept apart from the controller so that it stays about planning; the measurement itself is
:func:`~epochwise.callbacks.batch_memory.find_max_batch_size`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from .batch_memory import CPU_SEARCH_CAP, find_max_batch_size
from .plans import EpochPlan

__all__ = ["measure_max_per_device", "same_batches"]


def measure_max_per_device(trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any,
                           samples: int | None) -> int:
    """Every rank measures its own device with real training steps (the fit's optimizer and
    precision, the loader's first sample) and all ranks take the smallest answer (one all-gather).

    The search stops at ``samples`` (per rank and epoch: no batch holds more), and on CPU at
    :data:`~epochwise.callbacks.batch_memory.CPU_SEARCH_CAP`, where the ranks of one host share its
    memory.
    """
    cpu = pl_module.device.type == "cpu"
    cap = min(samples or CPU_SEARCH_CAP, CPU_SEARCH_CAP) if cpu else samples
    found = find_max_batch_size(
        pl_module, loader, trainer.optimizers[0] if trainer.optimizers else None, precision=trainer.precision,
        max_batch_size=cap, processes=trainer.num_devices if cpu else 1,
    )
    return int(trainer.strategy.all_gather(torch.tensor(found, device=pl_module.device)).min())


def same_batches(a: EpochPlan, b: EpochPlan) -> bool:
    """Whether two plans of one epoch give every batch the same size: then a measured
    ``max_per_device`` that does not bind this epoch keeps the batches already prefetched (re-creating
    the iterator draws a seed from the global RNG, which would make ``"auto"`` and the same int differ).

    Example:
        >>> from epochwise.callbacks.plans import plan_epoch
        >>> same_batches(plan_epoch(0, 0, lambda e, s: 8, 40), plan_epoch(0, 0, lambda e, s: 8, 40, max_per_device=16))
        True
        >>> same_batches(plan_epoch(0, 0, lambda e, s: 8, 40), plan_epoch(0, 0, lambda e, s: 8, 40, max_per_device=4))
        False
    """
    n = a.length if a.length is not None else 256  # a stream: more than any prefetch
    return a.accumulation == b.accumulation and a.length == b.length and all(
        a.size_of(i) == b.size_of(i) for i in range(n))
