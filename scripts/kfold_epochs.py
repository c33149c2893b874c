"""Choose ``max_epochs`` by k-fold cross-validation with early stopping.

The DataModule's training data (its train and validation splits together; the test split is not
touched) is shuffled with ``--seed`` and cut into ``--k`` folds. Each fold in turn is the
validation set while a fresh model trains on the rest, with early stopping on ``val_loss``
(``--patience``, ``--min-delta``) up to ``--max-epochs``; the fold's best epoch is the epoch of its
lowest val loss. The script prints a table (fold, best epoch, best val_loss, val_acc at the best
epoch, epochs run), the mean and median best epoch, and the recommendation

    recommended max_epochs = ceil(margin x median best epoch)      (margin 1.1 by default)

The median is robust to one odd fold; the margin leaves a little room above the typical best epoch.
The script only recommends: it trains no final model. Use the recommendation as ``max_epochs`` of
your final run (``scripts/train.py fit --trainer.max_epochs N``), with early stopping or as a fixed
epoch count. That run trains on the DataModule's own train split (``1 - val_fraction`` of the pool,
0.9 by default), more samples per epoch than a fold's model sees (``(k-1)/k`` of the pool, 0.8 at
k=5), so its best epoch tends to come no later than the folds'. A fold that ran into
``--max-epochs`` without stopping is flagged: raise ``--max-epochs`` if that happens.

The pool keeps the DataModule's normalisation (statistics of its train split); each fold's
training batches are augmented as the DataModule's are, its validation batches are not. The
folds come from ``--seed``, as does each fold's model initialisation and shuffle; the DataModule's
test split is fixed (its ``split_seed``) whatever ``--seed``.

Outputs under ``--out`` (default ``runs/kfold``): ``kfold_epochs.json`` (arguments, per-fold rows,
summary) and each fold's learning-curve PNG, all written to a temporary name first and moved into
place. Defaults: the embedded digits (DigitsDataModule, 28 px) and the reference ImageClassifier
(SimpleCNN, Adam 1e-3, batch 64), one torch thread (``--threads``); ``--k 5`` took 3 minutes on 2
CPU cores shared with another job.

Example:
    python scripts/kfold_epochs.py --k 5
    python scripts/kfold_epochs.py --k 3 --patience 3 --image-size 8 --out runs/kfold-small
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from epochwise.modules.runtime import tune_malloc

# Before any tensor is allocated: see tune_malloc's docstring.
MALLOC_TUNED = tune_malloc() if not os.environ.get("EPOCHWISE_NO_MALLOC_TUNING") else False

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from epochwise.callbacks.curves import LearningCurveMonitor  # noqa: E402
from epochwise.callbacks.stopping import EarlyStopping  # noqa: E402
from epochwise.datamodules import DigitsDataModule, InMemoryImageDataset, make_loader  # noqa: E402
from epochwise.datamodules.sampler import SeededRandomSampler  # noqa: E402
from epochwise.modules import ImageClassifier  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kfold_epochs.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--k", type=int, default=5, help="number of folds (>= 2, default: 5)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs (default: 5)")
    p.add_argument("--min-delta", type=float, default=0.0, help="early-stopping min_delta on val_loss (default: 0)")
    p.add_argument("--max-epochs", type=int, default=30, help="cap per fold (default: 30)")
    p.add_argument("--margin", type=float, default=1.1, help="recommended = ceil(margin x median) (default: 1.1)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--image-size", type=int, default=28, help="digits resolution fed to the model (default: 28)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of each fold's model and shuffle (default: 0)")
    p.add_argument("--out", default="runs/kfold", help="output folder (default: runs/kfold)")
    p.add_argument("--no-progress", action="store_true", help="hide Lightning's per-fold progress bar")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default: 1; 0 keeps torch's default, one per core). The digits"
        " models gain little from a second thread, and on 2 shared cores two threads per process ran"
        " 6x slower here (oversubscription)",
    )
    args = p.parse_args(argv)
    if args.k < 2:
        p.error(f"--k must be >= 2, got {args.k}")
    if args.patience < 0:
        p.error(f"--patience must be >= 0, got {args.patience}")
    if args.max_epochs < 1:
        p.error(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if not args.margin >= 1.0:
        p.error(f"--margin must be >= 1, got {args.margin}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    return args


def training_pool(dm: pl.LightningDataModule) -> tuple[InMemoryImageDataset, InMemoryImageDataset]:
    """The DataModule's train and val splits as one pool, twice: with the training transform
    (normalisation and augmentation) and with the evaluation one (normalisation only).

    The images stay in their stored dtype; the two datasets share them.
    """
    dm.setup("fit")
    train, val = dm.train_set, dm.val_set
    images, targets = torch.cat([train.images, val.images]), torch.cat([train.targets, val.targets])
    return (InMemoryImageDataset(images, targets, transform=train.transform),
            InMemoryImageDataset(images, targets, transform=val.transform))


def fold_indices(n: int, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint, nearly equal folds of a seeded permutation of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(perm, k))


def run_fold(
    args: argparse.Namespace, pools: tuple[InMemoryImageDataset, InMemoryImageDataset],
    folds: list[torch.Tensor], i: int,
) -> dict[str, Any]:
    fit_pool, eval_pool = pools
    val_idx = folds[i]
    train_idx = torch.cat([f for j, f in enumerate(folds) if j != i])
    train = InMemoryImageDataset(fit_pool.images[train_idx], fit_pool.targets[train_idx], transform=fit_pool.transform)
    val = InMemoryImageDataset(eval_pool.images[val_idx], eval_pool.targets[val_idx], transform=eval_pool.transform)
    sampler = SeededRandomSampler(train, seed=args.seed + i)  # order: a function of (seed, epoch)
    train_loader = make_loader(train, batch_size=args.batch_size, sampler=sampler)
    val_loader = make_loader(val, batch_size=args.batch_size)

    pl.seed_everything(args.seed + i, verbose=False)
    model = ImageClassifier(lr=args.lr)
    stopper = EarlyStopping(monitor="val_loss", mode="min", patience=args.patience, min_delta=args.min_delta)
    curves = LearningCurveMonitor(dirpath=args.out, filename=f"fold{i + 1}_learning_curves.png")
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        num_sanity_val_steps=0,
        callbacks=[stopper, curves],
        default_root_dir=args.out,
    )
    print(f"fold {i + 1}/{args.k}: train {len(train)}, val {len(val)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)
    best = stopper.best_epoch
    return {
        "fold": i + 1,
        "best_epoch": best + 1,  # epochs trained to reach the best val loss (1-based)
        "best_val_loss": float(stopper.best_score),
        "val_acc_at_best": curves.history["val_acc"][best],
        "epochs_run": trainer.current_epoch,
        "stopped_early": stopper.stopping_reason_message is not None,
        "seconds": time.perf_counter() - start,
        "curves_png": curves.png_path,
    }


def summarize(rows: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    best = [r["best_epoch"] for r in rows]
    median = statistics.median(best)
    return {
        "best_epochs": best,
        "mean_best_epoch": statistics.fmean(best),
        "median_best_epoch": median,
        "stdev_best_epoch": statistics.stdev(best) if len(best) > 1 else 0.0,
        "mean_best_val_loss": statistics.fmean(r["best_val_loss"] for r in rows),
        "mean_val_acc_at_best": statistics.fmean(r["val_acc_at_best"] for r in rows),
        "recommended_max_epochs": math.ceil(margin * median),
        "rule": f"ceil({margin:g} x median best epoch)",
        "folds_not_stopped": [r["fold"] for r in rows if not r["stopped_early"]],
    }


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [f"{'fold':>4}  {'best epoch':>10}  {'best val_loss':>13}  {'val_acc@best':>12}  {'epochs run':>10}"]
    for r in rows:
        flag = "" if r["stopped_early"] else "  (hit --max-epochs)"
        lines.append(
            f"{r['fold']:>4}  {r['best_epoch']:>10}  {r['best_val_loss']:>13.4f}  {r['val_acc_at_best']:>12.4f}"
            f"  {r['epochs_run']:>10}{flag}"
        )
    lines.append(
        f"{'mean':>4}  {summary['mean_best_epoch']:>10.1f}  {summary['mean_best_val_loss']:>13.4f}"
        f"  {summary['mean_val_acc_at_best']:>12.4f}"
    )
    lines.append(f"{'median':>4}  {summary['median_best_epoch']:>8g}")
    lines.append(f"recommended max_epochs: {summary['recommended_max_epochs']}  ({summary['rule']})")
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dm = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size)
    pools = training_pool(dm)
    n = len(pools[0])
    folds = fold_indices(n, args.k, args.seed)
    rows = [run_fold(args, pools, folds, i) for i in range(args.k)]
    summary = summarize(rows, args.margin)
    summary["wall_seconds"] = time.perf_counter() - start
    print(f"\n{args.k}-fold cross-validation on digits ({n} training images), early stopping on val_loss"
          f" (patience {args.patience}), max {args.max_epochs} epochs per fold")
    print(format_table(rows, summary))
    if summary["folds_not_stopped"]:
        print(f"warning: fold(s) {summary['folds_not_stopped']} did not stop early; raise --max-epochs")
    path = os.path.join(args.out, "kfold_epochs.json")
    write_json(path, {"args": vars(args), "folds": rows, "summary": summary, "malloc_tuned": MALLOC_TUNED})
    print(f"written: {path}  (wall time {summary['wall_seconds']:.0f} s)")
    return {"folds": rows, "summary": summary, "json": path}


if __name__ == "__main__":
    main(sys.argv[1:])
