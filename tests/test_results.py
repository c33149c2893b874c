"""scripts/results.py: docs/RESULTS.md and the README block from fake measurement files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import results  # noqa: E402

MACHINE = {"cpus": 2, "torch_threads": 1, "torch": "t", "lightning": "l", "load_average": [1.0, 2.0, 3.0],
           "utc": "2026-01-01T00:00:00+00:00"}
CLAIM = {"key": "grad_se", "claim": "SE falls as 1 / sqrt(B).", "verdict": "held", "seeds": [0, 1, 2],
         "numbers": {"slope": -0.5, "slope_per_seed": [-0.5, -0.49, -0.52], "slope_spread": 0.03},
         "command": "python scripts/claims.py --only grad_se", "rule": "held if slope in [-0.6, -0.4]",
         "conditions": [{"condition": "slope in [-0.6, -0.4] (log-log)", "value": -0.5, "held": True}],
         "note": "", "quick": False}


def write(root: Path, rel: str, payload: object) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_results_md_holds_verdicts_bench_targets_machine_and_commands(tmp_path):
    write(tmp_path, "runs/claims/claims.json", {"claims": [CLAIM], "seconds": 12.0, "command": "python scripts/claims.py",
                                                "machine": {"before": MACHINE, "after": MACHINE}})
    write(tmp_path, "runs/bench/results.json", {"mfu": 0.45, "tta_wall_ratio": 0.7, "tta_steps_ratio": 0.9,
                                                "batch_change_speedup": 12.0, "model": "simple_cnn", "cpus": 2})
    (tmp_path / "README.md").write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\nrest\n")
    text = results.main(["--root", str(tmp_path)])
    assert text == (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| SE falls as 1 / sqrt(B). | **held** | slope in [-0.6, -0.4]: **-0.5** | [0, 1, 2] |" in text
    assert "| mfu | 0.45 | >= 0.4: met |" in text and "| tta_wall_ratio | 0.7 | <= 0.6: **missed** |" in text
    assert "2 CPUs, 1 torch threads, torch t, lightning l, load average 1.00, 2.00, 3.00" in text
    for command, _ in results.COMMANDS:
        assert command in text
    assert "Not measured yet: run `python scripts/sweep_batch_size.py --out runs/sweep`." in text
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro\n<!-- results:begin -->\nMeasured evidence") and readme.endswith("<!-- results:end -->\nrest\n")
    assert "- Tutorial claims: 1 held." in readme and "`tta_wall_ratio` 0.7" in readme and "old" not in readme


def test_missing_measurements_say_which_command_makes_them(tmp_path):
    (tmp_path / "README.md").write_text("no markers\n")
    text = results.main(["--root", str(tmp_path)])
    assert "Not measured yet: run `python scripts/claims.py`." in text
    assert "Not measured yet: run `python scripts/bench.py --quick`." in text
    assert (tmp_path / "README.md").read_text() == "no markers\n"


def test_make_train_run_and_install_size_from_the_newest_default_run(tmp_path):
    import os

    default = {"argv": ["fit"], "fit_seconds": 12.5, "run_seconds": 18.0, "epochs_trained": 21, "stopped": ["EarlyStopping stopped it"],
               "test": {"test_acc": 0.98, "test_loss": 0.09}}
    write(tmp_path, "lightning_logs/version_0/run_summary.json", {**default, "test": {"test_acc": 0.5}})
    write(tmp_path, "lightning_logs/version_1/run_summary.json", default)
    write(tmp_path, "lightning_logs/version_2/run_summary.json",  # newer, but another recipe
          {**default, "argv": ["fit", "--config", "warmup.yaml"], "test": {"test_acc": 0.1}})
    for version, age in ((0, 30), (1, 20), (2, 10)):
        path = tmp_path / f"lightning_logs/version_{version}/run_summary.json"
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age))
    site = tmp_path / ".venv/lib/python3.11/site-packages"
    (site / "nvidia").mkdir(parents=True)
    (site / "torch").mkdir()
    (site / "nvidia" / "lib.so").write_bytes(b"x" * 2**20)
    (site / "torch" / "lib.so").write_bytes(b"x" * 2**19)
    (tmp_path / "README.md").write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    text = results.main(["--root", str(tmp_path)])
    line = ("- `make train` (default recipe): test accuracy 0.98, 21 epochs in 12.5 s of fit, 18 s for the whole "
            "run with the test, on this machine (EarlyStopping stopped it).")
    assert line in text and line in (tmp_path / "README.md").read_text()
    assert "`lightning_logs/version_1/run_summary.json`" in text
    assert "- Install: `.venv` 0.0 GiB" in text and "0.0 GiB torch" in text
    sizes = results.install_gib(tmp_path)
    assert sizes is not None and abs(sizes["nvidia"] * 1024 - 1.0) < 1e-9 and abs(sizes["torch"] * 1024 - 0.5) < 1e-9
    assert abs(sizes["venv"] * 1024 - 1.5) < 1e-9


def test_a_bench_run_too_noisy_to_resolve_its_targets_is_flagged(tmp_path):
    write(tmp_path, "runs/bench/results.json", {"overhead_control_vs_lightning": 0.9, "noise_floor_exceeds_3_percent": 1.0})
    assert "**This run was too noisy to resolve a few percent**" in results.main(["--root", str(tmp_path), "--no-readme"])
    write(tmp_path, "runs/bench/results.json", {"overhead_control_vs_lightning": 0.99, "noise_floor_exceeds_3_percent": 0.0})
    assert "too noisy" not in results.main(["--root", str(tmp_path), "--no-readme"])
