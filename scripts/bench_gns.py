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
it adds per step on average (the median would hide it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from bench_parts import StepTimer, make_data, make_model

from epochwise.callbacks import GradientNoiseScale


class FileStepTimer(StepTimer):
    """StepTimer whose rank-0 times are written to ``path`` at teardown (from a spawned process)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def teardown(self, trainer, pl_module, stage):
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps(self.times))


def gns_fit_times(args: argparse.Namespace, gns: GradientNoiseScale | None, accumulation: int = 1,
                  processes: int = 1) -> list[float]:
    """Step times of one fit; the per-device batch is ``args.batch / (accumulation x processes)``."""
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


def gns_arms(args: argparse.Namespace) -> dict[str, Callable[[], list[float]]]:
    arms: dict[str, Callable[[], list[float]]] = {
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
    per_repeat: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):  # interleaved: machine load hits every arm alike
        for name, run in arms.items():
            per_repeat[name].append(1e3 * statistics.fmean(run()))
            print(f"  repeat {repeat + 1}/{args.repeats} {name:<24} {per_repeat[name][-1]:8.3f} ms/step", flush=True)
    step_ms = {name: statistics.median(values) for name, values in per_repeat.items()}
    results = {f"gns_step_ms_{name}": ms for name, ms in step_ms.items()}
    for arm, base in BASELINE.items():
        if arm in step_ms:
            results[f"gns_overhead_{arm}"] = step_ms[arm] / step_ms[base] - 1.0
    return results


def gns_markdown(results: dict) -> str:
    lines = [f"GradientNoiseScale: {results['model']} batch {results['batch']} {results['precision']} on "
             f"{results['device']} (mean step time of a fit, median of {results['repeats']} interleaved repeats; "
             f"1-min load average at the end: {results['loadavg_1min_at_end']:.1f})", "",
             "| arm | ms / step | overhead vs its baseline |", "|---|---|---|"]
    for key, ms in results.items():
        if key.startswith("gns_step_ms_"):
            arm = key[len("gns_step_ms_"):]
            overhead = results.get(f"gns_overhead_{arm}")
            lines.append(f"| {arm} | {ms:.2f} | {'' if overhead is None else f'{100 * overhead:+.1f}%'} |")
    return "\n".join(lines) + "\n"
