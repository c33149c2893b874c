"""The gradient noise scale (McCandlish et al. 2018), pure: usable with or without Lightning.

For a mini-batch of ``B`` samples drawn independently from the data, the mini-batch gradient
``G_B`` is an unbiased estimate of the true gradient ``G`` with covariance ``Sigma / B`` (``Sigma``
the covariance of one sample's gradient), so::

    E |G_B|^2 = |G|^2 + tr(Sigma) / B

Two squared norms measured at two batch sizes ``b < B`` on the same parameters therefore give
unbiased estimates of both terms (McCandlish et al. 2018, appendix A.1)::

    |G|^2     ~  (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~  (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

and the *simple noise scale* ``B_simple = tr(Sigma) / |G|^2`` predicts the largest batch size that
still makes good use of each sample (the critical batch size, up to a constant). A ratio of two
noisy estimates is biased, so, as in the paper, each estimate is smoothed by an exponential moving
average and ``B_simple`` is the ratio of the two averages.

When ``|G_b|^2`` is the mean of several micro-batch norms of unequal sizes ``n_i``, or ``G_B`` the
plain average of such micro-batch gradients (Lightning's accumulation), ``b`` and ``B`` are the
*effective* sizes that make the identity hold: see :func:`effective_batch_sizes`.

Everything here works on tensors without reading them back to the host (no device sync), so a
training loop can update the estimate every step and read it only when it logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from scipy import stats
from torch import Tensor

__all__ = [
    "noise_scale_estimates",
    "effective_batch_sizes",
    "averaged_batch_size",
    "GradientNoiseEstimator",
    "minibatch_gradient_standard_error",
    "loglog_slope",
]

Number = float | Tensor


def noise_scale_estimates(small_sq: Number, b_small: float, big_sq: Number, b_big: float) -> tuple[Number, Number]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from ``|G_b|^2`` at ``b = b_small`` and ``|G_B|^2`` at ``B = b_big``.

    Example:
        >>> # |G|^2 = 1 and tr(Sigma) = 32: E|G_8|^2 = 1 + 32/8 = 5, E|G_32|^2 = 1 + 32/32 = 2
        >>> noise_scale_estimates(5.0, 8, 2.0, 32)
        (1.0, 32.0)
    """
    if not b_big > b_small > 0:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small!r}, b_big={b_big!r}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def effective_batch_sizes(sizes: Sequence[int], weighted: bool) -> tuple[float, float]:
    """Effective ``(b, B)`` when ``k`` micro-batches of ``sizes`` make one big gradient.

    The small norm is the mean of the ``k`` micro-batch squared norms: ``E = |G|^2 + tr(Sigma) h / k``
    with ``h = sum(1 / n_i)``, so ``b = k / h`` (the harmonic mean of the sizes). The big gradient
    is either the sample mean over all of them (``weighted=True``: micro-batch ``i`` weighted
    ``n_i / sum(n)``, so ``B = sum(n)``) or the plain average of the micro-batch gradients
    (``weighted=False``, what gradient accumulation does: ``B = k^2 / h``). Equal sizes ``n`` give
    ``(n, k n)`` either way.

    Example:
        >>> effective_batch_sizes([16, 16, 16, 16], weighted=False)
        (16.0, 64.0)
        >>> effective_batch_sizes([8, 4], weighted=True)  # b = 2 / (1/8 + 1/4)
        (5.333333333333333, 12.0)
    """
    k = len(sizes)
    if k < 2 or min(sizes) < 1:
        raise ValueError(f"need at least two micro-batches of at least one sample, got sizes {list(sizes)}")
    small = float(sizes[0]) if len(set(sizes)) == 1 else k / sum(1.0 / n for n in sizes)
    return small, float(sum(sizes)) if weighted else averaged_batch_size(sizes)


def averaged_batch_size(sizes: Sequence[int]) -> float:
    """Effective batch size of the plain average of micro-batch gradients of ``sizes``: ``k^2 / sum(1/n_i)``.

    Its covariance is ``Sigma sum(1/n_i) / k^2``; equal sizes ``n`` give ``k n``.

    Example:
        >>> averaged_batch_size([16, 16]), averaged_batch_size([8])
        (32.0, 8.0)
    """
    if not sizes or min(sizes) < 1:
        raise ValueError(f"need micro-batches of at least one sample, got sizes {list(sizes)}")
    if len(set(sizes)) == 1:
        return float(len(sizes) * sizes[0])  # exact
    return len(sizes) ** 2 / sum(1.0 / n for n in sizes)


class GradientNoiseEstimator:
    """Running estimates of ``|G|^2``, ``tr(Sigma)`` and ``B_simple`` from pairs of gradient norms.

    Each :meth:`update` turns one pair of squared norms (small batch ``b``, big batch ``B``, see
    the module docstring for the formulas) into unbiased estimates of ``|G|^2`` and ``tr(Sigma)``,
    and folds each into its own exponential moving average (decay ``ema_decay`` per update, with
    Adam's bias correction, so the first updates are not pulled towards 0). ``b_simple`` is the
    ratio of the two averages. A pair with a non-finite norm (an fp16 overflow step) is skipped.

    The state is kept in float64 tensors on one device and updated with tensor operations only:
    updating never reads a value back to the host. :meth:`values` reads everything at once.

    Args:
        ema_decay: weight of the past in each moving average, in ``[0, 1)`` (0: no smoothing).

    Example:
        >>> est = GradientNoiseEstimator(ema_decay=0.9)
        >>> est.update(5.0, 8, 2.0, 32); est.update(4.0, 8, 1.75, 32)
        >>> # two measurements: tr(Sigma) estimated 32, then 24; |G|^2 estimated 1 both times
        >>> round(float(est.grad_sq_norm), 4), round(float(est.trace_cov), 2), int(est.measurements)
        (1.0, 27.79, 2)
        >>> round(float(est.b_simple), 2)  # the later estimate weighs more: (0.09 * 32 + 0.1 * 24) / 0.19
        27.79
    """

    def __init__(self, ema_decay: float = 0.95) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self._dtype = torch.float64
        zero = torch.zeros((), dtype=self._dtype)
        self._ema_grad_sq, self._ema_trace, self._weight, self._count = zero, zero, zero, zero
        self._raw_grad_sq, self._raw_trace = zero + math.nan, zero + math.nan

    def to(self, device: torch.device | str) -> GradientNoiseEstimator:
        """Move the state to ``device`` (float32 where float64 is not supported, e.g. MPS)."""
        device = torch.device(device)
        if device.type == "mps":
            self._dtype = torch.float32
        for name in ("_ema_grad_sq", "_ema_trace", "_weight", "_count", "_raw_grad_sq", "_raw_trace"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=self._dtype))
        return self

    def update(self, small_sq: Number, b_small: float, big_sq: Number, b_big: float) -> None:
        """Fold one measurement in: ``|G_b|^2`` at ``b = b_small`` and ``|G_B|^2`` at ``B = b_big``."""
        like = self._ema_grad_sq
        small = torch.as_tensor(small_sq).to(device=like.device, dtype=self._dtype)
        big = torch.as_tensor(big_sq).to(device=like.device, dtype=self._dtype)
        grad_sq, trace = noise_scale_estimates(small, b_small, big, b_big)
        ok = torch.isfinite(grad_sq) & torch.isfinite(trace)
        d = self.ema_decay
        self._ema_grad_sq = torch.where(ok, d * self._ema_grad_sq + (1 - d) * grad_sq, self._ema_grad_sq)
        self._ema_trace = torch.where(ok, d * self._ema_trace + (1 - d) * trace, self._ema_trace)
        self._weight = torch.where(ok, d * self._weight + (1 - d), self._weight)
        self._count = self._count + ok.to(self._dtype)
        self._raw_grad_sq = torch.where(ok, grad_sq, self._raw_grad_sq)
        self._raw_trace = torch.where(ok, trace, self._raw_trace)

    # -- smoothed values (bias-corrected moving averages), as 0-d tensors ------------------------
    @property
    def grad_sq_norm(self) -> Tensor:
        """Smoothed ``|G|^2`` (NaN before the first measurement)."""
        return self._ema_grad_sq / self._weight

    @property
    def trace_cov(self) -> Tensor:
        """Smoothed ``tr(Sigma)`` (NaN before the first measurement)."""
        return self._ema_trace / self._weight

    @property
    def b_simple(self) -> Tensor:
        """``tr(Sigma) / |G|^2`` from the smoothed values (NaN before the first measurement)."""
        return self._ema_trace / self._ema_grad_sq

    @property
    def measurements(self) -> Tensor:
        """Number of measurements folded in."""
        return self._count

    # -- the last measurement alone -----------------------------------------------------------
    @property
    def raw_grad_sq_norm(self) -> Tensor:
        return self._raw_grad_sq

    @property
    def raw_trace_cov(self) -> Tensor:
        return self._raw_trace

    @property
    def raw_b_simple(self) -> Tensor:
        return self._raw_trace / self._raw_grad_sq

    def values(self) -> dict[str, float]:
        """Every value as a Python float, read from the device in one transfer.

        Example:
            >>> sorted(GradientNoiseEstimator().values())
            ['b_simple', 'b_simple_raw', 'grad_sq_norm', 'grad_sq_norm_raw', 'measurements', 'trace_cov', 'trace_cov_raw']
        """
        names = ("b_simple", "grad_sq_norm", "trace_cov", "b_simple_raw", "grad_sq_norm_raw", "trace_cov_raw",
                 "measurements")
        with torch.no_grad():
            stacked = torch.stack([
                self.b_simple, self.grad_sq_norm, self.trace_cov, self.raw_b_simple, self._raw_grad_sq,
                self._raw_trace, self._count,
            ]).tolist()
        return dict(zip(names, stacked))

    def state_dict(self) -> dict[str, float]:
        """The running state as Python floats (exact: float64)."""
        names = ("_ema_grad_sq", "_ema_trace", "_weight", "_count", "_raw_grad_sq", "_raw_trace")
        values = torch.stack([getattr(self, n) for n in names]).tolist()
        return {n.lstrip("_"): v for n, v in zip(names, values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys keep their current value)."""
        for name in ("ema_grad_sq", "ema_trace", "weight", "count", "raw_grad_sq", "raw_trace"):
            if name in state:
                current = getattr(self, f"_{name}")
                setattr(self, f"_{name}", torch.tensor(float(state[name]), dtype=current.dtype, device=current.device))


# -- the standard error of the mini-batch gradient ----------------------------------------------
def minibatch_gradient_standard_error(
    gradient: Callable[[Tensor], Tensor],
    num_samples: int,
    batch_sizes: Sequence[int],
    repeats: int | Mapping[int, int],
    generator: torch.Generator | None = None,
) -> dict[int, float]:
    """Measured standard error ``sqrt(E |G_B - G|^2)`` of the mini-batch gradient at each size ``B``.

    ``gradient(indices)`` returns the flat mean gradient over the samples ``indices`` (for fixed
    parameters); ``G`` is ``gradient`` over all ``num_samples``. Each of the ``repeats`` mini-batches
    per size (an int, or ``{size: repeats}``) draws ``B`` indices independently and uniformly (with
    replacement: the i.i.d. sampling under which the standard error is ``sqrt(tr(Sigma) / B)``, so
    it falls as ``B ** -0.5``). With heavy-tailed per-sample gradients (a few samples with a large
    gradient, late in training) small batches need many more draws than large ones for the mean of
    ``|G_B - G|^2`` to settle: give them more repeats.

    Example:
        >>> data = torch.randn(1000, 50, generator=torch.Generator().manual_seed(0))
        >>> se = minibatch_gradient_standard_error(lambda i: data[i].mean(0), 1000, [10, 1000], 100,
        ...                                         torch.Generator().manual_seed(1))
        >>> round(se[10] / se[1000])  # sqrt(1000 / 10) = 10
        10
    """
    counts = {int(b): int(repeats[b] if isinstance(repeats, Mapping) else repeats) for b in batch_sizes}
    if num_samples < 1 or not batch_sizes or min(batch_sizes) < 1 or min(counts.values()) < 1:
        raise ValueError("need num_samples >= 1, repeats >= 1 and batch sizes >= 1")
    full = gradient(torch.arange(num_samples)).detach().double()
    out: dict[int, float] = {}
    for size in batch_sizes:
        total = 0.0
        count = counts[int(size)]
        for _ in range(count):
            indices = torch.randint(num_samples, (int(size),), generator=generator)
            total += float((gradient(indices).detach().double() - full).pow(2).sum())
        out[int(size)] = math.sqrt(total / count)
    return out


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ``log y`` against ``log x`` and its standard error (``scipy.stats``).

    Example:
        >>> slope, stderr = loglog_slope([8, 32, 128, 512], [1 / 8 ** 0.5, 1 / 32 ** 0.5, 1 / 128 ** 0.5, 1 / 512 ** 0.5])
        >>> round(slope, 6), round(stderr, 6)
        (-0.5, 0.0)
    """
    fit = stats.linregress([math.log(x) for x in xs], [math.log(y) for y in ys])
    return float(fit.slope), float(fit.stderr)
