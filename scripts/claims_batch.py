"""Measurements of the tutorial's batch-size claims (each returns a :class:`Measured`).

- :func:`measure_iterations`: iterations per epoch and total updates, against the Trainer;
- :func:`measure_grad_se`: the gradient's standard error against the batch size (log-log slope);
- :func:`measure_lr_scaling`: a large batch at a fixed LR, then with linear / sqrt scaling + warmup;
- :func:`measure_smith`: increasing the batch instead of decaying the LR (Smith et al. 2017);
- :func:`measure_batch_warmup`: batch-size warmup against a fixed batch, time to a target accuracy.

The claims and their rules are in ``claims.py``; the measuring code lives here.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from claims_common import Measured, Settings, points, with_spread
from grad_se import finite_population_factor, loglog_slope, per_sample_gradients, standard_errors
from measured_fit import make_data, measured_fit

from epochwise.callbacks import BatchSizeSchedule
from epochwise.datamodules.memory import make_loader


class BatchCounter(pl.Callback):
    """Training batches per epoch and optimizer steps, counted from the hooks."""

    def __init__(self) -> None:
        self.per_epoch: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.per_epoch[trainer.current_epoch] = self.per_epoch.get(trainer.current_epoch, 0) + 1


def train_size(s: Settings) -> int:
    """Images in the train split of the claims' data set."""
    dm = make_data(s.data, 32, 0, s.data_dir)
    dm.setup("fit")
    return len(dm.train_set)


def count_iterations(s: Settings, n: int, batch: int, epochs: int = 2) -> dict[str, Any]:
    """One fit at ``batch``: batches per epoch and optimizer steps counted from the Trainer, next to
    ``ceil(N / B)`` and ``epochs x ceil(N / B)``; ``ok`` when all agree."""
    counter = BatchCounter()
    run = measured_fit(0, batch, 0.05, epochs=epochs, callbacks=[counter], data=s.data, data_dir=s.data_dir,
                       validate_every_epoch=False)
    per_epoch, expected = sorted(set(counter.per_epoch.values())), math.ceil(n / batch)
    row = {"batch": batch, "batches_per_epoch": per_epoch, "expected_per_epoch": expected,
           "trainer_num_training_batches": int(run["trainer"].num_training_batches),
           "optimizer_steps": run["steps"], "expected_steps": epochs * expected,
           "epochs_counted": len(counter.per_epoch)}
    row["ok"] = (per_epoch == [expected] and row["trainer_num_training_batches"] == expected
                 and run["steps"] == epochs * expected and len(counter.per_epoch) == epochs)
    return row


def measure_iterations(s: Settings) -> Measured:
    """Batches per epoch and optimizer steps for several batch sizes (edge cases around N included),
    against ``ceil(N / B)`` and ``epochs x ceil(N / B)``. Exact: one seed suffices."""
    n, epochs = train_size(s), 2
    rows = []
    for b in (7, 32, 100, n - 1, n, n + 1):
        rows.append(count_iterations(s, n, b, epochs))
        r = rows[-1]
        s.log(f"    batch {b}: {r['batches_per_epoch']} batches/epoch (ceil(N/B) = {r['expected_per_epoch']}), "
              f"{r['optimizer_steps']} steps (expected {r['expected_steps']})")
    numbers = {"N": n, "epochs": epochs, "cases": len(rows), "mismatches": sum(not r["ok"] for r in rows)}
    return Measured(numbers, [0], {"cases": rows}, note="exact counts: one seed (the count does not depend on it)")


def measure_grad_se(s: Settings) -> Measured:
    """SE of the mini-batch gradient at B = 8..512 at the weights after one epoch (per seed)."""
    sizes, draws = [8, 16, 32, 64, 128, 256, 512], 100 if s.quick else 400
    raw, corrected, per_seed = [], [], []
    for seed in s.seeds:
        run = measured_fit(seed, 32, 0.05, epochs=1, data=s.data, data_dir=s.data_dir, validate_every_epoch=False)
        dataset = run["datamodule"].train_set
        x, y = next(iter(make_loader(dataset, batch_size=len(dataset))))
        population = min(len(y), 2048)  # per-sample gradients of a larger set would not fit in memory
        x, y = x[:population], y[:population]
        grads = per_sample_gradients(run["model"].backbone.eval(), x, y)
        se = standard_errors(grads, [b for b in sizes if b < population], draws, seed)
        bs = sorted(se)
        raw.append(loglog_slope(bs, [se[b] for b in bs]))
        corrected.append(loglog_slope(bs, [se[b] / finite_population_factor(population, b) for b in bs]))
        per_seed.append({"seed": seed, "population": population, "se": se})
        s.log(f"    seed {seed}: SE {', '.join(f'{b}: {v:.4f}' for b, v in se.items())}; slope {raw[-1]:.3f} "
              f"({corrected[-1]:.3f} without the finite-population factor)")
    numbers: dict[str, Any] = {"population": per_seed[0]["population"], "draws_per_size": draws,
                               "batch_sizes": sizes}
    with_spread(numbers, "slope", raw, 3)
    with_spread(numbers, "slope_fpc_corrected", corrected, 3)
    return Measured(numbers, list(s.seeds), {"per_seed": per_seed})


def measure_lr_scaling(s: Settings) -> Measured:
    """Batch 32 vs 512 for a fixed number of epochs: SGD at the same LR, then linear / sqrt scaling
    with LR warmup (the sweep's cells, ``sweep_batch_size.run_cell``)."""
    import sweep_batch_size as sweep

    epochs = 20 if s.quick else 30
    args = sweep.parse_args(["--epochs", str(epochs), "--data", s.data, "--data-dir", s.data_dir])
    n = train_size(s)
    arms = {"small": ("none", 32), "large_none": ("none", 512), "large_linear": ("linear", 512),
            "large_sqrt": ("sqrt", 512)}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for seed in s.seeds:
        for arm, (rule, batch) in arms.items():
            runs[arm].append(sweep.run_cell(args, rule, batch, seed, n))
        s.log(f"    seed {seed}: " + ", ".join(f"{a} {runs[a][-1]['val_acc']:.3f}" for a in arms))
    numbers: dict[str, Any] = {"epochs": epochs, "lr_at_32": args.lr, "base_batch": 32, "large_batch": 512}
    for arm in arms:
        with_spread(numbers, f"val_acc_{arm}", [r["val_acc"] for r in runs[arm]])
        with_spread(numbers, f"gap_{arm}", [r["gap_acc"] for r in runs[arm]])
        numbers[f"steps_{arm}"] = runs[arm][0]["steps"]
    small = numbers["val_acc_small"]
    numbers["deficit_points_fixed_lr"] = round(points(small - numbers["val_acc_large_none"]), 2)
    best = max(numbers["val_acc_large_linear"], numbers["val_acc_large_sqrt"])
    numbers["deficit_points_best_scaled"] = round(points(small - best), 2)
    numbers["gap_excess_points_fixed_lr"] = round(points(numbers["gap_large_none"] - numbers["gap_small"]), 2)
    details = {arm: [{k: r[k] for k in ("seed", "val_acc", "train_acc", "steps", "wall_s")} for r in rs]
               for arm, rs in runs.items()}
    return Measured(numbers, list(s.seeds), details)


def measure_smith(s: Settings) -> Measured:
    """Same epochs, SGD from batch 32: decay the LR by 2 at each milestone, or double the batch there
    at a constant LR (:class:`BatchSizeSchedule`). Accuracy and optimizer steps of each."""
    epochs, every = (12, 3) if s.quick else (30, 8)
    milestones = {0: 32, every: 64, 2 * every: 128, 3 * every: 256}
    decay, grow = [], []
    for seed in s.seeds:
        decay.append(measured_fit(seed, 32, 0.05, epochs=epochs, data=s.data, data_dir=s.data_dir,
                                  scheduler="step", step_size=every, step_gamma=0.5))
        grow.append(measured_fit(seed, 32, 0.05, epochs=epochs, data=s.data, data_dir=s.data_dir,
                                 callbacks=[BatchSizeSchedule(milestones)]))
        s.log(f"    seed {seed}: LR decay {decay[-1]['val_acc']:.3f} in {decay[-1]['steps']} steps, batch growth "
              f"{grow[-1]['val_acc']:.3f} in {grow[-1]['steps']} steps")
    numbers: dict[str, Any] = {"epochs": epochs, "milestones": milestones, "lr": 0.05, "factor": 2}
    with_spread(numbers, "val_acc_lr_decay", [r["val_acc"] for r in decay])
    with_spread(numbers, "val_acc_batch_growth", [r["val_acc"] for r in grow])
    numbers["steps_lr_decay"], numbers["steps_batch_growth"] = decay[0]["steps"], grow[0]["steps"]
    numbers["steps_ratio"] = round(grow[0]["steps"] / decay[0]["steps"], 4)
    numbers["acc_delta_points"] = round(points(numbers["val_acc_batch_growth"] - numbers["val_acc_lr_decay"]), 2)
    return Measured(numbers, list(s.seeds))


def measure_batch_warmup(s: Settings) -> Measured:
    """The shipped warmup recipe (scripts/configs/warmup.yaml) against the fixed batch 64, to 97%
    digits validation accuracy, interleaved (:func:`tta.tta_comparison`); test accuracy at the target."""
    import tta

    result = tta.tta_comparison(tta.RECIPES["warmup"], tta.RECIPES["fixed64"], list(s.seeds), log=s.log)
    numbers: dict[str, Any] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
                               if k.startswith("tta_")}
    for arm in ("recipe", "baseline"):
        with_spread(numbers, f"test_acc_at_target_{arm}", [r["test_acc"] for r in result["runs"][arm]])
        numbers[f"load_{arm}"] = [round(r["load_before"], 1) for r in result["runs"][arm]]
    numbers["test_acc_delta_points"] = round(
        points(numbers["test_acc_at_target_recipe"] - numbers["test_acc_at_target_baseline"]), 2)
    runs = {arm: [{k: v for k, v in r.items() if k != "rows"} for r in rs] for arm, rs in result["runs"].items()}
    return Measured(numbers, list(s.seeds), {"recipe": result["recipe"], "runs": runs},
                    note="SimpleCNN on the 28 px digits whatever --data says; wall time depends on the load")
