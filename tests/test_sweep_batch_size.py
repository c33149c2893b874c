"""scripts/sweep_batch_size.py on tiny settings: the cells' callbacks, the summary, the outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import sweep_batch_size as sweep  # noqa: E402

from epochwise.callbacks import LRScaling, LRWarmup  # noqa: E402


@pytest.mark.parametrize(
    ("rule", "batch", "warmup"),
    [("none", 1024, False), ("linear", 32, False), ("linear", 16, False), ("linear", 64, True), ("sqrt", 512, True)],
)
def test_lr_warmup_only_where_the_rule_raises_the_lr(rule, batch, warmup):
    callbacks = sweep.cell_callbacks(rule, batch, 32, total_steps=100, warmup_fraction=0.1)
    assert isinstance(callbacks[0], LRScaling) and callbacks[0].rule == rule and callbacks[0].base_batch_size == 32
    assert sweep.warmed_up(rule, batch, 32, 0.1) is warmup
    assert [type(c) for c in callbacks[1:]] == ([LRWarmup] if warmup else [])
    if warmup:
        assert (callbacks[1].duration, callbacks[1].unit) == (10, "step")
    assert not sweep.warmed_up(rule, batch, 32, 0.0)


def test_summary_is_the_median_over_seeds_with_min_and_max():
    runs = [{"rule": "sqrt", "batch": 64, "seed": s, "warmup": True, "val_acc": v, "train_acc": 1.0,
             "gap_acc": 1.0 - v, "steps": 20, "epochs": 2, "wall_s": w, "cpu_s": 1.0}
            for s, v, w in ((0, 0.9, 3.0), (1, 0.8, 1.0), (2, 0.95, 2.0))]
    runs.append({**runs[0], "rule": "none", "batch": 8})
    rows = sweep.summarise(runs)
    assert [(r["rule"], r["batch"]) for r in rows] == [("none", 8), ("sqrt", 64)]
    sqrt = rows[1]
    assert (sqrt["val_acc"], sqrt["val_acc_min"], sqrt["val_acc_max"]) == (0.9, 0.8, 0.95)
    assert (sqrt["wall_s"], sqrt["steps"], sqrt["seeds"]) == (2.0, 20, [0, 1, 2])
    table = sweep.markdown(rows, "header")
    assert table.splitlines()[0] == "header" and "| sqrt | 64 | yes | 0.900 (0.800-0.950) |" in table


def test_a_tiny_sweep_writes_its_table_json_and_png(tmp_path):
    payload = sweep.main(["--batch-sizes", "512", "1024", "--rules", "none", "sqrt", "--epochs", "1", "--seeds", "0",
                          "--out", str(tmp_path)])
    steps = {(r["rule"], r["batch"]): r["steps"] for r in payload["rows"]}
    assert steps == {("none", 512): 3, ("none", 1024): 2, ("sqrt", 512): 3, ("sqrt", 1024): 2}  # ceil(1078 / B)
    assert json.loads((tmp_path / "sweep.json").read_text())["num_train"] == 1078
    assert (tmp_path / "sweep.md").read_text().count("\n| ") == 5
    assert (tmp_path / "sweep_batch_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    updates = sweep.main(["--budget", "updates", "--updates", "5", "--batch-sizes", "1024", "--rules", "none",
                          "--seeds", "0", "--out", str(tmp_path / "u")])
    assert [(r["steps"], r["epochs"]) for r in updates["rows"]] == [(5, 3)]  # 2 steps per epoch: 5 steps end in epoch 3
