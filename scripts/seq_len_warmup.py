"""Sequence-length warmup vs fixed length: wall time of a small causal LM to the same validation loss.

Runs the recipe ``scripts/configs/lm/seq_len_warmup.yaml`` (a ``LightningCLI``-style YAML: trainer,
callbacks, model and data by ``class_path``/``init_args``) in two arms, seed by seed and
interleaved: ``warmup`` (the recipe as written) and ``fixed`` (the same without
``SequenceLengthWarmup``: every step at full length, the loader's batch). Each fit stops at the
first validation whose ``val_loss`` is at or below ``--target`` (or at ``max_steps``); the wall
time is measured inside the process from the start of training to that validation's end (start-up
excluded, validation included: both arms validate every ``val_check_interval`` steps at the same
tokens per step). Also recorded: optimizer steps, training tokens, the 1-minute load average.

    python scripts/seq_len_warmup.py --seeds 0 1 2 --target 0.35 --max-steps 1000

Prints the median per arm and writes ``runs/seq_len_warmup.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback

from epochwise.callbacks import SequenceLengthWarmup
from epochwise.modules.language_model import CausalLM
from epochwise.modules.runtime import tune_malloc

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "scripts" / "configs" / "lm" / "seq_len_warmup.yaml"


def instantiate(spec: dict[str, Any]) -> Any:
    """``{"class_path": "pkg.Class", "init_args": {...}}`` -> ``pkg.Class(**init_args)``."""
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


class StopAtLoss(Callback):
    """Stops the fit at the first validation with ``val_loss <= target``; times it from train start."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.start = 0.0
        self.reached: dict[str, float] | None = None
        self.last_loss = float("nan")

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        self.last_loss = float(trainer.callback_metrics["val_loss"])  # once per validation
        if self.reached is None and self.last_loss <= self.target:
            self.reached = {"wall_s": time.perf_counter() - self.start, "steps": trainer.global_step,
                            "val_loss": self.last_loss}
            trainer.should_stop = True


class CountTokens(Callback):
    """Training tokens fed to ``training_step`` (after the recipe's callbacks cut them), all ranks."""

    def __init__(self) -> None:
        self.tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tokens += int(batch[0].numel()) * trainer.world_size  # a shape: no device sync


def run(recipe: dict[str, Any], arm: str, seed: int, target: float, overrides: dict[str, Any]) -> dict[str, Any]:
    recipe = copy.deepcopy(recipe)
    seed_everything(seed, workers=True)
    trainer_kwargs = {**recipe.get("trainer", {}), **overrides}
    callbacks = [instantiate(c) for c in trainer_kwargs.pop("callbacks", [])]
    if arm == "fixed":
        callbacks = [c for c in callbacks if not isinstance(c, SequenceLengthWarmup)]
    stop, count = StopAtLoss(target), CountTokens()
    trainer = Trainer(callbacks=[*callbacks, count, stop], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      accelerator="cpu", devices=1, **trainer_kwargs)
    load_before = os.getloadavg()[0]
    data = instantiate(recipe["data"])
    model_spec = recipe["model"]  # scripts/train_lm.py's form: CausalLM's arguments, vocabulary from the data
    model = instantiate(model_spec) if "class_path" in model_spec else CausalLM(vocab_size=data.vocab_size, **model_spec)
    trainer.fit(model, datamodule=data)
    reached = stop.reached or {}
    return {"arm": arm, "seed": seed, "reached": stop.reached is not None, "target": target,
            "wall_s": round(reached.get("wall_s", time.perf_counter() - stop.start), 2),
            "steps": reached.get("steps", trainer.global_step), "tokens": count.tokens,
            "val_loss": stop.last_loss, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(RECIPE))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.35, help="validation loss to reach")
    parser.add_argument("--arms", nargs="+", default=["warmup", "fixed"])
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=str(ROOT / "runs" / "seq_len_warmup.json"))
    opts = parser.parse_args(args)
    tune_malloc()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    recipe = yaml.safe_load(Path(opts.config).read_text())
    overrides = {"max_steps": opts.max_steps} if opts.max_steps else {}
    rows = []
    for k, seed in enumerate(opts.seeds):
        arms = opts.arms[k % len(opts.arms):] + opts.arms[: k % len(opts.arms)]
        for arm in arms:
            rows.append(run(recipe, arm, seed, opts.target, overrides))
            print(json.dumps(rows[-1]), flush=True)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(rows, indent=1))
    for arm in opts.arms:
        mine = [r for r in rows if r["arm"] == arm]
        print(f"{arm:8s} reached {sum(r['reached'] for r in mine)}/{len(mine)}  median wall to target "
              f"{statistics.median(r['wall_s'] for r in mine):.1f} s  median steps "
              f"{statistics.median(r['steps'] for r in mine):.0f}  per seed (s): {[r['wall_s'] for r in mine]}")
    return rows


if __name__ == "__main__":
    main()
