"""Write docs/RESULTS.md (and the README's headline block) from the measurements' JSON files.

Reads what the measuring scripts wrote (a missing file leaves its section saying which command
makes it) and writes, without running anything:

- the verdict table of ``scripts/claims.py`` (``runs/claims/claims.json``) and each claim's rule;
- the benchmark table of ``scripts/bench.py`` (``runs/bench/results.json``), with the acceptance
  targets, the time-to-accuracy keys among them;
- the time-to-accuracy explanation (``scripts/tta.py``: throughput per batch size, per-recipe runs);
- the batch-size sweeps' tables and plots (``scripts/sweep_batch_size.py``), the plots copied as
  small PNGs under ``docs/``;
- the machine each ran on (CPUs, torch threads, versions, load average) and the command behind each.

The README's block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is rewritten
with the headline figures, so every figure there comes from here.

    python scripts/results.py                     # after the commands listed in docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: The order to run them in on a quiet machine, with the expected duration on 2 quiet cores (from the
#: CPU time of dry runs on the 2-core development machine).
COMMANDS = (
    ("make train", "the default recipe end to end: lightning_logs/version_N/run_summary.json (about 20 s installed)"),
    ("python scripts/claims.py", "every claim, full runs (about 5 min)"),
    ("python scripts/sweep_batch_size.py --out runs/sweep", "batch-size sweep, 20 epochs per cell (about 2 min)"),
    ("python scripts/sweep_batch_size.py --budget updates --out runs/sweep_updates",
     "batch-size sweep, 600 optimizer steps per cell (about 3 min)"),
    ("python scripts/tta.py --throughput --out runs/tta",
     "SimpleCNN samples/s per batch size (about 1 min)"),
    ("python scripts/tta.py --recipes fixed64 warmup_old warmup fixed64_lr2 fixed64_lr3 --seeds 0 1 2 3 4 5 6 7 8 9 "
     "--out runs/tta", "epochs and steps to 97% per recipe and seed (about 3 min)"),
    ("python scripts/bench.py --quick", "the benchmark, time-to-accuracy keys included (a few min)"),
    ("python scripts/results.py", "this file and the README block (seconds)"),
)
#: bench.py keys with an acceptance target: (key, comparison, target)
TARGETS = (("overhead_all_callbacks_vs_raw", "<=", 1.10), ("batch_change_speedup", ">=", 10.0),
           ("mfu", ">=", 0.40), ("tta_wall_ratio", "<=", 0.6), ("overhead_all_callbacks_vs_lightning", "<=", 1.03),
           ("host_us_per_step_all_callbacks", "<=", 50.0))


def load(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def machine_line(m: dict[str, Any] | None) -> str:
    if not m:
        return "machine not recorded"
    load_avg = m.get("load_average") or m.get("load_before")
    load_txt = ", ".join(f"{v:.2f}" for v in load_avg) if isinstance(load_avg, list) else fmt(load_avg)
    return (f"{m.get('cpus', '?')} CPUs, {m.get('torch_threads', m.get('threads', '?'))} torch threads, torch "
            f"{m.get('torch', '?')}, lightning {m.get('lightning', '?')}, load average {load_txt}"
            + (f", {m['utc']}" if m.get("utc") else ""))


def claims_section(data: dict[str, Any] | None, claims_dir: Path, docs: Path) -> list[str]:
    out = ["## Claims of the tutorial, measured", ""]
    if data is None:
        return out + ["Not measured yet: run `python scripts/claims.py`.", ""]
    quick = any(c.get("quick") for c in data["claims"])
    if quick:
        out += ["> Made from `--quick` runs (shorter fits): a dry run, not the final figures.", ""]
    out += [f"Command: `{data['command']}`, {data['seconds']:.0f} s. Machine: "
            f"{machine_line(data['machine']['before'])} at the start; load average "
            f"{data['machine']['after']['load_average'][0]:.2f} at the end.", "",
            "| claim | verdict | measured (median over seeds) | seeds | command |", "|---|---|---|---|---|"]
    for c in data["claims"]:
        measured = "; ".join(f"{k['condition'].split(' (')[0]}: **{fmt(k['value'])}**" for k in c["conditions"])
        out.append(f"| {c['claim']} | **{c['verdict']}** | {measured} | {fmt(c['seeds'])} | `{c['command']}` |")
    out += ["", "Verdicts: *held* when every condition of the claim's rule holds, *held partly* when some do, "
            "*did not hold* when none does (`scripts/verdicts.py`).", ""]
    for c in data["claims"]:
        out += [f"### {c['key']}: {c['verdict']}", "", c["claim"], "", f"Rule: {c['rule']}.", ""]
        out += [f"- {'holds' if k['held'] else 'fails'}: {k['condition']} = {fmt(k['value'])}" for k in c["conditions"]]
        spreads = {k: v for k, v in c["numbers"].items() if k.endswith(("_per_seed", "_spread"))}
        if spreads:
            out.append("- per seed / spread: " + ", ".join(f"{k} {fmt(v)}" for k, v in spreads.items()))
        if c.get("note"):
            out.append(f"- note: {c['note']}")
        curves = claims_dir / "curves" / "seed0" / "long.png"
        if c["key"] == "epochs" and curves.is_file():
            shutil.copyfile(curves, docs / "claims_epochs_learning_curves.png")
            out += ["", "![learning curves of the long run, seed 0](claims_epochs_learning_curves.png)", "",
                    f"LearningCurveMonitor's plot of the long run, seed 0 (`{c['command']}`)."]
        out.append("")
    return out


def bench_section(bench: dict[str, Any] | None) -> list[str]:
    out = ["## Benchmark (`scripts/bench.py`)", ""]
    if bench is None:
        return out + ["Not measured yet: run `python scripts/bench.py --quick`.", ""]
    out += [f"{bench.get('model')} batch {bench.get('batch')} {bench.get('precision')} on {bench.get('device')}, "
            f"{bench.get('repeats')} interleaved repeats; machine: {machine_line(bench)}; "
            f"{bench.get('seconds', 0):.0f} s.", ""]
    if bench.get("noise_floor_exceeds_3_percent"):
        out += ["**This run was too noisy to resolve a few percent**: its two identical arms (plain Lightning and its "
                "control) differ by more than 3% (`overhead_control_vs_lightning`). Re-run on a quieter machine.", ""]
    out += ["| key | value | target |", "|---|---|---|"]
    targets = {k: (op, v) for k, op, v in TARGETS}
    for key in sorted(bench):
        value = bench[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        target = ""
        if key in targets:
            op, v = targets[key]
            ok = value <= v if op == "<=" else value >= v
            target = f"{op} {v:g}: {'met' if ok else '**missed**'}"
        out.append(f"| {key} | {fmt(value)} | {target} |")
    return out + [""]


def tta_section(root: Path) -> list[str]:
    out = ["## Time to 97% validation accuracy (`scripts/tta.py`)", ""]
    thr = load(root / "runs" / "tta" / "throughput.json")
    if thr is None:
        out += ["Throughput not measured yet: run `python scripts/tta.py --throughput`.", ""]
    else:
        out += [f"SimpleCNN training samples/s per batch size, interleaved rounds (load average before "
                f"{fmt(thr.get('load_before'))}; `python scripts/tta.py --throughput`):", "",
                "| batch | samples/s (wall) | samples/s (CPU time) | vs batch 64 (CPU) |", "|---|---|---|---|"]
        cpu, wall = thr["samples_per_s"]["cpu"], thr["samples_per_s"]["wall"]
        for b in cpu:
            out.append(f"| {b} | {wall[b]:.0f} | {cpu[b]:.0f} | {cpu[b] / cpu.get('64', cpu[b]):.2f}x |")
        out.append("")
    runs = load(root / "runs" / "tta" / "runs.json")
    if runs:
        out += ["Epochs (fractional: validation accuracy checked 4 times per epoch on a grid in samples) and "
                "optimizer steps to the target per recipe (exact and load-free; CPU seconds nearly so), and the "
                "share of the time spent on the checks:", "",
                "| recipe | epochs per seed | median epochs (seeds 0 1 2 / all) | median steps (0 1 2) "
                "| median CPU s (0 1 2) | validation share | load |", "|---|---|---|---|---|---|---|"]
        for name in sorted({r["recipe"] for r in runs}):
            rs = sorted((r for r in runs if r["recipe"] == name), key=lambda r: r["seed"])
            first = [r for r in rs if r["seed"] in (0, 1, 2)]
            rows = [row for r in rs for row in r["rows"]]
            val = sum(row["val_s"] for row in rows) / max(1e-9, sum(row["train_s"] + row["val_s"] for row in rows))
            loads = [r["load_before"] for r in rs]
            out.append(f"| {name} | {' '.join(fmt(r['epochs']) for r in rs)} | {fmt(_median([r['epochs'] for r in first]))}"
                       f" / {fmt(_median([r['epochs'] for r in rs]))} | {fmt(_median([r['steps'] for r in first]))} "
                       f"| {fmt(_median([r['cpu_s'] for r in first]))} | {val:.1%} | {min(loads):.1f}-{max(loads):.1f} |")
        out.append("")
    return out


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def sweep_section(root: Path, docs: Path, name: str, title: str) -> list[str]:
    out = [f"## {title}", ""]
    folder = root / "runs" / name
    data = load(folder / "sweep.json")
    if data is None:
        return out + [f"Not measured yet: run `python scripts/sweep_batch_size.py{' --budget updates' if name != 'sweep' else ''} "
                      f"--out runs/{name}`.", ""]
    png = folder / "sweep_batch_size.png"
    if png.is_file():
        target = docs / f"{name}_batch_size.png"
        shutil.copyfile(png, target)
        out += [f"![{title}]({target.name})", ""]
    out += [f"Command: `{data['command']}`, {data['seconds']:.0f} s; machine: {machine_line(data['machine'])}.", ""]
    out += (folder / "sweep.md").read_text().splitlines() if (folder / "sweep.md").is_file() else []
    return out + [""]


def default_run(root: Path) -> dict[str, Any] | None:
    """The newest ``run_summary.json`` of ``make train`` (``scripts/train.py fit`` without ``--config``)."""
    paths = sorted((root / "lightning_logs").glob("version_*/run_summary.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(paths):
        run = load(path)
        if run is not None and not any(a.startswith("--config") for a in run.get("argv", [])):
            return {**run, "path": str(path.relative_to(root))}
    return None


def install_gib(root: Path) -> dict[str, float] | None:
    """Size of ``.venv`` and of its CUDA (``nvidia*``) and torch packages, in GiB."""
    site = next((root / ".venv" / "lib").glob("python*/site-packages"), None) if (root / ".venv").is_dir() else None
    if site is None:
        return None

    def gib(paths: list[Path]) -> float:
        return sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file() and not f.is_symlink()) / 2**30

    return {"venv": gib([root / ".venv"]), "nvidia": gib(list(site.glob("nvidia*"))), "torch": gib([site / "torch"])}


def make_train_lines(run: dict[str, Any] | None, sizes: dict[str, float] | None) -> list[str]:
    lines = []
    if run is not None:
        stopped = "; ".join(reason.rstrip(".") for reason in run.get("stopped", []))
        total = f", {fmt(run['run_seconds'])} s for the whole run with the test" if run.get("run_seconds") else ""
        lines.append(f"- `make train` (default recipe): test accuracy {fmt(run['test'].get('test_acc'))}, "
                     f"{run.get('epochs_trained')} epochs in {fmt(run.get('fit_seconds'))} s of fit{total}, "
                     f"on this machine ({stopped}).")
    if sizes is not None:
        lines.append(f"- Install: `.venv` {sizes['venv']:.1f} GiB, of which {sizes['nvidia']:.1f} GiB CUDA libraries "
                     f"(`nvidia-*` wheels, which PyPI's Linux torch brings even without a GPU) and "
                     f"{sizes['torch']:.1f} GiB torch.")
    return lines


def make_train_section(run: dict[str, Any] | None, sizes: dict[str, float] | None) -> list[str]:
    out = ["## `make train` and the install", ""]
    if run is None and sizes is None:
        return out + ["Not measured yet: run `make train`.", ""]
    out += make_train_lines(run, sizes)
    if run is not None:
        test = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(run["test"].items()))
        out += [f"- Test of the best checkpoint: {test} (`{run['path']}`)."]
    return out + [""]


def headline(claims: dict[str, Any] | None, bench: dict[str, Any] | None) -> list[str]:
    """The README's block: verdict counts and the benchmark's headline keys, linked to RESULTS.md."""
    lines = ["Measured evidence, regenerated by `python scripts/results.py`: [docs/RESULTS.md](docs/RESULTS.md)."]
    if claims:
        counts: dict[str, int] = {}
        for c in claims["claims"]:
            counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
        quick = " (from `--quick` runs)" if any(c.get("quick") for c in claims["claims"]) else ""
        lines.append(f"- Tutorial claims{quick}: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".")
    if bench:
        keys = [k for k, _, _ in TARGETS if k in bench] + ["tta_steps_ratio"]
        lines.append("- `scripts/bench.py`: " + ", ".join(f"`{k}` {fmt(bench[k])}" for k in keys if k in bench) + ".")
    return lines


def write_readme(readme: Path, block: list[str]) -> bool:
    """Rewrite the README's results block in place; ``False`` if the markers are absent."""
    text = readme.read_text()
    pattern = re.compile(r"(<!-- results:begin -->\n).*?(<!-- results:end -->)", re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda m: m.group(1) + "\n".join(block) + "\n" + m.group(2), text))
    return True


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT), help="repository root (runs/ is read from it)")
    p.add_argument("--claims", default="runs/claims/claims.json")
    p.add_argument("--bench", default="runs/bench/results.json")
    p.add_argument("--out", default="docs/RESULTS.md")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = p.parse_args(argv)
    root = Path(args.root)
    docs = (root / args.out).parent
    docs.mkdir(parents=True, exist_ok=True)
    claims, bench = load(root / args.claims), load(root / args.bench)
    run, sizes = default_run(root), install_gib(root)
    lines = ["# Results", "", "<!-- generated by `python scripts/results.py`; edit the scripts, not this file -->", "",
             "What each technique of the tutorial buys on real data, measured, and the project's speed. "
             "Regenerate on a quiet machine, in this order:", "", "```bash"]
    lines += [f"{cmd}  # {why}" for cmd, why in COMMANDS] + ["```", ""]
    lines += make_train_section(run, sizes)
    lines += claims_section(claims, (root / args.claims).parent, docs) + bench_section(bench) + tta_section(root)
    lines += sweep_section(root, docs, "sweep", "Batch-size sweep, fixed number of epochs")
    lines += sweep_section(root, docs, "sweep_updates", "Batch-size sweep, fixed number of optimizer steps")
    text = "\n".join(lines).rstrip() + "\n"
    (root / args.out).write_text(text)
    block = headline(claims, bench) + make_train_lines(run, sizes)
    if not args.no_readme and not write_readme(root / "README.md", block):
        print("README.md has no <!-- results:begin --> / <!-- results:end --> block: left alone")
    print(f"wrote {root / args.out}")
    return text


if __name__ == "__main__":
    main()
