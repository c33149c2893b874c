"""Benchmark the batch-size engine.

1. Cost of one batch-size change: time to the first batch of the new size through the
   ResizableBatchSampler (at an epoch boundary, and mid-epoch) vs. rebuilding the DataLoader,
   both with 2 persistent workers.
2. Per-step overhead of the epochwise callbacks: the same fit with and without
   ``BatchSizeSchedule`` + ``LRScaling`` + ``LRWarmup`` (same batch size, so same work).

Usage: ``python scripts/bench_engine.py [--repeats 15] [--out runs/bench_engine]``.
Prints a table and writes ``results.json`` in ``--out``. Timings are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from epochwise.modules.runtime import tune_malloc

tune_malloc()

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from epochwise.callbacks import BatchSizeSchedule, LRScaling, LRWarmup  # noqa: E402
from epochwise.datamodules import DigitsDataModule  # noqa: E402
from epochwise.datamodules.sampler import ResizableBatchSampler  # noqa: E402
from epochwise.modules import MLP, ImageClassifier  # noqa: E402


class PerSampleDigits(Dataset):
    """Digits images served one sample at a time (the common user DataLoader shape)."""

    def __init__(self) -> None:
        dm = DigitsDataModule(image_size=28)
        dm.setup("fit")
        self.x, self.y = dm.train_set.images, dm.train_set.targets

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _first_batch_of_size(iterator, size: int) -> int:
    skipped = 0
    while True:
        x, _ = next(iterator)
        if x.shape[0] == size:
            return skipped
        skipped += 1


def bench_change_cost(repeats: int) -> dict[str, float]:
    ds = PerSampleDigits()
    sizes = [32, 64]
    out: dict[str, list[float]] = {"sampler_epoch_boundary_ms": [], "sampler_mid_epoch_ms": [],
                                   "rebuild_ms": [], "rebuild_shutdown_ms": [], "mid_epoch_lag_batches": []}

    loader = DataLoader(ds, batch_size=sizes[0], shuffle=True, num_workers=2, persistent_workers=True)
    sampler = ResizableBatchSampler.adopt(loader.batch_sampler, seed=0)
    for _ in loader:  # warm the workers up
        pass
    pids_before = None
    for r in range(repeats):
        new = sizes[(r + 1) % 2]
        for _ in loader:  # finish an epoch at the old size
            pass
        t0 = time.perf_counter()
        sampler.batch_size = new
        it = iter(loader)
        _first_batch_of_size(it, new)
        out["sampler_epoch_boundary_ms"].append((time.perf_counter() - t0) * 1e3)
        for _ in it:
            pass
        # mid-epoch: change after the first batch of an epoch
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        sampler.batch_size = sizes[r % 2]
        out["mid_epoch_lag_batches"].append(_first_batch_of_size(it, sizes[r % 2]))
        out["sampler_mid_epoch_ms"].append((time.perf_counter() - t0) * 1e3)
        for _ in it:
            pass
        pids = tuple(sorted(w.pid for w in loader._iterator._workers))  # noqa: SLF001 - benchmark only
        pids_before = pids_before or pids
        assert pids == pids_before, "worker processes were restarted"
    del loader

    for _ in range(repeats):
        old = DataLoader(ds, batch_size=sizes[0], shuffle=True, num_workers=2, persistent_workers=True)
        for _ in old:
            pass
        t0 = time.perf_counter()
        new_loader = DataLoader(ds, batch_size=sizes[1], shuffle=True, num_workers=2, persistent_workers=True)
        it = iter(new_loader)
        next(it)
        out["rebuild_ms"].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        old._iterator._shutdown_workers()  # noqa: SLF001 - what dropping the old loader costs
        out["rebuild_shutdown_ms"].append((time.perf_counter() - t0) * 1e3)
        new_loader._iterator._shutdown_workers()  # noqa: SLF001
    return {k: statistics.median(v) for k, v in out.items()}


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._t is not None and trainer.current_epoch > 0:  # skip the first (warm-up) epoch
            self.times.append(now - self._t)
        self._t = now

    def on_train_epoch_end(self, trainer, pl_module):
        self._t = None


def _fit_step_ms(with_callbacks: bool, epochs: int, seed: int) -> float:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=32, image_size=8)
    model = ImageClassifier(backbone=MLP(input_size=8, hidden=(64,)), lr=1e-2)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if with_callbacks:
        callbacks += [BatchSizeSchedule({0: 32}), LRScaling("linear"), LRWarmup(2, unit="epoch")]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=pl.loggers.TensorBoardLogger(tmp),
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, datamodule=dm)
    return statistics.median(timer.times) * 1e3


def bench_overhead(repeats: int, epochs: int) -> dict[str, float]:
    base, with_cb = [], []
    for r in range(repeats):  # interleaved, so machine load hits both alike
        base.append(_fit_step_ms(False, epochs, r))
        with_cb.append(_fit_step_ms(True, epochs, r))
    b, w = statistics.median(base), statistics.median(with_cb)
    return {"step_ms_without": b, "step_ms_with": w, "overhead_ms_per_step": w - b,
            "overhead_pct": 100 * (w - b) / b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="repeats of each change measurement")
    parser.add_argument("--fit-repeats", type=int, default=3, help="fits per arm for the overhead")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per overhead fit")
    parser.add_argument("--out", default="runs/bench_engine", help="output folder")
    args = parser.parse_args()

    change = bench_change_cost(args.repeats)
    overhead = bench_overhead(args.fit_repeats, args.epochs)
    print("\nBatch-size change with 2 persistent workers (median, time to first batch of the new size)")
    print(f"  sampler, at epoch boundary : {change['sampler_epoch_boundary_ms']:8.2f} ms")
    print(f"  sampler, mid-epoch         : {change['sampler_mid_epoch_ms']:8.2f} ms "
          f"(after {change['mid_epoch_lag_batches']:.0f} prefetched batches of the old size)")
    print(f"  rebuild DataLoader         : {change['rebuild_ms']:8.2f} ms "
          f"(+ {change['rebuild_shutdown_ms']:.2f} ms to shut the old workers down)")
    print("\nPer-step overhead of BatchSizeSchedule + LRScaling + LRWarmup (MLP on digits, batch 32)")
    print(f"  without: {overhead['step_ms_without']:.3f} ms/step   with: {overhead['step_ms_with']:.3f} ms/step"
          f"   overhead: {overhead['overhead_ms_per_step']:.3f} ms ({overhead['overhead_pct']:.1f}%)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"change": change, "overhead": overhead, "torch": torch.__version__,
                               "lightning": pl.__version__, "cpus": os.cpu_count()}, indent=2))
    os.replace(tmp, out / "results.json")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
