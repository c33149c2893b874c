"""scripts/compare_early_stopping.py: epochwise's EarlyStopping equals Lightning's on every scripted
stream where Lightning has the feature, and Keras 3's documented outcome where Keras has it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_early_stopping.py"

# (stop epoch or None, stopping_reason name, restored epoch) of epochwise, per stream
EXPECTED = {
    "improve": (None, "NOT_STOPPED", 5),
    "plateau": (5, "PATIENCE_EXHAUSTED", 2),
    "NaN": (2, "NON_FINITE_METRIC", 1),
    "threshold": (2, "STOPPING_THRESHOLD", 2),
    "divergence": (3, "DIVERGENCE_THRESHOLD", 1),
    "baseline": (2, "PATIENCE_EXHAUSTED", 1),
    "start_from_epoch": (6, "PATIENCE_EXHAUSTED", 3),
    "check_finite off": (4, "PATIENCE_EXHAUSTED", 1),
}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_early_stopping", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(script):
    torch.set_num_threads(1)
    return {row["stream"].name: row for row in (script.compare(s) for s in script.STREAMS)}


def test_eight_streams(script):
    assert [s.name for s in script.STREAMS] == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_epochwise_outcome_and_restored_weights(rows, name):
    row = rows[name]
    o = row["epochwise"]
    assert (o.stop, o.reason, o.restored) == EXPECTED[name]
    assert row["restored_weights_match"]  # the module holds exactly the weights of that epoch
    assert row["epochs_run"] == (row["stream"].max_epochs if o.stop is None else o.stop + 1)


@pytest.mark.parametrize("name", [n for n in EXPECTED if n not in ("baseline", "start_from_epoch")])
def test_epochwise_equals_lightning_where_lightning_has_the_feature(rows, name):
    row = rows[name]
    ours, theirs = row["epochwise_cb"], row["lightning_cb"]
    assert theirs is not None
    assert (row["epochwise"].stop, row["epochwise"].reason) == (row["lightning"].stop, row["lightning"].reason)
    assert (ours.stopped_epoch, ours.wait_count, float(ours.best_score), ours.stopping_reason_message) == (
        theirs.stopped_epoch, theirs.wait_count, float(theirs.best_score), theirs.stopping_reason_message
    )


@pytest.mark.parametrize("name", ["improve", "plateau", "baseline", "start_from_epoch", "check_finite off"])
def test_epochwise_equals_keras_documented_behaviour_where_keras_has_the_feature(rows, name):
    # not "NaN": Lightning's default check_finite=True stops at once, Keras 3 has no such check
    row = rows[name]
    keras = row["stream"].keras
    assert (row["epochwise"].stop, row["epochwise"].restored) == (keras.stop, keras.restored)


def test_markdown_table(script, rows):
    table = script.markdown(list(rows.values()))
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| stream", "| ---"))]
    assert len(body) == 8
    assert "| threshold | [0.5, 0.3, 0.05, 0.04, 0.03, 0.02]; stopping_threshold=0.1 | stops at 2 · STOPPING_THRESHOLD" in table
    assert script.KERAS_DOCS in table
