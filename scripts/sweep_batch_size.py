"""The tutorial's batch-size diagnostic: final validation accuracy, generalisation gap, optimizer
steps and wall time against the batch size, for each LR rule, median of seeds.

Every cell trains the same MLP on the 8 px digits (:mod:`measured_fit`: 360 validation images)
with SGD (momentum 0.9) for either a fixed number of epochs (``--budget epochs``: a larger batch
takes fewer steps) or a fixed number of optimizer steps (``--budget updates``: a larger batch sees
more epochs). The LR is ``--lr`` at ``--base-batch`` and follows the batch by the rule
(:class:`LRScaling`: ``none``, ``linear``, ``sqrt``); wherever the rule raises the LR above
``--lr`` (the large batches), :class:`LRWarmup` ramps it up linearly over the first
``--warmup-fraction`` of the run's steps. Accuracies and the gap (``train_acc - val_acc``) are
measured after the fit on the whole splits, in eval mode. Wall time is load-dependent (the
process CPU time, also recorded, much less so); steps are exact.

Writes ``sweep.json``, ``sweep.md`` (the table) and ``sweep_batch_size.png`` (four panels) to
``--out``.

    python scripts/sweep_batch_size.py                      # 8..1024, 3 rules, 3 seeds, 20 epochs
    python scripts/sweep_batch_size.py --budget updates --updates 600
    python scripts/sweep_batch_size.py --quick              # 4 sizes, 3 seeds, 8 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from epochwise.modules.runtime import tune_malloc  # noqa: E402

tune_malloc()

import torch  # noqa: E402
from measured_fit import measured_fit, public, quiet_lightning  # noqa: E402

from epochwise.callbacks import LRScaling, LRWarmup, iterations_per_epoch, lr_scale  # noqa: E402

RULES = ("none", "linear", "sqrt")
PANELS = (("val_acc", "final validation accuracy"), ("gap_acc", "generalisation gap (train - val acc)"),
          ("steps", "optimizer steps"), ("wall_s", "wall time of the fit (s)"))


def warmed_up(rule: str, batch: int, base_batch: int, warmup_fraction: float) -> bool:
    """Whether a cell gets an LR warmup: where its rule raises the LR above the base LR."""
    return warmup_fraction > 0 and lr_scale(rule, batch / base_batch) > 1.0


def cell_callbacks(rule: str, batch: int, base_batch: int, total_steps: int, warmup_fraction: float) -> list:
    """LRScaling by ``rule`` and, where it raises the LR, a linear LR warmup over a fraction of the steps."""
    callbacks: list = [LRScaling(rule, base_batch_size=base_batch)]  # type: ignore[arg-type]
    if warmed_up(rule, batch, base_batch, warmup_fraction):
        callbacks.append(LRWarmup(max(1, round(warmup_fraction * total_steps)), unit="step", start_factor=0.1))
    return callbacks


def run_cell(args: argparse.Namespace, rule: str, batch: int, seed: int, num_train: int) -> dict[str, Any]:
    """One fit of the sweep (see the module docstring); returns :func:`measured_fit`'s figures."""
    if args.budget == "epochs":
        total, budget = args.epochs * iterations_per_epoch(num_train, batch), {"epochs": args.epochs}
    else:
        total, budget = args.updates, {"max_steps": args.updates}
    run = measured_fit(seed, batch, args.lr, optimizer="sgd", callbacks=cell_callbacks(
        rule, batch, args.base_batch, total, args.warmup_fraction), data=args.data, data_dir=args.data_dir,
        validate_every_epoch=False, **budget)
    return {**public(run), "rule": rule, "warmup": warmed_up(rule, batch, args.base_batch, args.warmup_fraction)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rule, batch): the median over seeds of each figure, with its min and max."""
    rows = []
    for key in sorted({(r["rule"], r["batch"]) for r in runs}, key=lambda k: (RULES.index(k[0]), k[1])):
        cell = [r for r in runs if (r["rule"], r["batch"]) == key]
        row: dict[str, Any] = {"rule": key[0], "batch": key[1], "seeds": [r["seed"] for r in cell],
                               "warmup": cell[0]["warmup"]}
        for name in ("val_acc", "train_acc", "gap_acc", "steps", "epochs", "wall_s", "cpu_s"):
            values = [float(r[name]) for r in cell]
            row[name], row[f"{name}_min"], row[f"{name}_max"] = statistics.median(values), min(values), max(values)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The sweep table: median (min-max over seeds) per rule and batch size."""
    lines = [header, "", "| LR rule | batch | LR warmup | val acc | train - val acc | steps | epochs | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['batch']} | {'yes' if r['warmup'] else 'no'} "
            f"| {r['val_acc']:.3f} ({r['val_acc_min']:.3f}-{r['val_acc_max']:.3f}) "
            f"| {r['gap_acc']:+.3f} ({r['gap_acc_min']:+.3f}..{r['gap_acc_max']:+.3f}) "
            f"| {r['steps']:.0f} | {r['epochs']:.0f} | {r['wall_s']:.1f} ({r['wall_s_min']:.1f}-{r['wall_s_max']:.1f}) "
            f"| {r['cpu_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Four panels against the batch size (log2 axis), one line per LR rule, min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, (key, label) in zip(axes.flat, PANELS):
        for rule in RULES:
            rs = [r for r in rows if r["rule"] == rule]
            if not rs:
                continue
            xs = [r["batch"] for r in rs]
            ax.plot(xs, [r[key] for r in rs], marker="o", label=f"LR rule: {rule}")
            ax.fill_between(xs, [r[f"{key}_min"] for r in rs], [r[f"{key}_max"] for r in rs], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for r in rows}), [str(b) for b in sorted({r["batch"] for r in rows})])
        ax.minorticks_off()
        if key in ("steps", "wall_s"):
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("batch size")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--budget", choices=("epochs", "updates"), default="epochs")
    p.add_argument("--epochs", type=int, default=20, help="epochs per fit with --budget epochs (default: 20)")
    p.add_argument("--updates", type=int, default=600, help="optimizer steps per fit with --budget updates")
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    p.add_argument("--lr", type=float, default=0.05, help="SGD LR at --base-batch (default: 0.05)")
    p.add_argument("--base-batch", type=int, default=32, help="batch size at which --lr applies (default: 32)")
    p.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="LR warmup over this fraction of the steps where the rule raises the LR (0: none)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", choices=("digits", "mnist", "cifar10"), default="digits")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these tiny models "
                   "gain nothing from a second one, and on shared cores lose much)")
    p.add_argument("--quick", action="store_true", help="batch sizes 16 64 256 1024 and 8 epochs (or 200 updates)")
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.epochs, args.updates = [16, 64, 256, 1024], 8, 200
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()
    from measured_fit import make_data

    dm = make_data(args.data, 32, 0, args.data_dir)
    dm.setup("fit")
    num_train = len(dm.train_set)
    cells = [(rule, b, s) for s in args.seeds for rule in args.rules for b in args.batch_sizes]
    runs = []
    for i, (rule, batch, seed) in enumerate(cells):  # seeds outermost: a load change hits every cell alike
        runs.append(run_cell(args, rule, batch, seed, num_train))
        r = runs[-1]
        elapsed = time.perf_counter() - started
        print(f"[{i + 1}/{len(cells)}] rule {rule:<6} batch {batch:>4} seed {seed}: val acc {r['val_acc']:.3f} "
              f"gap {r['gap_acc']:+.3f} steps {r['steps']} wall {r['wall_s']:.1f} s "
              f"(about {elapsed / (i + 1) * (len(cells) - i - 1):.0f} s left)", flush=True)
    rows = summarise(runs)
    budget = f"{args.epochs} epochs" if args.budget == "epochs" else f"{args.updates} optimizer steps"
    header = (f"MLP on {args.data} (8 px digits: {num_train} train images), SGD lr {args.lr:g} at batch "
              f"{args.base_batch}, {budget}, median (min-max) of seeds {' '.join(map(str, args.seeds))}")
    table = markdown(rows, header)
    png = out / "sweep_batch_size.png"
    plot(rows, png, header.replace(", median", "\nmedian"))
    payload = {"args": vars(args), "num_train": num_train, "rows": rows,
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
               "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_before": load,
                           "load_after": os.getloadavg()}, "seconds": time.perf_counter() - started,
               "command": "python scripts/sweep_batch_size.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "sweep.json").write_text(json.dumps(payload, indent=2))
    (out / "sweep.md").write_text(table)
    print(table)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'} and {png} in {payload['seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
