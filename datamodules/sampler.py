"""ResizableBatchSampler: the one mechanism through which epochwise changes the batch size.

The batch size is an attribute (or a per-batch *plan*) read while index batches are produced, so
a change never rebuilds the DataLoader nor restarts its workers: workers only receive lists of
indices from the main process, and this sampler decides how long each list is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler

__all__ = ["ResizableBatchSampler"]


class ResizableBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose batch size may change between, or within, epochs.

    Two ways to set the size:

    - ``sampler.batch_size = n``: every batch produced from now on has ``n`` samples. With
      DataLoader workers, the ``num_workers * prefetch_factor`` batches already requested keep
      the old size (mid-epoch lag); at an epoch boundary the change is exact.
    - ``sampler.plan = f``: ``f(i)`` gives the size of batch ``i`` of the epoch. Sizes known in
      advance (schedules) are then exact at every step, whatever the prefetching, because the
      index lists are cut to size when they are produced.

    ``__len__`` follows the current size or plan, so epoch length in batches is always right.
    ``set_epoch(e)`` re-seeds a wrapped ``RandomSampler`` with ``seed + e`` (when ``seed`` is set)
    so that a resumed run shuffles exactly as the uninterrupted one; a ``DistributedSampler``
    has its own ``set_epoch``, which is forwarded.

    Args:
        sampler: any sampler of dataset indices (Random, Sequential, Distributed, ...).
        batch_size: initial batch size.
        drop_last: drop a final batch smaller than its planned size.
        seed: base seed for per-epoch shuffling of a wrapped ``RandomSampler`` (None: leave it).

    Example:
        >>> from torch.utils.data import SequentialSampler
        >>> bs = ResizableBatchSampler(SequentialSampler(range(10)), batch_size=4)
        >>> [len(b) for b in bs]
        [4, 4, 2]
        >>> bs.batch_size = 3
        >>> [len(b) for b in bs], len(bs)
        ([3, 3, 3, 1], 4)
        >>> bs.plan = lambda i: 2 ** i
        >>> [len(b) for b in bs], len(bs)
        ([1, 2, 4, 3], 4)
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, drop_last: bool = False, seed: int | None = None
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self._init_resizable(seed)

    def _init_resizable(self, seed: int | None) -> None:
        self.plan: Callable[[int], int] | None = None
        self.seed = seed

    @classmethod
    def adopt(cls, batch_sampler: BatchSampler, seed: int | None = None) -> ResizableBatchSampler:
        """Turn a DataLoader's existing plain ``BatchSampler`` into a resizable one, in place.

        PyTorch forbids re-assigning ``DataLoader.batch_sampler`` after construction, and a live
        iterator (persistent workers) keeps a reference to the original object. Changing the
        object's class keeps every reference valid and every attribute (sampler, drop_last) as
        the user set them: the DataLoader is neither rebuilt nor re-assigned.

        Raises:
            TypeError: if ``batch_sampler`` is a custom class with its own batching logic, which
                this sampler would silently discard.
        """
        if isinstance(batch_sampler, cls):
            if seed is not None:
                batch_sampler.seed = seed
            return batch_sampler
        if type(batch_sampler) is not BatchSampler:
            raise TypeError(
                f"the train DataLoader uses a custom batch sampler ({type(batch_sampler).__name__}); "
                "epochwise can resize only a plain torch.utils.data.BatchSampler. Build the DataLoader "
                "with batch_size=... (and shuffle/sampler) instead of batch_sampler=..., or pass a "
                "ResizableBatchSampler yourself."
            )
        batch_sampler.__class__ = cls
        batch_sampler._init_resizable(seed)
        return batch_sampler  # type: ignore[return-value]

    def size_of(self, index: int) -> int:
        """Planned size of batch ``index`` of the epoch."""
        n = self.plan(index) if self.plan is not None else self.batch_size
        if n < 1:
            raise ValueError(f"batch size must be >= 1, the plan gave {n} for batch {index}")
        return int(n)

    def __iter__(self) -> Iterator[list[int]]:
        indices = iter(self.sampler)
        i = 0
        while True:
            n = self.size_of(i)
            batch = list(islice(indices, n))
            if not batch or (self.drop_last and len(batch) < n):
                return
            yield batch
            i += 1

    def __len__(self) -> int:
        remaining = len(self.sampler)  # type: ignore[arg-type]
        if self.plan is None:
            if self.drop_last:
                return remaining // self.batch_size
            return (remaining + self.batch_size - 1) // self.batch_size
        count = 0
        while remaining > 0:
            n = self.size_of(count)
            if self.drop_last and remaining < n:
                break
            remaining -= n
            count += 1
        return count

    def set_epoch(self, epoch: int) -> None:
        """Seed this epoch's shuffle: forward to the sampler's ``set_epoch`` or re-seed a RandomSampler."""
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        elif isinstance(self.sampler, RandomSampler) and self.seed is not None:
            self.sampler.generator = torch.Generator().manual_seed(int(self.seed) + int(epoch))
