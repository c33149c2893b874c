"""The gradient noise scale on digits: B_simple along a training run, and the 1/sqrt(B) law.

1. **B_simple along a run**: SimpleCNN on the embedded digits (Adam 1e-3, constant LR, batch 64),
   with ``GradientNoiseScale`` (the in-step split, every step); B_simple (smoothed and raw) and the
   training loss after every optimizer step, in ``noise_scale.csv``, plotted against each other.
2. **The standard error of the mini-batch gradient** at B = 8, 32, 128, 512: mini-batches drawn
   i.i.d. from the training split, ``sqrt(mean |G_B - G|^2)`` over the same number of samples per
   size (``--repeats`` draws of 512), at the run's initial weights, after epoch ``--se-epoch`` and at
   the end, in log-log with the fitted slope (the tutorial's claim: -0.5) and the prediction
   ``sqrt(tr(Sigma) / B)`` from every per-sample gradient. Late in training a few samples carry
   most of the gradient (heavy tails): the measured small-batch points then fall below the
   prediction unless many more draws are made.

Writes ``noise_scale.png``, ``noise_scale.csv``, ``standard_error.png``, ``standard_error.csv`` and
``summary.md`` into ``--out``.

Usage::

    python scripts/noise_scale.py --quick          # a couple of minutes on 2 CPU cores
    python scripts/noise_scale.py --epochs 20 --repeats 24
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import lightning.pytorch as pl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from noise_parts import (  # noqa: E402
    NoiseRecorder,
    classifier,
    digits,
    ema,
    load_average,
    quiet_trainer,
    write_csv,
)

from epochwise.callbacks import GradientNoiseScale, loglog_slope, minibatch_gradient_standard_error  # noqa: E402

SIZES = (8, 32, 128, 512)


class Snapshot(Callback):
    """A copy of the module's weights at the end of epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.module = epoch, None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.module = copy.deepcopy(pl_module)


def train_recording(args: argparse.Namespace) -> tuple[list[dict], dict[str, torch.nn.Module], object]:
    pl.seed_everything(args.seed, verbose=False)
    dm = digits(args.batch, args.image_size, seed=args.seed)
    model = classifier(args.lr)
    initial = copy.deepcopy(model)
    recorder, snapshot = NoiseRecorder(), Snapshot(args.se_epoch)
    gns = GradientNoiseScale(every_n_steps=args.every, ema_decay=args.ema)
    quiet_trainer(max_epochs=args.epochs, callbacks=[gns, recorder, snapshot]).fit(model, datamodule=dm)
    models = {"initial weights": initial, f"after epoch {args.se_epoch}": snapshot.module,
              f"after epoch {args.epochs - 1} (end)": model}
    return recorder.rows, {k: v for k, v in models.items() if v is not None}, dm


def flat_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def exact_trace(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> float:
    """tr(Sigma) from every per-sample gradient (population covariance), ``torch.func`` per-sample grads."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))
    total, total_sq, n = None, 0.0, len(y)
    for i in range(0, n, chunk):
        g = per_sample(params, x[i:i + chunk], y[i:i + chunk])
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], dim=1).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        total_sq += float(flat.pow(2).sum())
    mean = total / n
    return total_sq / n - float(mean @ mean)


def standard_errors(model: torch.nn.Module, dm, repeats: int, seed: int) -> tuple[dict[int, float], float]:
    """Every size gets the same number of samples: ``repeats`` draws of the largest, more of the smaller."""
    model = copy.deepcopy(model).eval()  # eval: no dropout; SimpleCNN has no batch statistics
    x, y = dm.train_set.gather(range(len(dm.train_set)))  # the training transform: normalised floats
    counts = {b: repeats * max(SIZES) // b for b in SIZES}
    se = minibatch_gradient_standard_error(lambda i: flat_gradient(model, x[i], y[i]), len(y), SIZES, counts,
                                           torch.Generator().manual_seed(seed))
    return se, exact_trace(model, x, y)


def plot_run(rows: list[dict], out: Path) -> None:
    steps = [r["step"] for r in rows]
    loss = ema([r["train_loss"] for r in rows], 0.9)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(steps, [r["b_simple"] for r in rows], color="tab:blue", lw=2, label="B_simple (smoothed; one step's: CSV)")
    a.set_yscale("log")
    a.set_xlabel("optimizer step")
    a.set_ylabel("B_simple (samples)")
    twin = a.twinx()
    twin.plot(steps, loss, color="tab:red", lw=1.5, label="training loss (EMA)")
    twin.set_yscale("log")
    twin.set_ylabel("training loss")
    a.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    a.set_title("SimpleCNN on digits: noise scale along the run")
    keep = [(lo, r["b_simple"]) for lo, r in zip(loss, rows) if r["b_simple"] > 0 and math.isfinite(r["b_simple"])]
    b.scatter([k[0] for k in keep], [k[1] for k in keep], c=range(len(keep)), cmap="viridis", s=8)
    b.set_xscale("log")
    b.set_yscale("log")
    b.invert_xaxis()
    b.set_xlabel("training loss (EMA), falling to the right")
    b.set_ylabel("B_simple (smoothed)")
    b.set_title("B_simple against the training loss (colour: step)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def plot_standard_error(curves: dict[str, tuple[dict[int, float], float]], out: Path) -> list[dict]:
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    rows = []
    for (name, (se, trace)), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:red")):
        slope, stderr = loglog_slope(SIZES, [se[b] for b in SIZES])
        ax.loglog(SIZES, [se[b] for b in SIZES], "o", color=color, label=f"{name}: measured, slope {slope:.3f} ± {stderr:.3f}")
        ax.loglog(SIZES, [math.sqrt(trace / b) for b in SIZES], "--", color=color, lw=1,
                  label=f"{name}: sqrt(tr(Σ)/B), tr(Σ) = {trace:.3g}")
        rows += [{"weights": name, "batch_size": b, "standard_error": se[b], "predicted": math.sqrt(trace / b),
                  "slope": slope, "slope_stderr": stderr} for b in SIZES]
    ax.set_xticks(SIZES, [str(b) for b in SIZES])
    ax.set_xlabel("batch size B")
    ax.set_ylabel("standard error of the mini-batch gradient")
    ax.set_title("Digits, SimpleCNN: |G_B - G| falls as B^-1/2")
    ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--every", type=int, default=1, help="GradientNoiseScale every_n_steps")
    parser.add_argument("--ema", type=float, default=0.95, help="GradientNoiseScale ema_decay")
    parser.add_argument("--repeats", type=int, default=16,
                        help="draws of the largest batch for the standard error (smaller sizes: as many samples)")
    parser.add_argument("--se-epoch", type=int, default=2, help="also measure the standard error after this epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="6 epochs at 16 px, 12 repeats, noise scale every 2nd step")
    parser.add_argument("--out", default="runs/noise_scale")
    parser.add_argument("--replot", action="store_true", help="only redraw noise_scale.png from noise_scale.csv")
    args = parser.parse_args()
    if args.replot:
        import csv

        with open(Path(args.out) / "noise_scale.csv") as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        plot_run(rows, Path(args.out) / "noise_scale.png")
        return
    if args.quick:
        args.epochs, args.repeats, args.image_size, args.every = min(args.epochs, 6), min(args.repeats, 6), 16, 2
        args.se_epoch = min(args.se_epoch, args.epochs - 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), load_average()

    rows, models, dm = train_recording(args)
    write_csv(out / "noise_scale.csv", rows)
    plot_run(rows, out / "noise_scale.png")
    print(f"training run: {time.perf_counter() - started:.0f} s", flush=True)
    curves = {name: standard_errors(model, dm, args.repeats, args.seed + i) for i, (name, model) in enumerate(models.items())}
    print(f"standard errors: {time.perf_counter() - started:.0f} s", flush=True)
    se_rows = plot_standard_error(curves, out / "standard_error.png")
    write_csv(out / "standard_error.csv", se_rows)

    marks = [0, len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4, len(rows) - 1]
    loss = ema([r["train_loss"] for r in rows], 0.9)
    lines = [f"# Gradient noise scale on digits ({args.image_size} px, batch {args.batch}, Adam {args.lr}, "
             f"{args.epochs} epochs, seed {args.seed})", "",
             "| step | epoch | training loss (EMA) | B_simple (smoothed) | |G|^2 | tr(Sigma) |", "|---|---|---|---|---|---|"]
    for i in marks:
        r = rows[i]
        lines.append(f"| {r['step']} | {r['epoch']} | {loss[i]:.4f} | {r['b_simple']:.1f} | {r['grad_sq_norm']:.4g} | "
                     f"{r['trace_cov']:.4g} |")
    lines += ["", "| weights | B | standard error | sqrt(tr(Sigma)/B) | slope (log-log) |", "|---|---|---|---|---|"]
    for r in se_rows:
        lines.append(f"| {r['weights']} | {r['batch_size']} | {r['standard_error']:.4g} | {r['predicted']:.4g} | "
                     f"{r['slope']:.3f} ± {r['slope_stderr']:.3f} |")
    lines += ["", f"{time.perf_counter() - started:.0f} s; 1-min load average {load_start:.1f} at the start, "
              f"{load_average():.1f} at the end"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}/noise_scale.png, noise_scale.csv, standard_error.png, standard_error.csv, summary.md")


if __name__ == "__main__":
    main()
