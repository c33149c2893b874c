"""Optimizers for large-batch training."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg, 2017).

    Each parameter tensor's step is scaled by the trust ratio
    ``trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||)`` so that layers whose gradients
    are large relative to their weights do not diverge at large batch sizes. Parameters with
    ``ndim <= 1`` (biases, norm scales) skip the adaptation and weight decay when
    ``exclude_1d=True``, as is standard.

    Args:
        params: parameters or param groups.
        lr: global learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 penalty added to the gradient.
        trust_coefficient: ``eta`` in the paper.
        eps: guards the division.
        exclude_1d: skip adaptation/decay for 1-D parameters.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3, 3))
        >>> opt = LARS([w], lr=0.1)
        >>> w.grad = torch.ones(3, 3); opt.step()
        >>> bool((w < 1).all())
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        exclude_1d: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"Invalid learning rate: {lr} (must be > 0)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        if trust_coefficient <= 0:
            raise ValueError(f"Invalid trust_coefficient: {trust_coefficient} (must be > 0)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                adapt = not (group["exclude_1d"] and p.ndim <= 1)
                if adapt:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                        torch.ones_like(w_norm),
                    )
                    g = g.mul(trust)
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = g.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(g)
                    g = buf
                p.add_(g, alpha=-group["lr"])
        return loss
