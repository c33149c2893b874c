"""The standard error of the mini-batch gradient against the batch size, measured.

At fixed weights, the per-sample gradients of the whole train split (``torch.func``: ``vmap`` of
``grad``) give the full-batch gradient ``g`` exactly, and the gradient of any mini-batch ``S`` as
the mean of its rows. The standard error at batch size ``B`` is
``SE(B) = sqrt(mean over draws ||g_S - g||^2)``, over ``draws`` random batches drawn without
replacement (as an epoch's batches are). The tutorial's claim, ``SE ~ 1 / sqrt(B)``, is a slope of
-1/2 in log-log. Sampling without replacement from ``N`` samples multiplies the variance by the
finite-population factor ``(N - B) / (N - 1)``, so the raw slope steepens as ``B`` nears ``N``;
:func:`loglog_slope` of the SE divided by ``sqrt`` of that factor is what the law predicts exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from epochwise.callbacks import loglog_slope as fit_loglog


def per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 256) -> Tensor:
    """``(N, P)``: each sample's gradient of the cross-entropy, flattened over all parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(loss), in_dims=(None, 0, 0))
    rows = []
    for start in range(0, len(y), chunk):
        g = per(params, x[start:start + chunk], y[start:start + chunk])
        rows.append(torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], dim=1))
    return torch.cat(rows)


def standard_errors(grads: Tensor, batch_sizes: Sequence[int], draws: int, seed: int = 0) -> dict[int, float]:
    """``{B: SE(B)}`` over ``draws`` batches per size, each drawn without replacement."""
    n = grads.shape[0]
    full = grads.mean(0)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in batch_sizes:
        if not 1 <= b <= n:
            raise ValueError(f"batch size {b} must be in [1, {n}]")
        sq = 0.0
        for _ in range(draws):
            idx = torch.randperm(n, generator=g)[:b]
            sq += float((grads.index_select(0, idx).mean(0) - full).pow(2).sum())
        out[b] = math.sqrt(sq / draws)
    return out


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (the library's fit, without its standard error).

    Example:
        >>> round(loglog_slope([1, 4, 16], [1.0, 0.5, 0.25]), 6)
        -0.5
    """
    return fit_loglog(xs, ys)[0]


def finite_population_factor(n: int, b: int) -> float:
    """``sqrt((N - B) / (N - 1))``: how much sampling ``B`` of ``N`` without replacement shrinks the SE."""
    return math.sqrt((n - b) / (n - 1)) if n > 1 else 0.0
