"""The critical batch size (CBS) measured by branching (Merrill et al. 2025), next to B_simple, on digits.

1. **A run with checkpoints**: SimpleCNN on the embedded digits, Adam at a constant LR, batch
   ``--base-batch``, ``GradientNoiseScale`` measuring B_simple; a checkpoint (weights and optimizer
   state) at the end of each epoch in ``--points`` (or pass ``--checkpoints`` of a run of your own).
2. **Branches**: from each checkpoint, a short run at every batch size of ``--sizes`` over the same
   number of samples (``--branch-epochs`` epochs' worth), the LR scaled from the base batch by
   ``--rule`` (``LRScaling``: ``sqrt`` suits Adam), the optimizer state continued, ``--seeds`` data
   orders each. The loss after a branch is the mean cross-entropy over the whole training split.
   The **CBS** at a point is the largest batch size whose loss after the branch (median over the
   seeds) is within ``--tolerance`` (relative) of the smallest batch size's: up to the CBS a larger
   batch buys the same progress per sample in fewer steps. With one LR rule for every size the
   smallest batch is not always the most sample-efficient (its LR is not tuned, and one seed can
   diverge), so the table also gives the CBS against the *best* size's loss, which the figure and
   the recipe use.
3. **A batch-size warmup derived from it**: ``BatchSizeSchedule`` milestones at the checkpoint epochs,
   each the largest power of two not above the CBS measured there (never decreasing), with
   ``LRScaling(--rule)``; written as a ``scripts/train.py`` recipe (``warmup_recipe.yaml``).
4. **The warmup vs the fixed batch** (``--base-batch``, the default recipe's): fits to
   ``--target-acc`` validation accuracy (validated twice an epoch), interleaved over ``--compare-seeds``
   seeds: optimizer steps and wall time to the target, median over seeds; every timing is written
   with the machine's 1-minute load average.

Writes ``cbs.csv``, ``branches.csv`` (``branches.json`` with the loss curves), ``cbs.md``, ``cbs.png`` (loss vs samples of every branch; CBS and
B_simple over training), ``warmup_recipe.yaml``, ``compare.csv`` and ``compare.md`` into ``--out``.

Usage::

    python scripts/critical_batch_size.py --quick        # a few minutes on 2 CPU cores
    python scripts/critical_batch_size.py                 # the full measurement
    python scripts/critical_batch_size.py --skip-compare --checkpoints a.ckpt b.ckpt c.ckpt
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import lightning.pytorch as pl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from noise_parts import (  # noqa: E402
    NoiseRecorder,
    classifier,
    digits,
    full_loss,
    load_average,
    quiet_trainer,
    write_csv,
)

from epochwise.callbacks import BatchSizeSchedule, GradientNoiseScale, LRScaling  # noqa: E402


# -- 1. the run with checkpoints ----------------------------------------------------------------
class SaveAt(Callback):
    """Saves a checkpoint at the end of each epoch in ``epochs`` and notes B_simple, loss and samples there."""

    def __init__(self, epochs: list[int], folder: Path) -> None:
        self.epochs, self.folder, self.points = set(epochs), folder, []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.epochs:
            return
        path = self.folder / f"epoch{epoch}.ckpt"
        trainer.save_checkpoint(path)
        gns = next(c for c in trainer.callbacks if isinstance(c, GradientNoiseScale))
        self.points.append({"ckpt": str(path), "epoch": epoch, "step": trainer.global_step,
                            "b_simple": gns.value()})


def main_run(args: argparse.Namespace, out: Path) -> tuple[list[dict], list[dict]]:
    pl.seed_everything(args.seed, verbose=False)
    dm = digits(args.base_batch, args.image_size)
    saver = SaveAt(args.points, out / "checkpoints")
    recorder = NoiseRecorder()
    gns = GradientNoiseScale(every_n_steps=args.every, ema_decay=0.95)
    model = classifier(args.lr)
    quiet_trainer(max_epochs=max(args.points) + 1, callbacks=[gns, recorder, saver], limit_val_batches=0).fit(
        model, datamodule=dm)
    return saver.points, recorder.rows


# -- 2. branches ----------------------------------------------------------------------------------
class ContinueOptimizer(Callback):
    """Loads the checkpoint's optimizer state at fit start (before the LR path adopts its LR)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.optimizers[0].load_state_dict(self.state)


def branch(args: argparse.Namespace, ckpt: dict[str, Any], size: int, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    dm = digits(size, args.image_size)
    dm.setup("fit")
    dm.seed = 1000 + seed  # the same split, another order
    model = classifier(args.lr)
    model.load_state_dict(ckpt["state_dict"])
    samples = args.branch_epochs * len(dm.train_set.targets)
    steps = math.ceil(samples / size)
    recorder = NoiseRecorder()
    callbacks = [ContinueOptimizer(ckpt["optimizer_states"][0]), LRScaling(args.rule, base_batch_size=args.base_batch),
                 recorder]
    quiet_trainer(max_steps=steps, max_epochs=-1, callbacks=callbacks, limit_val_batches=0).fit(model, datamodule=dm)
    loss, acc = full_loss(model, dm)
    return {"size": size, "seed": seed, "steps": steps, "loss": loss, "acc": acc,
            "curve": [(r["samples"], r["train_loss"]) for r in recorder.rows]}


def critical_batch_size(losses: dict[int, float], tolerance: float, reference: str = "smallest") -> int:
    """The largest size whose loss is within ``tolerance`` (relative) of the reference loss.

    ``reference="smallest"``: the smallest size's loss (the definition, assuming the smallest batch
    makes the most progress per sample). ``"best"``: the lowest loss of any size, which is the same
    when that assumption holds and stays meaningful when the smallest batch is worse (an LR rule
    that under-tunes it, or a noisy seed).

    Example:
        >>> losses = {8: 0.080, 16: 0.050, 32: 0.054, 64: 0.070}
        >>> critical_batch_size(losses, 0.1), critical_batch_size(losses, 0.1, reference="best")
        (64, 32)
    """
    sizes = sorted(losses)
    level = losses[sizes[0]] if reference == "smallest" else min(losses.values())
    return max(b for b in sizes if losses[b] <= level * (1 + tolerance))


def measure(args: argparse.Namespace, points: list[dict]) -> tuple[list[dict], list[dict]]:
    table, branches = [], []
    for point in points:
        ckpt = torch.load(point["ckpt"], map_location="cpu", weights_only=False)
        dm = digits(args.base_batch, args.image_size)
        dm.setup("fit")
        model = classifier(args.lr)
        model.load_state_dict(ckpt["state_dict"])
        point_loss, _ = full_loss(model, dm)
        losses: dict[int, list[float]] = {}
        for size in args.sizes:
            for seed in range(args.seeds):
                result = branch(args, ckpt, size, seed)
                result.update({"point_epoch": point["epoch"]})
                branches.append(result)
                losses.setdefault(size, []).append(result["loss"])
                print(f"  point epoch {point['epoch']}: B={size:<4} seed {seed}: loss {result['loss']:.4f} "
                      f"({result['steps']} steps)", flush=True)
        median = {b: statistics.median(v) for b, v in losses.items()}  # robust to one diverging seed
        table.append({"epoch": point["epoch"], "step": point["step"], "loss_at_point": point_loss,
                      "b_simple": point["b_simple"], "cbs": critical_batch_size(median, args.tolerance, "best"),
                      "cbs_vs_smallest": critical_batch_size(median, args.tolerance, "smallest"),
                      **{f"loss_B{b}": median[b] for b in sorted(median)}})
    return table, branches


# -- 3. the derived warmup ---------------------------------------------------------------------------
def derived_milestones(table: list[dict], cap: int) -> dict[int, int]:
    """``{epoch: per-device size}``: from the first epoch the first point's CBS, from each later point's
    epoch its CBS; powers of two, never decreasing, at most ``cap``."""
    milestones, current = {}, 0
    for i, row in enumerate(table):
        size = min(cap, 2 ** int(math.floor(math.log2(max(1, row["cbs"])))))
        current = max(current, size)
        milestones[0 if i == 0 else row["epoch"] + 1] = current
    return milestones


def recipe_yaml(milestones: dict[int, int], args: argparse.Namespace) -> str:
    sched = ", ".join(f"{e}: {b}" for e, b in milestones.items())
    return f"""# Batch-size warmup derived from the critical batch size measured on digits by
# scripts/critical_batch_size.py (CBS at epochs {[e for e in milestones]}: per-device {list(milestones.values())}),
# with {args.rule}-rule LR scaling from the base batch {args.base_batch}.
# Run: python scripts/train.py fit --config <this file>
seed_everything: 0
trainer:
  max_epochs: 30
  log_every_n_steps: 5
  callbacks:
    - class_path: epochwise.callbacks.BatchSizeSchedule
      init_args: {{milestones: {{{sched}}}, unit: epoch}}
    - class_path: epochwise.callbacks.LRScaling
      init_args: {{rule: {args.rule}, base_batch_size: {args.base_batch}}}
    - class_path: epochwise.callbacks.LearningCurveMonitor
model:
  optimizer: adam
  lr: {args.lr}
  scheduler: null
data:
  class_path: epochwise.datamodules.DigitsDataModule
  init_args: {{batch_size: {args.base_batch}, image_size: {args.image_size}}}
"""


# -- 4. the warmup vs the fixed batch ----------------------------------------------------------------
class ToTarget(Callback):
    """Stops at the first validation with ``val_acc >= target``; notes optimizer steps, samples and wall time."""

    def __init__(self, target: float) -> None:
        self.target, self.result = target, None
        self._start = 0.0
        self._samples = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += int(batch[0].shape[0])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        acc = trainer.callback_metrics.get("val_acc")
        if self.result is None and acc is not None and float(acc) >= self.target:
            self.result = {"steps": trainer.global_step, "samples": self._samples, "epoch": trainer.current_epoch,
                           "seconds": time.perf_counter() - self._start, "val_acc": float(acc)}
            trainer.should_stop = True


def compare_fit(args: argparse.Namespace, arm: str, milestones: dict[int, int], seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    dm = digits(args.base_batch, args.image_size)
    dm.setup("fit")
    dm.seed = 2000 + seed
    callbacks: list[Callback] = [ToTarget(args.target_acc)]
    if arm == "warmup":
        callbacks += [BatchSizeSchedule(milestones), LRScaling(args.rule, base_batch_size=args.base_batch)]
    load = load_average()
    quiet_trainer(max_epochs=args.compare_epochs, callbacks=callbacks, val_check_interval=0.5).fit(
        classifier(args.lr), datamodule=dm)
    result = callbacks[0].result or {"steps": None, "samples": None, "epoch": None, "seconds": None, "val_acc": None}
    return {"arm": arm, "seed": seed, **result, "load_at_start": load, "load_at_end": load_average()}


def compare(args: argparse.Namespace, milestones: dict[int, int]) -> tuple[list[dict], list[str]]:
    rows = []
    for seed in range(args.compare_seeds):  # interleaved: load hits both arms alike
        for arm in ("fixed", "warmup"):
            rows.append(compare_fit(args, arm, milestones, seed))
            print(f"  {arm:<7} seed {seed}: {rows[-1]}", flush=True)
    lines = [f"Fits to validation accuracy >= {args.target_acc} (validated twice an epoch), "
             f"{args.compare_seeds} seeds, interleaved; fixed: batch {args.base_batch}; warmup: "
             f"BatchSizeSchedule({milestones}) + LRScaling({args.rule!r}); Adam {args.lr}, constant LR.", "",
             "| arm | optimizer steps (median) | samples (median) | wall s (median) | reached | per seed: steps / s / load |",
             "|---|---|---|---|---|---|"]
    for arm in ("fixed", "warmup"):
        mine = [r for r in rows if r["arm"] == arm]
        done = [r for r in mine if r["steps"] is not None]

        def med(key: str, done: list[dict] = done) -> float:
            return statistics.median(r[key] for r in done) if done else float("nan")

        per_seed = "; ".join(f"{r['steps']} / {r['seconds']:.1f} / {r['load_at_start']:.1f}" if r["steps"] is not None
                             else "not reached" for r in mine)
        lines.append(f"| {arm} | {med('steps'):.0f} | {med('samples'):.0f} | {med('seconds'):.1f} | "
                     f"{len(done)}/{len(mine)} | {per_seed} |")
    return rows, lines


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV this script wrote, numbers as numbers (empty: ``None``)."""
    import csv

    def value(text: str) -> Any:
        if text == "":
            return None
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if number.is_integer() and "." not in text else number

    with open(path) as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


# -- the figure ---------------------------------------------------------------------------------------
def smoothed_curve(runs: list[dict], window: int = 384, every: int = 64) -> tuple[list[int], list[float]]:
    """Mean batch loss over the trailing ``window`` samples, on a grid of samples, averaged over seeds."""
    total = min(b["curve"][-1][0] for b in runs)
    grid = list(range(window, total + 1, every))
    out = []
    xs = []
    for x in grid:
        per_run = []
        for b in runs:
            inside = [v for s, v in b["curve"] if x - window < s <= x]
            if not inside:  # a batch larger than the window: its latest loss
                inside = [v for s, v in b["curve"] if s <= x][-1:]
            if inside:
                per_run.append(statistics.fmean(inside))
        if len(per_run) == len(runs):
            xs.append(x)
            out.append(statistics.fmean(per_run))
    return xs, out


def plot(table: list[dict], branches: list[dict], run_rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    points = [row["epoch"] for row in table]
    fig, axes = plt.subplots(1, len(points) + 1, figsize=(4.2 * (len(points) + 1), 3.8))
    colors = plt.cm.viridis([i / max(1, len(args.sizes) - 1) for i in range(len(args.sizes))])
    for ax, row in zip(axes, table):
        for size, color in zip(args.sizes, colors):
            runs = [b for b in branches if b["point_epoch"] == row["epoch"] and b["size"] == size]
            xs, ys = smoothed_curve(runs)
            ax.plot(xs, ys, color=color, lw=1.4, label=f"B={size}")
            ax.plot([xs[-1]], [row[f"loss_B{size}"]], "o", color=color, ms=4)
        ax.set_yscale("log")
        ax.set_xlabel("samples in the branch")
        ax.set_ylabel("training loss (mean over 384 samples)")
        cbs = f"≤{row['cbs']}" if row["cbs"] == min(args.sizes) else str(row["cbs"])
        b_simple = "—" if row["b_simple"] is None else f"{row['b_simple']:.0f}"
        ax.set_title(f"from epoch {row['epoch']}: CBS {cbs}, B_simple {b_simple}\n"
                     "(dots: loss on the whole train split after the branch)", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[-1]
    samples_per_epoch = max(r["samples"] for r in run_rows) / (max(args.points) + 1)
    ax.plot([r["samples"] for r in run_rows], [max(r["b_simple"], 1e-1) for r in run_rows], color="tab:blue",
            lw=1.5, label="B_simple (smoothed, GradientNoiseScale)")
    xs = [(row["epoch"] + 1) * samples_per_epoch for row in table]
    ax.plot(xs, [row["cbs"] for row in table], "s-", color="tab:red",
            label=f"CBS (branching, tolerance {args.tolerance:g} of the best)")
    for x, row in zip(xs, table):
        if row["cbs"] == min(args.sizes):
            ax.annotate("≤", (x, row["cbs"]), textcoords="offset points", xytext=(-12, -4), color="tab:red")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("samples seen in the run")
    ax.set_ylabel("batch size")
    ax.set_title("critical batch size and noise scale over training", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[0, 3, 9], help="epochs after which to branch")
    parser.add_argument("--checkpoints", nargs="+", help="branch from these Lightning checkpoints instead")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--branch-epochs", type=float, default=2.0, help="samples per branch, in epochs")
    parser.add_argument("--seeds", type=int, default=3, help="data orders per branch")
    parser.add_argument("--rule", default="sqrt", choices=("linear", "sqrt", "none"))
    parser.add_argument("--tolerance", type=float, default=0.1, help="relative loss tolerance of the CBS")
    parser.add_argument("--base-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=16, help="digits upsampled to this side (28: the tutorial's)")
    parser.add_argument("--every", type=int, default=2, help="GradientNoiseScale every_n_steps in the run")
    parser.add_argument("--target-acc", type=float, default=0.97)
    parser.add_argument("--compare-seeds", type=int, default=3)
    parser.add_argument("--compare-epochs", type=int, default=30)
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="3 points in 5 epochs, 4 sizes, 1 seed, 1-epoch branches")
    parser.add_argument("--out", default="runs/critical_batch_size")
    parser.add_argument("--replot", action="store_true", help="only redraw cbs.png from the files in --out")
    args = parser.parse_args()
    if args.quick:
        args.points, args.sizes, args.seeds = [0, 2, 4], [16, 64, 256, 512], 1
        args.branch_epochs, args.compare_seeds, args.compare_epochs = 1.0, 1, 12
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replot:
        out = Path(args.out)
        table, run_rows = read_csv(out / "cbs.csv"), read_csv(out / "run.csv")
        args.sizes = sorted({int(b["size"]) for b in json.loads((out / "branches.json").read_text())})
        plot(table, json.loads((out / "branches.json").read_text()), run_rows, args, out / "cbs.png")
        return
    out = Path(args.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), load_average()

    if args.checkpoints:
        points = []
        for path in args.checkpoints:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            gns = next((v for k, v in ckpt.get("callbacks", {}).items() if "GradientNoiseScale" in k), None)
            b = None
            if gns and gns.get("estimator"):
                est = gns["estimator"]
                b = est["ema_trace"] / est["ema_grad_sq"] if est.get("count") else None
            points.append({"ckpt": path, "epoch": int(ckpt["epoch"]), "step": int(ckpt["global_step"]), "b_simple": b})
        run_rows: list[dict] = []
    else:
        print("run with checkpoints", flush=True)
        points, run_rows = main_run(args, out)
        write_csv(out / "run.csv", run_rows)
    print("branches", flush=True)
    table, branches = measure(args, points)
    write_csv(out / "cbs.csv", table)
    write_csv(out / "branches.csv", [{k: v for k, v in b.items() if k != "curve"} for b in branches])
    (out / "branches.json").write_text(json.dumps(branches))  # with every branch's loss curve
    if run_rows:
        plot(table, branches, run_rows, args, out / "cbs.png")
    milestones = derived_milestones(table, cap=max(args.sizes))
    (out / "warmup_recipe.yaml").write_text(recipe_yaml(milestones, args))

    lines = [f"# Critical batch size on digits ({args.image_size} px, SimpleCNN, Adam {args.lr}, base batch "
             f"{args.base_batch}, LR rule {args.rule!r}, branches of {args.branch_epochs:g} epochs, "
             f"{args.seeds} seed(s), tolerance {args.tolerance:g})", "",
             "| branch point | step | train loss there | B_simple there | CBS (vs best) | CBS (vs smallest) | " +
             " | ".join(f"loss after B={b}" for b in args.sizes) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(args.sizes)]
    for row in table:
        b_simple = "—" if row["b_simple"] is None else f"{row['b_simple']:.0f}"
        cbs, smallest = (f"≤ {row[k]}" if row[k] == min(args.sizes) else str(row[k]) for k in ("cbs", "cbs_vs_smallest"))
        lines.append(f"| end of epoch {row['epoch']} | {row['step']} | {row['loss_at_point']:.4f} | {b_simple} | "
                     f"{cbs} | {smallest} | " + " | ".join(f"{row[f'loss_B{b}']:.4f}" for b in args.sizes) + " |")
    lines += ["", "Losses: mean cross-entropy over the whole training split after the branch, median over seeds. "
              "'≤ B': the smallest size tried is already the CBS."]
    lines += ["", f"Derived warmup: BatchSizeSchedule({milestones}) (see warmup_recipe.yaml)", ""]
    if not args.skip_compare:
        print("warmup vs fixed batch", flush=True)
        rows, compare_lines = compare(args, milestones)
        write_csv(out / "compare.csv", rows)
        (out / "compare.md").write_text("\n".join(compare_lines) + "\n")
        lines += compare_lines
    lines += ["", f"{time.perf_counter() - started:.0f} s; 1-min load average {load_start:.1f} at the start, "
              f"{load_average():.1f} at the end"]
    (out / "cbs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
