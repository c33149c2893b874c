"""Pure epoch plans: from a batch-size schedule to the size of every batch of every epoch.

The batch-size engine lays out each epoch before it starts: how many samples each batch gets
(:class:`EpochPlan`), which accumulation the Trainer uses for it, how many batches and optimizer
steps it has. Because the plan is a pure function of (schedule, epoch, optimizer step at the
epoch's start, samples per rank), every DDP rank computes the same one, a resumed fit recomputes
the one it interrupted, and the whole fit can be simulated before it starts (:func:`simulate_fit`):
that is how the engine knows the number of optimizer steps, checks ``val_check_interval`` and
``limit_train_batches`` against every epoch, and refuses what it cannot honour before training.
Nothing here knows about Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .schedules import split_for_max_per_device

__all__ = ["EpochPlan", "plan_epoch", "limited_length", "FitStep", "simulate_fit"]

#: ``(epoch, optimizer step) -> per-device request`` (the size of one micro-batch slot).
Request = Callable[[int, int], int]


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass
class EpochPlan:
    """The batches of one epoch.

    Batch ``i`` belongs to optimizer step ``first_step + i // accumulation``; its size is that
    step's request divided by ``extra`` (the micro-batches a request is split into when it exceeds
    ``max_per_device``), rounded half up and capped at ``max_per_device``. ``samples`` is the
    number of samples per rank in the epoch (``None`` for a stream without length).

    Example:
        >>> plan = plan_epoch(0, 0, lambda e, s: 4 * 2 ** s, samples=20, unit="step")
        >>> [plan.size_of(i) for i in range(3)], plan.length
        ([4, 8, 16], 3)
    """

    epoch: int
    first_step: int
    accumulation: int
    extra: int
    request: Request = field(repr=False)
    samples: int | None
    drop_last: bool = False
    max_per_device: int | None = None
    clamped: list[int] = field(default_factory=list, repr=False)  # steps whose micro-batch was capped
    _sizes: dict[int, int] = field(default_factory=dict, repr=False)
    _length: int | None = field(default=None, repr=False)

    def step_of(self, index: int) -> int:
        """Optimizer step (global) that batch ``index`` of the epoch belongs to."""
        return self.first_step + index // self.accumulation

    def size_of(self, index: int) -> int:
        """Planned size of batch ``index`` (the scheduled size: a short last batch is not shorter here)."""
        size = self._sizes.get(index)
        if size is None:
            step = self.step_of(index)
            wanted = int(self.request(self.epoch, step))
            size = max(1, _half_up(wanted / self.extra))
            if self.max_per_device is not None and size > self.max_per_device:
                size = self.max_per_device
                self.clamped.append(step)
            self._sizes[index] = size
        return size

    @property
    def length(self) -> int | None:
        """Batches in the epoch (``None`` for a stream without length)."""
        if self.samples is None:
            return None
        if self._length is None:
            remaining, count = self.samples, 0
            while remaining > 0:
                n = self.size_of(count)
                if self.drop_last and remaining < n:
                    break
                remaining -= n
                count += 1
            self._length = count
        return self._length

    def actual_size(self, index: int) -> int:
        """Samples batch ``index`` really holds (the last batch of a sized epoch may be short)."""
        n = self.size_of(index)
        if self.samples is None:
            return n
        used = sum(self.size_of(j) for j in range(index))
        return max(0, min(n, self.samples - used))

    def samples_before(self, index: int) -> int:
        """Samples per rank in batches ``0 .. index - 1`` of the epoch."""
        return sum(self.actual_size(j) for j in range(index))


def plan_epoch(
    epoch: int,
    first_step: int,
    request: Request,
    samples: int | None,
    unit: str = "epoch",
    base_accumulation: int = 1,
    max_per_device: int | None = None,
    drop_last: bool = False,
    largest_request: int | None = None,
) -> EpochPlan:
    """Lay out epoch ``epoch``, which starts at optimizer step ``first_step``.

    ``unit="epoch"``: one request for the whole epoch. ``unit="step"``: a request per optimizer
    step. The accumulation is fixed for an epoch (Lightning reads it per batch, and a change in the
    middle of a step would mix two effective batches): ``base_accumulation`` (the user's) times
    the split needed for the epoch's largest request, found by walking the epoch step by step
    (``largest_request`` for a stream, whose epoch cannot be walked).

    Example:
        >>> p = plan_epoch(0, 0, lambda e, s: 256, samples=1000, max_per_device=64)
        >>> p.size_of(0), p.accumulation, p.length
        (64, 4, 16)
    """
    if unit == "epoch":
        largest = int(request(epoch, first_step))
    elif samples is not None:
        largest, remaining, step = 1, samples, first_step
        while remaining > 0:
            wanted = int(request(epoch, step))
            largest = max(largest, wanted)
            remaining -= wanted * base_accumulation
            step += 1
    elif largest_request is not None:
        largest = int(largest_request)
    else:
        raise ValueError("a stream without length needs `largest_request` to fix the epoch's accumulation")
    micro, extra = split_for_max_per_device(largest, max_per_device)
    if unit == "epoch":  # one size for the whole epoch: the exact split where a divisor exists
        request = _constant_request(micro * extra)
    return EpochPlan(
        epoch=epoch,
        first_step=first_step,
        accumulation=base_accumulation * extra,
        extra=extra,
        request=request,
        samples=samples,
        drop_last=drop_last,
        max_per_device=max_per_device,
    )


def _constant_request(size: int) -> Request:
    return lambda epoch, step: size


def limited_length(length: float, limit: int | float) -> float:
    """Lightning's ``limit_train_batches`` rule: an int caps, a float scales and rounds down.

    Example:
        >>> limited_length(10, 4), limited_length(10, 0.25), limited_length(float("inf"), 3)
        (4, 2, 3)
    """
    if isinstance(limit, int):
        return min(length, limit)
    if math.isinf(length):
        return length
    return int(length * float(limit))


@dataclass(frozen=True)
class FitStep:
    """One epoch of a simulated fit: where it starts, how long it is, what it trains."""

    epoch: int
    first_step: int
    accumulation: int
    batches: float  # after limit_train_batches (inf for a stream)
    steps: float  # optimizer steps taken in the epoch
    first_size: int


def simulate_fit(
    make_plan: Callable[[int, int], EpochPlan],
    max_epochs: int | None,
    max_steps: int,
    limit: int | float = 1.0,
) -> list[FitStep]:
    """Every epoch of a fit, as the engine will run it: ``make_plan(epoch, first_step)`` per epoch.

    Stops at ``max_epochs`` or once ``max_steps`` (``-1``: none) optimizer steps are taken. Needs
    at least one bound; an epoch of a stream without length never ends, so only ``max_steps``
    bounds it.

    Example:
        >>> make = lambda e, s: plan_epoch(e, s, lambda e, s: 8 * 2 ** e, samples=64)
        >>> [(f.epoch, f.first_step, f.batches) for f in simulate_fit(make, 3, -1)]
        [(0, 0, 8), (1, 8, 4), (2, 12, 2)]
    """
    if (max_epochs is None or max_epochs < 0) and max_steps < 0:
        raise ValueError("simulate_fit needs max_epochs or max_steps")
    out: list[FitStep] = []
    epoch, step = 0, 0
    while (max_epochs is None or max_epochs < 0 or epoch < max_epochs) and (max_steps < 0 or step < max_steps):
        plan = make_plan(epoch, step)
        length = plan.length
        batches = limited_length(math.inf if length is None else length, limit)
        steps = math.ceil(batches / plan.accumulation) if not math.isinf(batches) else math.inf
        if max_steps >= 0:
            steps = min(steps, max_steps - step)
        out.append(FitStep(epoch, step, plan.accumulation, batches, steps, plan.size_of(0)))
        if math.isinf(steps):
            break
        step += int(steps)
        epoch += 1
    return out
