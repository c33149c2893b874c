"""Optimizers for large-batch training."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from epochwise.datamodules._checks import check_bool, check_number

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg, 2017).

    For every parameter tensor ``w`` with gradient ``g`` (Algorithm 1 of "Large Batch Training of
    Convolutional Networks", arXiv:1708.03888):

    .. code-block:: text

        trust = eta * ||w|| / (||g|| + weight_decay * ||w|| + eps)     (1 if ||w|| or ||g|| is 0)
        d     = trust * (g + weight_decay * w)
        buf   = momentum * buf + d                                     (buf = d at the first step)
        w     = w - lr * buf

    The denominator holds the two norms added, as in the paper: a gradient that the weight decay
    nearly cancels gives a small step, not one of norm ``lr * eta * ||w||``. The momentum buffer
    follows ``torch.optim.SGD`` (the LR multiplies the buffer; the paper puts the LR inside it,
    which is the same while the LR is constant).

    ``clip=True`` is LARC's clipping mode (NVIDIA Apex ``apex.parallel.LARC``): the LR of a tensor
    is ``min(trust, lr)``, i.e. the trust ratio only ever lowers the global LR
    (``d = min(trust / lr, 1) * (g + weight_decay * w)``). With ``exclude_1d=True`` (the usual
    practice) tensors with ``ndim <= 1`` (biases, norm scales and shifts) get neither the trust
    ratio nor weight decay: a plain momentum-SGD step. ``p.grad`` is never modified; the momentum
    buffers live in ``state`` and round-trip through ``state_dict``. The trust ratio stays a tensor
    (no host-device synchronisation per step).

    Args:
        params: parameters or param groups.
        lr: global learning rate (> 0).
        momentum: heavy-ball momentum in ``[0, 1)``.
        weight_decay: L2 coefficient (``beta`` in the paper), >= 0.
        trust_coefficient: ``eta`` in the paper (> 0).
        eps: added to the trust ratio's denominator (>= 0).
        exclude_1d: give 1-D tensors a plain momentum-SGD step, without trust ratio or decay.
        clip: LARC's clipping mode: per-tensor LR ``min(trust, lr)`` instead of ``trust * lr``.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3, 3))
        >>> opt = LARS([w], lr=0.1, momentum=0.0, trust_coefficient=0.01)
        >>> w.grad = torch.ones(3, 3); opt.step()
        >>> round(float((1 - w.detach()[0, 0]) * 1000), 4)  # lr * eta * ||w|| / ||g|| * g = 1e-3
        1.0
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        exclude_1d: bool = True,
        clip: bool = False,
    ) -> None:
        defaults = dict(
            lr=check_number("lr", lr, 0.0, low_inclusive=False),
            momentum=check_number("momentum", momentum, 0.0, 1.0, high_inclusive=False),
            weight_decay=check_number("weight_decay", weight_decay, 0.0),
            trust_coefficient=check_number("trust_coefficient", trust_coefficient, 0.0, low_inclusive=False),
            eps=check_number("eps", eps, 0.0),
            exclude_1d=check_bool("exclude_1d", exclude_1d),
            clip=check_bool("clip", clip),
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state saved before `clip` existed
            group.setdefault("clip", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One LARS step over every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["exclude_1d"] and p.ndim <= 1:
                    d = g.clone() if momentum else g  # plain SGD step, no trust ratio, no decay
                else:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    if group["clip"]:
                        trust = torch.clamp(trust / lr, max=1.0)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    d = g.add(p, alpha=wd) if wd else g.clone()
                    d.mul_(trust)
                if momentum:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        self.state[p]["momentum_buffer"] = buf = d
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss
