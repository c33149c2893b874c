"""LARS against a hand-computed update: trust ratio, momentum, weight decay, exclusion, LARC clip."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from epochwise.modules import LARS


def two_layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def gradients(model: nn.Module, step: int) -> None:
    """Set ``p.grad`` from a fixed regression loss (different inputs at every step)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()


def norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(float(v) ** 2 for v in t.flatten()))


def hand_step(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None, lr: float, momentum: float,
              wd: float, eta: float, clip: bool, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 of You et al. (2017), with torch.optim.SGD's momentum convention."""
    if w.ndim <= 1:  # biases: plain momentum SGD, no trust ratio, no decay
        d = g.clone()
    else:
        w_norm, g_norm = norm(w), norm(g)
        trust = eta * w_norm / (g_norm + wd * w_norm + eps)
        if clip:  # LARC: the per-tensor LR is min(trust, lr)
            trust = min(trust / lr, 1.0)
        d = trust * (g + wd * w)
    buf = d if buf is None else momentum * buf + d
    return w - lr * buf, buf


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05), (0.5, 0.5)])
def test_matches_hand_computed_update_for_several_steps(momentum, wd, clip):
    lr, eta = 0.5, 0.02
    model = two_layer()
    extra = {"clip": True} if clip else {}
    opt = LARS(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=eta, **extra)
    ref = [p.detach().clone() for p in model.parameters()]
    bufs: list[torch.Tensor | None] = [None] * len(ref)
    for step in range(5):
        gradients(model, step)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for i, g in enumerate(grads):
            ref[i], new_buf = hand_step(ref[i], g, bufs[i], lr, momentum, wd, eta, clip)
            bufs[i] = new_buf if momentum else None
        for p, g, want in zip(model.parameters(), grads, ref):
            assert torch.equal(p.grad, g)  # p.grad left untouched
            torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=0)
        # the reference's parameters drive the next gradient: keep the model on them exactly
        with torch.no_grad():
            for p, want in zip(model.parameters(), ref):
                p.copy_(want)


def test_clip_changes_the_step_only_where_trust_exceeds_lr():
    w = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    for lr, want_scale in [(0.001, 0.001), (1.0, 0.1)]:  # trust = 0.1 * 2 / 2 = 0.1
        with torch.no_grad():
            w.fill_(1.0)
        w.grad = torch.ones(2, 2, dtype=torch.float64)
        LARS([w], lr=lr, momentum=0.0, trust_coefficient=0.1, clip=True).step()
        # step = min(trust, lr) * g
        torch.testing.assert_close(w.detach(), torch.full((2, 2), 1.0 - want_scale, dtype=torch.float64))


def test_gradient_and_decay_nearly_cancelling_give_a_small_step():
    """The old code divided by ||g + wd w||: every step had norm lr * eta * ||w|| (100x too big here)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    wd, lr, eta = 0.1, 1.0, 0.01
    noise = torch.randn(8, 8, dtype=torch.float64)
    w.grad = -wd * w.detach() + 1e-3 * noise  # the gradient and the decay nearly cancel
    before = w.detach().clone()
    LARS([w], lr=lr, momentum=0.0, weight_decay=wd, trust_coefficient=eta).step()
    step = norm(before - w.detach())
    d = w.grad + wd * before
    paper = lr * eta * norm(before) * norm(d) / (norm(w.grad) + wd * norm(before))
    assert step == pytest.approx(paper, rel=1e-6)
    assert step < lr * eta * norm(before) / 50  # far below the old, normalised step


def test_excluded_1d_parameters_get_plain_sgd_and_no_decay():
    b = nn.Parameter(torch.ones(3, dtype=torch.float64))
    b.grad = torch.full((3,), 2.0, dtype=torch.float64)
    LARS([b], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=1e-3).step()
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.8, dtype=torch.float64))
    c = nn.Parameter(torch.ones(3, dtype=torch.float64))
    c.grad = torch.full((3,), 2.0, dtype=torch.float64)
    LARS([c], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=1e-3, exclude_1d=False).step()
    # adapted: trust = 1e-3 * sqrt(3) / (2 sqrt(3) + 0.5 sqrt(3)) = 4e-4; d = 4e-4 * (2 + 0.5)
    torch.testing.assert_close(c.detach(), torch.full((3,), 1.0 - 0.1 * 4e-4 * 2.5, dtype=torch.float64))


def test_zero_weights_or_gradients_fall_back_to_trust_one():
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    w.grad = torch.ones(2, 2, dtype=torch.float64)
    LARS([w], lr=0.1, momentum=0.0).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1, dtype=torch.float64))


def test_state_dict_round_trip_continues_identically():
    a = two_layer()
    opt_a = LARS(a.parameters(), lr=0.3, momentum=0.9, weight_decay=0.01, clip=True)
    for step in range(3):
        gradients(a, step)
        opt_a.step()
    b = two_layer(seed=5)
    b.load_state_dict(a.state_dict())
    opt_b = LARS(b.parameters(), lr=1.0)  # every setting comes from the state dict
    saved = io.BytesIO()
    torch.save(opt_a.state_dict(), saved)  # as a checkpoint holds it
    saved.seek(0)
    opt_b.load_state_dict(torch.load(saved))
    assert opt_b.param_groups[0]["clip"] is True and opt_b.param_groups[0]["lr"] == 0.3
    for step in range(3, 6):
        gradients(a, step)
        gradients(b, step)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(lr=0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=True), "lr"), (dict(momentum=1.0), "momentum"),
     (dict(weight_decay=-1), "weight_decay"), (dict(trust_coefficient=0), "trust_coefficient"),
     (dict(eps=-1e-8), "eps"), (dict(clip=1), "clip"), (dict(exclude_1d="yes"), "exclude_1d")],
)
def test_bad_arguments_name_themselves(kwargs, name):
    w = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match=f"`{name}` must be .*, got {kwargs[name]!r}"):
        LARS([w], **kwargs)

