"""Measurements of the tutorial's epoch and technique claims (each returns a :class:`Measured`).

- :func:`measure_epochs`: too few epochs underfit, too many overfit; early stopping with restored
  weights and the learning-curve diagnosis against one long run;
- :func:`measure_snapshots`: snapshot ensemble vs its best single snapshot chosen on validation
  (``scripts/snapshot_ensemble.py``);
- :func:`measure_resizing`: progressive resizing vs the same fit at full size
  (``scripts/bench_resizing.py``);
- :func:`measure_mixed_precision`: step memory in float32 vs bf16 mixed precision.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any

from claims_common import Measured, Settings, median, points, with_spread
from measured_fit import evaluate, measured_fit
from precision_memory import precision_memory
from verdicts import NOT_MEASURED_GPU

from epochwise.callbacks import DIAGNOSIS_CODES, EarlyStopping, LearningCurveMonitor


def _quietly(fn: Any, *args: Any) -> tuple[Any, str]:
    """Run a script's ``main`` with its printing captured (the claims print one line each)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn(*args)
    return result, buffer.getvalue()


def measure_epochs(s: Settings) -> Measured:
    """Per seed: one long fit (SGD 0.05, batch 32) and the same fit with EarlyStopping(val_loss,
    patience, restore_best_weights=True); both with LearningCurveMonitor. Test split for the verdict
    on the restored weights."""
    epochs, patience = (30, 4) if s.quick else (60, 5)
    per_seed: list[dict[str, Any]] = []
    for seed in s.seeds:
        curves = os.path.join(s.work_dir, "curves", f"seed{seed}")
        long_monitor = LearningCurveMonitor(dirpath=curves, filename="long.png")
        long = measured_fit(seed, 32, 0.05, epochs=epochs, data=s.data, data_dir=s.data_dir, callbacks=[long_monitor])
        es = EarlyStopping("val_loss", patience=patience, restore_best_weights=True)
        es_monitor = LearningCurveMonitor(dirpath=curves, filename="early_stopping.png")
        stopped = measured_fit(seed, 32, 0.05, epochs=epochs, data=s.data, data_dir=s.data_dir,
                               callbacks=[es, es_monitor])
        val_loss = [r["val_loss"] for r in long["history"]]
        val_acc = [r["val_acc"] for r in long["history"]]
        best = min(range(len(val_loss)), key=val_loss.__getitem__)
        test_long = evaluate(long["model"], long["datamodule"].test_set)
        test_es = evaluate(stopped["model"], stopped["datamodule"].test_set)
        row = {
            "seed": seed, "best_epoch_long": best, "val_loss_min": val_loss[best], "val_loss_last": val_loss[-1],
            "val_acc_first": val_acc[0], "val_acc_best": max(val_acc), "val_acc_last": val_acc[-1],
            "diagnosis_first": long_monitor.diagnoses[0], "diagnosis_last": long_monitor.diagnosis,
            "es_stopped_after": stopped["epochs"], "es_restored_epoch": es.restored_epoch,
            "es_diagnosis": es_monitor.diagnosis, "test_acc_long": test_long[0], "test_loss_long": test_long[1],
            "test_acc_es": test_es[0], "test_loss_es": test_es[1],
        }
        per_seed.append(row)
        s.log(f"    seed {seed}: val loss min {row['val_loss_min']:.3f} at epoch {best}, last {row['val_loss_last']:.3f}"
              f" ({row['diagnosis_last']}); early stopping after {row['es_stopped_after']} epochs restored epoch "
              f"{row['es_restored_epoch']}: test acc {row['test_acc_es']:.3f} vs {row['test_acc_long']:.3f} after "
              f"{epochs}")
    n: dict[str, Any] = {"epochs_long": epochs, "patience": patience}
    with_spread(n, "underfit_points_first_epoch", [points(r["val_acc_best"] - r["val_acc_first"]) for r in per_seed], 2)
    with_spread(n, "val_loss_rise_last_vs_min", [r["val_loss_last"] / r["val_loss_min"] - 1 for r in per_seed], 3)
    with_spread(n, "val_acc_drop_points_last_vs_best", [points(r["val_acc_best"] - r["val_acc_last"]) for r in per_seed], 2)
    n["diagnosis_first_is_underfitting"] = sum(r["diagnosis_first"] == "underfitting" for r in per_seed) / len(per_seed)
    n["diagnosis_last_is_overfitting"] = sum(r["diagnosis_last"] == "overfitting" for r in per_seed) / len(per_seed)
    n["diagnosis_codes"] = DIAGNOSIS_CODES
    with_spread(n, "es_restored_epoch", [r["es_restored_epoch"] for r in per_seed], 1)
    with_spread(n, "best_epoch_long", [r["best_epoch_long"] for r in per_seed], 1)
    n["es_restored_is_long_best_share"] = sum(r["es_restored_epoch"] == r["best_epoch_long"] for r in per_seed) / len(per_seed)
    with_spread(n, "es_epochs_run", [r["es_stopped_after"] for r in per_seed], 1)
    with_spread(n, "test_acc_es_minus_long_points", [points(r["test_acc_es"] - r["test_acc_long"]) for r in per_seed], 2)
    with_spread(n, "test_loss_es_minus_long", [r["test_loss_es"] - r["test_loss_long"] for r in per_seed], 4)
    return Measured(n, list(s.seeds), {"per_seed": per_seed},
                    note=f"learning-curve PNGs in {os.path.join(s.work_dir, 'curves')}")


def measure_snapshots(s: Settings) -> Measured:
    """``scripts/snapshot_ensemble.py`` (MLP on 8 px digits, SGD, cosine cycles); the single
    snapshot is the one with the best validation accuracy, both scored on test."""
    import snapshot_ensemble

    cycles, cycle_epochs = (4, 3) if s.quick else (5, 4)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--seeds", *map(str, s.seeds), "--num-cycles", str(cycles), "--cycle-epochs", str(cycle_epochs),
                "--out", tmp]
        payload, printed = _quietly(snapshot_ensemble.main, argv)
    runs = payload["runs"]
    n: dict[str, Any] = {"cycles": cycles, "cycle_epochs": cycle_epochs}
    with_spread(n, "test_acc_single_val_chosen", [r["best_single_test_acc"] for r in runs])
    with_spread(n, "test_acc_ensemble", [r["ensemble_test_acc"] for r in runs])
    with_spread(n, "delta_points", [points(r["delta_test_acc"]) for r in runs], 2)
    n["seeds_ensemble_ge_single"] = payload["summary"]["seeds_ensemble_ge_single"]
    n["seeds_ensemble_ge_single_share"] = n["seeds_ensemble_ge_single"] / len(runs)
    n["test_nll_single_minus_ensemble"] = round(median(
        [r["best_single_test_nll"] - r["ensemble_test_nll"] for r in runs]), 4)
    s.log("\n".join("    " + line for line in printed.strip().splitlines()[-6:]))
    return Measured(n, list(s.seeds), {"runs": [{k: v for k, v in r.items() if not k.startswith("snapshot_")}
                                                 for r in runs]}, note="digits whatever --data says")


def measure_resizing(s: Settings) -> Measured:
    """``scripts/bench_resizing.py`` (SimpleCNN, 32 px digits, batch coupled to the side, sqrt LR):
    fit time and test accuracy against the same fit at full size; CPU time is the load-robust figure."""
    import bench_resizing

    stages, epochs = ("0:16,3:24,6:32", 10) if s.quick else ("0:16,6:24,12:32", 20)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--seeds", *map(str, s.seeds), "--epochs", str(epochs), "--stages", stages, "--out", tmp,
                "--picture", ""]
        summary, printed = _quietly(bench_resizing.main, argv)
    n: dict[str, Any] = {"epochs": epochs, "stages": stages,
                         "speedup_fit_wall": round(summary["speedup_fit"], 3),
                         "speedup_fit_cpu": round(summary["speedup_fit_cpu"], 3),
                         "fit_s_full": round(summary["full"]["fit_s"], 2),
                         "fit_s_progressive": round(summary["progressive"]["fit_s"], 2),
                         "acc_delta_points": round(summary["acc_delta_points"], 2),
                         "acc_delta_points_per_seed": [round(v, 2) for v in summary["acc_delta_points_per_seed"]],
                         "test_acc_full": summary["full"]["test_acc"],
                         "test_acc_progressive": summary["progressive"]["test_acc"]}
    s.log("\n".join("    " + line for line in printed.strip().splitlines()[-8:]))
    return Measured(n, list(s.seeds), {"stages": {k: summary[k]["stages"] for k in ("full", "progressive")}},
                    note="digits whatever --data says; wall time depends on the load, CPU time much less")


def measure_mixed_precision(s: Settings) -> Measured:
    """On a GPU: step memory (max_memory_allocated) in float32 vs bf16 autocast and the batch that
    fits. On a CPU: the bytes saved for backward, reported, and no verdict (see the note)."""
    out = precision_memory(s.device, batch=256)
    n = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
    if s.device == "cuda":
        return Measured(n, [0], note="SimpleCNN, 28 px, batch 256 and 128, one step after a warm-up step")
    return Measured(n, [0], verdict=NOT_MEASURED_GPU, note=(
        "the claim is about accelerator memory and no GPU was used (run with --device cuda where one is); on CPU "
        f"the tensors saved for backward take {out['fp32_bytes'] / 2**20:.1f} MiB in float32 and "
        f"{out['bf16_bytes'] / 2**20:.1f} MiB under bf16 autocast at batch 256 (SimpleCNN, 28 px): a "
        f"{out['fit_ratio']:.2f}x larger batch would fit if those tensors were the whole step's memory"))
