"""scripts/snapshot_ensemble.py: the single snapshot is chosen on validation data, not on test.

Issue 11, reproduction 5: the "best single snapshot" was the best by *test* accuracy (an oracle),
and the digits test split changed with the training seed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "snapshot_ensemble.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("snapshot_ensemble", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_choose_on_validation_breaks_ties_by_nll(script):
    assert script.choose_on_validation([0.9, 0.95, 0.95], [0.3, 0.2, 0.1]) == 2
    assert script.choose_on_validation([0.97, 0.95], [0.5, 0.1]) == 0


def test_reports_the_validation_chosen_snapshot_and_the_labelled_oracle(script, tmp_path, capsys, one_thread):
    out = tmp_path / "snap"
    payload = script.main(["--seeds", "0", "1", "--cycle-epochs", "1", "--num-cycles", "3", "--image-size", "8",
                           "--batch-size", "128", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "test-oracle" in printed and "chosen on validation" in printed
    assert json.loads((out / "snapshot_ensemble.json").read_text())["summary"] == payload["summary"]
    for r in payload["runs"]:
        assert r["num_snapshots"] == 3 and r["split_seed"] == 0
        chosen = script.choose_on_validation(r["snapshot_val_acc"], r["snapshot_val_nll"])
        assert r["chosen_snapshot"] == chosen
        assert r["best_single_test_acc"] == r["snapshot_test_acc"][chosen]
        assert r["delta_test_acc"] == r["ensemble_test_acc"] - r["snapshot_test_acc"][chosen]
        assert r["test_oracle_snapshot_acc"] == max(r["snapshot_test_acc"])
    # every seed is scored on the same test images
    assert len({r["num_test_samples"] for r in payload["runs"]}) == 1
