"""``make bench-scaling``: how a 7B-shaped run grows with the dictionary — 15, 25, 50 and 100 adapters.

Each point is one cold ``unmerge run`` (fresh output directory, child process) of a synthetic
manifest with Qwen2.5-7B attention shapes (28 layers × q/k/v/o, rank 32: 822,083,584 ΔW entries per
adapter), ``known`` dictionary adapters and a quarter as many unknown ones, and
``targets = 11.52 × known`` (288, 576, 1,152 targets at 25, 50, 100: the issue's sizes; 72 at the
paper's 15-adapter reference, 8 known + 7 unknown), 2–5 tasks per target, mergekit's four
element-wise methods on the mask (TIES with its exact per-task thresholds) and four decomposers
that work from the run's shared ``DᵀD`` or a dot product (``gram-nnls``, ``lasso``, ``omp``,
``dot-product``; the paper's own ``paper-nnls`` runs SciPy on the whole masked matrix, atoms² work
per target, and is left out).

Printed and written to ``bench-results/<timestamp>/scaling.{json,md}``: wall time and peak RSS per
stage, **time per adapter** (trainer + masker + merge statistics + masked task vectors, divided by
the adapters) and **time per target** (merger + decomposer + metric, divided by the targets), and
the fitted growth exponent of each stage (slope of log time against log adapters or log targets:
1 is linear, 2 quadratic). The adapters (about 80 MB each) are deleted after each point.

Run ``python benchmarks/scaling.py --help`` for options (``--sizes 25 50`` for a shorter run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from paper_scale import machine  # noqa: E402

ADAPTER_STAGES = ("trainer", "masker", "task-vectors", "merge-statistics")
TARGET_STAGES = ("merger", "decomposer", "metric")
GROWTH_AGAINST_TARGETS = (*TARGET_STAGES, "report")
METHODS = ("linear", "ties", "dare_linear", "task_arithmetic")
# Gram-form or cheap decomposers: ``paper-nnls`` / ``nnls`` run SciPy on the whole masked matrix by
# design (the paper's protocol), n_coords × atoms² per target: 0.6 s per target at 100 atoms
DECOMPOSERS = ("gram-nnls", "lasso", "omp", "dot-product")
REFERENCE = 15  # the paper-scale manifest's adapters: 8 known, 7 unknown, 72 targets


def point(size: int) -> dict[str, int]:
    """Known / unknown adapters and targets per group of one benchmark point."""
    if size == REFERENCE:
        return {"known": 8, "unknown": 7, "targets_per_group": 24}
    unknown = max(7, size // 4)
    per_method = max(1, round(size * 11.52 / 3 / len(METHODS)))  # a multiple of the methods, as the protocol asks
    return {"known": size, "unknown": unknown, "targets_per_group": per_method * len(METHODS)}


def registry_text(names: list[str]) -> str:
    """A registry of synthetic skills (the synthetic trainer reads no task data; the source is valid anyway)."""
    categories = ("code", "structured", "reasoning", "style", "other")
    parts = []
    for i, name in enumerate(names):
        parts.append(f'[tasks.{name}]\ncategory = "{categories[i % len(categories)]}"\n'
                     f'description = "synthetic skill {i}"\n[tasks.{name}.source]\n'
                     'kind = "procedural"\ngenerator = "python-function"\n')
    return "\n".join(parts)


def manifest_text(name: str, known: list[str], unknown: list[str], targets_per_group: int) -> str:
    decomposers = "\n".join(f'[[decomposers]]\nplugin = "{d}"\n' for d in DECOMPOSERS)
    return f"""name = "{name}"
seed = 42
registry = "registry.toml"

[tasks]
known = {json.dumps(known)}
unknown = {json.dumps(unknown)}

[protocol]
groups = ["known", "mixed", "unknown"]
methods = {json.dumps(list(METHODS))}
targets_per_group = {targets_per_group}
min_tasks = 2
max_tasks = 5
weights = "uniform"

[trainer]
plugin = "synthetic"

[trainer.params]
rank = 32
alpha = 32
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
config = {{ hidden_size = 3584, num_attention_heads = 28, num_key_value_heads = 4, num_hidden_layers = 28, intermediate_size = 18944 }}
shared = 0.3
category_shared = 0.2
scale = 1e-3

[merger]
plugin = "mergekit"
params = {{ density = 0.5, int8_mask = true, path = "fast" }}

[masker]
plugin = "topk"
params = {{ budget = 99904, aggregate = "max" }}

{decomposers}
[[metrics]]
plugin = "support"
params = {{ threshold = 1e-3 }}

[[metrics]]
plugin = "reconstruction"
"""


def run_point(out: Path, size: int) -> dict[str, Any]:
    shape = point(size)
    names = [f"skill-{i:03d}" for i in range(shape["known"] + shape["unknown"])]
    known, unknown = names[: shape["known"]], names[shape["known"]:]
    work = out / f"n{size}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "registry.toml").write_text(registry_text(names))
    name = f"scaling-{size}"
    (work / "manifest.toml").write_text(manifest_text(name, known, unknown, shape["targets_per_group"]))
    cmd = [str(Path(sys.executable).parent / "unmerge"), "run", str(work / "manifest.toml"), "--no-progress",
           "--no-plots", "--output-dir", str(work / "runs")]
    print(f"\n[{size} adapters in the dictionary] {shape['known']} known + {shape['unknown']} unknown, "
          f"{3 * shape['targets_per_group']} targets", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (work / "run.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"scaling run with {size} adapters failed (exit {proc.returncode}); see {work / 'run.log'}")
    run_dir = work / "runs" / name
    stages = {s["stage"]: s for s in json.loads((run_dir / "timings.json").read_text())}
    shutil.rmtree(run_dir / "cache" / "adapters", ignore_errors=True)  # ~80 MB per adapter: inputs, not results
    adapters = shape["known"] + shape["unknown"]
    targets = 3 * shape["targets_per_group"]
    adapter_s = sum(stages[s]["seconds"] for s in ADAPTER_STAGES if s in stages)
    target_s = sum(stages[s]["seconds"] for s in TARGET_STAGES if s in stages)
    result = {
        "size": size, **shape, "adapters": adapters, "targets": targets, "wall_s": wall,
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
        "stages": {k: {"seconds": v["seconds"], "cpu_seconds": v.get("cpu_seconds"), "peak_rss_mb": v["peak_rss_mb"]}
                   for k, v in stages.items()},
        "per_adapter_s": adapter_s / adapters, "per_target_s": target_s / targets,
    }
    print(f"  wall {wall:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB; per adapter "
          f"{result['per_adapter_s']:.2f} s, per target {result['per_target_s'] * 1e3:.1f} ms", flush=True)
    return result


def growth(points: list[dict[str, Any]], stage: str, axis: str) -> float | None:
    """Least-squares slope of log(stage seconds) against log(axis): the growth exponent."""
    xs, ys = [], []
    for p in points:
        seconds = p["stages"].get(stage, {}).get("seconds")
        if seconds and seconds > 0:
            xs.append(math.log(p[axis]))
            ys.append(math.log(seconds))
    if len(xs) < 2 or max(xs) == min(xs):
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summary_md(result: dict[str, Any]) -> str:
    pts = result["points"]
    stages = list(dict.fromkeys(s for p in pts for s in p["stages"]))
    lines = [f"# UNMERGE scaling bench — {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['memory']}; "
             f"torch {result['machine']['torch']}. Load average before: {result['load_before'][0]:.1f}.", "",
             "| dictionary | adapters | targets | wall s | peak RSS MB | per adapter s | per target ms | "
             "per adapter vs 15 |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = next((p for p in pts if p["size"] == REFERENCE), None)
    for p in pts:
        ratio = f"{p['per_adapter_s'] / ref['per_adapter_s']:.2f}×" if ref else "n/a"
        lines.append(f"| {p['known']} | {p['adapters']} | {p['targets']} | {p['wall_s']:.1f} | {p['peak_rss_mb']:.0f} | "
                     f"{p['per_adapter_s']:.2f} | {p['per_target_s'] * 1e3:.1f} | {ratio} |")
    lines += ["", "Wall seconds per stage:", "", "| stage | " + " | ".join(str(p["known"]) for p in pts) +
              " | growth exponent | against |", "|---|" + "---:|" * (len(pts) + 2)]
    for stage in stages:
        axis = "targets" if stage in GROWTH_AGAINST_TARGETS else "adapters"
        slope = result["growth"].get(stage)
        cells = " | ".join(f"{p['stages'].get(stage, {}).get('seconds', float('nan')):.1f}" for p in pts)
        lines.append(f"| {stage} | {cells} | {'n/a' if slope is None else f'{slope:.2f}'} | {axis} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench-results"), help="results folder (git-ignored)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[REFERENCE, 25, 50, 100],
                        help="dictionary sizes (15 is the paper-scale reference: 8 known + 7 unknown)")
    args = parser.parse_args(argv)
    if any(s < 2 for s in args.sizes):
        parser.error("--sizes: every size must be at least 2")
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(f"scaling bench: results in {out}", flush=True)
    result: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg(), "points": []}
    for size in sorted(set(args.sizes)):
        result["points"].append(run_point(out, size))
        fitted = [p for p in result["points"] if p["size"] != REFERENCE] or result["points"]
        result["growth"] = {stage: growth(fitted, stage, "targets" if stage in GROWTH_AGAINST_TARGETS else "adapters")
                            for stage in dict.fromkeys(s for p in fitted for s in p["stages"])}
        (out / "scaling.json").write_text(json.dumps(result, indent=2))  # kept after every point
        (out / "scaling.md").write_text(summary_md(result))
    print("\n" + (out / "scaling.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
