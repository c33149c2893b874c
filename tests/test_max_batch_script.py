"""scripts/max_batch.py on CPU: the finder's answer, the step's peak, a fit at that size, one table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("max_batch", ROOT / "scripts" / "max_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_path_prints_one_row_per_model_and_precision(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "rows.json"
    rows = script.main(["--device", "cpu", "--models", "resnet20", "--precisions", "32-true", "bf16-mixed",
                        "--max-batch-size", "6", "--image-size", "8", "--fit-steps", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert [(r["model"], r["precision"]) for r in rows] == [("resnet20", "32-true"), ("resnet20", "bf16-mixed")]
    for r in rows:
        assert r["device"] == "cpu" and r["batch"] == 6 and r["capped"]  # the host has room: the cap ends it
        assert 0 < r["step_peak_fraction"] <= r["budget_fraction"] < 1
        assert r["fit"] == "ok" and 0 < r["fit_peak_fraction"] < 1
        assert f"| resnet20 | {r['precision']} | 6 (cap) |" in printed
    assert json.loads(out.read_text()) == rows
