"""Samplers: the one mechanism that sizes batches, and a shuffle that is a function of (seed, epoch).

:class:`ResizableBatchSampler` decides how many indices each batch gets while the batches are
produced, so a batch-size change never rebuilds a DataLoader nor restarts its workers (workers only
receive lists of indices from the main process). :class:`SeededRandomSampler` shuffles each epoch
from ``(seed, epoch)`` alone, so a resumed or reloaded run sees the order an uninterrupted one sees.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence, Sized
from itertools import islice

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler

__all__ = [
    "ResizableBatchSampler",
    "SeededRandomSampler",
    "epoch_seed",
    "is_plain_batch_sampler",
    "resizable_copy",
    "close_loader",
]

# torchdata's StatefulDataLoader swaps in look-alikes of these two; named here, never imported
_TORCHDATA = "torchdata.stateful_dataloader.sampler"


def _is(obj: object, torch_class: type, name: str) -> bool:
    cls = type(obj)
    return cls is torch_class or (cls.__module__ == _TORCHDATA and cls.__name__ == name)


def is_plain_batch_sampler(batch_sampler: object) -> bool:
    """Whether ``batch_sampler`` only cuts its sampler into equal chunks (so resizing loses nothing):
    ``torch.utils.data.BatchSampler``, torchdata's stateful look-alike, or a ResizableBatchSampler."""
    return isinstance(batch_sampler, ResizableBatchSampler) or _is(batch_sampler, BatchSampler, "BatchSampler")

#: 2**61 - 1, a Mersenne prime: mixes (seed, epoch) into one generator seed.
_PRIME = (1 << 61) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch`` for base ``seed``; distinct pairs give distinct seeds.

    (``seed + epoch``, DistributedSampler's rule, makes seed 0 at epoch 1 repeat seed 1 at epoch 0.)

    Example:
        >>> epoch_seed(0, 1) != epoch_seed(1, 0)
        True
    """
    return (int(seed) * 1_000_003 + int(epoch)) % _PRIME


class SeededRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose order is a function of ``(seed, epoch)`` and nothing else.

    Lightning calls ``set_epoch`` on a train loader's sampler at every epoch start, as it does for
    a ``DistributedSampler``; a fresh generator seeded by :func:`epoch_seed` then draws the order.
    The global RNG is neither read nor advanced, so the order is the same whatever else the run
    does, after a resume and after a reload of the loaders. Being a ``RandomSampler``, Lightning
    still treats the loader as shuffled (under DDP it swaps in a shuffling ``DistributedSampler``).

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed of the order.
        replacement, num_samples: as in ``RandomSampler``.

    Example:
        >>> s = SeededRandomSampler(range(6), seed=3)
        >>> first = list(s); s.set_epoch(1); second = list(s); s.set_epoch(0)
        >>> list(s) == first != second
        True
    """

    def __init__(
        self, data_source: Sized, seed: int = 0, replacement: bool = False, num_samples: int | None = None
    ) -> None:
        super().__init__(data_source, replacement=replacement, num_samples=num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from super().__iter__()


class ResizableBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose batch size may change between, or within, epochs.

    Two ways to set the size:

    - ``sampler.batch_size = n``: every batch produced from now on has ``n`` samples. With
      DataLoader workers, the ``num_workers * prefetch_factor`` batches already requested keep
      the old size; at an epoch boundary the change is exact.
    - ``sampler.plan = f``: ``f(i)`` is the size of batch ``i`` of the epoch. Sizes known in
      advance (schedules) are exact at every step whatever the prefetching, because the index
      lists are cut to size when they are produced.

    The order of an epoch: a wrapped sampler with ``set_epoch`` (``DistributedSampler``,
    :class:`SeededRandomSampler`) gets the epoch forwarded; a plain ``RandomSampler`` is never
    touched: with ``seed`` set, this sampler draws the epoch's order from a private copy seeded by
    ``(seed, epoch)``; any other sampler is iterated as it is. ``start_batch = k`` makes the next
    iteration begin at batch ``k`` of the epoch (skipping the samples of batches ``0..k-1``: a
    mid-epoch resume); ``__len__`` still counts the whole epoch, as Lightning expects of a resumed
    loader. ``order = f`` hands the order of each epoch to someone else (a curriculum): ``f(epoch)``
    returns the dataset indices of this epoch for this process, in order, or ``None`` for the
    wrapped sampler's own order; the epoch then has ``len(f(epoch))`` samples. Over an ``IterableDataset`` (the sampler yields ``None`` forever) the sizes say how many
    items each batch pulls from the stream, and ``len()`` raises ``TypeError``.

    Args:
        sampler: any sampler of dataset indices (Random, Sequential, Distributed, ...).
        batch_size: size of every batch while no plan is set.
        drop_last: drop a final batch smaller than its planned size.
        seed: base seed of the per-epoch order when ``sampler`` is a plain ``RandomSampler``.

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
        >>> bs.start_batch = 2
        >>> list(bs), len(bs)
        ([[3, 4, 5, 6], [7, 8, 9]], 4)
        >>> bs.plan = None; bs.order = lambda epoch: [9, 7, 5, 3, 1]
        >>> list(bs), len(bs)
        ([[9, 7, 5], [3, 1]], 2)
    """

    def __init__(
        self, sampler: Sampler[int] | Sized, batch_size: int, drop_last: bool = False, seed: int | None = None
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)  # type: ignore[arg-type]
        self.seed = seed
        self.epoch = 0
        self.plan: Callable[[int], int] | None = None
        self.order: Callable[[int], Sequence[int] | None] | None = None
        self.start_batch = 0

    def size_of(self, index: int) -> int:
        """Planned size of batch ``index`` of the epoch."""
        n = self.plan(index) if self.plan is not None else self.batch_size
        if n < 1:
            raise ValueError(f"batch size must be >= 1, the plan gave {n} for batch {index}")
        return int(n)

    def set_epoch(self, epoch: int) -> None:
        """Order the coming iteration as epoch ``epoch`` (forwarded to the sampler if it has ``set_epoch``)."""
        self.epoch = int(epoch)
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)

    def _ordered(self) -> Sequence[int] | None:
        """The epoch's indices given by ``order`` (``None``: no order hook, or it defers)."""
        return self.order(self.epoch) if self.order is not None else None

    def _epoch_indices(self) -> Iterator[int]:
        ordered = self._ordered()
        if ordered is not None:
            return iter(ordered)
        inner = self.sampler
        if _is(inner, RandomSampler, "RandomSampler") and self.seed is not None:
            private = RandomSampler(
                inner.data_source,
                replacement=inner.replacement,
                num_samples=inner._num_samples,  # type: ignore[attr-defined]
                generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)),
            )
            return iter(private)
        return iter(inner)

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._epoch_indices()
        i, self.start_batch = self.start_batch, 0  # a resume offset holds for one iteration only
        skip = sum(self.size_of(j) for j in range(i))
        if skip:
            next(islice(indices, skip - 1, None), None)  # consume the indices of batches 0..i-1
        while True:
            n = self.size_of(i)
            batch = list(islice(indices, n))
            if not batch or (self.drop_last and len(batch) < n):
                return
            yield batch
            i += 1

    def __len__(self) -> int:
        ordered = self._ordered()
        # TypeError for a stream: Lightning's "inf"
        remaining = len(ordered) if ordered is not None else len(self.sampler)  # type: ignore[arg-type]
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


def resizable_copy(loader: DataLoader, batch_size: int | None = None, seed: int | None = None) -> DataLoader:
    """A copy of ``loader`` whose batches come from a :class:`ResizableBatchSampler`; ``loader`` is untouched.

    The copy has the same class (a torchdata ``StatefulDataLoader`` stays stateful), dataset,
    collate function and worker settings, and draws indices from the same sampler; only its batch
    sampler is new (``copy.sampler`` is the resizable one: ``copy.batch_sampler``). PyTorch forbids
    re-assigning ``batch_sampler`` on a built DataLoader through ``setattr``; the copy is set up
    before anyone iterates it. Over an ``IterableDataset`` its ``len()`` counts samples, not batches
    (whoever resizes it knows the epoch length).

    Raises:
        TypeError: if ``loader`` has no batch sampler (``batch_size=None``) or a custom one whose
            batching logic a resizable sampler would silently drop.

    Example:
        >>> loader = DataLoader(list(range(10)), batch_size=4)
        >>> twin = resizable_copy(loader)
        >>> twin.batch_sampler.batch_size = 5
        >>> [len(b) for b in twin], [len(b) for b in loader]
        ([5, 5], [4, 4, 2])
    """
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        raise TypeError("the DataLoader makes no batches (batch_size=None)")
    if not is_plain_batch_sampler(batch_sampler):
        raise TypeError(f"the DataLoader uses a custom batch sampler ({type(batch_sampler).__name__})")
    size = int(batch_size if batch_size is not None else batch_sampler.batch_size)
    sampler = ResizableBatchSampler(batch_sampler.sampler, size, batch_sampler.drop_last, seed=seed)
    twin = copy.copy(loader)
    twin.__dict__["batch_sampler"] = sampler
    twin.__dict__["_iterator"] = None  # never share a live iterator (persistent workers) with the original
    if isinstance(loader.dataset, IterableDataset):
        twin.__dict__["batch_size"] = None  # its len() would otherwise divide by the old size
    return twin


def close_loader(loader: DataLoader) -> None:
    """Shut down the worker processes a DataLoader keeps (persistent workers) and forget its iterator."""
    iterator = loader.__dict__.get("_iterator")
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    loader.__dict__["_iterator"] = None
