"""scripts/claims.py and its pieces on tiny settings: exact, load-independent facts only.

The verdict rule (pure), the progress estimate (pure), the JSON schema (with instant fake claims),
the iterations-per-epoch claim against a real Trainer, the gradient standard-error pieces, and the
step-memory comparison. Never wall time.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import claims  # noqa: E402
from claims_batch import count_iterations, train_size  # noqa: E402
from claims_common import Measured, Settings, with_spread  # noqa: E402
from grad_se import finite_population_factor, loglog_slope, per_sample_gradients, standard_errors  # noqa: E402
from precision_memory import saved_activation_bytes  # noqa: E402
from verdicts import HELD, NOT_HELD, NOT_MEASURED_GPU, PARTLY, Condition, Rule, checked, verdict  # noqa: E402

RULE = Rule((Condition("a", ">=", 1.0, "a at least 1"), Condition("b", "between", (-0.6, -0.4), "b near -1/2")))


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        ({"a": 1.0, "b": -0.5}, HELD),
        ({"a": 2, "b": -0.6}, HELD),  # bounds are inclusive
        ({"a": 0.99, "b": -0.5}, PARTLY),
        ({"a": 1.0, "b": -0.61}, PARTLY),
        ({"a": 0.0, "b": 0.0}, NOT_HELD),
        ({"a": float("nan"), "b": -0.5}, PARTLY),  # NaN fails its condition
        ({"b": -0.5}, PARTLY),  # a missing number fails its condition
        ({}, NOT_HELD),
        ({"a": "1.0", "b": None}, NOT_HELD),  # not numbers: nothing presumed
        ({"a": True, "b": -0.5}, HELD),  # a bool counts as 0 / 1
    ],
)
def test_verdict_from_numbers(numbers, expected):
    assert verdict(numbers, RULE) == expected


def test_verdict_is_pure_and_single_condition_rules_never_hold_partly():
    one = Rule((Condition("x", "<", 0, "negative"),))
    numbers = {"x": -1}
    assert [verdict(numbers, one) for _ in range(3)] == [HELD] * 3
    assert numbers == {"x": -1}
    assert verdict({"x": 1}, one) == NOT_HELD
    assert {verdict({"x": v}, one) for v in (-2, 0, 2, float("nan"))} == {HELD, NOT_HELD}


def test_rule_is_written_down():
    assert RULE.describe() == ("held if all of: a >= 1 (a at least 1); b in [-0.6, -0.4] (b near -1/2); "
                               "held partly if some; did not hold if none")
    assert checked({"a": 3, "b": 0}, RULE) == [
        {"condition": "a >= 1 (a at least 1)", "value": 3, "held": True},
        {"condition": "b in [-0.6, -0.4] (b near -1/2)", "value": 0, "held": False},
    ]


@pytest.mark.parametrize("bad", [dict(op="~"), dict(op="between", value=1.0)])
def test_condition_refuses_unknown_ops(bad):
    kwargs = {"key": "x", "op": ">", "value": 0.0, "text": "t", **bad}
    with pytest.raises(ValueError):
        Condition(**kwargs)
    with pytest.raises(ValueError):
        Rule(())


def test_every_claim_has_a_rule_and_a_unique_key():
    assert len(claims.KEYS) == len(set(claims.KEYS)) == 9
    for claim in claims.CLAIMS:
        assert claim.rule.conditions and claim.cost > 0 and claim.text.endswith(".")


def test_time_left_scales_the_estimates_by_the_pace_so_far():
    assert claims.time_left(0.0, [], [10.0, 20.0]) == 30.0
    assert claims.time_left(30.0, [10.0, 10.0], [40.0]) == 60.0
    assert claims.time_left(5.0, [10.0], []) == 0.0


def test_with_spread_stores_median_per_seed_and_spread():
    numbers: dict = {}
    assert with_spread(numbers, "x", [3.0, 1.0, 2.0]) == 2.0
    assert numbers == {"x": 2.0, "x_per_seed": [3.0, 1.0, 2.0], "x_spread": 2.0}


def test_json_has_one_entry_per_claim_and_only_updates_what_it_remeasures(tmp_path, monkeypatch):
    rule = Rule((Condition("x", ">", 0, "positive"),))
    fake = (
        claims.Claim("one", "One.", lambda s: Measured({"x": 1.0}, list(s.seeds)), rule, 1.0),
        claims.Claim("gpu", "Two.", lambda s: Measured({"x": 2.0}, [0], note="why", verdict=NOT_MEASURED_GPU), rule, 1.0),
    )
    monkeypatch.setattr(claims, "CLAIMS", fake)
    monkeypatch.setattr(claims, "KEYS", ("one", "gpu"))
    monkeypatch.setattr(claims, "quiet_lightning", lambda: None)  # no process-wide logging changes
    threads = ["--threads", str(torch.get_num_threads())]
    out = tmp_path / "claims.json"
    claims.main(["--quick", "--seeds", "4", "5", "--out", str(out), *threads])
    data = json.loads(out.read_text())
    assert [e["key"] for e in data["claims"]] == ["one", "gpu"]
    for e in data["claims"]:
        assert {"claim", "verdict", "numbers", "seeds", "command"} <= set(e)
    one, gpu = data["claims"]
    assert (one["verdict"], one["seeds"], one["numbers"]) == (HELD, [4, 5], {"x": 1.0})
    assert one["command"] == "python scripts/claims.py --only one --quick --seeds 4 5"
    assert (gpu["verdict"], gpu["note"]) == (NOT_MEASURED_GPU, "why")
    assert {"before", "after"} == set(data["machine"]) and data["machine"]["before"]["cpus"] >= 1
    worse = claims.Claim("one", "One.", lambda s: Measured({"x": -1.0}, [0]), rule, 1.0)
    monkeypatch.setattr(claims, "CLAIMS", (worse, fake[1]))
    claims.main(["--only", "one", "--out", str(out), *threads])
    again = json.loads(out.read_text())["claims"]
    assert [(e["key"], e["verdict"], e["quick"]) for e in again] == [("one", NOT_HELD, False), ("gpu", NOT_MEASURED_GPU, True)]


def test_iterations_per_epoch_and_total_updates_against_the_trainer():
    s = Settings()
    n = train_size(s)
    assert n == 1078  # the claims' digits split: 1,797 images, 20% test, then 25% of the rest for validation
    for batch in (400, n - 1, n + 1):
        row = count_iterations(s, n, batch, epochs=2)
        assert row["batches_per_epoch"] == [math.ceil(n / batch)]
        assert row["optimizer_steps"] == 2 * math.ceil(n / batch)
        assert row["ok"]


def test_loglog_slope_and_finite_population_factor():
    assert loglog_slope([1, 4, 16, 64], [2.0, 1.0, 0.5, 0.25]) == pytest.approx(-0.5)
    assert loglog_slope([2, 4], [3.0, 3.0]) == 0.0
    assert finite_population_factor(101, 1) == 1.0
    assert finite_population_factor(101, 101) == 0.0


def test_standard_error_follows_the_without_replacement_law_on_synthetic_gradients():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(600, 20, generator=g, dtype=torch.float64)
    sizes = [4, 16, 64, 256]
    se = standard_errors(grads, sizes, draws=400, seed=1)
    corrected = [se[b] / finite_population_factor(600, b) for b in sizes]
    assert loglog_slope(sizes, corrected) == pytest.approx(-0.5, abs=0.05)
    assert loglog_slope(sizes, [se[b] for b in sizes]) < loglog_slope(sizes, corrected)
    with pytest.raises(ValueError):
        standard_errors(grads, [601], draws=1)


def test_per_sample_gradients_equal_one_backward_per_sample():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 1, 0])
    fast = per_sample_gradients(model, x, y, chunk=2)
    for i in range(5):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        slow = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(fast[i], slow)


def test_bf16_autocast_saves_fewer_bytes_for_backward_on_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    fp32, bf16 = saved_activation_bytes(model, x, y, False), saved_activation_bytes(model, x, y, True)
    assert 0 < bf16 < fp32
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_the_claims_run_on_mnist_and_cifar10_files_when_present(name, tmp_path):
    from measured_fit import data_available

    from _native_files import write_cifar10, write_mnist

    assert not data_available(name, str(tmp_path))
    with pytest.raises(SystemExit):
        claims.parse_args(["--data", name, "--data-dir", str(tmp_path)])
    write_mnist(tmp_path, n_train=200) if name == "mnist" else write_cifar10(tmp_path, per_batch=40)
    assert data_available(name, str(tmp_path))
    s = Settings(data=name, data_dir=str(tmp_path))
    n = train_size(s)
    assert n == 180  # the torchvision DataModules hold out a tenth of the 200 training images
    row = count_iterations(s, n, 64, epochs=1)
    assert (row["batches_per_epoch"], row["optimizer_steps"], row["ok"]) == ([3], 3, True)
