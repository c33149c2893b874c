"""Linear regression with Gaussian inputs and label noise: a task whose gradient noise is known exactly.

``y = x . w* + sigma * eps`` with ``x ~ N(0, I_d)``; the model is ``y_hat = x . w`` (no bias) with the
loss ``0.5 (y_hat - y)^2`` averaged over the batch. The gradient of one sample is ``(x . w - y) x``,
so the exact ``|G|^2`` and ``tr(Sigma)`` of the finite data set come from all ``N`` per-sample
gradients at once (:func:`exact_noise`).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

__all__ = ["regression_data", "exact_noise", "LinearRegression"]


def regression_data(n: int = 8192, features: int = 8, sigma: float = 1.0, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w_star = torch.ones(features) / features**0.5
    return TensorDataset(x, x @ w_star + sigma * torch.randn(n, generator=g))


def exact_noise(data: TensorDataset, weight: torch.Tensor | None = None) -> dict[str, float]:
    """``|G|^2``, ``tr(Sigma)`` (population covariance) and ``B_simple`` from every per-sample gradient."""
    x, y = (t.double() for t in data.tensors)
    w = torch.zeros(x.shape[1], dtype=torch.float64) if weight is None else weight.double().reshape(-1)
    per_sample = (x @ w - y)[:, None] * x
    mean = per_sample.mean(0)
    grad_sq = float(mean @ mean)
    trace = float((per_sample - mean).pow(2).sum(1).mean())
    return {"grad_sq_norm": grad_sq, "trace_cov": trace, "b_simple": trace / grad_sq}


class LinearRegression(pl.LightningModule):
    """``y_hat = x . w`` from ``w = 0``; ``lr=0`` freezes it (the noise scale then stays the exact one).

    ``rows`` records ``(epoch, global_step, batch_idx, batch size)`` from inside ``training_step``.
    """

    def __init__(self, features: int = 8, lr: float = 0.0) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, 1, bias=False)
        torch.nn.init.zeros_(self.linear.weight)
        self.lr = lr
        self.rows: list[tuple[int, int, int, int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.rows.append((self.current_epoch, self.global_step, batch_idx, int(x.shape[0])))
        return 0.5 * (self.linear(x).squeeze(-1).float() - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
