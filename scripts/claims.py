"""Every claim of the tutorial (docs: epochs and batch size), measured, with a verdict.

Each claim below is measured on the embedded digits (or MNIST / CIFAR-10 with ``--data`` when
their files are in ``--data-dir``; the claims that reuse a digits-only script say so), over the
seeds (median, with the per-seed values and the spread), and judged by its rule: a list of
conditions on the measured numbers, written next to the claim and printed with the verdict
("held" when all hold, "held partly" when some do, "did not hold" when none does; see
``verdicts.py``). A claim that needs hardware the run lacks (mixed precision: a GPU) is reported
with what was measured and the verdict "not measured on a GPU".

Prints one line per claim as it finishes, with an estimate of the time left; writes one JSON
(``--out``) with one entry per claim: ``{key, claim, verdict, numbers, seeds, command, rule,
conditions, note, seconds, details}`` and the machine it ran on. ``--only KEY ...`` re-measures
some claims and updates their entries in an existing JSON.

    python scripts/claims.py --quick            # all claims, shorter runs: under 10 min on 2 quiet cores
    python scripts/claims.py                    # the full measurement (docs/RESULTS.md)
    python scripts/claims.py --only grad_se lr_scaling
    python scripts/claims.py --only mixed_precision --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from epochwise.modules.runtime import tune_malloc  # noqa: E402

tune_malloc()

import claims_batch as cb  # noqa: E402
import claims_epochs as ce  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from claims_common import Measured, Settings  # noqa: E402
from measured_fit import DATASETS, data_available, quiet_lightning  # noqa: E402
from verdicts import Condition, Rule, checked, verdict  # noqa: E402


@dataclass(frozen=True)
class Claim:
    """A claim of the tutorial, how it is measured and the rule that judges it.

    ``cost`` / ``full_cost``: expected seconds of its ``--quick`` / full measurement on one quiet
    core (the CPU seconds of a dry run: the first estimate of the time left; later estimates scale
    them by how the finished claims ran).
    """

    key: str
    text: str
    measure: Callable[[Settings], Measured]
    rule: Rule
    cost: float
    full_cost: float = 0.0

    def expected(self, quick: bool) -> float:
        return self.cost if quick else max(self.cost, self.full_cost)


C = Condition
CLAIMS: tuple[Claim, ...] = (
    Claim("iterations", "Iterations per epoch = ceil(N / batch size); total updates = epochs x ceil(N / batch size).",
          cb.measure_iterations, Rule((C("mismatches", "==", 0, "every count equals the formula, per epoch and in total"),)),
          3, 3),
    Claim("grad_se", "The standard error of the mini-batch gradient falls as 1 / sqrt(batch size).",
          cb.measure_grad_se, Rule((
              C("slope_fpc_corrected", "between", (-0.55, -0.45),
                "log-log slope of SE over B = 8..512, without-replacement factor divided out"),
              C("slope", "between", (-0.6, -0.4), "raw log-log slope, batches drawn as an epoch draws them"))),
          22, 80),
    Claim("lr_scaling", "A large batch at a fixed learning rate generalises worse; linear or square-root LR scaling "
          "with warmup closes the gap.", cb.measure_lr_scaling, Rule((
              C("deficit_points_fixed_lr", ">=", 1.0, "batch 512 at the batch-32 LR ends >= 1 point below batch 32"),
              C("gap_excess_points_fixed_lr", ">=", 0.5,
                "its train-val accuracy gap is >= 0.5 point larger: worse generalisation, not only less training"),
              C("deficit_points_best_scaled", "<=", 1.0, "the better of linear / sqrt with warmup ends within 1 point"))),
          6, 9),
    Claim("smith", "Increasing the batch size instead of decaying the LR reaches the same accuracy with fewer "
          "parameter updates (Smith et al. 2017).", cb.measure_smith, Rule((
              C("acc_delta_points", ">=", -1.0, "batch growth ends within 1 point of LR decay (or above)"),
              C("steps_ratio", "<", 1.0, "with fewer optimizer steps"))),
          5, 12),
    Claim("batch_warmup", "Batch-size warmup (small -> large) reaches a target accuracy in less wall time than a fixed "
          "batch, at equal or better accuracy.", cb.measure_batch_warmup, Rule((
              C("tta_wall_ratio", "<", 1.0, "median wall time to 97% val acc, warmup recipe / fixed batch 64"),
              C("test_acc_delta_points", ">=", -1.0, "test accuracy at the target within 1 point (or above)"))),
          14, 14),
    Claim("resizing", "Progressive resizing saves training time at equal accuracy.", ce.measure_resizing, Rule((
              C("speedup_fit_cpu", ">=", 1.1, "the fit takes >= 10% less CPU time than at full size"),
              C("acc_delta_points", ">=", -1.0, "median test accuracy within 1 point (or above)"))),
          40, 80),
    Claim("epochs", "Too few epochs underfit and too many overfit; early stopping with restored weights picks the "
          "right epoch, and the learning-curve diagnosis agrees.", ce.measure_epochs, Rule((
              C("underfit_points_first_epoch", ">=", 2.0, "after 1 epoch val acc is >= 2 points below its best"),
              C("val_loss_rise_last_vs_min", ">=", 0.1, "at the last epoch val loss is >= 10% above its minimum"),
              C("val_acc_drop_points_last_vs_best", ">=", 0.5, "at the last epoch val acc is >= 0.5 point below its best"),
              C("diagnosis_last_is_overfitting", ">=", 0.66, "LearningCurveMonitor says overfitting at the end (2/3 seeds)"),
              C("es_restored_is_long_best_share", ">=", 0.66,
                "early stopping restores the long run's best val-loss epoch (2/3 seeds)"),
              C("test_loss_es_minus_long", "<", 0.0, "the restored weights have a lower test loss than the last ones"),
              C("test_acc_es_minus_long_points", ">=", -0.5, "and a test accuracy within 0.5 point (or above)"))),
          11, 22),
    Claim("snapshots", "A snapshot ensemble beats its best single snapshot (chosen on validation data).",
          ce.measure_snapshots, Rule((
              C("delta_points", ">", 0.0, "median test accuracy, ensemble - validation-chosen snapshot"),
              C("seeds_ensemble_ge_single_share", ">=", 1.0, "the ensemble is at least as good in every seed"))),
          4, 7),
    Claim("mixed_precision", "Mixed precision fits a larger batch in the same memory.", ce.measure_mixed_precision,
          Rule((C("fit_ratio", ">=", 1.3, "bf16 fits a >= 1.3x larger batch in the float32 step's memory"),)), 1, 1),
)
KEYS = tuple(c.key for c in CLAIMS)


def time_left(elapsed: float, done_costs: Sequence[float], remaining_costs: Sequence[float]) -> float:
    """Seconds left: the remaining claims' expected costs, scaled by how the finished ones ran.

    Example:
        >>> time_left(30.0, [10.0, 10.0], [40.0])  # the first two took 1.5x their estimate
        60.0
    """
    expected = sum(done_costs)
    pace = elapsed / expected if expected > 0 else 1.0
    return pace * sum(remaining_costs)


def judge(claim: Claim, measured: Measured) -> tuple[str, list[dict[str, Any]]]:
    """The claim's verdict (its rule on the numbers, unless the measurement could not be made)."""
    conditions = checked(measured.numbers, claim.rule)
    return measured.verdict or verdict(measured.numbers, claim.rule), conditions


def command_for(key: str, s: Settings) -> str:
    """The command that re-measures one claim as this run did."""
    parts = ["python scripts/claims.py --only", key]
    if s.quick:
        parts.append("--quick")
    if list(s.seeds) != [0, 1, 2]:
        parts += ["--seeds", *map(str, s.seeds)]
    if s.data != "digits":
        parts += ["--data", s.data, "--data-dir", s.data_dir]
    if s.device != "cpu":
        parts += ["--device", s.device]
    return " ".join(parts)


def entry(claim: Claim, measured: Measured, s: Settings, seconds: float, cpu_seconds: float) -> dict[str, Any]:
    """One claim's JSON entry (``cpu_seconds``: this process's CPU time, much less load-dependent)."""
    result, conditions = judge(claim, measured)
    return {"key": claim.key, "claim": claim.text, "verdict": result, "numbers": measured.numbers,
            "seeds": measured.seeds, "command": command_for(claim.key, s), "rule": claim.rule.describe(),
            "conditions": conditions, "note": measured.note, "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "data": s.data, "quick": s.quick, "details": measured.details}


def machine(threads: int) -> dict[str, Any]:
    """What the numbers ran on (wall times depend on it, and on the load)."""
    return {"cpus": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "lightning": pl.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter runs (under 10 minutes on 2 quiet cores)")
    p.add_argument("--only", nargs="+", choices=KEYS, default=None, help="measure these claims only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the mixed-precision claim on a GPU")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the digits models gain little from more, and lose much on busy cores)")
    p.add_argument("--out", default="runs/claims/claims.json")
    p.add_argument("--verbose", action="store_true", help="print each claim's per-seed lines")
    args = p.parse_args(argv)
    if len(args.seeds) < 1:
        p.error("--seeds needs at least one seed")
    if not data_available(args.data, args.data_dir):
        p.error(f"--data {args.data}: its files are not in {args.data_dir!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    s = Settings(quick=args.quick, seeds=tuple(args.seeds), data=args.data, data_dir=args.data_dir,
                 device=args.device, work_dir=str(out.parent), log=print if args.verbose else (lambda line: None))
    todo = [c for c in CLAIMS if args.only is None or c.key in args.only]
    previous = json.loads(out.read_text()) if out.is_file() and args.only else {"claims": []}
    entries = {e["key"]: e for e in previous.get("claims", [])}
    before = machine(args.threads)
    print(f"{len(todo)} claims on {args.data}, seeds {' '.join(map(str, args.seeds))}, "
          f"{'quick' if args.quick else 'full'} runs; load average {before['load_average'][0]:.1f}; "
          f"about {time_left(0, [], [c.expected(args.quick) for c in todo]):.0f} s on a quiet machine", flush=True)
    started = time.perf_counter()
    for i, claim in enumerate(todo):
        t0, c0 = time.perf_counter(), time.process_time()
        measured = claim.measure(s)
        entries[claim.key] = entry(claim, measured, s, time.perf_counter() - t0, time.process_time() - c0)
        e = entries[claim.key]
        shown = ", ".join(f"{c['condition'].split(' ')[0]} {c['value']}" for c in e["conditions"])
        left = time_left(time.perf_counter() - started, [c.expected(args.quick) for c in todo[: i + 1]],
                         [c.expected(args.quick) for c in todo[i + 1:]])
        print(f"[{i + 1}/{len(todo)}] {claim.key}: {e['verdict'].upper()} ({shown}) in {e['seconds']:.0f} s "
              f"({e['cpu_seconds']:.0f} s CPU); "
              f"about {left:.0f} s left", flush=True)
    payload = {
        "claims": [entries[c.key] for c in CLAIMS if c.key in entries],
        "machine": {"before": before, "after": machine(args.threads)},
        "seconds": round(time.perf_counter() - started, 1),
        "command": "python scripts/claims.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)
    print(f"wrote {out} in {payload['seconds']:.0f} s (load average now {payload['machine']['after']['load_average'][0]:.1f})")
    return payload


if __name__ == "__main__":
    main()
