"""Benchmark progressive resizing (batch size coupled to resolution) against the same fit at full size.

For each seed, trains the same model twice on the same split: once at full resolution with the
loader's batch size, once with :class:`~epochwise.callbacks.resizing.ProgressiveResizing`
(explicit stages, ``couple_batch_size=True``, LR scaled with the coupled batch by
:class:`~epochwise.callbacks.LRScaling`). Records the wall time of every epoch (training part and
validation separately), the whole ``fit``, and the final test accuracy; reports medians over the
seeds per stage. Writes a JSON and a PNG to ``--out`` and the "what the network sees" picture to
``--picture``. Files are written to a temporary name and renamed into place.

CPU (default, ~4-5 min on 2 cores)::

    python scripts/bench_resizing.py

GPU comparison on CIFAR-10-shaped random data with resnet20, with peak GPU memory per stage
(``torch.cuda.max_memory_allocated``, reset at each epoch start; accuracy is meaningless there)::

    python scripts/bench_resizing.py --device cuda --data cifar-shaped --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from epochwise.modules.runtime import tune_malloc

MALLOC_TUNED = tune_malloc()  # before any tensor exists (see its docstring)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from epochwise.callbacks.lr import LRScaling  # noqa: E402
from epochwise.callbacks.resizing import ProgressiveResizing, coupled_batch_size, resize_batch  # noqa: E402
from epochwise.datamodules import DigitsDataModule, ImageArrays, InMemoryImageDataModule  # noqa: E402
from epochwise.modules import ImageClassifier, SimpleCNN, resnet20  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# data and models
# ---------------------------------------------------------------------------------------------
class CifarShapedRandom(InMemoryImageDataModule):
    """Random uint8 images shaped like CIFAR-10 (3x32x32, 10 classes): for speed/memory only."""

    num_classes = 10
    num_channels = 3

    def __init__(self, n_train: int = 50_000, n_test: int = 10_000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_train, self.n_test = n_train, n_test

    def load_arrays(self) -> ImageArrays:
        g = torch.Generator().manual_seed(self.seed)
        return ImageArrays(
            torch.randint(0, 256, (self.n_train, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (self.n_train,), generator=g),
            torch.randint(0, 256, (self.n_test, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (self.n_test,), generator=g),
        )


def make_data(args: argparse.Namespace, seed: int) -> InMemoryImageDataModule:
    common = dict(batch_size=args.batch_size, seed=seed, num_workers=0,
                  pin_memory=args.device == "cuda")
    if args.data == "digits":
        return DigitsDataModule(image_size=args.image_size, **common)
    return CifarShapedRandom(n_train=args.n_train, n_test=args.n_test, image_size=args.image_size, **common)


def make_model(args: argparse.Namespace, channels: int) -> ImageClassifier:
    if args.model == "resnet20":
        backbone: torch.nn.Module = resnet20(in_channels=channels, num_classes=10)
    else:
        backbone = SimpleCNN(in_channels=channels, num_classes=10)
    return ImageClassifier(backbone=backbone, in_channels=channels, optimizer=args.optimizer, lr=args.lr,
                           scheduler="cosine" if args.cosine else None)


def parse_stages(text: str) -> list[tuple[int, int]]:
    """``"0:16,6:24,10:32"`` -> ``[(0, 16), (6, 24), (10, 32)]``."""
    try:
        return [(int(a), int(b)) for a, b in (part.split(":") for part in text.split(","))]
    except ValueError as err:
        raise SystemExit(f"--stages must look like 0:16,6:24,10:32, got {text!r}") from err


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
class EpochMeter(Callback):
    """Per epoch: wall and process-CPU seconds of the training part (epoch start -> validation
    start) and of the whole epoch, image side, per-device batch, steps, and on CUDA the peak
    memory of the training part (``max_memory_allocated``, reset at each epoch start)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.rows: list[dict[str, Any]] = []
        self._t0 = self._c0 = 0.0
        self._t_train: float | None = None
        self._c_train = 0.0
        self._side: int | None = None
        self._batch: int | None = None
        self._steps = 0
        self._peak: float | None = None

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._side, self._batch, self._steps, self._t_train, self._peak = None, None, 0, None, None
        self._t0, self._c0 = self.now(), time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._side is None:  # the images as training_step saw them (after resizing)
            self._side, self._batch = int(batch[0].shape[-1]), int(batch[0].shape[0])
        self._steps += 1

    def _end_of_training_part(self) -> None:
        if self._t_train is None:
            self._t_train, self._c_train = self.now(), time.process_time()
            if self.cuda:
                self._peak = torch.cuda.max_memory_allocated() / 2**20

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":  # validation inside fit (trainer.training is False here)
            self._end_of_training_part()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_of_training_part()
        end, cpu = self.now(), time.process_time()
        assert self._t_train is not None
        self.rows.append({
            "epoch": trainer.current_epoch, "side": self._side, "batch": self._batch, "steps": self._steps,
            "train_s": self._t_train - self._t0, "val_s": end - self._t_train, "epoch_s": end - self._t0,
            "train_cpu_s": self._c_train - self._c0, "epoch_cpu_s": cpu - self._c0, "peak_mib": self._peak,
        })


def run_one(args: argparse.Namespace, seed: int, progressive: bool) -> dict[str, Any]:
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = make_data(args, seed)
    model = make_model(args, dm.num_channels)
    meter = EpochMeter(cuda=args.device == "cuda")
    callbacks: list[Callback] = [meter]
    if progressive:
        callbacks = [ProgressiveResizing(stages=args.stage_list, max_batch_size=args.max_batch, seed=seed),
                     LRScaling(rule=args.lr_rule, base_batch_size=args.batch_size), meter]
    trainer = pl.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_epochs=args.epochs,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=callbacks,
        deterministic=False,
    )
    t0, c0 = meter.now(), time.process_time()
    trainer.fit(model, dm)
    fit_s, fit_cpu_s = meter.now() - t0, time.process_time() - c0
    test = trainer.test(model, dm, verbose=False)[0]
    return {"seed": seed, "progressive": progressive, "fit_s": fit_s, "fit_cpu_s": fit_cpu_s,
            "test_acc": float(test["test_acc"]), "epochs": meter.rows}


# ---------------------------------------------------------------------------------------------
# summary, table, plots
# ---------------------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(runs: list[dict[str, Any]], stages: list[tuple[int, int]], epochs: int) -> dict[str, Any]:
    """Per stage and per fit: medians over seeds (of each seed's median epoch in the stage), plus
    contention-robust figures: process CPU time, and the fastest epoch / fit (noise only adds time)."""

    def stage_of(epoch: int) -> int:
        return max(i for i, (start, _) in enumerate(stages) if start <= epoch)

    out: dict[str, Any] = {}
    for key, prog in (("full", False), ("progressive", True)):
        rs = [r for r in runs if r["progressive"] is prog]
        per_stage = []
        for i, (start, _side) in enumerate(stages):
            end = stages[i + 1][0] if i + 1 < len(stages) else epochs
            if start >= epochs:
                break
            end = min(end, epochs)

            def col(name: str, r: dict[str, Any], i: int = i) -> list[float]:
                return [e[name] for e in r["epochs"] if stage_of(e["epoch"]) == i]

            peaks = [p for r in rs for p in col("peak_mib", r) if p]
            sample = col("side", rs[0]), col("batch", rs[0]), col("steps", rs[0])
            per_stage.append({
                "epochs": f"{start}-{end - 1}", "n_epochs": end - start,
                "side": sample[0][0], "batch": sample[1][0], "steps": sample[2][0],
                "train_s": _median([_median(col("train_s", r)) for r in rs]),
                "epoch_s": _median([_median(col("epoch_s", r)) for r in rs]),
                "epoch_s_min": min(min(col("epoch_s", r)) for r in rs),
                "epoch_cpu_s": _median([_median(col("epoch_cpu_s", r)) for r in rs]),
                "peak_mib": max(peaks) if peaks else None,
            })
        out[key] = {
            "stages": per_stage,
            "fit_s": _median([r["fit_s"] for r in rs]),
            "fit_s_min": min(r["fit_s"] for r in rs),
            "fit_cpu_s": _median([r["fit_cpu_s"] for r in rs]),
            # lower envelope: the fastest epoch of each stage, times the stage's epochs
            "fit_s_from_fastest_epochs": sum(st["n_epochs"] * st["epoch_s_min"] for st in per_stage),
            "train_s": _median([sum(e["train_s"] for e in r["epochs"]) for r in rs]),
            "test_acc": _median([r["test_acc"] for r in rs]),
            "fit_s_all": [r["fit_s"] for r in rs],
            "test_acc_all": [r["test_acc"] for r in rs],
        }
    full, prog = out["full"], out["progressive"]
    out["speedup_fit"] = full["fit_s"] / prog["fit_s"]
    out["speedup_fit_min"] = full["fit_s_min"] / prog["fit_s_min"]
    out["speedup_fit_cpu"] = full["fit_cpu_s"] / prog["fit_cpu_s"]
    out["speedup_fastest_epochs"] = full["fit_s_from_fastest_epochs"] / prog["fit_s_from_fastest_epochs"]
    out["acc_delta_points"] = 100.0 * (prog["test_acc"] - full["test_acc"])
    out["acc_delta_points_per_seed"] = [
        100.0 * (p - f) for f, p in zip(full["test_acc_all"], prog["test_acc_all"], strict=True)
    ]
    out["acc_delta_points_mean_paired"] = statistics.fmean(out["acc_delta_points_per_seed"])
    return out


def print_table(summary: dict[str, Any]) -> None:
    print("\nper stage: epoch = training + full-size validation; median over seeds of each seed's median"
          " epoch; 'fastest' = least-disturbed epoch; CPU = process CPU seconds")
    print(f"{'run':<12}{'epochs':>8}{'side':>6}{'batch':>7}{'steps':>7}{'train s':>9}{'epoch s':>9}"
          f"{'fastest':>9}{'CPU s':>8}{'peak MiB':>10}")
    for key in ("full", "progressive"):
        for st in summary[key]["stages"]:
            peak = f"{st['peak_mib']:.0f}" if st["peak_mib"] else "-"
            print(f"{key:<12}{st['epochs']:>8}{st['side']:>6}{st['batch']:>7}{st['steps']:>7}"
                  f"{st['train_s']:>9.3f}{st['epoch_s']:>9.3f}{st['epoch_s_min']:>9.3f}"
                  f"{st['epoch_cpu_s']:>8.3f}{peak:>10}")
    print(f"\n{'run':<12}{'fit s':>8}{'min':>8}{'CPU s':>8}{'fastest':>9}{'test acc':>10}   per seed (fit s / acc)")
    for key in ("full", "progressive"):
        s = summary[key]
        per_seed = ", ".join(f"{f:.1f}/{a:.4f}" for f, a in zip(s["fit_s_all"], s["test_acc_all"], strict=True))
        print(f"{key:<12}{s['fit_s']:>8.1f}{s['fit_s_min']:>8.1f}{s['fit_cpu_s']:>8.1f}"
              f"{s['fit_s_from_fastest_epochs']:>9.1f}{s['test_acc']:>10.4f}   {per_seed}")
    print(f"\nspeed-up of the whole fit: {summary['speedup_fit']:.2f}x (median wall), "
          f"{summary['speedup_fit_min']:.2f}x (fastest wall), {summary['speedup_fit_cpu']:.2f}x (median CPU), "
          f"{summary['speedup_fastest_epochs']:.2f}x (fastest epoch per stage)")
    deltas = ", ".join(f"{d:+.2f}" for d in summary["acc_delta_points_per_seed"])
    print(f"test accuracy delta (median progressive - median full): {summary['acc_delta_points']:+.2f} "
          f"points; paired per seed: {deltas} (mean {summary['acc_delta_points_mean_paired']:+.2f})")


def _atomic_path(path: Path) -> tuple[str, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return tmp, path


def write_json(obj: Any, path: Path) -> None:
    tmp, path = _atomic_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def plot(summary: dict[str, Any], runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for prog, label, color in ((False, "full size", "tab:blue"), (True, "progressive", "tab:orange")):
        rs = [r for r in runs if r["progressive"] is prog]
        n = min(len(r["epochs"]) for r in rs)
        ys = [_median([r["epochs"][e]["train_s"] for r in rs]) for e in range(n)]
        fastest = [min(r["epochs"][e]["train_s"] for r in rs) for e in range(n)]
        ax1.plot(range(n), fastest, ":", color=color, linewidth=1, label=f"{label} (fastest seed)")
        ax1.plot(range(n), ys, "-o", color=color, markersize=3, label=f"{label} (median over seeds)")
        if prog:
            for e in range(n):
                row = rs[0]["epochs"][e]
                if e == 0 or row["side"] != rs[0]["epochs"][e - 1]["side"]:
                    ax1.annotate(f"{row['side']}px\nbatch {row['batch']}", (e, ys[e]), fontsize=8,
                                 textcoords="offset points", xytext=(0, 10), ha="left")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training seconds per epoch")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.legend()
    keys = ("full", "progressive")
    metrics = (("fit_s", "median wall"), ("fit_cpu_s", "median CPU"), ("fit_s_min", "fastest wall"))
    width = 0.38
    for j, (k, color) in enumerate(zip(keys, ("tab:blue", "tab:orange"), strict=True)):
        xs = [m + (j - 0.5) * width for m in range(len(metrics))]
        vals = [summary[k][name] for name, _ in metrics]
        ax2.bar(xs, vals, width, color=color, label=f"{k}: acc {100 * summary[k]['test_acc']:.1f}%")
        for x, v in zip(xs, vals, strict=True):
            ax2.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(metrics)), [label for _, label in metrics], fontsize=8)
    ax2.set_ylabel("whole fit, seconds")
    ax2.legend(fontsize=8)
    ax2.set_title(f"speed-up {summary['speedup_fit']:.2f}x wall / {summary['speedup_fit_cpu']:.2f}x CPU, "
                  f"acc {summary['acc_delta_points']:+.2f} pts (median), "
                  f"{summary['acc_delta_points_mean_paired']:+.2f} (mean paired)", fontsize=9)
    ax2.margins(y=0.25)
    fig.suptitle(title)
    fig.tight_layout()
    tmp, path = _atomic_path(path)
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def stage_picture(args: argparse.Namespace, path: Path) -> None:
    """One test digit at each stage's size, as the network sees it (nearest-neighbour display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dm = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size)
    dm.setup("fit")
    image = dm.test_set.gather([3])[0]  # (1, 1, H, W) as stored
    sides = [side for _, side in args.stage_list]
    fig, axes = plt.subplots(1, len(sides), figsize=(2.4 * len(sides), 2.9))
    for ax, (start, side) in zip(axes, args.stage_list, strict=True):
        seen = resize_batch(image, side)[0, 0]
        ax.imshow(seen.numpy(), cmap="gray", interpolation="nearest")
        batch = coupled_batch_size(args.batch_size, args.image_size, side, max_batch=args.max_batch)
        ax.set_title(f"from epoch {start}\n{side}x{side} px, batch {batch}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("What the network sees per stage (progressive resizing)", fontsize=10)
    fig.tight_layout()
    tmp, path = _atomic_path(path)
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--data", choices=["digits", "cifar-shaped"], default="digits")
    p.add_argument("--precision", default="32-true", help="Trainer precision, e.g. 32-true, bf16-mixed")
    p.add_argument("--model", choices=["simple_cnn", "resnet20"], default=None,
                   help="default: simple_cnn on digits, resnet20 on cifar-shaped")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: 20 (digits), 8 (cifar-shaped)")
    p.add_argument("--stages", default=None,
                   help="start_epoch:side,... default: 0:16,6:24,12:32 (digits), 0:16,3:24,6:32 (cifar-shaped)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="batch at full size (the base of the coupling)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="upper bound of the coupled per-device batch; default: 128 (digits), none (cifar-shaped)")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 (digits), 1e-3 (cifar-shaped)")
    p.add_argument("--lr-rule", choices=["linear", "sqrt", "none"], default="sqrt")
    p.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=True,
                   help="cosine LR over the epochs in both runs (default: on)")
    p.add_argument("--n-train", type=int, default=50_000, help="cifar-shaped: training images")
    p.add_argument("--n-test", type=int, default=10_000, help="cifar-shaped: test images")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_resizing"))
    p.add_argument("--picture", default=str(ROOT / "docs" / "progressive_resizing_stages.png"),
                   help="digits only; '' to skip")
    args = p.parse_args(argv)
    cifar = args.data == "cifar-shaped"
    args.model = args.model or ("resnet20" if cifar else "simple_cnn")
    args.epochs = args.epochs or (8 if cifar else 20)
    args.stages = args.stages or ("0:16,3:24,6:32" if cifar else "0:16,6:24,12:32")
    args.lr = args.lr or (1e-3 if cifar else 3e-3)
    if args.max_batch is None and not cifar:
        args.max_batch = 128
    args.stage_list = parse_stages(args.stages)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_float32_matmul_precision("high")

    print(f"bench_resizing: {args.data} {args.image_size}px, {args.model}, {args.epochs} epochs, stages "
          f"{args.stages}, batch {args.batch_size} at full size (coupled, max {args.max_batch}), "
          f"{args.optimizer} lr {args.lr} ({args.lr_rule} scaling, cosine {args.cosine}), device {args.device} {args.precision}, seeds {args.seeds}, "
          f"malloc tuning {'on' if MALLOC_TUNED else 'off'}, torch threads {torch.get_num_threads()}")
    runs = []
    t_start = time.perf_counter()
    for seed in args.seeds:
        for progressive in (False, True):
            r = run_one(args, seed, progressive)
            runs.append(r)
            print(f"  seed {seed} {'progressive' if progressive else 'full size  '}: fit {r['fit_s']:.1f}s, "
                  f"test acc {r['test_acc']:.4f}", flush=True)
    summary = summarize(runs, args.stage_list, args.epochs)
    print_table(summary)
    if cifar:
        print("(cifar-shaped data is random: accuracy is meaningless there, only time and memory count)")

    out = Path(args.out)
    config = {k: v for k, v in vars(args).items() if k != "stage_list"}
    env = {"torch": torch.__version__, "lightning": pl.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "malloc_tuned": MALLOC_TUNED,
           "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "total_bench_s": time.perf_counter() - t_start}
    write_json({"config": config, "env": env, "summary": summary, "runs": runs}, out / "bench_resizing.json")
    plot(summary, runs, out / "bench_resizing.png",
         f"{args.data} {args.image_size}px, {args.model}, stages {args.stages}, {args.device} {args.precision}")
    print(f"\nwrote {out / 'bench_resizing.json'} and {out / 'bench_resizing.png'}")
    if args.picture and not cifar:
        stage_picture(args, Path(args.picture))
        print(f"wrote {args.picture}")
    print(f"total benchmark time: {time.perf_counter() - t_start:.0f}s")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
