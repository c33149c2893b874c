"""Exhaustive tables for the pure schedules."""

import math

import pytest

from epochwise.callbacks.schedules import (
    MilestoneSchedule,
    WarmupSchedule,
    cosine_factor,
    linear_warmup_factor,
    lr_scale,
    one_cycle_factor,
    split_for_max_per_device,
)


def test_exponential_warmup_matches_issue_table():
    s = WarmupSchedule(start=16, end=256, factor=2, interval=2)
    assert [s(t) for t in range(12)] == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256, 256, 256]


@pytest.mark.parametrize("start,end,factor,interval", [(1, 1000, 2, 1), (3, 100, 3, 2), (16, 256, 2, 3), (8, 8, 2, 1)])
def test_exponential_warmup_reference_formula(start, end, factor, interval):
    s = WarmupSchedule(start, end, factor, interval)
    for t in range(60):
        assert s(t) == min(end, start * factor ** (t // interval))


def test_non_integer_factor():
    s = WarmupSchedule(10, 100, factor=1.5, interval=1)
    assert [s(t) for t in range(4)] == [10, 15, 22, 34]
    assert s(100) == 100


def test_linear_warmup_table():
    s = WarmupSchedule(32, 128, interval=2, mode="linear", increment=32)
    assert [s(t) for t in range(9)] == [32, 32, 64, 64, 96, 96, 128, 128, 128]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(start=0, end=8), "start"),
        (dict(start=16, end=8), "end"),
        (dict(start=4, end=8, interval=0), "interval"),
        (dict(start=4, end=8, factor=1), "factor"),
        (dict(start=4, end=8, mode="cubic"), "mode"),
        (dict(start=4, end=8, mode="linear"), "increment"),
        (dict(start=4, end=8, mode="linear", increment=0), "increment"),
        (dict(start=4, end=8, increment=2), "increment"),
    ],
)
def test_warmup_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupSchedule(**kwargs)


def test_milestones_table_and_no_mutation():
    given = {60: 256, 0: 64, 30: 128}
    s = MilestoneSchedule(given)
    assert [s(t) for t in (0, 1, 29, 30, 31, 59, 60, 10**6)] == [64, 64, 64, 128, 128, 128, 256, 256]
    assert list(given) == [60, 0, 30]  # caller's dict untouched
    assert MilestoneSchedule({5: 32})(4) is None


@pytest.mark.parametrize("bad", [{}, {-1: 4}, {0: 0}, {0: 2.5}, [(0, 4)]])
def test_milestone_validation(bad):
    with pytest.raises(ValueError, match="milestones"):
        MilestoneSchedule(bad)


def test_lr_scale_rules():
    for k in (0.25, 1, 2, 16):
        assert lr_scale("linear", k) == k
        assert lr_scale("sqrt", k) == pytest.approx(math.sqrt(k))
        assert lr_scale("none", k) == 1.0
    with pytest.raises(ValueError, match="rule"):
        lr_scale("cubic", 2)


def test_warmup_factor_and_shapes():
    assert [linear_warmup_factor(t, 4, 0.2) for t in (0, 2, 4, 8)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert cosine_factor(0) == 1 and cosine_factor(1) == pytest.approx(0) and cosine_factor(0.5) == pytest.approx(0.5)
    assert one_cycle_factor(0.3, pct_start=0.3) == pytest.approx(1.0)
    assert one_cycle_factor(0.0) == pytest.approx(1 / 25)


@pytest.mark.parametrize(
    "batch,maximum,expected",
    [(256, 64, (64, 4)), (96, 64, (48, 2)), (64, 64, (64, 1)), (10, None, (10, 1)), (130, 64, (26, 5)), (7, 2, (1, 7)),
     (101, 64, (51, 2))],  # no exact split: 50.5 rounds half up, as the step-unit plans round
)
def test_split_for_max_per_device(batch, maximum, expected):
    micro, k = split_for_max_per_device(batch, maximum)
    assert (micro, k) == expected
    assert micro <= maximum if maximum else True


def test_one_cycle_factor_matches_torchs_one_cycle_lr_everywhere():
    import torch

    total, pct = 200, 0.3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=pct,
                                                anneal_strategy="cos", cycle_momentum=False,
                                                three_phase=False)
    for step in range(total):
        # torch's phases end at step pct*total - 1 and total - 1
        p_up = step / (pct * total - 1)
        p = pct * p_up if step <= pct * total - 1 else pct + (1 - pct) * (step - (pct * total - 1)) / (total - pct * total)
        assert one_cycle_factor(p, pct_start=pct) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), step
        opt.step()
        sched.step()
    assert one_cycle_factor(1.0) == pytest.approx(1 / 25 / 1e4)
    assert one_cycle_factor(0.65, pct_start=0.3) == pytest.approx(0.5 * (1 + 1 / 25 / 1e4), rel=1e-9)
