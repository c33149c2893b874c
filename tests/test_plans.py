"""Pure epoch plans: sizes, accumulation, lengths and the whole-fit simulation."""

import math

import pytest

from epochwise.callbacks.plans import limited_length, plan_epoch, simulate_fit


def sizes(plan):
    return [plan.size_of(i) for i in range(plan.length)]


def test_epoch_unit_constant_size_and_exact_split():
    plan = plan_epoch(3, 10, lambda e, s: 96, samples=200, max_per_device=64)
    assert plan.accumulation == 2 and plan.extra == 2  # 96 = 2 x 48, the exact split
    assert sizes(plan) == [48] * 5  # planned sizes: the short last batch is not a change
    assert plan.actual_size(4) == 8 and plan.samples_before(4) == 192


def test_user_accumulation_multiplies_the_split():
    plan = plan_epoch(0, 0, lambda e, s: 256, samples=1024, base_accumulation=3, max_per_device=64)
    assert plan.accumulation == 12 and plan.size_of(0) == 64


def test_step_unit_uses_the_step_of_each_batch_under_accumulation():
    requests = {0: 2, 1: 4, 2: 8, 3: 8}
    plan = plan_epoch(0, 0, lambda e, s: requests.get(s, 8), samples=40, unit="step", base_accumulation=2)
    # two micro-batches per optimizer step, each the step's request
    assert sizes(plan)[:6] == [2, 2, 4, 4, 8, 8]
    assert plan.step_of(5) == 2 and plan.accumulation == 2


def test_step_unit_split_rounds_half_up_and_first_step_offsets():
    plan = plan_epoch(1, 100, lambda e, s: 35 if s < 101 else 128, samples=512, unit="step", max_per_device=64)
    assert plan.accumulation == 2  # the epoch's largest request (128) needs two micro-batches
    assert plan.size_of(0) == 18  # 35 / 2 = 17.5 -> 18 (not 17: floor, nor banker's rounding)
    assert plan.size_of(2) == 64


def test_step_unit_clamp_is_recorded():
    plan = plan_epoch(0, 0, lambda e, s: 50, samples=None, unit="step", max_per_device=16, largest_request=20)
    assert plan.accumulation == 2 and plan.size_of(0) == 16 and plan.clamped == [0]
    assert plan.length is None and plan.actual_size(7) == 16


def test_stream_without_largest_request_is_refused():
    with pytest.raises(ValueError, match="largest_request"):
        plan_epoch(0, 0, lambda e, s: 4, samples=None, unit="step")


def test_drop_last_length():
    plan = plan_epoch(0, 0, lambda e, s: 30, samples=100, drop_last=True)
    assert plan.length == 3


@pytest.mark.parametrize(
    "length, limit, expected", [(10, 4, 4), (10, 40, 10), (10, 0.25, 2), (10, 1.0, 10), (math.inf, 3, 3)]
)
def test_limited_length_is_lightnings_rule(length, limit, expected):
    assert limited_length(length, limit) == expected


def test_simulate_fit_epochs_steps_and_max_steps():
    def make(e, s):
        return plan_epoch(e, s, lambda e, s: 10 * 2**e, samples=100, base_accumulation=2)

    fit = simulate_fit(make, max_epochs=3, max_steps=-1)
    assert [(f.epoch, f.first_step, f.batches, f.steps) for f in fit] == [(0, 0, 10, 5), (1, 5, 5, 3), (2, 8, 3, 2)]
    capped = simulate_fit(make, max_epochs=3, max_steps=7)
    assert [(f.first_step, f.steps) for f in capped] == [(0, 5), (5, 2)]
    limited = simulate_fit(make, max_epochs=2, max_steps=-1, limit=0.5)
    assert [f.batches for f in limited] == [5, 2]


def test_simulate_a_stream_needs_max_steps():
    def make(e, s):
        return plan_epoch(e, s, lambda e, s: 4, samples=None, unit="step", largest_request=4)

    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        simulate_fit(make, max_epochs=-1, max_steps=-1)
    fit = simulate_fit(make, max_epochs=-1, max_steps=9)
    assert len(fit) == 1 and fit[0].steps == 9
