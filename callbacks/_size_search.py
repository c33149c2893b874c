"""The search behind :func:`~epochwise.callbacks.batch_memory.find_max_batch_size`: exponential
growth, then bisection, over sizes whose measured peak must stay within a budget."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["grow_and_bisect"]


def grow_and_bisect(
    trial: Callable[[int], int | None], trials: list[tuple[int, int | None]], first: int, cap: int, budget: int,
    predict: bool,
) -> int:
    """The largest size that fits: grow from ``first`` by doubling while the peak fits (halve if
    ``first`` does not), then bisect between the last fit and the first failure; 0 if not even 1 fits.

    ``trial(size)`` runs one step and returns its peak (``None``: out of memory); every size tried
    is appended to ``trials`` with its peak. A size fits when its peak is within ``budget``. With
    ``predict`` (CPU, where running out of memory ends the process) a size whose peak, extrapolated
    linearly from the two largest fits, is over the budget counts as a failure without being run.

    Example:
        >>> trials = []
        >>> grow_and_bisect(lambda n: 100 + 10 * n, trials, 1, 1000, budget=300, predict=False)
        20
        >>> [n for n, _ in trials]
        [1, 2, 4, 8, 16, 32, 24, 20, 22, 21]
    """

    def fits(size: int) -> bool:
        done = [(s, p) for s, p in trials if p is not None and p <= budget]
        if predict and len(done) >= 2:
            (s1, p1), (s2, p2) = sorted(done)[-2:]
            if p2 + max(0.0, (p2 - p1) / (s2 - s1)) * (size - s2) > budget:
                trials.append((size, None))
                return False
        peak = trial(size)
        trials.append((size, peak))
        return peak is not None and peak <= budget

    low, high, size = 0, None, first
    while high is None:
        if fits(size):
            low = size
            if size >= cap:
                return low
            size = min(2 * size, cap)
        else:
            high = size
    while low == 0 and high > 1:
        size = high // 2
        if fits(size):
            low = size
        else:
            high = size
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low
