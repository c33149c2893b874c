"""Test accuracy and wall time of digits recipes, seed by seed, through ``scripts/train.py``.

Each (seed, recipe) is one ``train.py fit`` process (fit, then the test of the best checkpoint);
the recipes are interleaved and their order rotates from seed to seed, so a change in machine load
spreads over every arm. Wall time is the whole process (start-up, fit, test); the 1-minute load
average is recorded before and after each run (the figures mean little on a loaded machine).

    python scripts/compare_recipes.py --recipes default one_cycle_batch_lr curriculum --seeds 0 1 2

Prints a table (median over seeds) and writes ``runs/compare_recipes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def epochs_trained(run_dir: Path) -> int | None:
    """Validation runs logged (one per epoch) in the run's TensorBoard file."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir))
        events.Reload()
        return len(events.Scalars("val_loss"))
    except Exception:  # a missing or unreadable log: report none
        return None


def run_one(recipe: str, seed: int, out: Path) -> dict:
    root = out / recipe / f"seed{seed}"
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    if recipe != "default":
        args[3:3] = ["--config", str(ROOT / "scripts" / "configs" / f"{recipe}.yaml")]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{recipe} seed {seed} failed:\n{result.stderr[-3000:]}")
    found = re.search(r"test_acc\s+([0-9.]+)", result.stdout)
    versions = sorted((root / "lightning_logs").glob("version_*"))
    return {
        "recipe": recipe, "seed": seed, "wall_s": round(wall, 2),
        "test_acc": float(found.group(1)) if found else None,
        "epochs": epochs_trained(versions[-1]) if versions else None,
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["default", "one_cycle_batch_lr", "curriculum"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "runs" / "compare_recipes"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for k, seed in enumerate(args.seeds):
        recipes = args.recipes[k % len(args.recipes):] + args.recipes[: k % len(args.recipes)]
        for recipe in recipes:
            row = run_one(recipe, seed, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / "compare_recipes.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'recipe':24s} {'test acc (median)':>18s} {'wall s (median)':>16s} {'epochs':>8s}  per seed (acc, s)")
    for recipe in args.recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        accs = [r["test_acc"] for r in mine if r["test_acc"] is not None]
        walls = [r["wall_s"] for r in mine]
        per_seed = ", ".join(f"({r['test_acc']:.4f}, {r['wall_s']:.0f})" for r in mine)
        print(f"{recipe:24s} {statistics.median(accs):18.4f} {statistics.median(walls):16.1f} "
              f"{str([r['epochs'] for r in mine]):>8s}  {per_seed}")


if __name__ == "__main__":
    main()
