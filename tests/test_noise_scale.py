"""The pure gradient-noise estimator: unbiased estimates, effective batch sizes, smoothing, no host
sync, and the 1/sqrt(B) standard error of the mini-batch gradient on digits."""

from __future__ import annotations

import math

import pytest
import torch

from epochwise.callbacks.noise_scale import (
    GradientNoiseEstimator,
    averaged_batch_size,
    effective_batch_sizes,
    loglog_slope,
    minibatch_gradient_standard_error,
    noise_scale_estimates,
)


def gaussian_gradients(draws: int, sizes: list[int], dims: int = 20, seed: int = 0):
    """Per-sample gradients G + N(0, diag(var)), grouped into micro-batches of ``sizes``, ``draws`` times."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.linspace(-0.5, 0.5, dims, dtype=torch.float64)
    std = torch.linspace(0.5, 2.0, dims, dtype=torch.float64)
    micro = [mean + std * torch.randn(draws, n, dims, generator=g, dtype=torch.float64).mean(1) * 1.0
             for n in sizes]
    return mean, std, micro


def test_estimates_are_the_exact_terms_for_exact_norms():
    # E|G_b|^2 = |G|^2 + tr(Sigma)/b with |G|^2 = 2, tr(Sigma) = 48
    assert noise_scale_estimates(2 + 48 / 6, 6, 2 + 48 / 24, 24) == pytest.approx((2.0, 48.0))
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_scale_estimates(1.0, 8, 1.0, 8)


def test_estimates_are_unbiased_for_equal_micro_batches():
    mean, std, micro = gaussian_gradients(20000, [8, 8, 8, 8])
    small = torch.stack([m.pow(2).sum(1) for m in micro]).mean(0)
    big = torch.stack(micro).mean(0).pow(2).sum(1)
    grad_sq, trace = noise_scale_estimates(small, 8, big, 32)
    assert float(grad_sq.mean()) == pytest.approx(float(mean @ mean), rel=0.03)
    assert float(trace.mean()) == pytest.approx(float(std.pow(2).sum()), rel=0.03)


@pytest.mark.parametrize("weighted", [True, False])
def test_effective_sizes_make_unequal_micro_batches_unbiased(weighted):
    sizes = [12, 3, 6]
    mean, std, micro = gaussian_gradients(40000, sizes)
    small = torch.stack([m.pow(2).sum(1) for m in micro]).mean(0)
    if weighted:  # the sample mean over all of them (the in-step split)
        big = sum(m * n for m, n in zip(micro, sizes)) / sum(sizes)
    else:  # the plain average (Lightning's accumulation)
        big = torch.stack(micro).mean(0)
    b, B = effective_batch_sizes(sizes, weighted=weighted)
    assert b == pytest.approx(3 / (1 / 12 + 1 / 3 + 1 / 6))
    assert B == (21.0 if weighted else pytest.approx(9 / (1 / 12 + 1 / 3 + 1 / 6)))
    grad_sq, trace = noise_scale_estimates(small, b, big.pow(2).sum(1), B)
    assert float(grad_sq.mean()) == pytest.approx(float(mean @ mean), rel=0.05)
    assert float(trace.mean()) == pytest.approx(float(std.pow(2).sum()), rel=0.03)
    assert averaged_batch_size([5, 5, 5]) == 15.0
    with pytest.raises(ValueError):
        effective_batch_sizes([4], weighted=True)


def test_smoothing_bias_correction_skipping_and_raw_values():
    est = GradientNoiseEstimator(ema_decay=0.9)
    assert math.isnan(float(est.b_simple)) and int(est.measurements) == 0
    est.update(5.0, 8, 2.0, 32)  # |G|^2 = 1, tr = 32: the first value is not pulled toward 0
    assert float(est.grad_sq_norm) == pytest.approx(1.0) and float(est.trace_cov) == pytest.approx(32.0)
    est.update(float("inf"), 8, 2.0, 32)  # an overflow step: skipped
    assert int(est.measurements) == 1 and float(est.trace_cov) == pytest.approx(32.0)
    est.update(3.0, 8, 1.5, 32)  # |G|^2 = 1, tr = 16
    assert float(est.trace_cov) == pytest.approx((0.9 * 0.1 * 32 + 0.1 * 16) / (0.9 * 0.1 + 0.1))
    assert float(est.raw_trace_cov) == pytest.approx(16.0) and float(est.raw_b_simple) == pytest.approx(16.0)
    assert float(est.b_simple) == pytest.approx(float(est.trace_cov) / float(est.grad_sq_norm))
    last = GradientNoiseEstimator(ema_decay=0.0)
    last.update(5.0, 8, 2.0, 32)
    last.update(3.0, 8, 1.5, 32)
    assert float(last.b_simple) == pytest.approx(16.0)
    with pytest.raises(ValueError, match="ema_decay"):
        GradientNoiseEstimator(ema_decay=1.0)


def test_state_round_trip_is_exact_and_tolerates_missing_keys():
    est = GradientNoiseEstimator(ema_decay=0.7)
    for k in range(5):
        est.update(5.0 + 0.1 * k, 8, 2.0 - 0.05 * k, 32)
    copy = GradientNoiseEstimator(ema_decay=0.7)
    copy.load_state_dict(est.state_dict())
    assert copy.values() == est.values()
    partial = GradientNoiseEstimator(ema_decay=0.7)
    partial.load_state_dict({"count": 3.0})
    assert int(partial.measurements) == 3 and math.isnan(float(partial.b_simple))


def test_update_never_reads_the_device(monkeypatch):
    est = GradientNoiseEstimator(ema_decay=0.9)
    small, big = torch.tensor(5.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read")

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    est.update(small, 8, big, 32)
    _ = est.b_simple, est.grad_sq_norm, est.trace_cov
    monkeypatch.undo()
    assert est.values()["b_simple"] == pytest.approx(32.0)


def test_loglog_slope():
    slope, stderr = loglog_slope([1, 10, 100], [3.0, 0.3, 0.03])
    assert slope == pytest.approx(-1.0) and stderr == pytest.approx(0.0, abs=1e-12)


def test_standard_error_of_the_minibatch_gradient_on_digits_falls_as_one_over_sqrt_b():
    """Acceptance: at B = 8, 32, 128, 512 on digits the measured standard error has slope -0.5 +- 0.1."""
    from epochwise.datamodules import DigitsDataModule
    from epochwise.modules import SimpleCNN

    dm = DigitsDataModule(image_size=8)
    dm.setup("fit")
    x, y = dm.train_set.gather(range(len(dm.train_set)))  # uint8 storage -> the normalised batches training sees
    torch.manual_seed(0)
    net = SimpleCNN(pool_size=2)
    params = list(net.parameters())

    def gradient(indices: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(net(x[indices]), y[indices])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    sizes = [8, 32, 128, 512]
    se = minibatch_gradient_standard_error(gradient, len(y), sizes, repeats=12, generator=torch.Generator().manual_seed(0))
    slope, _ = loglog_slope(sizes, [se[b] for b in sizes])
    assert -0.6 <= slope <= -0.4, (slope, se)
    assert se[8] > se[32] > se[128] > se[512]
