"""The per-step cost of ``GradientNoiseScale`` for each of its sources (``python scripts/bench.py --gns``).

Each source is timed against the same fit without the callback (same model, data, batch,
accumulation and strategy), arms interleaved over repeats, the median of per-repeat medians:

- ``split``: one device, no accumulation; measured every 4th step (the default) and every step
  (the cost of one measured step: an extra backward pass);
- ``accumulation``: one device, ``accumulate_grad_batches=2`` (batch / 2 per micro-batch), every step;
- ``ddp``: 2 processes on CPU (gloo, ``ddp_spawn``; batch / 2 per rank), every step; rank 0's times.

A step's time is as in ``scripts/bench.py`` (``StepTimer``: one ``on_train_batch_start`` to the next,
from the second epoch on; with accumulation that is a micro-batch), but each fit reports the *mean*
step time: a source that measures every 4th step costs on those steps only, and the mean is what
it adds per step on average (the median would hide it). The process's CPU time per step is
reported too: on a machine shared with other work it moves much less than wall time (for the
DDP arms it is rank 0's process only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from bench_parts import StepTimer, make_data, make_model

from epochwise.callbacks import GradientNoiseScale


class FileStepTimer(StepTimer):
    """StepTimer that also takes this process's CPU time per step (less sensitive than wall time to
    other processes on a shared machine), and writes rank 0's times to ``path`` at teardown."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.cpu_times: list[float] = []
        self._cpu: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.process_time()
        if self._cpu is not None and trainer.current_epoch > 0:
            self.cpu_times.append(now - self._cpu)
        self._cpu = now
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):
        self._cpu = None
        super().on_train_epoch_end(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage):
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps({"wall": self.times, "cpu": self.cpu_times}))


def gns_fit_times(args: argparse.Namespace, gns: GradientNoiseScale | None, accumulation: int = 1,
                  processes: int = 1) -> dict[str, list[float]]:
    """Wall and CPU times per step of one fit; the per-device batch is ``args.batch / (accumulation x processes)``."""
    pl.seed_everything(0, verbose=False)
    per_device = max(1, args.batch // (accumulation * processes))
    data = make_data(args.model, per_device, args.device, args.quick)
    model = make_model(args.model, data)
    with tempfile.TemporaryDirectory() as tmp:
        timer = FileStepTimer(str(Path(tmp) / "times.json"))
        extra = {"strategy": "ddp_spawn", "devices": processes} if processes > 1 else {"devices": 1}
        trainer = pl.Trainer(
            max_epochs=args.epochs, accelerator="gpu" if args.device == "cuda" else "cpu", precision=args.precision,
            logger=pl.loggers.TensorBoardLogger(tmp), enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, limit_val_batches=2, num_sanity_val_steps=0,
            accumulate_grad_batches=accumulation, callbacks=[timer, *([gns] if gns is not None else [])], **extra,
        )
        trainer.fit(model, datamodule=data)
        return json.loads(Path(timer.path).read_text())


def gns_arms(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, list[float]]]]:
    arms: dict[str, Callable[[], dict[str, list[float]]]] = {
        "plain": lambda: gns_fit_times(args, None),
        "split(every 4)": lambda: gns_fit_times(args, GradientNoiseScale()),
        "split(every 1)": lambda: gns_fit_times(args, GradientNoiseScale(every_n_steps=1)),
        "plain, accumulate 2": lambda: gns_fit_times(args, None, accumulation=2),
        "accumulation(every 1)": lambda: gns_fit_times(args, GradientNoiseScale(every_n_steps=1), accumulation=2),
    }
    if args.device == "cpu" and not args.no_ddp:
        arms["plain, ddp 2"] = lambda: gns_fit_times(args, None, processes=2)
        arms["ddp(every 1)"] = lambda: gns_fit_times(args, GradientNoiseScale(every_n_steps=1), processes=2)
    return arms


BASELINE = {"split(every 4)": "plain", "split(every 1)": "plain", "accumulation(every 1)": "plain, accumulate 2",
            "ddp(every 1)": "plain, ddp 2"}


def run_gns(args: argparse.Namespace) -> dict[str, float]:
    """Mean ms per step of every arm (median over repeats), and each source's overhead over its baseline."""
    arms = gns_arms(args)
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):  # interleaved: machine load hits every arm alike
        for name, run in arms.items():
            times = run()
            wall[name].append(1e3 * statistics.fmean(times["wall"]))
            cpu[name].append(1e3 * statistics.fmean(times["cpu"]))
            print(f"  repeat {repeat + 1}/{args.repeats} {name:<24} {wall[name][-1]:8.3f} ms/step wall, "
                  f"{cpu[name][-1]:8.3f} ms/step CPU (load {os.getloadavg()[0]:.1f})", flush=True)
    results: dict[str, float] = {}
    for kind, values in (("step_ms", wall), ("cpu_ms", cpu)):
        ms = {name: statistics.median(v) for name, v in values.items()}
        results.update({f"gns_{kind}_{name}": v for name, v in ms.items()})
        for arm, base in BASELINE.items():
            if arm in ms:
                results[f"gns_{kind}_overhead_{arm}"] = ms[arm] / ms[base] - 1.0
    return results


def gns_markdown(results: dict) -> str:
    lines = [f"GradientNoiseScale: {results['model']} batch {results['batch']} {results['precision']} on "
             f"{results['device']} (mean step time of a fit, median of {results['repeats']} interleaved repeats; "
             f"1-min load average at the end: {results['loadavg_1min_at_end']:.1f})", "",
             "| arm | wall ms / step | overhead (wall) | CPU ms / step | overhead (CPU) |", "|---|---|---|---|---|"]

    def pct(key: str) -> str:
        return "" if key not in results else f"{100 * results[key]:+.1f}%"

    for key, ms in results.items():
        if key.startswith("gns_step_ms_") and "overhead" not in key:
            arm = key[len("gns_step_ms_"):]
            lines.append(f"| {arm} | {ms:.2f} | {pct(f'gns_step_ms_overhead_{arm}')} | "
                         f"{results[f'gns_cpu_ms_{arm}']:.2f} | {pct(f'gns_cpu_ms_overhead_{arm}')} |")
    return "\n".join(lines) + "\n"
