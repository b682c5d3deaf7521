"""The merged models' own task scores: Scale-SVD (activation and uniform scaling) beside task arithmetic.

Issue 26, item 4 — the seed's claim is that scaling by the inputs' activation statistics keeps a merged
model's performance at a given compression. For the first ``--targets`` task-arithmetic targets of the
*known* group of a finished run (constituents and weights from ``targets.json``, adapters from
``adapters.json``) this script builds the full ΔW of the same constituents and weights with

- **task arithmetic**: the run's own merger for that method, exactly as the run forms a target's full
  ΔW for causal verification (:class:`~unmerge_core.pipeline.runner.RoutedDenseMerge`);
- **Scale-SVD, activation** and **Scale-SVD, uniform** at each of ``--sparsities``: the run's
  ``scale-svd`` parameters except ``scaling`` and ``sparsity``; the activation statistics are the
  store's input-statistics artifacts (``<store>/cache/input-stats/<key>/``), looked up by the runner's
  own key. A constituent whose statistics the store lacks gets them recorded exactly as the runner
  records them (the dictionary's trainer on the base model, cached in the store, reused by a later run),
  and a progress line says so — never a silent fallback to uniform scaling;

puts ``base + ΔW`` into the run's base model (the one the adapters name, as ``causal-ablation`` does),
answers the first ``--prompts`` held-out prompts of each constituent skill greedily and scores them with
the skill's checker — the same held-out split, prompts, batches and checkers as the run's
``causal-ablation`` metric (its parameters when the run has it, else their defaults). The base model
and each constituent adapter alone (the ceiling) are scored too.

**Compression.** Under ``budget = "task-rank"`` a module's budget is the LoRA's own parameter count
P = r·(out + in); sparsity ρ keeps (1 − ρ)·P of it, κ = ``rank_ratio`` of that as a rank-k part
(k = ⌊κ(1 − ρ)r⌋) and the rest as sparse entries. The defaults ρ = 0.1 and 0.7 keep 90 % and 30 % of
the LoRA's parameters nominally; the floor on k makes the share actually kept smaller (for rank-8
adapters and κ = 0.75 on SmolLM2's q/k/v/o: k = 5 and 1, 88 % and 24 %) — the ``kept`` column reports both.

Writes ``<run-dir>/scale-svd-scores.{csv,json,md}`` and prints the Markdown table; progress on stderr.
Usage (after ``make real``; ``make real-scale-svd-scores``)::

    .venv/bin/python experiments/scale_svd_scores.py [--run-dir runs/smollm2-scale-svd] [--targets 3]
        [--prompts 16] [--sparsities 0.1,0.7] [--device cpu]

Cost, measured 2026-12-07 on SmolLM2-135M-Instruct, float32, on the 2 development cores shared with
other runs (load average 6-12; timings contended): model load 4 s; one *skill scoring* (16 greedy
answers of one skill on one model) 31-54 s (chat-sort, chat-pirate 31 s, chat-json-person 45 s,
chat-sql-query 54 s); one Scale-SVD merge (``svd = "randomized"``, 10 rounds) 4.3 s per 576 × 576
module and 1.5 s per 192 × 576 module for 3 constituents, i.e. ~6 min for a 3-skill target (~4 min for
2 skills) per variant. With the defaults on runs/smollm2-scale-svd (2 known task-arithmetic targets;
base and each adapter alone, then task arithmetic + 4 Scale-SVD variants per target: ~35 skill
scorings and 8 merges) that is an estimated 50-60 min on those contended cores — over the 15 minutes
aimed at; roughly half on quiet cores. ``--sparsities 0.7`` halves the merges, ``--prompts 8`` the
scorings. The whole script was not yet run on SmolLM2 (its run was not complete). The tiny test run:
~80 s on the contended cores.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from unmerge_core.config.manifest import load_manifest
from unmerge_core.errors import UnmergeError
from unmerge_core.io.activations import load_input_statistics
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.store import atomic_write_json, atomic_write_text, derive_seed
from unmerge_core.pipeline.merging import run_target_deltas
from unmerge_core.pipeline.runner import RoutedDenseMerge, Runner
from unmerge_core.quiet import quiet_third_party
from unmerge_core.types import MergeJob
from unmerge_plugins.lib.generation import GenerationSet, exact_match, resolve_checker
from unmerge_plugins.lib.lm import WeightEditor, load_causal_lm, resolve_device
from unmerge_plugins.lib.tasks import load_examples
from unmerge_plugins.mergers.scale_svd import ScaleSvdMerger, budget_sizes
from unmerge_plugins.metrics.causal_ablation import CausalParams

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = ROOT / "runs" / "smollm2-scale-svd"
DEFAULT_SPARSITIES = (0.1, 0.7)
OUTPUT = "scale-svd-scores"
TA = "task_arithmetic"
SVD = "scale-svd"


def log(message: str) -> None:
    print(f"scale-svd-scores: {message}", file=sys.stderr, flush=True)


class InputError(Exception):
    """Bad input: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Model:
    """One merged model (or reference) scored on a target's skills."""

    key: str        # task_arithmetic, scale-svd-activation-0.1, ...
    label: str      # what the table says
    scaling: str = ""
    sparsity: float | None = None
    kept_nominal: float | None = None
    kept_effective: float | None = None


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no {what}; is this a finished run directory?")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable {what} ({exc})") from None


def open_run(run_dir: Path) -> tuple[Any, Any, dict[str, Path], list[Any]]:
    """(manifest, read-only runner, adapter dirs, the run's targets) of a complete run directory."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory (run `make real` first)")
    status = _read_json(run_dir / "run.json", "run.json")
    if status.get("status") != "complete":
        raise InputError(f"{run_dir}: the run is not complete (run.json says {status.get('status')!r}, stage "
                         f"{status.get('stage')!r}); wait for it or rerun its manifest")
    manifest_path = Path(str(status.get("manifest", "")))
    if not manifest_path.is_file():
        raise InputError(f"{run_dir}: the run's manifest {manifest_path} is gone")
    copy = run_dir / "manifest.toml"
    if copy.is_file() and copy.read_text(encoding="utf-8-sig") != manifest_path.read_text(encoding="utf-8-sig"):
        raise InputError(f"{manifest_path} changed since the run in {run_dir}: rerun it first")
    try:
        manifest = load_manifest(manifest_path)
    except UnmergeError as exc:
        raise InputError(str(exc).splitlines()[0]) from None
    # the run's paths were relative to the folder `unmerge run` ran in: find it from the run directory
    output = manifest.file.output
    out_dir = Path(output.dir)
    if out_dir.is_absolute():
        origin = Path.cwd()
    else:
        origin = run_dir.resolve().parent
        for _ in out_dir.parts:
            origin = origin.parent
    if (origin / out_dir / manifest.name).resolve() != run_dir.resolve():
        raise InputError(f"{run_dir}: its manifest {manifest_path} names the run directory "
                         f"{out_dir / manifest.name}, not this one")
    output.dir = str(run_dir.resolve().parent)
    if output.store and not Path(output.store).is_absolute():
        output.store = str(origin / output.store)
    methods = manifest.protocol.methods
    if TA not in methods:
        raise InputError(f"{run_dir}: the run has no {TA} targets (protocol.methods = {list(methods)})")
    try:
        svd_plugin = manifest.merger_for(SVD)
    except KeyError:
        raise InputError(f"{run_dir}: the run has no scale-svd merger: no scale-svd parameters to use "
                         "(a run of experiments/smollm2-scale-svd.toml has them)") from None
    if svd_plugin.params.scaling != "activation":
        raise InputError(f"{run_dir}: the run's scale-svd uses scaling = {svd_plugin.params.scaling!r}, so it "
                         "recorded no input statistics; run a manifest with scaling = 'activation'")
    adapters = {name: (origin / p if not Path(p).is_absolute() else Path(p))
                for name, p in _read_json(run_dir / "adapters.json", "adapters.json").items()}
    for name, path in adapters.items():
        if not path.is_dir():
            raise InputError(f"{run_dir}/adapters.json: adapter {name} at {path} is missing")
    targets = []
    for entry in _read_json(run_dir / "targets.json", "targets.json"):
        targets.append(MergeJob(entry["target_id"], entry["method"], tuple(entry["tasks"]), tuple(entry["weights"]),
                                int(entry["seed"]), entry["group"], tuple(entry.get("sources", ())),
                                tuple(entry.get("coefficients", ()))))
    return manifest, ReadOnlyRunner(manifest, progress=False, echo=log), adapters, targets


class ReadOnlyRunner(Runner):
    """The run's runner, used only for its keys and its input-statistics stage: it never claims the run
    directory nor rewrites its run.json (which says ``complete``)."""

    def _write_status(self, status: str, error: str | None = None) -> None:
        return None


def input_statistics(runner: Any, jobs: Sequence[MergeJob], adapters: Mapping[str, Path],
                     record: bool = True) -> dict[tuple[str, int], Path]:
    """The store's input statistics of every constituent of ``jobs`` (as scale-svd targets), by (task,
    batches), under the runner's own keys. Those the store lacks are recorded by the runner's stage (and
    said so), or with ``record=False`` are an error naming them."""
    as_svd = [replace(j, method=SVD, target_id=f"{j.target_id}@{SVD}", coefficients=()) for j in jobs]
    planned = runner.input_statistics_units(as_svd, adapters)
    missing = sorted(task for (task, _), unit in planned.items() if not runner.store.exists("input-stats", unit.key))
    log(f"input statistics of {len(planned)} tasks from {runner.store.root / 'cache' / 'input-stats'}")
    if missing and not record:
        raise InputError(f"the store has no input statistics of {', '.join(missing)} (the run's scale-svd targets "
                         "did not use them); leave out --no-record to record them the runner's way")
    if missing:
        log(f"the store has no input statistics of {', '.join(missing)}: recording them now (the runner's "
            "input-statistics stage; cached in the store)")
    return runner.input_statistics(as_svd, adapters)


# --------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------


def kept_share(params: Any, adapters: Iterable[Any]) -> float:
    """Share of the constituents' LoRA parameters Σ r·(out + in) that Scale-SVD keeps (rank-k part
    k·(out + in) plus the sparse entries it keeps), under ``params``."""
    kept = total = 0.0
    for adapter in adapters:
        for module, (out, inn) in adapter.shapes.items():
            a, _ = adapter.factors(module)
            rank = int(a.shape[0])
            k, pruned = budget_sizes((out, inn), params, rank)
            if params.prune == "row":
                sparse = out * (inn - int(inn * pruned))
            else:
                sparse = out * inn - int(out * inn * pruned)
            kept += k * (out + inn) + sparse
            total += (out * inn if params.budget == "matrix" else rank * (out + inn))
    return kept / total if total else 0.0


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


class Scorer:
    """The base model with its editor and the held-out prompts, as ``causal-ablation`` sets them up."""

    def __init__(self, manifest: Any, adapters: Mapping[str, Path], skills: Sequence[str], prompts: int,
                 device: str) -> None:
        causal = next((m for m in manifest.metrics if m.spec.name == "causal-ablation"), None)
        self.params = causal.params if causal is not None else CausalParams()
        p = self.params
        if prompts > p.examples_per_task:
            raise InputError(f"--prompts {prompts}: the causal metric's held-out split has {p.examples_per_task} "
                             "examples per task")
        loaded = {name: LoraAdapter(path, name) for name, path in adapters.items()}
        bases = {a.base_model for a in loaded.values()}
        if len(bases) != 1 or None in bases:
            raise InputError(f"the adapters name {sorted(map(str, bases))} as base model; one base model is needed")
        self.base = str(bases.pop())
        tasks = {t.name: t for t in manifest.all_tasks}
        checkers = {}
        for skill in skills:
            checker = resolve_checker(tasks[skill], fallback=True)
            if checker is None:
                raise InputError(f"skill {skill} has no checker: its answers cannot be scored")
            checkers[skill] = checker
        try:
            self.device = resolve_device(device)
            self.model, tokenizer = load_causal_lm(self.base, self.device)
        except UnmergeError as exc:
            raise InputError(str(exc)) from None
        modules = list(dict.fromkeys(m for a in loaded.values() for m in a.module_names))
        self.editor = WeightEditor(self.model, modules)
        seed = derive_seed(manifest.seed, "causal-heldout", p.seed)  # the causal metric's held-out split
        self.examples = {s: load_examples(tasks[s], p.examples_per_task, seed, split="heldout")[:prompts]
                         for s in skills}
        self.generation = GenerationSet(tokenizer, self.examples, checkers, p.generation_batch_size,
                                        p.new_tokens_margin, p.max_new_tokens)

    def precision(self) -> Any:
        if self.params.autocast == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def apply(self, deltas: Iterable[tuple[str, Any]]) -> None:
        """``θ = θ_base + ΔW``, one module at a time; every other editable module back to the base."""
        touched = set()
        for module, delta in deltas:
            self.editor.set_module(module, delta)
            touched.add(module)
        for module in list(self.editor.params):
            if module not in touched:
                self.editor.set_module(module)

    def score(self, skills: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per skill: checker accuracy, accepted count, prompts, exact-match share, on the model as it is."""
        # GenerationSet.judged, keeping the answers: the skill's checker and exact match on each
        with self.precision():
            answers = self.generation.answers(self.model, self.device, skills)
        out = {}
        for skill, got in answers.items():
            examples = self.generation.examples[skill]
            accepted = [bool(self.generation.checkers[skill](ex, a)) for ex, a in zip(examples, got)]
            exact = [exact_match(ex, a) for ex, a in zip(examples, got)]
            n = len(got)
            out[skill] = {"accuracy": sum(accepted) / n if n else 0.0, "accepted": sum(accepted), "prompts": n,
                          "exact_match": sum(exact) / n if n else 0.0, "answers": list(got)}
        return out


def _relative_distance(deltas: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """‖ΔW − ΔW_ref‖ / ‖ΔW_ref‖ over every module (Frobenius; a module one of them lacks counts as zero)."""
    diff = ref = 0.0
    for module in set(deltas) | set(reference):
        r = reference[module].double() if module in reference else None
        d = deltas[module].double() if module in deltas else torch.zeros_like(r)  # type: ignore[arg-type]
        diff += float(((d - r) if r is not None else d).square().sum())
        ref += float(r.square().sum()) if r is not None else 0.0
    return (diff / ref) ** 0.5 if ref > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _sparsities(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers in [0, 1)") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers in [0, 1)")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scale_svd_scores.py", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN, help="a finished run with task_arithmetic "
                        "and scale-svd targets (default: runs/smollm2-scale-svd)")
    parser.add_argument("--targets", type=int, default=3, help="known task-arithmetic targets scored (default 3)")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts per skill (default 16)")
    parser.add_argument("--sparsities", type=_sparsities, default=DEFAULT_SPARSITIES,
                        help="Scale-SVD sparsities, comma-separated (default 0.1,0.7)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-record", action="store_true", help="a constituent without input statistics in the "
                        "store is an error (default: record them as the runner does, into the store)")
    args = parser.parse_args(argv)
    if args.targets < 1 or args.prompts < 1:
        parser.error("--targets and --prompts must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with quiet_third_party():  # no transformers progress bars among the progress lines
            result = score_run(args.run_dir, args.targets, args.prompts, args.sparsities, args.device,
                               not args.no_record)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"], end="")
    return 0


def score_run(run_dir: Path, n_targets: int, prompts: int, sparsities: Sequence[float],
              device: str = "cpu", record: bool = True) -> dict[str, Any]:
    """Score the run (see the module docstring); returns the JSON written, with ``markdown``."""
    start = time.perf_counter()
    manifest, runner, adapters, targets = open_run(run_dir)
    chosen = [t for t in targets if t.method == TA and t.group == "known"][:n_targets]
    if not chosen:
        raise InputError(f"{run_dir}: the run has no known-group {TA} targets")
    if any(any(t.sources) for t in chosen):
        raise InputError(f"{run_dir}: targets with constituent variants (protocol.constituents) are not supported")
    skills = list(dict.fromkeys(s for t in chosen for s in t.tasks))
    log(f"{run_dir}: {len(chosen)} known {TA} targets ({', '.join(t.target_id for t in chosen)}), "
        f"{len(skills)} skills, {prompts} prompts each, sparsities {', '.join(map(str, sparsities))}")
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        input_dirs = input_statistics(runner, chosen, adapters, record)
        timings["input_statistics"] = time.perf_counter() - t0
        base_model = runner.full_weight_base(chosen, dict(adapters))
        routed = RoutedDenseMerge({m: manifest.merger_for(m) for m in manifest.protocol.methods}, adapters,
                                  base_model, input_dirs)
        svd_plugin = manifest.merger_for(SVD)
        run_params = svd_plugin.params
        batches = int(run_params.calibration_batches)
        stats = {t: load_input_statistics(input_dirs[(t, batches)]) for t in skills}
        t0 = time.perf_counter()
        scorer = Scorer(manifest, {s: adapters[s] for s in skills}, skills, prompts, device)
        timings["load_model"] = time.perf_counter() - t0
        log(f"base model {scorer.base} on {scorer.device}")
    except UnmergeError as exc:
        raise InputError(str(exc).splitlines()[0]) from None

    models = [Model(TA, "task arithmetic", kept_nominal=1.0, kept_effective=1.0)]
    variants: list[tuple[Model, Any]] = []
    loaded = {s: LoraAdapter(adapters[s], s) for s in skills}
    for rho in sparsities:
        for scaling in ("activation", "uniform"):
            params = run_params.model_copy(update={"scaling": scaling, "sparsity": rho})
            kept = kept_share(params, loaded.values())
            model = Model(f"{SVD}-{scaling}-{rho:g}", f"Scale-SVD {scaling} ρ={rho:g}", scaling, rho,
                          (1 - rho) if params.budget == "task-rank" else None, kept)
            models.append(model)
            variants.append((model, ScaleSvdMerger(params)))

    # references: the base model on every skill, each adapter alone on its own skill (the ceiling)
    t0 = time.perf_counter()
    scorer.apply(())
    base_scores = scorer.score(skills)
    timings["base"] = time.perf_counter() - t0
    log(f"base model: {_fmt_scores(base_scores)} ({timings['base']:.0f} s)")
    alone: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for skill in skills:
        adapter = loaded[skill]
        scorer.apply((m, adapter.delta(m)) for m in adapter.module_names)
        alone[skill] = scorer.score([skill])[skill]
        log(f"{skill} adapter alone: {alone[skill]['accuracy']:.2f}")
    timings["adapters_alone"] = time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    per_target: list[dict[str, Any]] = []
    for job in chosen:
        entry: dict[str, Any] = {"target_id": job.target_id, "tasks": list(job.tasks), "weights": list(job.weights),
                                 "models": {}}
        entry["models"]["base"] = _model_entry(Model("base", "base model"), {s: base_scores[s] for s in job.tasks})
        entry["models"]["adapter-alone"] = _model_entry(Model("adapter-alone", "each adapter alone (ceiling)"),
                                                        {s: alone[s] for s in job.tasks})
        t0 = time.perf_counter()
        try:
            reference = {m: d.clone() for m, d in routed(job)}
        except UnmergeError as exc:
            raise InputError(str(exc).splitlines()[0]) from None
        scorer.apply(reference.items())
        scores = scorer.score(job.tasks)
        entry["models"][TA] = _model_entry(models[0], scores, time.perf_counter() - t0, 0.0,
                                           manifest.merger_for(TA).label)
        log(f"{job.target_id} {models[0].label}: {_fmt_scores(scores)} ({time.perf_counter() - t0:.0f} s)")
        for model, merger in variants:
            t0 = time.perf_counter()
            svd_job = replace(job, method=SVD, coefficients=())
            inputs = {t: stats[t] for t in job.tasks} if model.scaling == "activation" else None
            try:
                deltas = dict(run_target_deltas(merger, adapters, svd_plugin.label, svd_job, None, inputs))
            except UnmergeError as exc:
                raise InputError(str(exc).splitlines()[0]) from None
            merged = time.perf_counter() - t0
            distance = _relative_distance(deltas, reference)
            scorer.apply(deltas.items())
            del deltas
            scores = scorer.score(job.tasks)
            entry["models"][model.key] = _model_entry(model, scores, time.perf_counter() - t0, distance,
                                                      svd_plugin.label, merged)
            log(f"{job.target_id} {model.label} (kept {model.kept_effective:.0%}, ‖ΔW − TA‖/‖TA‖ {distance:.2f}): "
                f"{_fmt_scores(scores)} (merge {merged:.0f} s, total {time.perf_counter() - t0:.0f} s)")
        del reference
        per_target.append(entry)
        for key, m in entry["models"].items():
            for skill, s in m["skills"].items():
                rows.append({"target": job.target_id, "tasks": "+".join(job.tasks),
                             "weights": "+".join(f"{w:g}" for w in job.weights), "model": key, "label": m["label"],
                             "scaling": m["scaling"], "sparsity": m["sparsity"], "kept_nominal": m["kept_nominal"],
                             "kept_effective": m["kept_effective"], "distance_to_ta": m["distance_to_ta"],
                             "skill": skill, **{k: v for k, v in s.items() if k != "answers"}})
    timings["total"] = time.perf_counter() - start
    result: dict[str, Any] = {
        "run_dir": str(run_dir), "base_model": scorer.base, "prompts": prompts, "sparsities": list(sparsities),
        "scale_svd_params": run_params.model_dump(mode="json"),
        "task_arithmetic_merger": manifest.merger_for(TA).config(),
        "input_statistics": {t: str(input_dirs[(t, batches)]) for t in skills},
        "heldout": {"examples_per_task": scorer.params.examples_per_task, "seed": scorer.params.seed,
                    "batch_size": scorer.params.generation_batch_size, "autocast": scorer.params.autocast},
        "models": [m.__dict__ for m in models], "targets": per_target, "timings_s": timings,
        "cpu_threads": _threads(),
    }
    markdown = render_markdown(result)
    _write(run_dir, rows, result, markdown)
    log(f"wrote {run_dir / OUTPUT}.{{csv,json,md}} in {timings['total']:.0f} s")
    result["markdown"] = markdown
    return result


def _threads() -> int:
    return int(torch.get_num_threads())


def _model_entry(model: Model, scores: Mapping[str, Mapping[str, Any]], seconds: float | None = None,
                 distance: float | None = None, merger: str | None = None,
                 merge_seconds: float | None = None) -> dict[str, Any]:
    accuracies = [s["accuracy"] for s in scores.values()]
    return {"label": model.label, "scaling": model.scaling, "sparsity": model.sparsity,
            "kept_nominal": model.kept_nominal, "kept_effective": model.kept_effective,
            "distance_to_ta": distance, "merger": merger, "mean": sum(accuracies) / len(accuracies),
            "skills": {k: dict(v) for k, v in scores.items()}, "seconds": seconds, "merge_seconds": merge_seconds}


def _fmt_scores(scores: Mapping[str, Mapping[str, Any]]) -> str:
    return ", ".join(f"{s} {v['accuracy']:.2f}" for s, v in scores.items())


def _kept(entry: Mapping[str, Any]) -> str:
    if entry["kept_effective"] is None:
        return "–"
    if entry["sparsity"] is None:
        return "100 %"
    return f"{entry['kept_nominal']:.0%} ({entry['kept_effective']:.0%})".replace("%", " %")


def render_markdown(result: Mapping[str, Any]) -> str:
    out = io.StringIO()
    out.write(f"# Merged models' own task scores: Scale-SVD beside task arithmetic\n\n"
              f"Run `{result['run_dir']}`; checker accuracy on {result['prompts']} held-out prompts per skill "
              f"(greedy answers; the causal metric's split). *kept*: share of the constituents' LoRA parameters "
              f"kept, nominal 1 − ρ (actually kept, after the rank floor); ‖ΔW − TA‖ relative to task "
              f"arithmetic's ΔW.\n\n")
    out.write("| target | model | kept | ‖ΔW − TA‖ / ‖TA‖ | mean | per skill |\n|---|---|---|---|---|---|\n")
    order = ["base", "adapter-alone", *[m["key"] for m in result["models"]]]
    for target in result["targets"]:
        first = True
        for key in order:
            entry = target["models"][key]
            name = f"`{target['target_id']}` ({' + '.join(target['tasks'])})" if first else ""
            distance = "–" if entry["distance_to_ta"] is None else f"{entry['distance_to_ta']:.2f}"
            skills = " · ".join(f"{s.removeprefix('chat-')} {v['accuracy']:.2f}" for s, v in entry["skills"].items())
            out.write(f"| {name} | {entry['label']} | {_kept(entry)} | {distance} | {entry['mean']:.2f} | {skills} |\n")
            first = False
    out.write("\nMean over targets:\n\n| model | kept | mean checker accuracy |\n|---|---|---|\n")
    for key in order:
        entries = [t["models"][key] for t in result["targets"]]
        mean = sum(e["mean"] for e in entries) / len(entries)
        out.write(f"| {entries[0]['label']} | {_kept(entries[0])} | {mean:.2f} |\n")
    out.write("\nWhat to look at: at each sparsity, Scale-SVD *activation* against *uniform* and both against task "
              "arithmetic — the seed's claim is that scaling by the inputs' statistics keeps the score near task "
              "arithmetic's as the kept share falls; the base model is the floor, each adapter alone the ceiling. "
              f"{result['prompts']} prompts per skill: one prompt is {1 / result['prompts']:.2f} of a score.\n")
    return out.getvalue()


def _write(run_dir: Path, rows: list[dict[str, Any]], result: Mapping[str, Any], markdown: str) -> None:
    buffer = io.StringIO()
    fields = ["target", "tasks", "weights", "model", "label", "scaling", "sparsity", "kept_nominal",
              "kept_effective", "distance_to_ta", "skill", "accuracy", "accepted", "prompts", "exact_match"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    atomic_write_text(run_dir / f"{OUTPUT}.csv", buffer.getvalue())
    atomic_write_json(run_dir / f"{OUTPUT}.json", {k: v for k, v in result.items() if k != "markdown"})
    atomic_write_text(run_dir / f"{OUTPUT}.md", markdown)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
