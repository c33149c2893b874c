"""Training memory as a function of the batch size: the estimate behind max_per_device="auto"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from epochwise.callbacks.batch_memory import (
    OPTIMIZER_STATE_COPIES,
    MemoryEstimate,
    estimate_max_batch_size,
    estimate_training_memory,
)


# --------------------------------------------------------------------------------------------
# memory estimate
# --------------------------------------------------------------------------------------------
def test_training_memory_counts_exactly():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    est = estimate_training_memory(model, (1, 8, 8), optimizer="adam", activation_factor=1.0)
    params = (64 * 32 + 32 + 32 * 10 + 10) * 4
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (params, params, 2 * params)
    # input 64 + flatten 64 + linear 32 + relu 32 + linear 10 floats per sample
    assert est.activation_bytes_per_sample == (64 + 64 + 32 + 32 + 10) * 4
    assert est.fixed_bytes == 4 * params and est.bytes_for(10) == 4 * params + 10 * est.per_sample_bytes


def test_frozen_parameters_need_no_gradient_or_optimizer_state():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    est = estimate_training_memory(model, (10,), optimizer="sgd_momentum")
    assert est.param_bytes == (110 + 22) * 4
    assert est.grad_bytes == est.optimizer_bytes == 22 * 4


@pytest.mark.parametrize("optimizer, copies", sorted(OPTIMIZER_STATE_COPIES.items()))
def test_optimizer_state_copies(optimizer, copies):
    est = estimate_training_memory(nn.Linear(3, 3), (3,), optimizer=optimizer)
    assert est.optimizer_bytes == copies * 12 * 4


def test_estimate_leaves_the_model_untouched():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    model[3].eval()  # a mixed mode must come back as it was
    stats = model[1].running_mean.clone()
    estimate_training_memory(model, (1, 8, 8))
    assert torch.equal(model[1].running_mean, stats) and int(model[1].num_batches_tracked) == 0
    assert model.training and model[1].training and not model[3].training


def test_max_batch_size_arithmetic():
    est = MemoryEstimate(param_bytes=100, grad_bytes=100, optimizer_bytes=200, activation_bytes_per_sample=50.0,
                         activation_factor=2.0)
    assert est.max_batch_size(400) == 0  # only the fixed part fits
    assert est.max_batch_size(499) == 0 and est.max_batch_size(500) == 1 and est.max_batch_size(1450) == 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    sizes = [estimate_max_batch_size(model, (1, 8, 8), m) for m in (10_000, 10**6, 10**7, 10**8)]
    assert sizes[0] == 0 and sizes == sorted(sizes) and sizes[-1] > 10_000
    full = estimate_training_memory(model, (1, 8, 8))
    bs = estimate_max_batch_size(model, (1, 8, 8), 10**7, safety_fraction=1.0)
    assert full.bytes_for(bs) <= 10**7 < full.bytes_for(bs + 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "rmsprop"}, "`optimizer` must be one of"),
        ({"activation_factor": 0}, "`activation_factor` must be > 0, got 0"),
        ({"probe_batch_size": 0}, "`probe_batch_size` must be an int >= 1, got 0"),
        ({"sample_shape": ()}, "`sample_shape` must be a non-empty sequence of ints >= 1"),
        ({"memory_bytes": 0}, "`memory_bytes` must be > 0, got 0"),
        ({"safety_fraction": 1.5}, "`safety_fraction` must be in \\(0, 1\\], got 1.5"),
    ],
)
def test_memory_validation(kwargs, match):
    args = {"model": nn.Linear(4, 2), "sample_shape": (4,), "memory_bytes": 1e6, **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate_max_batch_size(**args)
