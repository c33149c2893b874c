"""The largest batch that fits, measured: find_max_batch_size on resnet20 / resnet18 x precisions.

For every model and precision: the finder's answer (real training steps, SGD with momentum, on
32x32 colour images), the peak memory of a training step at that size as a fraction of the
device's memory (the target with the default 15% headroom: 80-90% of the card), and a Lightning
fit of a few steps at that size (did it fit, and its peak). One command, one table::

    python scripts/max_batch.py                       # on the GPU: resnet20, resnet18 x 32-true, bf16-mixed
    python scripts/max_batch.py --device cpu --max-batch-size 64 --image-size 16   # the CPU path

On CPU the peak is the process's resident memory against the host's available memory, and the
search stops at ``--max-batch-size`` (default 4096 there). ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from epochwise.callbacks import search_max_batch_size
from epochwise.callbacks._device_memory import MemoryMeter
from epochwise.datamodules.memory import InMemoryImageDataset, make_loader
from epochwise.modules import ImageClassifier, build_backbone

GIB = 2**30


def fit_at(module: ImageClassifier, batch: int, precision: str, device: torch.device, steps: int,
           image_size: int) -> tuple[bool, int | None]:
    """Train ``steps`` optimizer steps at ``batch``; return (it fit, its peak memory in bytes)."""
    images = torch.randn(batch, 3, image_size, image_size)
    loader = make_loader(InMemoryImageDataset(images, torch.randint(0, 10, (batch,))), batch_size=batch)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    meter = MemoryMeter(device)
    meter.start()
    try:
        trainer.fit(module, train_dataloaders=loader)
    except torch.OutOfMemoryError:
        return False, None
    return True, meter.peak()


def measure(name: str, precision: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    module = ImageClassifier(build_backbone(name, in_channels=3, num_classes=10), in_channels=3,
                             optimizer="sgd", lr=0.1, momentum=0.9).to(device)
    optimizer = module.configure_optimizers()
    sample = torch.zeros(1, 3, args.image_size, args.image_size)
    start = time.perf_counter()
    found = search_max_batch_size(module, sample, optimizer, headroom=args.headroom, precision=precision,
                                  max_batch_size=args.max_batch_size)
    seconds = time.perf_counter() - start
    del optimizer
    row: dict[str, Any] = {
        "model": name, "precision": precision, "device": found.device, "batch": found.size,
        "step_peak_gib": None if found.peak_bytes is None else found.peak_bytes / GIB,
        "step_peak_fraction": found.peak_fraction, "budget_fraction": found.budget_bytes / found.total_bytes,
        "total_gib": found.total_bytes / GIB, "capped": found.capped, "trials": len(found.trials),
        "search_s": seconds, "fit": None, "fit_peak_fraction": None,
    }
    if found.size and args.fit_steps:
        ok, peak = fit_at(module, found.size, precision, device, args.fit_steps, args.image_size)
        row["fit"] = "ok" if ok else "out of memory"
        row["fit_peak_fraction"] = None if peak is None else peak / found.total_bytes
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| model | precision | batch (finder) | step peak | step peak / device | budget / device | "
             f"fit ({rows[0]['device'] if rows else ''}) | fit peak / device | trials | search |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["step_peak_gib"] is None else f"{r['step_peak_gib']:.2f} GiB"
        batch = f"{r['batch']}{' (cap)' if r['capped'] else ''}"
        lines.append(f"| {r['model']} | {r['precision']} | {batch} | {peak} | {pct(r['step_peak_fraction'])} | "
                     f"{pct(r['budget_fraction'])} | {r['fit'] or '-'} | {pct(r['fit_peak_fraction'])} | "
                     f"{r['trials']} | {r['search_s']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18"], choices=["resnet20", "resnet18"])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--headroom", type=float, default=0.15)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=None, help="the search's cap (default: by device)")
    parser.add_argument("--fit-steps", type=int, default=3, help="optimizer steps of the fit at the answer (0: none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    if kind == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, "
              f"{torch.cuda.get_device_properties(device).total_memory / GIB:.1f} GiB; torch {torch.__version__}")
    else:
        print(f"device: CPU (host memory); torch {torch.__version__}")
    rows = [measure(name, precision, device, args) for name in args.models for precision in args.precisions]
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
