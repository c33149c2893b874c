"""Training throughput with and without ``tune_malloc`` (glibc mmap/trim thresholds).

Each measurement runs in a fresh process (the malloc settings are per process): SimpleCNN on the
digits at 28 px, batch 64, timed over the steps after a warm-up epoch. Arms are interleaved so
machine load hits both alike; the table reports medians.

Usage: ``python scripts/bench_malloc.py [--repeats 3] [--epochs 3] [--out runs/bench_malloc]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(epochs: int, batch_size: int) -> None:
    """Run in a subprocess: one timed fit, prints a JSON line with samples/s."""
    from epochwise.modules.runtime import tune_malloc

    tuned = tune_malloc() if not os.environ.get("EPOCHWISE_NO_MALLOC_TUNING") else False
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from epochwise.datamodules import DigitsDataModule
    from epochwise.modules import ImageClassifier

    class Timer(Callback):
        def __init__(self) -> None:
            self.samples, self.start = 0, None

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.start is not None:
                self.samples += batch[0].shape[0]

    pl.seed_everything(0, verbose=False)
    timer = Timer()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         callbacks=[timer])
    trainer.fit(ImageClassifier(), datamodule=DigitsDataModule(batch_size=batch_size))
    rate = timer.samples / (time.perf_counter() - timer.start)
    print(json.dumps({"tuned": tuned, "samples_per_s": rate}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="runs/bench_malloc")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.epochs, args.batch_size)
        return
    rates: dict[str, list[float]] = {"default_malloc": [], "tuned": []}
    for _ in range(args.repeats):
        for arm in ("default_malloc", "tuned"):
            env = dict(os.environ)
            env.pop("EPOCHWISE_NO_MALLOC_TUNING", None)
            if arm == "default_malloc":
                env["EPOCHWISE_NO_MALLOC_TUNING"] = "1"
            out = subprocess.run([sys.executable, __file__, "--child", "--epochs", str(args.epochs),
                                  "--batch-size", str(args.batch_size)],
                                 env=env, capture_output=True, text=True, check=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
            rates[arm].append(json.loads(line)["samples_per_s"])
            print(f"{arm:15s} {rates[arm][-1]:8.0f} samples/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    speedup = med["tuned"] / med["default_malloc"]
    print(f"\nmedian samples/s: default malloc {med['default_malloc']:.0f}, tuned {med['tuned']:.0f}"
          f"  -> speed-up x{speedup:.2f}")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps({"rates": rates, "median": med, "speedup": speedup}, indent=2))
    os.replace(tmp, folder / "results.json")


if __name__ == "__main__":
    main()
