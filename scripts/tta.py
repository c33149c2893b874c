"""Time to accuracy on the embedded digits: how long a recipe takes to reach a validation accuracy.

A *recipe* is a batch-size path (fixed, or :class:`BatchSizeWarmup` growth) with an Adam LR that
follows the batch by a rule (:class:`LRScaling`). :func:`run_to_target` trains SimpleCNN on the
28 px digits and stops at the first check whose validation accuracy reaches the target.

Checks (:class:`TargetClock`): the 144 validation images are evaluated in eval mode inside the
fit, ``checks_per_epoch`` times per epoch (default 4), at the first optimizer step whose samples
seen reach the next multiple of ``n_train / checks_per_epoch``: a grid in *samples*, the same for
every batch size (a grid in steps would give a small batch more chances per sample), so an arm
is checked at most one batch after each grid point and the last check of an epoch is at its end.
Lightning's own validation loop is off. Epoch-end validation alone quantised the time to the
target to whole epochs (2 vs 3 epochs is 0.67x whatever happened within them). A check reads no
random numbers, so the training path is the one an unchecked fit would take.

Each check records the optimizer steps, samples, fractional epochs, and the wall and process CPU
seconds since the training started both *including* the checks (``wall_s``, ``cpu_s``) and
*excluding* them (``train_wall_s``, ``train_cpu_s``: the checks are measurement, not training).
:func:`tta_comparison` runs a recipe and the fixed-batch baseline interleaved over seeds (the
machine's load hits both alike) and gives the ratios ``bench.py`` reports, every one the ratio of
the two arms' medians computed the same way: ``tta_wall_ratio`` (training wall seconds to the
target, checks excluded), ``tta_wall_incl_val_ratio`` (checks included), ``tta_steps_ratio``
(optimizer steps, exact and load-free), ``tta_samples_ratio`` and ``tta_cpu_ratio`` (process CPU
seconds, checks excluded; less sensitive to load). ``--checks-per-epoch 1`` is the old
epoch-end-only measurement.

:func:`throughput` is the interleaved micro-benchmark that explains the wall times: SimpleCNN's
training samples/s at each batch size on this machine (a ratio between sizes is meaningful even
under load, since every size is timed in every round).

    python scripts/tta.py --throughput                      # samples/s at batch 8..512, one thread
    python scripts/tta.py --recipes fixed64 warmup_old warmup fixed64_lr3 --seeds 0 1 2 3 4 5 6 7 8 9
    python scripts/tta.py --compare warmup --seeds 0 1 2    # bench.py's tta_* keys alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from measured_fit import evaluate, quiet_lightning

from epochwise.callbacks import BatchSizeWarmup, LRScaling, LRWarmup
from epochwise.datamodules import DigitsDataModule
from epochwise.datamodules.memory import make_loader
from epochwise.modules import ImageClassifier, SimpleCNN

#: The acceptance target: validation accuracy on the digits' default split (144 images: 140 right).
TARGET = 0.97


@dataclass(frozen=True)
class Recipe:
    """A batch-size path and the Adam LR that follows it.

    ``start == end``: a fixed batch. Otherwise :class:`BatchSizeWarmup` grows the per-device batch
    from ``start`` to ``end`` by ``factor`` every ``interval`` ``unit``s, and :class:`LRScaling`
    sets ``lr x rule(batch / base_batch)`` (``lr`` applies at ``base_batch``, default ``start``).
    ``lr_warmup_steps > 0`` adds a linear LR warmup over that many optimizer steps.
    """

    name: str
    start: int
    end: int
    factor: float = 2.0
    interval: int = 1
    unit: str = "epoch"
    lr: float = 1e-3
    rule: str = "none"
    base_batch: int | None = None
    lr_warmup_steps: int = 0

    @property
    def fixed(self) -> bool:
        return self.start == self.end

    def callbacks(self) -> list[Callback]:
        """The epochwise callbacks that apply this recipe (none for a fixed batch at a fixed LR)."""
        out: list[Callback] = []
        if not self.fixed:
            out.append(BatchSizeWarmup(self.start, self.end, self.factor, self.interval, unit=self.unit))  # type: ignore[arg-type]
            out.append(LRScaling(self.rule, base_batch_size=self.base_batch or self.start))  # type: ignore[arg-type]
        if self.lr_warmup_steps > 0:
            out.append(LRWarmup(self.lr_warmup_steps, unit="step", start_factor=0.1))
        return out


#: Named recipes. ``fixed64`` is scripts/configs/default.yaml's optimizer, LR and batch (without its
#: plateau scheduler, which cannot act before the target: it waits 3 epochs without improvement).
#: ``warmup_old`` is scripts/configs/warmup.yaml as it shipped before issue 17 (16 -> 256, every 2 epochs);
#: ``warmup`` is the recipe that replaced it (32 -> 64 -> 128, one epoch each, sqrt LR with Adam 2e-3 at
#: batch 64; why: scripts/configs/warmup.yaml). ``fixed64_lr2`` / ``fixed64_lr3`` are ablations: the
#: fixed batch 64 at the new recipe's LR at batch 64, and at about its LR at batch 128.
RECIPES: dict[str, Recipe] = {
    "fixed64": Recipe("fixed64", 64, 64, lr=1e-3),
    "warmup_old": Recipe("warmup_old", 16, 256, 2, 2, lr=1e-3, rule="sqrt", base_batch=16),
    "warmup": Recipe("warmup", 32, 128, 2, 1, lr=2e-3, rule="sqrt", base_batch=64),
    "fixed64_lr2": Recipe("fixed64_lr2", 64, 64, lr=2e-3),
    "fixed64_lr3": Recipe("fixed64_lr3", 64, 64, lr=3e-3),
}


def parse_recipe(text: str) -> Recipe:
    """A named recipe, or ``key=value`` pairs of :class:`Recipe`'s fields.

    Example:
        >>> parse_recipe("name=r,start=32,end=128,lr=2e-3,rule=sqrt,base_batch=64").end
        128
    """
    if text in RECIPES:
        return RECIPES[text]
    fields: dict[str, Any] = {}
    types = {"start": int, "end": int, "factor": float, "interval": int, "lr": float, "base_batch": int,
             "lr_warmup_steps": int, "name": str, "unit": str, "rule": str}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in types or not value:
            raise ValueError(f"recipe {text!r}: expected a name in {sorted(RECIPES)} or key=value pairs of "
                             f"{sorted(types)}, got {part!r}")
        fields[key] = types[key](value)
    fields.setdefault("name", text)
    return Recipe(**fields)


class TargetClock(Callback):
    """Checks the validation accuracy ``checks_per_epoch`` times per epoch (see the module docstring).

    Per check a row: epoch, steps, samples, fractional ``epochs``, batch, ``train_s`` / ``val_s``
    (training and checking wall seconds since the previous check), ``wall_s`` / ``cpu_s`` (since
    ``on_train_start``, checks included), ``train_wall_s`` / ``train_cpu_s`` (checks excluded) and
    ``val_acc``. Clocks start at ``on_train_start`` (after setup, which both arms share). With
    ``stop`` the fit ends at the first check whose accuracy reaches ``target``; ``reached`` is that row.
    """

    def __init__(self, target: float, checks_per_epoch: int = 4, stop: bool = True) -> None:
        if checks_per_epoch < 1:
            raise ValueError(f"`checks_per_epoch` must be >= 1, got {checks_per_epoch}")
        self.target, self.checks, self.stop = target, checks_per_epoch, stop
        self.rows: list[dict[str, Any]] = []
        self.reached: dict[str, Any] | None = None
        self._t0 = self._c0 = self._last_t = self._check_t = self._check_c = 0.0
        self._samples = self._batch = self._n_train = self._next = 0
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule  # type: ignore[attr-defined]
        self._n_train = len(data.train_set)
        x, y = next(iter(make_loader(data.val_set, batch_size=len(data.val_set))))  # plain transform, fixed order
        self._val = (x, y)
        self._next = 1  # the next grid point, in units of n_train / checks
        self._t0 = self._last_t = time.perf_counter()
        self._c0 = time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._batch = int(batch[0].shape[0]) if batch_idx == 0 else self._batch
        self._samples += int(batch[0].shape[0])
        if self._samples * self.checks < self._next * self._n_train:
            return
        while self._next * self._n_train <= self._samples * self.checks:
            self._next += 1
        start, start_cpu = time.perf_counter(), time.process_time()
        assert self._val is not None
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            acc = float((pl_module(self._val[0]).argmax(-1) == self._val[1]).float().mean())
        pl_module.train(was_training)
        now, cpu = time.perf_counter(), time.process_time()
        self._check_t += now - start
        self._check_c += cpu - start_cpu
        row = {
            "epoch": trainer.current_epoch, "steps": trainer.global_step, "samples": self._samples,
            "epochs": round(self._samples / self._n_train, 4), "batch": self._batch,
            "train_s": start - self._last_t, "val_s": now - start,
            "wall_s": now - self._t0, "cpu_s": cpu - self._c0,
            "train_wall_s": now - self._t0 - self._check_t, "train_cpu_s": cpu - self._c0 - self._check_c,
            "val_acc": acc,
        }
        self._last_t = now
        self.rows.append(row)
        if self.reached is None and acc >= self.target:
            self.reached = row
            if self.stop:
                trainer.should_stop = True


#: What :func:`run_to_target` reports at the target (``inf`` when it is not reached).
AT_TARGET = ("epochs", "steps", "samples", "wall_s", "train_wall_s", "cpu_s", "train_cpu_s")


def run_to_target(recipe: Recipe, seed: int, target: float = TARGET, max_epochs: int = 12,
                  stop: bool = True, checks_per_epoch: int = 4) -> dict[str, Any]:
    """Train SimpleCNN on the 28 px digits with ``recipe`` until the validation accuracy ``>= target``.

    Returns the recipe, the seed, ``reached`` (bool), the :data:`AT_TARGET` figures of the check
    that reached it (``inf`` when never reached), the per-check ``rows`` and the load average
    before the fit.
    """
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=recipe.start, seed=seed)
    model = ImageClassifier("simple_cnn", optimizer="adam", lr=recipe.lr)
    clock = TargetClock(target, checks_per_epoch, stop=stop)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[*recipe.callbacks(), clock],
    )
    load = os.getloadavg()[0]
    trainer.fit(model, datamodule=data)
    test_acc = evaluate(model, data.test_set)[0]  # the model as it stopped (at the target, if reached)
    hit = clock.reached
    return {
        "recipe": recipe.name, "seed": seed, "reached": hit is not None, "load_before": load,
        **{k: hit[k] if hit else float("inf") for k in AT_TARGET},
        "checks_per_epoch": checks_per_epoch, "test_acc": test_acc, "rows": clock.rows,
    }


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    """``a / b`` that stays finite-or-inf: ``inf / inf`` and ``x / 0`` are ``nan``."""
    try:
        out = a / b
    except ZeroDivisionError:
        return float("nan")
    return out if out == out else float("nan")


def tta_comparison(recipe: Recipe, baseline: Recipe, seeds: list[int], target: float = TARGET,
                   max_epochs: int = 12, log: Any = print, checks_per_epoch: int = 4) -> dict[str, Any]:
    """Run ``baseline`` and ``recipe`` interleaved over ``seeds`` (order alternating per seed), after
    one unmeasured epoch of each (kernels, allocator and Lightning's first-fit costs).

    Returns the ratios of the arms' medians (recipe / baseline): ``tta_wall_ratio`` (training wall
    seconds to the target, the validation checks excluded), ``tta_wall_incl_val_ratio`` (checks
    included), ``tta_steps_ratio`` (optimizer steps), ``tta_samples_ratio``, ``tta_cpu_ratio``
    (process CPU seconds, checks excluded, less sensitive to load); both arms' medians and every run.
    """
    runs: dict[str, list[dict[str, Any]]] = {"recipe": [], "baseline": []}
    for rec in (baseline, recipe):  # unmeasured: the first fit of a process pays one-off setup costs
        run_to_target(rec, seeds[0], target=2.0, max_epochs=1, checks_per_epoch=checks_per_epoch)
    for i, seed in enumerate(seeds):
        order = [("baseline", baseline), ("recipe", recipe)]
        for arm, rec in order if i % 2 == 0 else order[::-1]:
            run = run_to_target(rec, seed, target, max_epochs, checks_per_epoch=checks_per_epoch)
            runs[arm].append(run)
            log(f"    tta seed {seed} {rec.name:<14} {_summary(run)}")
    med = {arm: {k: _median([r[k] for r in rs]) for k in AT_TARGET} for arm, rs in runs.items()}
    return {
        "tta_wall_ratio": ratio(med["recipe"]["train_wall_s"], med["baseline"]["train_wall_s"]),
        "tta_wall_incl_val_ratio": ratio(med["recipe"]["wall_s"], med["baseline"]["wall_s"]),
        "tta_steps_ratio": ratio(med["recipe"]["steps"], med["baseline"]["steps"]),
        "tta_samples_ratio": ratio(med["recipe"]["samples"], med["baseline"]["samples"]),
        "tta_cpu_ratio": ratio(med["recipe"]["train_cpu_s"], med["baseline"]["train_cpu_s"]),
        "tta_epochs_recipe": med["recipe"]["epochs"], "tta_epochs_baseline": med["baseline"]["epochs"],
        "tta_wall_s_recipe": med["recipe"]["train_wall_s"], "tta_wall_s_baseline": med["baseline"]["train_wall_s"],
        "tta_wall_incl_val_s_recipe": med["recipe"]["wall_s"], "tta_wall_incl_val_s_baseline": med["baseline"]["wall_s"],
        "tta_steps_recipe": med["recipe"]["steps"], "tta_steps_baseline": med["baseline"]["steps"],
        "tta_checks_per_epoch": checks_per_epoch,
        "target": target, "seeds": list(seeds), "recipe": asdict(recipe), "baseline": asdict(baseline),
        "runs": runs,
    }


def _summary(run: dict[str, Any]) -> str:
    return (f"epochs {run['epochs']} steps {run['steps']} samples {run['samples']} wall {run['train_wall_s']:.2f} s "
            f"(with checks {run['wall_s']:.2f} s) cpu {run['train_cpu_s']:.2f} s (load {run['load_before']:.1f})")


def throughput(batch_sizes: list[int], rounds: int = 5, samples_per_round: int = 1024,
               side: int = 28) -> dict[str, dict[int, float]]:
    """SimpleCNN training samples/s (forward, backward, Adam step) at each batch size, raw loop.

    Interleaved: every round times every size once, in a rotated order, so load changes during the
    benchmark touch every size. Returns the median over rounds of each size's samples per wall
    second (``"wall"``) and per second of this process's CPU time (``"cpu"``: with one torch
    thread, what one quiet core would do, nearly independent of the other processes' load).
    """
    torch.manual_seed(0)
    net = SimpleCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    wall: dict[int, list[float]] = {b: [] for b in batch_sizes}
    cpu: dict[int, list[float]] = {b: [] for b in batch_sizes}

    def steps(b: int, n: int) -> None:
        x, y = torch.randn(b, 1, side, side), torch.randint(0, 10, (b,))
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()

    for b in batch_sizes:  # warm-up: allocator and oneDNN kernels for every shape
        steps(b, 2)
    for r in range(rounds):
        order = batch_sizes[r % len(batch_sizes):] + batch_sizes[: r % len(batch_sizes)]
        for b in order:
            n = max(1, samples_per_round // b)
            start, start_cpu = time.perf_counter(), time.process_time()
            steps(b, n)
            wall[b].append(n * b / (time.perf_counter() - start))
            cpu[b].append(n * b / max(1e-9, time.process_time() - start_cpu))
    return {"wall": {b: _median(v) for b, v in wall.items()}, "cpu": {b: _median(v) for b, v in cpu.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--throughput", action="store_true", help="the samples/s micro-benchmark only")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--recipes", nargs="+", default=["fixed64", "warmup_old"],
                   help=f"names ({', '.join(RECIPES)}) or key=value,... specs (see parse_recipe)")
    p.add_argument("--compare", default=None, metavar="RECIPE",
                   help="run RECIPE and fixed64 interleaved over --seeds and print bench.py's tta_* ratios")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--target", type=float, default=TARGET)
    p.add_argument("--max-epochs", type=int, default=12)
    p.add_argument("--checks-per-epoch", type=int, default=4,
                   help="validation checks per epoch, on a grid in samples (1: at epoch ends only)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as bench.py's "
                   "tta keys: on busy cores two threads slowed these fits ~10x and small batches most)")
    p.add_argument("--out", default="runs/tta")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.throughput:
        load = os.getloadavg()
        thr = throughput(args.batch_sizes, args.rounds)
        for kind, values in thr.items():
            base = values.get(64) or next(iter(values.values()))
            for b, v in values.items():
                print(f"{kind:>4} batch {b:>4}: {v:8.1f} samples/s ({v / base:.2f}x batch 64)")
        (out / "throughput.json").write_text(json.dumps({"samples_per_s": thr, "load_before": load,
                                                         "load_after": os.getloadavg()}, indent=2))
        return
    if args.compare:
        result = tta_comparison(parse_recipe(args.compare), RECIPES["fixed64"], args.seeds, args.target,
                                args.max_epochs, checks_per_epoch=args.checks_per_epoch)
        keys = {k: v for k, v in result.items() if k.startswith("tta_")}
        print(json.dumps(keys, indent=2))
        (out / "compare.json").write_text(json.dumps(result, indent=2))
        return
    recipes = [parse_recipe(name) for name in args.recipes]
    for recipe in recipes:  # unmeasured, as in tta_comparison: the first fits pay one-off setup costs
        run_to_target(recipe, args.seeds[0], target=2.0, max_epochs=1, checks_per_epoch=args.checks_per_epoch)
    results = []
    for seed in args.seeds:  # interleaved: every recipe once per seed
        for recipe in recipes:
            run = run_to_target(recipe, seed, args.target, args.max_epochs, checks_per_epoch=args.checks_per_epoch)
            results.append(run)
            print(f"{recipe.name:<14} seed {seed}: {_summary(run)}", flush=True)
            (out / "runs.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
