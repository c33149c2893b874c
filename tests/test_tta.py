"""scripts/tta.py: recipes, the clock that stops at the target, the comparison's ratios."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import tta  # noqa: E402

from epochwise.callbacks import BatchSizeWarmup, LRScaling, LRWarmup  # noqa: E402


def test_recipes_apply_through_the_epochwise_callbacks():
    assert tta.RECIPES["fixed64"].callbacks() == []
    warmup, scaling = tta.RECIPES["warmup"].callbacks()
    assert isinstance(warmup, BatchSizeWarmup) and isinstance(scaling, LRScaling) and scaling.rule == "sqrt"
    shipped = tta.RECIPES["warmup_old"].callbacks()[0]
    assert [shipped.schedule(e) for e in range(10)] == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]
    spec = tta.parse_recipe("name=r,start=16,end=64,interval=8,unit=step,lr=2e-3,rule=sqrt,base_batch=64,lr_warmup_steps=5")
    assert (spec.start, spec.end, spec.unit, spec.lr, spec.base_batch) == (16, 64, "step", 2e-3, 64)
    assert [type(c) for c in spec.callbacks()] == [BatchSizeWarmup, LRScaling, LRWarmup]
    assert tta.parse_recipe("fixed64") is tta.RECIPES["fixed64"]
    with pytest.raises(ValueError, match="key=value"):
        tta.parse_recipe("start=16,speed=3")


def test_the_warmup_recipe_is_the_shipped_warmup_old():
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "scripts" / "configs" / "warmup.yaml").read_text())
    by_class = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
    recipe = tta.RECIPES["warmup"]
    warmup, scaling = by_class["BatchSizeWarmup"], by_class["LRScaling"]
    assert (warmup["start"], warmup["end"], warmup["factor"], warmup["interval"], warmup["unit"]) == (
        recipe.start, recipe.end, recipe.factor, recipe.interval, recipe.unit)
    assert (scaling["rule"], scaling["base_batch_size"]) == (recipe.rule, recipe.base_batch)
    assert (config["model"]["optimizer"], config["model"]["lr"], config["data"]["init_args"]["batch_size"]) == (
        "adam", recipe.lr, recipe.start)


def test_ratio_keeps_missed_targets_visible():
    assert tta.ratio(3.0, 6.0) == 0.5
    assert tta.ratio(math.inf, 6.0) == math.inf
    assert math.isnan(tta.ratio(math.inf, math.inf)) and math.isnan(tta.ratio(1.0, 0.0))


def test_the_clock_stops_the_fit_at_the_first_check_that_reaches_the_target():
    run = tta.run_to_target(tta.Recipe("r", 512, 512), seed=0, target=0.0, max_epochs=3, checks_per_epoch=1)
    assert run["reached"] and run["epochs"] == 1 and len(run["rows"]) == 1
    assert (run["steps"], run["samples"]) == (3, 1294)  # ceil(1294 / 512) steps over the 1,294 training images
    never = tta.run_to_target(tta.Recipe("r", 512, 512), seed=0, target=1.01, max_epochs=2, checks_per_epoch=1)
    assert not never["reached"] and never["steps"] == math.inf and len(never["rows"]) == 2
    assert [r["steps"] for r in never["rows"]] == [3, 6] and 0.0 <= never["test_acc"] <= 1.0


def test_checks_within_an_epoch_follow_a_grid_in_samples_and_stay_out_of_the_training_time():
    # 4 checks per epoch: grid points every 323.5 samples; batch 512 reaches them at 512, 1024 (two
    # points at once: one check) and 1294 (the epoch end); batch 256 at 512, 768, 1024 and 1294
    never = tta.run_to_target(tta.Recipe("r", 512, 512), seed=0, target=1.01, max_epochs=2)
    assert [r["samples"] for r in never["rows"]] == [512, 1024, 1294, 1806, 2318, 2588]
    assert [r["epochs"] for r in never["rows"]][2] == 1.0
    smaller = tta.run_to_target(tta.Recipe("r", 256, 256), seed=0, target=1.01, max_epochs=1)
    assert [r["samples"] for r in smaller["rows"]] == [512, 768, 1024, 1294]
    for row in never["rows"]:
        assert 0.0 < row["train_wall_s"] < row["wall_s"] and row["train_cpu_s"] <= row["cpu_s"]
    first = tta.run_to_target(tta.Recipe("r", 512, 512), seed=0, target=0.0, max_epochs=2)
    assert first["reached"] and (first["steps"], first["samples"], len(first["rows"])) == (1, 512, 1)
    with pytest.raises(ValueError, match="checks_per_epoch"):
        tta.TargetClock(0.97, checks_per_epoch=0)


def test_checks_do_not_change_the_training_path():
    once = tta.run_to_target(tta.Recipe("r", 256, 256), seed=0, target=1.01, max_epochs=1, checks_per_epoch=1)
    often = tta.run_to_target(tta.Recipe("r", 256, 256), seed=0, target=1.01, max_epochs=1, checks_per_epoch=8)
    assert once["rows"][-1]["val_acc"] == often["rows"][-1]["val_acc"] and once["test_acc"] == often["test_acc"]
