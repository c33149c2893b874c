"""The rows of a batch, whatever its structure: the first one, repeated, or split into micro-batches.

A batch is what a DataLoader yields: a tensor, or lists, tuples (named ones too) and dicts of them,
with other objects passed through. Its rows are the first dimension of every tensor that has one;
0-dim tensors and non-tensors belong to every part of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

__all__ = ["first_rows", "template_batch", "repeat_rows", "split_rows", "first_tensor", "balanced_sizes"]


def _map(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch) if batch.ndim else batch
    if isinstance(batch, dict):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        rows = [_map(v, fn) for v in batch]
        return type(batch)(*rows) if hasattr(batch, "_fields") else type(batch)(rows)
    return batch


def first_rows(batch: Any) -> Any:
    """The batch cut to its first row."""
    return _map(batch, lambda t: t[:1])


def template_batch(data: Any) -> Any:
    """A batch of one sample: a DataLoader's first sample collated by its ``collate_fn`` (a
    stream's first batch cut to one row), or the first row of a batch."""
    if isinstance(data, DataLoader):
        try:
            sample = data.dataset[0]
        except (TypeError, NotImplementedError, IndexError, KeyError):  # a stream: no indexing
            return first_rows(next(iter(data)))
        return (data.collate_fn or default_collate)([sample])
    return first_rows(data)


def repeat_rows(batch: Any, size: int, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A one-row ``batch`` repeated to ``size`` rows (materialised) on ``device``, floats cast to
    ``dtype`` when given.

    Example:
        >>> x, y = repeat_rows([torch.ones(1, 2), torch.zeros(1, dtype=torch.long)], 3, torch.device("cpu"))
        >>> tuple(x.shape), y.tolist()
        ((3, 2), [0, 0, 0])
    """

    def grow(t: Tensor) -> Tensor:
        t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.expand(size, *t.shape[1:]).contiguous()

    return _map(batch, grow)


def balanced_sizes(n: int, parts: int) -> list[int]:
    """``n`` rows in ``parts`` sizes that differ by at most one, largest first.

    Example:
        >>> balanced_sizes(10, 3)
        [4, 3, 3]
    """
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def split_rows(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """``batch`` split along its rows into consecutive parts of ``sizes`` (views, no copy).

    Example:
        >>> parts = split_rows({"x": torch.arange(5), "scale": 2.0}, [3, 2])
        >>> [p["x"].tolist() for p in parts], [p["scale"] for p in parts]
        ([[0, 1, 2], [3, 4]], [2.0, 2.0])
    """
    sizes = list(sizes)
    total = sum(sizes)

    def cut(t: Tensor) -> list[Tensor]:
        if t.shape[0] != total:
            raise ValueError(f"a tensor of {t.shape[0]} rows in a batch of {total}: cannot split it")
        return list(torch.split(t, sizes))

    pieces = _map(batch, lambda t: _Parts(cut(t)))
    return [_pick(pieces, i) for i in range(len(sizes))]


class _Parts(list):
    """The parts of one tensor, while the structure around them is rebuilt per part."""


def _pick(batch: Any, i: int) -> Any:
    if isinstance(batch, _Parts):
        return batch[i]
    if isinstance(batch, dict):
        return {k: _pick(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        rows = [_pick(v, i) for v in batch]
        return type(batch)(*rows) if hasattr(batch, "_fields") else type(batch)(rows)
    return batch


def first_tensor(batch: Any) -> Tensor:
    """The first tensor of a batch (depth first)."""
    if isinstance(batch, Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        try:
            return first_tensor(item)
        except TypeError:
            continue
    raise TypeError("the batch holds no tensor")
