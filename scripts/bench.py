"""epochwise's speed, measured: what Lightning and every epochwise callback cost per training step.

Arms, on the same model and data, interleaved over repeats (median of the per-repeat medians):

- ``raw``: a plain PyTorch loop over the same DataLoader (same per-batch transform and precision);
- ``lightning``: ``Trainer.fit`` with no callback of ours (TensorBoard logger at Lightning's cadence);
- ``lightning+<Callback>``: each epochwise callback alone, set up so it changes no work (a batch
  schedule that keeps the batch, a budget that never runs out, ...);
- ``lightning+all``: all of them together;
- ``lightning (control)``: the plain fit again, so ``overhead_control_vs_lightning`` shows how far
  two identical arms differ on this machine (the noise floor of every ratio); a run where they
  differ by more than 3% says so and is flagged ``noise_floor_exceeds_3_percent`` (on a shared
  virtual machine the neighbours' load can move whole fits by 10%).

Every repeat runs the arms in its own shuffled order (seeded), so no arm always runs first or last.

A step's time is the wall time from one ``on_train_batch_start`` to the next within an epoch
(data loading, forward, backward, optimizer and every hook; validation and epoch ends excluded),
from the second epoch on. Also measured:

- ``host_us_per_step_all_callbacks``: what all callbacks add per step on a model so small that
  host time dominates (an MLP on 8 px digits, batch 32), in microseconds; split into
  ``host_us_per_step_lightning_dispatch`` (as many empty ``Callback()`` objects: Lightning calling
  every hook of every callback) and ``host_us_per_step_epochwise_code`` (the rest);
- ``batch_change_speedup``: time to the first batch of a new size, rebuilding a DataLoader with 2
  workers vs the engine's in-place change at an epoch boundary;
- ``mfu``: SimpleCNN at batch 256 in the raw loop, achieved FLOP/s over the machine's measured
  float32 matmul peak (CPU; bf16 on a GPU);
- ``tta_wall_ratio`` / ``tta_steps_ratio``: the batch-size warmup + sqrt LR scaling recipe
  (``scripts/tta.py``'s ``warmup``, as in scripts/configs/warmup.yaml) over the fixed batch 64
  (scripts/configs/default.yaml), median wall time / optimizer steps to 97% digits validation
  accuracy over seeds 0 1 2, run interleaved on one torch thread (CPU only; ``tta_cpu_ratio`` is the
  process CPU time, ``tta_load_before`` the load average).

Writes ``results.json`` (one flat object) and ``results.md`` into ``--out`` and prints the table.

``--gns`` measures instead what ``GradientNoiseScale`` costs per step for each of its sources
(split, accumulation, DDP), each against the same fit without it (``scripts/bench_gns.py``);
it writes ``results_gns.json`` and ``results_gns.md``.

Usage::

    python scripts/bench.py --quick                      # under 2 minutes on 2 CPU cores
    python scripts/bench.py --gns --quick                # GradientNoiseScale per source
    python scripts/bench.py --device cuda --model resnet20 --precision bf16-mixed --batch 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from epochwise.modules.runtime import tune_malloc  # noqa: E402

tune_malloc()

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from bench_parts import (  # noqa: E402
    SIDE,
    ZERO_COST_CALLBACKS,
    StepTimer,
    batch_change_times,
    make_data,
    make_model,
    matmul_peak_flops,
    raw_step_times,
    training_flops_per_sample,
)
from lightning.pytorch.callbacks import Callback  # noqa: E402
from tta import RECIPES, tta_comparison  # noqa: E402

#: Two identical arms (``lightning`` and ``lightning (control)``) further apart than this: the run
#: is flagged (``noise_floor_exceeds_3_percent``) as unable to resolve the 3% overhead target.
NOISE_LIMIT = 0.03


def lightning_step_times(args: argparse.Namespace, extra: list[Callback], epochs: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    data = make_data(args.model, args.batch, args.device, args.quick)
    model = make_model(args.model, data)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
            precision=args.precision, logger=pl.loggers.TensorBoardLogger(tmp), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=2, num_sanity_val_steps=0,
            callbacks=[timer, *extra],
        )
        trainer.fit(model, datamodule=data)
    return timer.times


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def all_callbacks(batch: int, side: int) -> list[Callback]:
    return [make(batch, side) for make in ZERO_COST_CALLBACKS.values()]


def run_arms(args: argparse.Namespace) -> dict[str, float]:
    side = SIDE[args.model]
    arms: dict[str, Callable[[], list[float]]] = {
        "raw": lambda: raw_step_times(args.model, args.batch, args.device, args.precision, args.epochs, args.quick),
        "lightning": lambda: lightning_step_times(args, [], args.epochs),
    }
    for name, make in ZERO_COST_CALLBACKS.items():
        arms[f"lightning+{name}"] = (lambda make=make: lightning_step_times(args, [make(args.batch, side)], args.epochs))
    arms["lightning+all"] = lambda: lightning_step_times(args, all_callbacks(args.batch, side), args.epochs)
    # the plain fit again, as an arm of its own: how far two identical arms differ is the noise floor
    arms["lightning (control)"] = lambda: lightning_step_times(args, [], args.epochs)
    per_repeat: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):  # interleaved: machine load hits every arm alike
        order = list(arms)
        random.Random(repeat).shuffle(order)  # no arm always runs first or last in a repeat
        for name in order:
            run = arms[name]
            per_repeat[name].append(median_ms(run()))
            print(f"  repeat {repeat + 1}/{args.repeats} {name:<40} {per_repeat[name][-1]:8.3f} ms/step", flush=True)
    return {name: statistics.median(values) for name, values in per_repeat.items()}


def host_overhead_us(args: argparse.Namespace) -> dict[str, float]:
    """Host time per step on the tiny MLP: all callbacks, and as many empty ``Callback()`` objects
    (what Lightning's hook dispatch alone costs for that many callbacks), over plain Lightning."""
    tiny = argparse.Namespace(**{**vars(args), "model": "tiny_mlp", "batch": 32, "precision": "32-true"})
    count = len(all_callbacks(32, SIDE["tiny_mlp"]))
    plain, empty, full = [], [], []
    arms = {
        "plain": (plain, lambda: []),
        "empty": (empty, lambda: [Callback() for _ in range(count)]),
        "full": (full, lambda: all_callbacks(32, SIDE["tiny_mlp"])),
    }
    for repeat in range(args.repeats):  # interleaved, in a shuffled order
        order = list(arms)
        random.Random(repeat).shuffle(order)
        for name in order:
            times, make = arms[name]
            times.append(median_ms(lightning_step_times(tiny, make(), tiny.epochs)))
    base = statistics.median(plain)
    return {
        "host_us_per_step_all_callbacks": 1e3 * (statistics.median(full) - base),
        "host_us_per_step_lightning_dispatch": 1e3 * (statistics.median(empty) - base),
        "host_us_per_step_epochwise_code": 1e3 * (statistics.median(full) - statistics.median(empty)),
    }


def time_to_accuracy(seeds: tuple[int, ...] = (0, 1, 2), threads: int = 1) -> dict[str, float]:
    """The warmup recipe vs the fixed batch 64, to 97% digits validation accuracy (see tta.py).

    On ``threads`` torch threads (restored after): these small fits gain little from a second
    thread, and on busy cores two threads made every fit ~10x slower and penalised the small
    batches most (a 16-sample step waits at as many thread barriers as a 64-sample one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    try:
        result = tta_comparison(RECIPES["warmup"], RECIPES["fixed64"], list(seeds))
    finally:
        torch.set_num_threads(before)
    keys = {k: v for k, v in result.items() if k.startswith("tta_")}
    return {**keys, "tta_threads": threads, "tta_load_before": load, "tta_load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("simple_cnn", "resnet20"), default="simple_cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed", "16-mixed"))
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of every arm (median)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (the first is warm-up)")
    parser.add_argument("--quick", action="store_true", help="2 epochs per fit and a smaller data set")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: one per CPU core)")
    parser.add_argument("--gns", action="store_true", help="GradientNoiseScale's cost per source only")
    parser.add_argument("--no-ddp", action="store_true", help="with --gns: skip the 2-process DDP arms")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 2
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    started, load_at_start, threads = time.perf_counter(), list(os.getloadavg()), torch.get_num_threads()
    if args.gns:
        if args.quick:  # every GNS arm is a full fit: 3 repeats keep --gns --quick to minutes
            args.repeats = min(args.repeats, 3)
        gns_main(args, started)
        return

    print(f"step times: {args.model} batch {args.batch} {args.precision} on {args.device}")
    step_ms = run_arms(args)
    results: dict[str, float | str | int] = {f"step_ms_{k}": v for k, v in step_ms.items()}
    light, raw, full = step_ms["lightning"], step_ms["raw"], step_ms["lightning+all"]
    results.update({
        "overhead_lightning_vs_raw": light / raw,
        "overhead_all_callbacks_vs_raw": full / raw,
        "overhead_all_callbacks_vs_lightning": full / light,
    })
    for name in ZERO_COST_CALLBACKS:
        results[f"overhead_{name}_vs_lightning"] = step_ms[f"lightning+{name}"] / light
    results["overhead_control_vs_lightning"] = step_ms["lightning (control)"] / light  # the noise floor
    noise = abs(results["overhead_control_vs_lightning"] - 1.0)
    results["noise_floor_exceeds_3_percent"] = float(noise > NOISE_LIMIT)
    if noise > NOISE_LIMIT:
        print(f"WARNING: two identical arms differ by {noise:.1%} (more than {NOISE_LIMIT:.0%}): this run cannot "
              "resolve a few percent of overhead; run it again on a quieter machine", flush=True)
    print("host time of all callbacks on a tiny model")
    results.update(host_overhead_us(args))
    print("batch-size change: rebuild vs in place")
    rebuild_ms, in_place_ms = batch_change_times(repeats=5 if args.quick else 15)
    results.update({"batch_change_rebuild_ms": rebuild_ms, "batch_change_in_place_ms": in_place_ms,
                    "batch_change_speedup": rebuild_ms / in_place_ms})
    if args.device == "cpu":
        print("MFU: SimpleCNN at batch 256, raw loop, float32")
        peak = matmul_peak_flops("cpu", torch.float32)
        cnn_ms = median_ms(raw_step_times("simple_cnn", 256, "cpu", "32-true", 2, args.quick))
        flops = training_flops_per_sample("simple_cnn") * 256
        results.update({"matmul_peak_gflops": peak / 1e9, "step_ms_simple_cnn_b256_raw": cnn_ms,
                        "mfu": flops / (cnn_ms / 1e3) / peak})
        print("time to 97% digits validation accuracy: warmup + sqrt recipe vs fixed batch 64, 3 seeds")
        results.update(time_to_accuracy())
    results.update({
        "device": args.device, "model": args.model, "batch": args.batch, "precision": args.precision,
        "repeats": args.repeats, "cpus": os.cpu_count() or 0, "machine": platform.machine(), "threads": threads,
        "load_average": load_at_start, "torch": torch.__version__, "lightning": pl.__version__,
        "seconds": time.perf_counter() - started,
    })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    table = markdown(results, list(step_ms))
    (out / "results.md").write_text(table)
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} in {results['seconds']:.0f} s")


def gns_main(args: argparse.Namespace, started: float) -> None:
    from bench_gns import gns_markdown, run_gns

    print(f"GradientNoiseScale step times: {args.model} batch {args.batch} {args.precision} on {args.device}")
    results: dict[str, float | str | int] = dict(run_gns(args))
    results.update({
        "device": args.device, "model": args.model, "batch": args.batch, "precision": args.precision,
        "repeats": args.repeats, "cpus": os.cpu_count() or 0, "threads": torch.get_num_threads(),
        "loadavg_1min_at_end": os.getloadavg()[0],
        "torch": torch.__version__, "lightning": pl.__version__, "seconds": time.perf_counter() - started,
    })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_gns.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    table = gns_markdown(results)
    (out / "results_gns.md").write_text(table)
    print(table)
    print(f"wrote {out / 'results_gns.json'} and {out / 'results_gns.md'} in {results['seconds']:.0f} s")


def markdown(results: dict, arms: list[str]) -> str:
    light = results["step_ms_lightning"]
    lines = [f"{results['model']} batch {results['batch']} {results['precision']} on {results['device']} "
             f"(median of {results['repeats']} interleaved repeats)", "",
             "| arm | ms / step | vs plain Lightning |", "|---|---|---|"]
    for arm in arms:
        ms = results[f"step_ms_{arm}"]
        lines.append(f"| {arm} | {ms:.3f} | {ms / light:.3f}x |")
    lines += ["", "| figure | value |", "|---|---|"]
    for key in ("overhead_lightning_vs_raw", "overhead_all_callbacks_vs_raw", "overhead_all_callbacks_vs_lightning",
                "overhead_control_vs_lightning",
                "host_us_per_step_all_callbacks", "host_us_per_step_lightning_dispatch",
                "host_us_per_step_epochwise_code", "batch_change_speedup", "mfu", "tta_wall_ratio",
                "tta_wall_incl_val_ratio", "tta_steps_ratio", "tta_samples_ratio", "tta_cpu_ratio"):
        if key in results:
            lines.append(f"| {key} | {results[key]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
