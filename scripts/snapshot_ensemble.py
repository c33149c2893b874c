"""Measure a snapshot ensemble against its best single snapshot on the embedded digits.

For each seed: train one model with :class:`SnapshotEnsemble` (cosine LR cycles with restarts,
one snapshot per cycle), then evaluate every snapshot and the ensemble (mean of the snapshots'
softmax outputs) on the validation and the test split. The best single snapshot is the one with
the highest *validation* accuracy (ties: lower validation NLL); the honest comparison is the
ensemble against that snapshot, both on test. The best snapshot by test accuracy is also reported,
labelled "test-oracle": it is chosen on the data it is scored on, so it flatters the single model.

The splits are fixed (DigitsDataModule's ``split_seed``); the seed changes only the training
(initialisation, shuffle, augmentation), so per-seed averages measure training noise, not split
noise. Prints one row per seed and a summary, and writes ``snapshot_ensemble.json`` to ``--out``
(via a temporary file, never half-written).

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

from epochwise.callbacks.ensembles import SnapshotEnsemble, evaluate_snapshot_ensemble  # noqa: E402
from epochwise.datamodules import DigitsDataModule  # noqa: E402
from epochwise.modules import ImageClassifier  # noqa: E402


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


def choose_on_validation(val_acc: list[float], val_nll: list[float]) -> int:
    """Index of the snapshot with the highest validation accuracy (ties: the lower validation NLL)."""
    return max(range(len(val_acc)), key=lambda i: (val_acc[i], -val_nll[i]))


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, seed=seed)
    if args.backbone == "mlp":
        backbone, kwargs = "mlp", {"input_size": args.image_size, "hidden": [256, 256]}
    else:
        backbone, kwargs = "simple_cnn", {"pool_size": max(1, args.image_size // 4)}
    model = ImageClassifier(backbone, kwargs, optimizer=args.optimizer, lr=args.lr)
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
    val = evaluate_snapshot_ensemble(model, snap.snapshot_paths, dm.val_dataloader())
    test = snap.ensemble_test(trainer, model, datamodule=dm)
    chosen = choose_on_validation(val["snapshot_acc"], val["snapshot_nll"])
    return {
        "seed": seed,
        "split_seed": dm.split_seed,
        "num_snapshots": test["num_snapshots"],
        "num_val_samples": val["num_samples"],
        "num_test_samples": test["num_samples"],
        "snapshot_val_acc": val["snapshot_acc"],
        "snapshot_val_nll": val["snapshot_nll"],
        "snapshot_test_acc": test["snapshot_acc"],
        "snapshot_test_nll": test["snapshot_nll"],
        "chosen_snapshot": chosen,  # on validation data
        "best_single_test_acc": test["snapshot_acc"][chosen],
        "best_single_test_nll": test["snapshot_nll"][chosen],
        "ensemble_val_acc": val["ensemble_acc"],
        "ensemble_test_acc": test["ensemble_acc"],
        "ensemble_test_nll": test["ensemble_nll"],
        "delta_test_acc": test["ensemble_acc"] - test["snapshot_acc"][chosen],
        "test_oracle_snapshot_acc": max(test["snapshot_acc"]),  # chosen on test: not a fair baseline
        "train_seconds": time.perf_counter() - start,
    }


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
    r0 = rows[0]
    print(f"\nsnapshot ensemble on digits ({r0['num_val_samples']} val / {r0['num_test_samples']} test images, "
          f"the same split for every seed), {args.backbone}, {args.optimizer} lr {args.lr}, "
          f"{args.num_cycles} cycles x {args.cycle_epochs} epochs")
    print(f"{'seed':>4}  {'snapshots val acc':<36} {'chosen':>6} {'single':>7} {'ensemble':>8} {'delta':>7}"
          f"  {'test-oracle':>11}  {'NLL single/ens':>14}")
    for r in rows:
        accs = " ".join(f"{a:.4f}" for a in r["snapshot_val_acc"])
        print(f"{r['seed']:>4}  {accs:<36} {r['chosen_snapshot']:>6} {r['best_single_test_acc']:>7.4f}"
              f" {r['ensemble_test_acc']:>8.4f} {r['delta_test_acc']:>+7.4f}  {r['test_oracle_snapshot_acc']:>11.4f}"
              f"  {r['best_single_test_nll']:.3f}/{r['ensemble_test_nll']:.3f}")
    print("single: test accuracy of the snapshot chosen on validation; delta = ensemble - single (test);"
          " test-oracle: the best snapshot by test accuracy (chosen on test, reported for reference only)")
    deltas = [r["delta_test_acc"] for r in rows]
    summary = {
        "mean_best_single_test_acc": statistics.fmean(r["best_single_test_acc"] for r in rows),
        "mean_ensemble_test_acc": statistics.fmean(r["ensemble_test_acc"] for r in rows),
        "mean_delta_test_acc": statistics.fmean(deltas),
        "seeds_ensemble_ge_single": sum(d >= 0 for d in deltas),
        "mean_test_oracle_snapshot_acc": statistics.fmean(r["test_oracle_snapshot_acc"] for r in rows),
    }
    print(f"mean single (val-chosen) {summary['mean_best_single_test_acc']:.4f}, mean ensemble"
          f" {summary['mean_ensemble_test_acc']:.4f} ({summary['mean_delta_test_acc']:+.4f});"
          f" ensemble >= single in {summary['seeds_ensemble_ge_single']}/{len(rows)} seeds;"
          f" test-oracle single {summary['mean_test_oracle_snapshot_acc']:.4f}")
    payload = {"args": vars(args), "runs": rows, "summary": summary}
    path = os.path.join(args.out, "snapshot_ensemble.json")
    write_json(path, payload)
    print(f"written: {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
