"""scripts/seq_len_warmup.py runs its recipe in both arms and stops each at the target loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("seq_len_warmup_script", ROOT / "scripts" / "seq_len_warmup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_arms_of_the_recipe_stop_at_the_first_validation_under_the_target():
    script = load_script()
    recipe = yaml.safe_load((ROOT / "scripts" / "configs" / "lm" / "seq_len_warmup.yaml").read_text())
    recipe["model"].update(d_model=16, num_layers=1, num_heads=2)
    recipe["data"]["init_args"].update(val_windows=16)
    overrides = {"max_steps": 6, "val_check_interval": 2}
    warmup = script.run(recipe, "warmup", 0, target=100.0, overrides=overrides)
    fixed = script.run(recipe, "fixed", 0, target=100.0, overrides=overrides)
    for row in (warmup, fixed):
        assert row["reached"] and row["steps"] == 2 and row["val_loss"] <= 100.0
    assert fixed["tokens"] == 2 * 16 * 128  # two steps at full length
    assert warmup["tokens"] == 2 * 128 * 16  # two steps of 128 windows of 16 tokens: as many tokens
    never = script.run(recipe, "fixed", 0, target=0.0, overrides={"max_steps": 3, "val_check_interval": 3})
    assert not never["reached"] and never["steps"] == 3
