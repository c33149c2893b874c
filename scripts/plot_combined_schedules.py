"""Plot the three combined schedules (pure functions, as the recipes set them) to docs/combined_schedules.png.

    python scripts/plot_combined_schedules.py [--out docs/combined_schedules.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from epochwise.callbacks import (  # noqa: E402
    CurriculumPacing,
    OneCycleBatchLRSchedule,
    SequenceLengthSchedule,
    coupled_batch_for_length,
)
from epochwise.callbacks.curriculum_schedules import curriculum_batch_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    # one-cycle batch/LR (scripts/configs/one_cycle_batch_lr.yaml)
    cycle = OneCycleBatchLRSchedule(max_lr_factor=10, min_batch_factor=0.5)
    p = [i / 400 for i in range(401)]
    ax = axes[0]
    ax.plot(p, [cycle.lr_factor(x) for x in p], color="tab:red", label="LR factor")
    ax.set_xlabel("progress (samples seen / total samples)")
    ax.set_ylabel("LR factor (x optimizer LR)", color="tab:red")
    twin = ax.twinx()
    twin.step(p, [cycle.batch_size(x, 64) for x in p], color="tab:blue", where="post", label="batch")
    twin.set_ylabel("per-device batch (base 64)", color="tab:blue")
    twin.set_ylim(0, 70)
    ax.set_title("OneCycleBatchLR(max_lr_factor=10, min_batch_factor=0.5)")

    # curriculum (scripts/configs/curriculum.yaml, given scores: no scoring epoch)
    ax = axes[1]
    t = [i / 400 for i in range(401)]
    for pacing, style in (("linear", "-"), ("root", "--")):
        schedule = CurriculumPacing(0.25, 0.5, pacing)
        ax.plot(t, [schedule.fraction(x) for x in t], style, color="tab:green", label=f"data in play ({pacing})")
    ax.set_xlabel("fraction of training (epoch / max_epochs)")
    ax.set_ylabel("fraction of the data (easiest first)", color="tab:green")
    ax.set_ylim(0, 1.05)
    twin = ax.twinx()
    linear = CurriculumPacing(0.25, 0.5)
    twin.plot(t, [curriculum_batch_size(linear.fraction(x), 0.25, 16, 64) for x in t], color="tab:blue")
    twin.set_ylabel("per-device batch (linear pacing)", color="tab:blue")
    twin.set_ylim(0, 70)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("CurriculumSampling(start_fraction=0.25, full_at=0.5)")

    # sequence-length warmup (scripts/configs/lm/seq_len_warmup.yaml)
    ax = axes[2]
    lengths = SequenceLengthSchedule(16, 128, 300, 16)
    steps = list(range(0, 401))
    ax.step(steps, [lengths(s) for s in steps], color="tab:purple", where="post", label="length")
    batches = [coupled_batch_for_length(16, 128, lengths(s)) for s in steps]
    ax.step(steps, batches, color="tab:blue", where="post", label="batch (coupled)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens per sequence / per-device batch")
    twin = ax.twinx()
    twin.plot(steps, [b * lengths(s) for b, s in zip(batches, steps)], color="black", lw=1, label="tokens / step")
    twin.set_ylim(0, 2600)
    twin.set_ylabel("tokens per optimizer step (flat: coupled)")
    ax.legend(loc="center right", fontsize=8)
    ax.set_title("SequenceLengthWarmup(16, 128, warmup_steps=300)")

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "combined_schedules.png"))
    main(Path(parser.parse_args().out))
