"""Measure a snapshot ensemble against its best single snapshot on the embedded digits.

For each seed: train one model with :class:`SnapshotEnsemble` (cosine LR cycles with restarts,
one snapshot per cycle), then evaluate every snapshot and the ensemble (mean of the snapshots'
softmax outputs) on the digits test split. Prints one row per seed and a summary, and writes
``snapshot_ensemble.json`` to ``--out`` (via a temporary file, never half-written).

    python scripts/snapshot_ensemble.py                 # MLP, SGD lr 0.2, 5 cycles x 4 epochs, 3 seeds
    python scripts/snapshot_ensemble.py --backbone cnn --image-size 12 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from epochwise.modules.runtime import tune_malloc

# Before any tensor is allocated (see tune_malloc).
MALLOC_TUNED = tune_malloc() if not os.environ.get("EPOCHWISE_NO_MALLOC_TUNING") else False

import lightning.pytorch as pl  # noqa: E402

from epochwise.callbacks.ensembles import SnapshotEnsemble  # noqa: E402
from epochwise.datamodules import DigitsDataModule  # noqa: E402
from epochwise.modules import MLP, ImageClassifier, SimpleCNN  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed (default: 0 1 2)")
    p.add_argument("--cycle-epochs", type=int, default=4, help="epochs per LR cycle (default: 4)")
    p.add_argument("--num-cycles", type=int, default=5, help="cycles = snapshots (default: 5)")
    p.add_argument("--min-lr-factor", type=float, default=0.0, help="LR factor at a cycle's end (default: 0)")
    p.add_argument("--backbone", choices=("mlp", "cnn"), default="mlp", help="MLP(256, 256) or SimpleCNN")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.2, help="peak LR of every cycle (default: 0.2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=8, help="digits resolution (default: native 8)")
    p.add_argument("--out", default="runs/snapshot_ensemble", help="output folder (default: runs/snapshot_ensemble)")
    args = p.parse_args(argv)
    if args.cycle_epochs < 1 or args.num_cycles < 1:
        p.error("--cycle-epochs and --num-cycles must be >= 1")
    return args


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, seed=seed)
    if args.backbone == "mlp":
        backbone = MLP(input_size=args.image_size, hidden=(256, 256))
    else:
        backbone = SimpleCNN(pool_size=max(1, args.image_size // 4))
    model = ImageClassifier(backbone=backbone, optimizer=args.optimizer, lr=args.lr)
    snap = SnapshotEnsemble(
        args.cycle_epochs, args.num_cycles, dirpath=os.path.join(args.out, f"seed{seed}"),
        min_lr_factor=args.min_lr_factor,
    )
    trainer = pl.Trainer(
        max_epochs=snap.total_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[snap], deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    result = snap.ensemble_test(trainer, model, datamodule=dm)
    result["seed"] = seed
    result["train_seconds"] = time.perf_counter() - start
    return result


def write_json(path: str, payload: dict) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = [run_seed(args, seed) for seed in args.seeds]
    print(f"\nsnapshot ensemble on digits test ({rows[0]['num_samples']} images), {args.backbone},"
          f" {args.optimizer} lr {args.lr}, {args.num_cycles} cycles x {args.cycle_epochs} epochs")
    print(f"{'seed':>4}  {'snapshots acc':<40} {'best':>6} {'ensemble':>8} {'delta':>7}  {'NLL best/ens':>13}")
    for r in rows:
        accs = " ".join(f"{a:.4f}" for a in r["snapshot_acc"])
        best_nll = min(r["snapshot_nll"])
        print(f"{r['seed']:>4}  {accs:<40} {r['best_snapshot_acc']:.4f} {r['ensemble_acc']:>8.4f}"
              f" {r['ensemble_acc'] - r['best_snapshot_acc']:>+7.4f}  {best_nll:.3f}/{r['ensemble_nll']:.3f}")
    deltas = [r["ensemble_acc"] - r["best_snapshot_acc"] for r in rows]
    summary = {
        "mean_best_snapshot_acc": statistics.fmean(r["best_snapshot_acc"] for r in rows),
        "mean_ensemble_acc": statistics.fmean(r["ensemble_acc"] for r in rows),
        "mean_delta": statistics.fmean(deltas),
        "seeds_ensemble_ge_best": sum(d >= 0 for d in deltas),
    }
    print(f"mean best snapshot {summary['mean_best_snapshot_acc']:.4f}, mean ensemble"
          f" {summary['mean_ensemble_acc']:.4f} ({summary['mean_delta']:+.4f});"
          f" ensemble >= best in {summary['seeds_ensemble_ge_best']}/{len(rows)} seeds")
    payload = {"args": vars(args), "runs": rows, "summary": summary}
    path = os.path.join(args.out, "snapshot_ensemble.json")
    write_json(path, payload)
    print(f"written: {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
