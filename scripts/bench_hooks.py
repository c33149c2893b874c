"""Host time of each epochwise callback's per-step hooks, timed directly (no subtraction of noisy arms).

Wraps every per-step hook a callback overrides (``on_train_batch_start`` / ``_end``,
``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``, ``on_before_zero_grad``)
with ``time.perf_counter`` and runs ``bench.py``'s tiny-MLP fit with all of ``ZERO_COST_CALLBACKS``
(one thread, 3 epochs, the second of two fits is reported). What this leaves out: Lightning's own
dispatch of the hooks (``bench.py``'s ``host_us_per_step_lightning_dispatch``) and work outside the
hooks (the twin loader's plan lookup).

    python scripts/bench_hooks.py
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from bench_parts import SIDE  # noqa: E402

HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
         "on_before_optimizer_step", "on_before_zero_grad")


def timed(callbacks: list[pl.Callback], totals: dict, calls: dict) -> list[pl.Callback]:
    """Wrap the per-step hooks each callback overrides (instance attributes; the class is untouched)."""
    for cb in callbacks:
        for hook in HOOKS:
            if getattr(type(cb), hook) is getattr(pl.Callback, hook):
                continue
            method, key = getattr(cb, hook), (type(cb).__name__, hook)

            def wrapper(*args, _method=method, _key=key, **kwargs):
                start = time.perf_counter()
                out = _method(*args, **kwargs)
                totals[_key] += time.perf_counter() - start
                calls[_key] += 1
                return out

            setattr(cb, hook, wrapper)
    return callbacks


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    args = argparse.Namespace(model="tiny_mlp", batch=32, precision="32-true", device="cpu", quick=True, epochs=3)
    totals: dict = collections.defaultdict(float)
    calls: dict = collections.defaultdict(int)
    for _ in range(2):  # the first fit warms up
        totals.clear()
        calls.clear()
        bench.lightning_step_times(args, timed(bench.all_callbacks(32, SIDE["tiny_mlp"]), totals, calls), 3)
    steps = max(calls.values())
    print(f"{steps} training steps; host time per step in each callback's hooks (microseconds):")
    per_callback: dict[str, float] = collections.defaultdict(float)
    for (name, hook), seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        per_callback[name] += 1e6 * seconds / steps
        print(f"  {name:<26} {hook:<26} {1e6 * seconds / steps:7.2f}")
    print("per callback: " + ", ".join(f"{n} {v:.1f}" for n, v in sorted(per_callback.items(), key=lambda kv: -kv[1])))
    print(f"all hooks: {sum(per_callback.values()):.1f} us per step")


if __name__ == "__main__":
    main()
