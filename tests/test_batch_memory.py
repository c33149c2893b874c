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


# --------------------------------------------------------------------------------------------
# the finder: real training steps, peak memory against a budget
# --------------------------------------------------------------------------------------------
import random  # noqa: E402

import numpy  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, TensorDataset  # noqa: E402

from epochwise.callbacks.batch_memory import (  # noqa: E402
    find_max_batch_size,
    search_max_batch_size,
)


class Wide(nn.Module):
    """About 1 MiB of activations per sample (64 inputs repeated 4096 times), at almost no compute."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).unsqueeze(-1).repeat(1, 1, 4096).relu()


class OutOfMemoryAbove(nn.Module):
    """Raises torch.OutOfMemoryError for a batch larger than ``limit``; records what it saw."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.layer = nn.Linear(4, 2)
        self.seen: list[tuple[int, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        self.seen.append((int(x.shape[0]), out.dtype))
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"fake: {x.shape[0]} > {self.limit}")
        return out


def test_finder_answer_peaks_within_the_budget_and_one_more_sample_does_not():
    model = Wide()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    base = search_max_batch_size(model, torch.zeros(1, 64), opt, start=1, max_batch_size=1).peak_bytes
    capacity = int((base + 40 * 2**20) / 0.85)  # room for about 40 MiB above the process's own
    found = search_max_batch_size(model, torch.zeros(1, 64), opt, headroom=0.15, capacity_bytes=capacity)
    assert found.budget_bytes == int(0.85 * capacity) and found.device == "cpu"
    assert 4 <= found.size < 40 and not found.capped
    peaks = dict(found.trials)
    assert found.peak_bytes == peaks[found.size] <= found.budget_bytes
    assert peaks[found.size] - base >= found.size * 2**20  # the step's activations were measured
    over = peaks[found.size + 1]  # the bisection ended on the next size: out of budget (or predicted so)
    assert over is None or over > found.budget_bytes
    assert [s for s, _ in found.trials[:3]] == [2, 4, 8]  # CPU: grows from 2 by doubling
    assert find_max_batch_size(model, torch.zeros(1, 64), opt, capacity_bytes=capacity) >= 1


def test_finder_leaves_weights_buffers_grads_modes_optimizer_state_and_rng_as_they_were():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()  # momentum buffers exist; the gradients stay as the user left them
    model[2].eval()  # a mixed train/eval state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_before = copy_state(opt)
    torch.manual_seed(3), random.seed(3), numpy.random.seed(3)
    rng = (torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1].copy())
    found = find_max_batch_size(model, torch.zeros(2, 8), opt, max_batch_size=64)
    assert found == 64
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats, num_batches_tracked
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert model.training and model[1].training and not model[2].training
    assert_same_state(opt_before, copy_state(opt))
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert numpy.array_equal(numpy.random.get_state()[1], rng[2])
    fresh = torch.optim.Adam(model.parameters())
    find_max_batch_size(model, torch.zeros(2, 8), fresh, max_batch_size=8)
    assert len(fresh.state) == 0  # state the search created is dropped


def copy_state(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    return {"state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in sd["state"].items()}, "param_groups": [dict(g) for g in sd["param_groups"]]}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]) if isinstance(v, torch.Tensor) else v == b["state"][i][k]


@pytest.mark.parametrize("limit, start", [(13, None), (13, 64), (1, None), (40, 40)])
def test_out_of_memory_is_a_failure_and_the_search_finds_the_exact_limit(limit, start):
    model = OutOfMemoryAbove(limit)
    found = search_max_batch_size(model, torch.zeros(1, 4), torch.optim.SGD(model.parameters(), lr=0.1),
                                  start=start, max_batch_size=100)
    assert found.size == limit
    assert dict(found.trials)[limit + 1] is None  # the first failure next to the answer was tried
    if start == 64:  # a first guess that does not fit: halve, then bisect
        assert [s for s, _ in found.trials[:3]] == [64, 32, 16]


def test_not_even_one_sample_fits_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not even a batch of 1 fits on cpu: its peak is out of memory"):
        find_max_batch_size(OutOfMemoryAbove(0), torch.zeros(1, 4))


def test_the_cap_ends_the_search_and_is_reported():
    found = search_max_batch_size(nn.Linear(4, 2), torch.zeros(1, 4), max_batch_size=12)
    assert found.size == 12 and found.capped and [s for s, _ in found.trials] == [2, 4, 8, 12]


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16),
                                              ("16-mixed", torch.float16), ("64-true", torch.float64)])
def test_trials_run_under_the_precision(precision, dtype):
    model = OutOfMemoryAbove(1000)
    if precision == "64-true":
        model = model.double()
    find_max_batch_size(model, torch.zeros(1, 4), max_batch_size=4, precision=precision)
    assert {d for _, d in model.seen} == {dtype}


def test_data_from_a_loader_a_stream_or_a_batch():
    model = OutOfMemoryAbove(1000)
    loader = DataLoader(TensorDataset(torch.arange(40.0).reshape(10, 4), torch.zeros(10)), batch_size=5)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter((torch.full((4,), 7.0), 0) for _ in range(6))

    for data in (loader, DataLoader(Stream(), batch_size=3), (torch.zeros(5, 4), torch.zeros(5)),
                 {"x": torch.zeros(2, 4)}):
        model.seen.clear()
        assert find_max_batch_size(model, data, max_batch_size=16) == 16
        assert [n for n, _ in model.seen] == [2, 4, 8, 16]


def test_finder_validation():
    with pytest.raises(ValueError, match="`headroom` must be a number in \\[0, 1\\), got 1.0"):
        find_max_batch_size(nn.Linear(4, 2), torch.zeros(1, 4), headroom=1.0)
    with pytest.raises(ValueError, match="`precision` must be"):
        find_max_batch_size(nn.Linear(4, 2), torch.zeros(1, 4), precision="8-mixed")


def test_max_per_device_auto_is_the_measured_limit_and_the_fit_is_the_one_with_that_int():
    import lightning.pytorch as pl

    from epochwise.callbacks import BatchSizeSchedule, BatchSizeWarmup

    from conftest import make_dataset, quiet_trainer

    class Limited(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer, self.sizes = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2)), []

        def forward(self, x):  # what the finder runs: out of memory above 6 samples
            if len(x) > 6:
                raise torch.OutOfMemoryError("fake")
            return self.layer(x)

        def training_step(self, batch, batch_idx):
            self.sizes.append(len(batch[0]))
            return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    runs = []
    for limit in ("auto", 6):
        torch.manual_seed(1)  # the same global RNG state: dropout draws the same masks unless the probe drew
        module, warmup = Limited(), BatchSizeWarmup(4, 16, interval=1, max_per_device=limit)
        quiet_trainer(callbacks=[warmup], max_epochs=3).fit(
            module, train_dataloaders=DataLoader(make_dataset(48), batch_size=4))  # the loader straight to fit
        runs.append((module, warmup.state_dict()))
    (auto, auto_state), (fixed, _) = runs
    assert auto_state["probed_max_per_device"] == 6
    assert auto.sizes == fixed.sizes and max(auto.sizes) <= 6 < 16  # 8 and 16 ran as micro-batches
    for a, b in zip(auto.parameters(), fixed.parameters()):  # weights, momentum and RNG untouched by the probe
        assert torch.equal(a, b)
    # a measured limit below the first epoch's request: the batches already prefetched are replaced
    module = Limited()
    quiet_trainer(callbacks=[BatchSizeSchedule({0: 8}, max_per_device="auto")], max_epochs=1).fit(
        module, train_dataloaders=DataLoader(make_dataset(48), batch_size=8))
    assert module.sizes == [4] * 12
