"""The one best-weights store of every epochwise stopping callback: copy at a best check, restore at fit end.

:class:`EarlyStopping` and :class:`MultiMetricEarlyStopping` decide *when* a check is the best;
this store keeps the weights of that check and puts them back. Written once, so the copy, the
checkpoint format and the DDP rule are the same for both callbacks.

Under DDP the module's weights are identical on every rank (DDP keeps them in step), so one copy
is enough: only global rank 0 holds it (one model's worth of host memory for the whole job, not
one per rank), and at fit end rank 0 broadcasts it once (``strategy.broadcast``, a single
collective, outside any step) to every rank, which loads it. Rank 0's decision therefore chooses
the epoch on every rank: log the monitored metric with ``sync_dist=True`` so that it is the best
epoch on every rank. Sharded strategies (FSDP, DeepSpeed) are not supported: their
``state_dict`` is sharded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["BestWeights"]


def _cpu_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class BestWeights:
    """An in-memory CPU copy of a module's ``state_dict`` at its best check, for one fit.

    Call :meth:`setup` at the start of every fit (it forgets the previous fit's copy, so one
    fit's weights never reach another fit's model), :meth:`snapshot` at every new best and
    :meth:`restore` at fit end (on every rank). :meth:`state_dict` goes into the owning
    callback's checkpoint state, so a resumed fit can still restore a best epoch from before the
    interruption.

    Attributes:
        state: the copied weights (``None`` before the first copy, and on ranks other than 0).
        epoch: the epoch of the copy, ``-1`` before the first.

    Example:
        >>> from torch import nn
        >>> net, store = nn.Linear(2, 1), BestWeights()
        >>> store.snapshot(net, epoch=3)
        >>> _ = nn.init.zeros_(net.weight)
        >>> store.restore(None, net), bool(net.weight.abs().sum() > 0)
        (3, True)
    """

    def __init__(self) -> None:
        self.state: dict[str, Tensor] | None = None
        self.epoch = -1
        self._holder = True

    @property
    def has_copy(self) -> bool:
        """Whether this process holds a copy of the weights."""
        return self.state is not None

    def setup(self, trainer: pl.Trainer) -> None:
        """Start a fit: forget any copy; only global rank 0 will hold one."""
        self.state = None
        self.epoch = -1
        self._holder = trainer.global_rank == 0

    def snapshot(self, module: torch.nn.Module, epoch: int) -> None:
        """Copy ``module``'s weights as those of ``epoch`` (rank 0 only; the others note the epoch)."""
        self.epoch = int(epoch)
        if self._holder:
            self.state = _cpu_copy(module)

    def restore(self, trainer: pl.Trainer | None, module: torch.nn.Module) -> int | None:
        """Load the copy into ``module``; return its epoch, or ``None`` if there is none.

        Under DDP every rank must call this (it broadcasts rank 0's copy once).
        """
        payload = (self.epoch, self.state) if self.state is not None else None
        if trainer is not None and trainer.world_size > 1:
            payload = trainer.strategy.broadcast(payload, src=0)
        if payload is None:
            return None
        epoch, state = payload
        module.load_state_dict(state)
        return int(epoch)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"best_state_epoch": self.epoch}
        if self.state is not None:
            state["best_state"] = self.state
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (missing keys keep the current values)."""
        self.epoch = int(state.get("best_state_epoch", self.epoch))
        weights = state.get("best_state")
        if weights is not None and self._holder:
            self.state = dict(weights)
