"""``make bench``: the paper-scale run end to end, its floor, and the fast merge path against mergekit's dense route.

Four measurements, written to ``bench-results/<timestamp>/`` (``results.json``, ``summary.md``) and
printed:

1. **Paper scale, end to end**: ``unmerge run experiments/paper-scale-synthetic.toml`` from scratch
   in a child process (adapters, mask, statistics, 72 targets, decomposition, metrics, report): wall
   time, CPU time and peak RSS of the child, the per-stage table, and the bytes it wrote besides
   the adapters (no merged checkpoint, no dense mask: every such file is checked to be smaller than
   one dense ΔW module).
2. **The floor**: forming ΔW densely, module by module on every core, for the 15 adapters — once
   each, as the shared pass does for the mask and the statistics (and the 8 dictionary adapters
   again, what separate masker and statistics passes would add) — what any exact method
   that needs per-module magnitude thresholds and a top-k mask must at least do.
3. **Fast vs dense** at a size where both fit (the same shapes, ``--layers`` layers): the same
   targets merged by the fast path (statistics for the tasks they need, masked merge) and by
   mergekit's dense route (each constituent's dense ΔW, ``merge_tensors``, gather), in this process,
   one after the other; values are compared and the time ratio printed. The dense route takes
   about a minute per TIES target at 4 layers, so ``--dense-targets`` (default 2 per method) are
   compared; the estimated ratio for all 72 targets is printed too, labelled as an estimate.

4. **TSV-M and Iso-C, factored vs dense** on one 3584×3584 module: ``merge_lowrank`` (Gram products
   of the LoRA factors) against ``merge_module`` (full SVDs of the dense module), time and agreement.

Run ``python benchmarks/paper_scale.py --help`` for options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "experiments" / "paper-scale-synthetic.toml"
EXACT = ("linear", "task_arithmetic", "ties")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench-results"), help="results folder (git-ignored)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the fast-vs-dense comparison")
    parser.add_argument("--dense-targets", type=int, default=2, help="targets per method merged by both routes")
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper-scale run")
    parser.add_argument("--skip-floor", action="store_true", help="skip the floor measurement")
    parser.add_argument("--skip-compare", action="store_true", help="skip the fast-vs-dense comparison")
    parser.add_argument("--skip-spectral", action="store_true", help="skip TSV-M / Iso-C factored vs dense")
    parser.add_argument("--spectral-tasks", type=int, default=3, help="constituents of the TSV-M / Iso-C module")
    args = parser.parse_args(argv)

    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg()}
    print(f"bench: results in {out}", flush=True)
    adapter_paths: dict[str, Path] | None = None
    if not args.skip_paper:
        results["paper"], adapter_paths = paper_run(out)
        print_paper(results["paper"])
    if not args.skip_floor:
        results["floor"] = floor(out, adapter_paths)
        print_floor(results["floor"], results.get("paper"))
    # the adapters (1.5 GB) are inputs, not results: keep bench-results small
    shutil.rmtree(out / "runs" / "paper-scale-synthetic" / "cache" / "adapters", ignore_errors=True)
    shutil.rmtree(out / "floor-adapters", ignore_errors=True)
    if not args.skip_compare:
        results["compare"] = compare(out, args.layers, args.dense_targets)
        print_compare(results["compare"])
    if not args.skip_spectral:
        results["spectral"] = spectral(args.spectral_tasks)
        print_spectral(results["spectral"])
    results["load_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(summary_md(results))
    print(f"\nbench: wrote {out / 'results.json'} and {out / 'summary.md'}")
    return 0


# --------------------------------------------------------------------------------------------------
# 1. paper scale end to end
# --------------------------------------------------------------------------------------------------


def paper_run(out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    runs = out / "runs"
    cmd = [str(Path(sys.executable).parent / "unmerge"), "run", str(MANIFEST), "--no-progress", "--output-dir", str(runs)]
    print(f"\n[1/4] paper scale: {' '.join(cmd[1:])}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (out / "paper-run.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"paper-scale run failed (exit {proc.returncode}); see {out / 'paper-run.log'}")
    run_dir = runs / "paper-scale-synthetic"
    timings = json.loads((run_dir / "timings.json").read_text())
    disk = disk_usage(run_dir)
    shutil.copyfile(run_dir / "timings.json", out / "paper-timings.json")
    shutil.copyfile(run_dir / "summary.md", out / "paper-summary.md")
    adapters = {k: Path(v) for k, v in json.loads((run_dir / "adapters.json").read_text()).items()}
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mb": after.ru_maxrss / 1024,
        "stages": timings,
        "disk": disk,
    }, adapters


def disk_usage(run_dir: Path) -> dict[str, Any]:
    """Bytes on disk by kind; any file at least one dense 3584×3584 float32 module big is 'dense'."""
    dense_module_bytes = 3584 * 3584 * 4
    adapters = other = 0
    dense_files: list[str] = []
    largest = ("", 0)
    for f in run_dir.rglob("*"):
        if not f.is_file():
            continue
        size = f.stat().st_size
        if "adapters" in f.relative_to(run_dir).parts:
            adapters += size
            continue
        other += size
        if size > largest[1]:
            largest = (str(f.relative_to(run_dir)), size)
        if size >= dense_module_bytes:
            dense_files.append(str(f.relative_to(run_dir)))
    return {"adapter_bytes": adapters, "bytes_besides_adapters": other, "largest_file": largest,
            "dense_files": dense_files, "merged_checkpoint_bytes": 0 if not dense_files else None}


def print_paper(p: dict[str, Any]) -> None:
    print(f"  wall {p['wall_s']:.1f} s   cpu {p['cpu_s']:.1f} s   peak RSS {p['peak_rss_mb']:.0f} MB")
    print(f"  {'stage':<18}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}")
    for t in p["stages"]:
        print(f"  {t['stage']:<18}{t['seconds']:>8.1f}{t.get('cpu_seconds', 0):>8.1f}{t['peak_rss_mb']:>13.0f}")
    d = p["disk"]
    print(f"  written besides adapters: {d['bytes_besides_adapters'] / 2**20:.1f} MiB "
          f"(largest {d['largest_file'][0]}, {d['largest_file'][1] / 2**20:.2f} MiB); "
          f"dense files: {len(d['dense_files'])}; adapters {d['adapter_bytes'] / 2**30:.2f} GiB")


# --------------------------------------------------------------------------------------------------
# 2. the floor
# --------------------------------------------------------------------------------------------------


def floor(out: Path, paths: dict[str, Path] | None) -> dict[str, Any]:
    """Dense ΔW formation for 15 + 8 adapters at paper scale, on every core (no selection, no merge)."""
    from unmerge_core.io.adapters import LoraAdapter
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.pipeline.parallel import BufferPool, thread_map

    print("\n[2/4] floor: forming ΔW densely for the 15 adapters, then the 8 dictionary ones", flush=True)
    m = load_manifest(MANIFEST)
    if paths is None:
        paths = train_adapters(m, out / "floor-adapters")
    pool = BufferPool()

    def form_all(names: list[str]) -> float:
        start = time.perf_counter()
        for name in names:
            adapter = LoraAdapter(paths[name], name)
            thread_map(lambda mod: float(adapter.delta(mod, out=pool.get(adapter.modules[mod].shape))[0, 0]),
                       adapter.module_names)
        return time.perf_counter() - start

    all_tasks = [t.name for t in m.all_tasks]
    known = [t.name for t in m.known]
    t15 = form_all(all_tasks)
    t8 = form_all(known)
    # one formation per adapter is the floor (the shared pass forms the dictionary's ΔW once for the
    # mask and the statistics); separate masker and statistics stages would form the 8 again
    return {"form_15_s": t15, "form_8_s": t8, "floor_s": t15, "separate_stages_floor_s": t15 + t8}


def print_floor(f: dict[str, Any], paper: dict[str, Any] | None) -> None:
    print(f"  floor: ΔW of the 15 adapters once {f['form_15_s']:.1f} s (forming the 8 dictionary adapters' "
          f"again, as separate masker and statistics passes would: +{f['form_8_s']:.1f} s)")
    if paper:
        stages = {t["stage"]: t["seconds"] for t in paper["stages"]}
        dense_part = stages.get("masker", 0) + stages.get("merge-statistics", 0)
        print(f"  the run's masker + merge-statistics took {dense_part:.1f} s "
              f"({dense_part / f['floor_s']:.2f}× the floor); whole run {paper['wall_s'] / f['floor_s']:.2f}× the floor")


def train_adapters(m: Any, directory: Path, manifest_trainer: Any = None) -> dict[str, Path]:
    from unmerge_core.pipeline.protocol import derive_seed
    from unmerge_core.types import TrainJob

    trainer = (manifest_trainer or m.trainer).build()
    paths = {}
    for i, task in enumerate(m.all_tasks):
        d = directory / task.name
        if not (d / "adapter_model.safetensors").is_file():
            d.mkdir(parents=True, exist_ok=True)
            trainer.train(TrainJob(task, d, derive_seed(m.seed, "train", task.name), directory, i))
        paths[task.name] = d
    return paths


# --------------------------------------------------------------------------------------------------
# 3. fast vs dense
# --------------------------------------------------------------------------------------------------


def compare(out: Path, layers: int, per_method: int) -> dict[str, Any]:
    from unmerge_core.io.adapters import LoraAdapter
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.pipeline.merging import compute_statistics, dense_masked_vector, merge_masked_vector, needs_statistics
    from unmerge_core.pipeline.protocol import generate_targets
    from unmerge_core.pipeline.runner import masked_vector
    from unmerge_core.types import MergeJob
    from unmerge_plugins.mergers.mergekit_merger import MergekitMerger, MergekitParams

    print(f"\n[3/4] fast vs dense: the paper shapes at {layers} layers, {per_method} targets per method", flush=True)
    text = MANIFEST.read_text()
    text = re.sub(r"num_hidden_layers = 28", f"num_hidden_layers = {layers}", text)
    text = re.sub(r"budget = 99904", f"budget = {892 * 4 * layers}", text)
    text = re.sub(r'^registry = ".*"$', f'registry = "{REPO / "registry.toml"}"', text, flags=re.M)
    small = out / f"paper-shapes-{layers}-layers.toml"
    small.write_text(text)
    m = load_manifest(small)
    paths = train_adapters(m, out / "compare-adapters")
    adapters = {name: LoraAdapter(p, name) for name, p in paths.items()}
    masker = m.masker.build()
    mask = masker.build_mask([adapters[t.name] for t in m.known])
    specs = [s for s in generate_targets(m) if s.method in MergekitMerger.methods]  # TSV-M / Iso-C: spectral()
    chosen = [s for method in m.protocol.methods for s in [x for x in specs if x.method == method][:per_method]]
    fast = MergekitMerger(MergekitParams(density=0.5, int8_mask=True, path="fast"))
    dense = MergekitMerger(MergekitParams(density=0.5, int8_mask=True, path="dense"))

    def job(spec: Any) -> MergeJob:
        return MergeJob(spec.target_id, spec.method, spec.tasks, spec.weights, spec.seed)

    def fast_route(targets: list[Any]) -> tuple[float, dict[str, np.ndarray]]:
        start = time.perf_counter()
        need = sorted({t for s in targets if needs_statistics(fast, s.method) for t in s.tasks})
        stats = {t: compute_statistics(fast, adapters[t], mask) for t in need}
        tasks = sorted({t for s in targets for t in s.tasks})
        values = {t: stats[t][1] if t in stats else masked_vector(adapters[t], mask) for t in tasks}
        merged = {s.target_id: merge_masked_vector(fast, job(s), mask, [values[t] for t in s.tasks],
                                                   [stats[t][0] if t in stats else None for t in s.tasks])
                  for s in targets}
        return time.perf_counter() - start, merged

    fast_s, fast_vectors = fast_route(chosen)
    fast_all_s, _ = fast_route(specs)
    print(f"  fast route: {len(chosen)} targets in {fast_s:.2f} s; all {len(specs)} targets in {fast_all_s:.2f} s",
          flush=True)
    per_target: list[dict[str, Any]] = []
    dense_total = 0.0
    for spec in chosen:
        start = time.perf_counter()
        vector = dense_masked_vector(dense, job(spec), [adapters[t] for t in spec.tasks], mask)
        seconds = time.perf_counter() - start
        dense_total += seconds
        a = fast_vectors[spec.target_id]
        row: dict[str, Any] = {"target": spec.target_id, "method": spec.method, "tasks": len(spec.tasks),
                               "dense_s": seconds}
        if spec.method in EXACT:
            row["max_rel_diff"] = float(np.abs(a - vector).max() / np.abs(vector).max())
        else:
            row["nonzero_fast"] = float(np.mean(a != 0))
            row["nonzero_dense"] = float(np.mean(vector != 0))
            row["norm_ratio"] = float(np.linalg.norm(a) / np.linalg.norm(vector))
        per_target.append(row)
        print(f"  dense {spec.target_id:<28} {len(spec.tasks)} tasks {seconds:7.1f} s  "
              + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k not in ("target", "method", "tasks", "dense_s")),
              flush=True)
    by_method: dict[str, list[float]] = {}
    for row in per_target:
        by_method.setdefault(row["method"], []).append(row["dense_s"] / row["tasks"])
    mean_tasks = {meth: float(np.mean([len(s.tasks) for s in specs if s.method == meth])) for meth in by_method}
    dense_all_estimate = sum(float(np.mean(v)) * mean_tasks[meth] * sum(s.method == meth for s in specs)
                             for meth, v in by_method.items())
    shutil.rmtree(out / "compare-adapters", ignore_errors=True)
    return {
        "layers": layers, "mask_size": mask.size, "targets": len(chosen), "all_targets": len(specs),
        "fast_s": fast_s, "dense_s": dense_total, "ratio": dense_total / fast_s,
        "fast_all_s": fast_all_s, "dense_all_estimate_s": dense_all_estimate,
        "ratio_all_estimate": dense_all_estimate / fast_all_s, "per_target": per_target,
    }


def print_compare(c: dict[str, Any]) -> None:
    print(f"  same {c['targets']} targets: dense {c['dense_s']:.1f} s / fast {c['fast_s']:.2f} s = "
          f"{c['ratio']:.0f}× (measured)")
    print(f"  all {c['all_targets']} mergekit targets: dense ≈ {c['dense_all_estimate_s']:.0f} s (estimated from the "
          f"per-task cost above) / "
          f"fast {c['fast_all_s']:.2f} s (measured) ≈ {c['ratio_all_estimate']:.0f}×")
    exact = [r["max_rel_diff"] for r in c["per_target"] if "max_rel_diff" in r]
    if exact:
        print(f"  linear / task arithmetic / TIES: max |fast − dense| / max |dense| = {max(exact):.2e}")


# --------------------------------------------------------------------------------------------------
# 4. TSV-M and Iso-C: factored from the LoRA factors vs dense SVDs, one 7B module
# --------------------------------------------------------------------------------------------------


def spectral(n_tasks: int) -> dict[str, Any]:
    """One 3584×3584 module, ``n_tasks`` rank-32 LoRA constituents: each merger's factored route
    (``merge_lowrank``: Gram products and K × K algebra, gathered at 892 mask coordinates) against its
    dense route (``merge_module``: full SVDs of the dense module, then gathered), single-threaded."""
    import torch

    from unmerge_core import LowRankDelta, MergeJob, torch_threads
    from unmerge_plugins.mergers.iso_c import IsoCMerger, IsoCParams
    from unmerge_plugins.mergers.tsv_m import TsvMerger, TsvMParams

    print(f"\n[4/4] TSV-M and Iso-C on one 3584×3584 module, {n_tasks} rank-32 constituents: factored vs dense",
          flush=True)
    g = torch.Generator().manual_seed(0)
    deltas = [LowRankDelta(torch.randn(32, 3584, generator=g) * 0.02, torch.randn(3584, 32, generator=g) * 0.02, 1.0)
              for _ in range(n_tasks)]
    idx = np.sort(np.random.default_rng(0).choice(3584 * 3584, 892, replace=False))
    rows: list[dict[str, Any]] = []
    with torch_threads(1):
        for merger in (TsvMerger(TsvMParams()), IsoCMerger(IsoCParams())):
            job = MergeJob("bench", merger.methods[0], tuple(f"t{i}" for i in range(n_tasks)), (1 / n_tasks,) * n_tasks, 0)
            start = time.perf_counter()
            fast = merger.merge_lowrank(job, "m", deltas, idx)
            fast_s = time.perf_counter() - start
            start = time.perf_counter()
            dense_module = merger.merge_module(job, "m", [d.dense().clone() for d in deltas])
            dense_s = time.perf_counter() - start
            slow = dense_module.reshape(-1).double().numpy()[idx]
            del dense_module
            rows.append({"method": merger.methods[0], "factored_s": fast_s, "dense_s": dense_s,
                         "max_rel_diff": float(np.abs(fast - slow).max() / np.abs(slow).max())})
    return {"tasks": n_tasks, "rows": rows}


def print_spectral(s: dict[str, Any]) -> None:
    for r in s["rows"]:
        print(f"  {r['method']:<6} factored {r['factored_s']:.3f} s   dense {r['dense_s']:.1f} s   "
              f"({r['dense_s'] / r['factored_s']:.0f}×)   max rel diff at the mask {r['max_rel_diff']:.1e}")


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import numpy
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    mem = ""
    try:
        kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform()}


def summary_md(r: dict[str, Any]) -> str:
    mach = r["machine"]
    lines = [f"# UNMERGE bench — {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']}; torch {mach['torch']}, "
             f"numpy {mach['numpy']}. Load average before/after: "
             f"{'/'.join(f'{x:.1f}' for x in r['load_before'])} → {'/'.join(f'{x:.1f}' for x in r['load_after'])}.", ""]
    if "paper" in r:
        p = r["paper"]
        lines += ["## Paper scale end to end", "",
                  f"Wall {p['wall_s']:.1f} s, CPU {p['cpu_s']:.1f} s, peak RSS {p['peak_rss_mb']:.0f} MB; "
                  f"{p['disk']['bytes_besides_adapters'] / 2**20:.1f} MiB written besides the adapters, "
                  f"{len(p['disk']['dense_files'])} files as large as a dense module.", "",
                  "| stage | wall s | cpu s | peak RSS MB |", "|---|---:|---:|---:|"]
        lines += [f"| {t['stage']} | {t['seconds']:.1f} | {t.get('cpu_seconds', 0):.1f} | {t['peak_rss_mb']:.0f} |"
                  for t in p["stages"]]
        lines.append("")
    if "floor" in r:
        f = r["floor"]
        ratio = (f" The run took {r['paper']['wall_s'] / f['floor_s']:.1f}× the floor." if "paper" in r else "")
        lines += ["## Floor", "", f"Dense ΔW of the 15 adapters, once: **{f['floor_s']:.1f} s** (the 8 dictionary "
                  f"adapters again, as separate masker and statistics passes would need: +{f['form_8_s']:.1f} s)."
                  + ratio, ""]
    if "compare" in r:
        c = r["compare"]
        lines += [f"## Fast vs dense ({c['layers']} layers, mask {c['mask_size']})", "",
                  f"Same {c['targets']} targets: dense {c['dense_s']:.1f} s, fast {c['fast_s']:.2f} s: "
                  f"**{c['ratio']:.0f}×**. All {c.get('all_targets', 72)} mergekit targets: fast {c['fast_all_s']:.2f} s (measured), dense ≈ "
                  f"{c['dense_all_estimate_s']:.0f} s (estimated): ≈ {c['ratio_all_estimate']:.0f}×.", "",
                  "| target | tasks | dense s | comparison |", "|---|---:|---:|---|"]
        for row in c["per_target"]:
            extra = ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k not in ("target", "method", "tasks", "dense_s"))
            lines.append(f"| {row['target']} | {row['tasks']} | {row['dense_s']:.1f} | {extra} |")
        lines.append("")
    if "spectral" in r:
        sp = r["spectral"]
        lines += [f"## TSV-M and Iso-C, one 3584×3584 module, {sp['tasks']} rank-32 constituents", "",
                  "| method | factored s | dense s | max rel diff at the mask |", "|---|---:|---:|---:|"]
        lines += [f"| {x['method']} | {x['factored_s']:.3f} | {x['dense_s']:.1f} | {x['max_rel_diff']:.1e} |"
                  for x in sp["rows"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
