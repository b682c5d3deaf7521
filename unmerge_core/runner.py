"""Run a manifest: train → mask → merge → decompose → score, reusing every finished artifact.

Order of work: adapters are trained first (one job per task); the mask depends only on the dictionary
adapters, so it is built next; targets are then merged module by module and kept only on the mask
coordinates (no merged checkpoint is written); every decomposer is run on every target; metrics score
each decomposition. Each unit of work has a serialisable input (a dataclass of paths, names and
validated params) and is run by an :class:`~unmerge_core.executor.Executor`.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import LoraAdapter
from .errors import PluginError, UnmergeError
from .executor import Executor, SequentialExecutor, progress
from .manifest import Manifest, ResolvedPlugin
from .masked_merge import (
    StatisticsUnit,
    masked_target,
    needs_statistics,
    statistics_key,
    statistics_unit,
    supports_masked,
)
from .parallel import blas_threads
from .protocol import TargetSpec, derive_seed, generate_targets
from .results import ResultTable, write_results
from .store import ArtifactStore, atomic_save_tensors, atomic_write_json, content_key, load_tensors
from .types import (
    Decomposition,
    DecompositionProblem,
    Mask,
    MergeJob,
    RunContext,
    TargetEvaluation,
    TaskInfo,
    TrainJob,
)


# --------------------------------------------------------------------------------------------------
# Units of work
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainUnit:
    plugin: ResolvedPlugin
    task: TaskInfo
    key: str
    seed: int
    store_root: Path
    workspace: Path
    task_index: int


def train_unit(unit: TrainUnit) -> Path:
    """Train one task's adapter into the cache (no-op when it is already there)."""
    store = ArtifactStore(unit.store_root)

    def build(tmp: Path) -> None:
        trainer = unit.plugin.build()
        unit.workspace.mkdir(parents=True, exist_ok=True)
        job = TrainJob(task=unit.task, output_dir=tmp, seed=unit.seed, workspace=unit.workspace,
                       task_index=unit.task_index)
        with plugin_errors("trainer", unit.plugin.label):
            trainer.train(job)
        LoraAdapter(tmp, unit.task.name)  # check the trainer wrote a readable adapter

    meta = {"task": unit.task.name, "trainer": unit.plugin.config()}
    return store.produce("adapters", unit.key, build, meta)


@dataclass(frozen=True)
class MergeUnit:
    plugin: ResolvedPlugin
    spec: TargetSpec
    key: str
    adapter_dirs: tuple[Path, ...]
    mask_dir: Path
    store_root: Path
    # fast path (masked_merge): the run's masked task vectors and, per constituent, its statistics
    vectors_path: Path | None = None
    statistics_dirs: tuple[Path | None, ...] = ()


def merge_unit(unit: MergeUnit) -> Path:
    """Form one target's task vector on the mask coordinates, module by module.

    Fast path when the merger supports the method on masked coordinates (and the unit carries the
    task vectors); otherwise the dense path: each constituent's ΔW module, merged, then gathered.
    """
    store = ArtifactStore(unit.store_root)

    def build(tmp: Path) -> None:
        merger = unit.plugin.build()
        mask = load_mask(unit.mask_dir)
        job = MergeJob(unit.spec.target_id, unit.spec.method, unit.spec.tasks, unit.spec.weights, unit.spec.seed)
        if unit.vectors_path is not None and supports_masked(merger, job.method):
            vector = torch.from_numpy(masked_target(merger, job, mask, unit.vectors_path, unit.statistics_dirs,
                                                    unit.plugin.label))
        else:
            vector = _dense_target(unit, merger, mask, job)
        if not torch.isfinite(vector).all():
            raise PluginError("merger", unit.plugin.label, f"target {unit.spec.target_id} has NaN or inf")
        atomic_save_tensors(tmp / "target.safetensors", {"vector": vector})
        atomic_write_json(tmp / "target.json", unit.spec.as_dict())

    return store.produce("targets", unit.key, build, {"target": unit.spec.target_id})


def _dense_target(unit: MergeUnit, merger: Any, mask: Mask, job: MergeJob) -> torch.Tensor:
    adapters = [LoraAdapter(p, name) for p, name in zip(unit.adapter_dirs, unit.spec.tasks)]
    pieces = []
    for module, idx in mask.indices.items():
        shape = mask.shapes[module]
        deltas = [a.delta(module) if module in a.modules else torch.zeros(shape) for a in adapters]
        with plugin_errors("merger", unit.plugin.label):
            merged = merger.merge_module(job, module, deltas)
        if tuple(merged.shape) != tuple(shape):
            raise PluginError("merger", unit.plugin.label,
                              f"returned shape {tuple(merged.shape)} for {module}, expected {shape}")
        pieces.append(merged.reshape(-1).to(torch.float64)[torch.from_numpy(idx)])
        del deltas, merged
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)


@dataclass(frozen=True)
class DecomposeUnit:
    plugin: ResolvedPlugin
    problem: DecompositionProblem
    target_id: str


def decompose_unit(unit: DecomposeUnit) -> Decomposition:
    decomposer = unit.plugin.build()
    with plugin_errors("decomposer", unit.plugin.label):
        result = decomposer.decompose(unit.problem)
    return check_decomposition(result, unit.problem, unit.plugin.label, unit.target_id)


def check_decomposition(result: Any, problem: DecompositionProblem, label: str, target_id: str) -> Decomposition:
    """Reject what a decomposer may not return, naming the plugin."""
    if not isinstance(result, Decomposition):
        raise PluginError("decomposer", label, f"returned {type(result).__name__}, expected Decomposition")
    n_atoms = problem.dictionary.shape[1]
    coef = np.asarray(result.coefficients, dtype=np.float64).reshape(-1)
    recon = np.asarray(result.reconstruction, dtype=np.float64).reshape(-1)
    if coef.shape[0] != n_atoms:
        raise PluginError("decomposer", label,
                          f"returned {coef.shape[0]} coefficients for {n_atoms} atoms (target {target_id})")
    if recon.shape[0] != problem.target.shape[0]:
        raise PluginError("decomposer", label,
                          f"returned a reconstruction of length {recon.shape[0]}, expected {problem.target.shape[0]}")
    if not (np.isfinite(coef).all() and np.isfinite(recon).all()):
        raise PluginError("decomposer", label, f"returned NaN or inf (target {target_id})")
    support = None
    if result.support is not None:
        support = np.asarray(result.support, dtype=bool).reshape(-1)
        if support.shape[0] != n_atoms:
            raise PluginError("decomposer", label, f"returned a support of length {support.shape[0]}")
    return Decomposition(coef, recon, support, result.out_of_dictionary, dict(result.info))


@contextmanager
def plugin_errors(stage: str, label: str) -> Iterator[None]:
    """Turn an exception escaping a plugin into a one-line :class:`PluginError`."""
    try:
        yield
    except UnmergeError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PluginError(stage, label, f"raised {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def save_mask(directory: Path, mask: Mask) -> None:
    atomic_save_tensors(directory / "mask.safetensors",
                        {m: torch.from_numpy(np.asarray(idx, dtype=np.int64)) for m, idx in mask.indices.items()})
    atomic_write_json(directory / "mask.json",
                      {"modules": list(mask.indices), "shapes": {m: list(s) for m, s in mask.shapes.items()},
                       "size": mask.size})


def load_mask(directory: Path) -> Mask:
    meta = json.loads((directory / "mask.json").read_text())
    tensors = load_tensors(directory / "mask.safetensors")
    indices = {m: tensors[m].numpy() for m in meta["modules"]}
    shapes = {m: (int(s[0]), int(s[1])) for m, s in meta["shapes"].items()}
    return Mask(indices, shapes)


def masked_vector(adapter: LoraAdapter, mask: Mask) -> np.ndarray:
    """The adapter's ΔW on the mask coordinates, formed without dense matrices."""
    parts = []
    for module, idx in mask.indices.items():
        if module in adapter.modules:
            parts.append(adapter.values_at(module, np.asarray(idx)))
        else:
            parts.append(np.zeros(len(idx)))
    return np.concatenate(parts) if parts else np.zeros(0)


# --------------------------------------------------------------------------------------------------
# Stage bookkeeping
# --------------------------------------------------------------------------------------------------


@dataclass
class StageTiming:
    stage: str
    seconds: float
    peak_rss_mb: float
    jobs: int
    reused: int
    cpu_seconds: float = 0.0  # user + system CPU of this process during the stage (all threads)


@dataclass
class RunResult:
    run_dir: Path
    table: ResultTable
    timings: list[StageTiming] = field(default_factory=list)


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class Runner:
    """Executes a validated :class:`Manifest`.

    Args:
        manifest: From :func:`unmerge_core.manifest.load_manifest`.
        executor: Runs the units of work; sequential by default.
        progress: Show progress bars.
        echo: Where to print the summary lines (``print`` by default).
    """

    def __init__(self, manifest: Manifest, *, executor: Executor | None = None, progress: bool = True,
                 echo: Callable[[str], None] = print) -> None:
        self.m = manifest
        self.run_dir = manifest.run_dir
        self.store = ArtifactStore(self.run_dir)
        self.executor = executor or SequentialExecutor(progress=progress)
        self.progress = progress
        self.echo = echo
        self.timings: list[StageTiming] = []

    @contextmanager
    def _stage(self, name: str, jobs: int = 0, reused: int = 0) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        self.timings.append(StageTiming(name, time.perf_counter() - start, _peak_rss_mb(), jobs, reused,
                                        time.process_time() - cpu_start))

    def run(self) -> RunResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.m.path, self.run_dir / "manifest.toml")
        adapter_dirs = self.train()
        mask_dir = self.build_mask(adapter_dirs)
        mask = load_mask(mask_dir)
        vectors = self.task_vectors(adapter_dirs, mask)
        specs = generate_targets(self.m)
        targets = self.merge(specs, adapter_dirs, mask_dir)
        context = RunContext(adapter_dirs, {t.name: t for t in self.m.all_tasks}, mask, self.m.merger.build(),
                             self.m.seed, self.run_dir)
        table = self.decompose_and_score(specs, targets, vectors, mask, context)
        from .attribute import score_external_targets  # manifest [[targets]]; lazy: attribute imports runner

        score_external_targets(self, table, vectors, mask, context)
        with self._stage("report"):
            write_results(self.run_dir, table, self.m)
        self._write_timings()
        return RunResult(self.run_dir, table, self.timings)

    # -- stages ------------------------------------------------------------------------------------
    def adapter_key(self, task: TaskInfo) -> str:
        return content_key("adapter", self.m.trainer.config(), task.name, task.category, dict(task.source),
                           derive_seed(self.m.seed, "train", task.name))

    def train(self) -> dict[str, Path]:
        workspace = self.run_dir / "cache" / "workspace" / content_key(self.m.trainer.config())
        units = [
            TrainUnit(self.m.trainer, task, self.adapter_key(task), derive_seed(self.m.seed, "train", task.name),
                      self.run_dir, workspace, i)
            for i, task in enumerate(self.m.all_tasks)
        ]
        reused = sum(self.store.exists("adapters", u.key) for u in units)
        with self._stage("trainer", len(units), reused):
            paths = self.executor.map(train_unit, units, desc=f"train ({self.m.trainer.label})")
        out = {u.task.name: p for u, p in zip(units, paths)}
        atomic_write_json(self.run_dir / "adapters.json", {k: str(v) for k, v in out.items()})
        return out

    def build_mask(self, adapter_dirs: dict[str, Path]) -> Path:
        known_keys = [self.adapter_key(t) for t in self.m.known]
        key = content_key("mask", self.m.masker.config(), known_keys)
        reused = int(self.store.exists("masks", key))

        def build(tmp: Path) -> None:
            masker = self.m.masker.build()
            adapters = [LoraAdapter(adapter_dirs[t.name], t.name) for t in self.m.known]
            with plugin_errors("masker", self.m.masker.label):
                mask = masker.build_mask(adapters)
            if not isinstance(mask, Mask) or mask.size == 0:
                raise PluginError("masker", self.m.masker.label, "returned an empty mask or not a Mask")
            save_mask(tmp, mask)

        with self._stage("masker", 1, reused):
            return self.store.produce("masks", key, build)

    def task_vectors(self, adapter_dirs: dict[str, Path], mask: Mask) -> dict[str, np.ndarray]:
        with self._stage("task-vectors", len(adapter_dirs)):
            vectors = {
                t.name: masked_vector(LoraAdapter(adapter_dirs[t.name], t.name), mask)
                for t in progress(self.m.all_tasks, desc="task vectors", enabled=self.progress)
            }
            atomic_save_tensors(self.run_dir / "task_vectors.safetensors",
                                {k: torch.from_numpy(v) for k, v in vectors.items()})
        return vectors

    def merge(self, specs: Sequence[TargetSpec], adapter_dirs: dict[str, Path], mask_dir: Path) -> dict[str, np.ndarray]:
        vectors_path = self.run_dir / "task_vectors.safetensors"
        fast = vectors_path.is_file()
        stats = self.merge_statistics(specs, adapter_dirs, mask_dir) if fast else {}
        units = []
        for spec in specs:
            key = content_key("target", self.m.merger.config(), spec.as_dict(),
                              [self.adapter_key(self._task(t)) for t in spec.tasks], mask_dir.name)
            units.append(MergeUnit(self.m.merger, spec, key, tuple(adapter_dirs[t] for t in spec.tasks),
                                   mask_dir, self.run_dir, vectors_path if fast else None,
                                   tuple(stats.get(t) for t in spec.tasks)))
        reused = sum(self.store.exists("targets", u.key) for u in units)
        with self._stage("merger", len(units), reused):
            paths = self.executor.map(merge_unit, units, desc=f"merge ({self.m.merger.label})")
        atomic_write_json(self.run_dir / "targets.json", [s.as_dict() for s in specs])
        return {s.target_id: load_tensors(p / "target.safetensors")["vector"].numpy() for s, p in zip(specs, paths)}

    def merge_statistics(self, specs: Sequence[TargetSpec], adapter_dirs: dict[str, Path],
                         mask_dir: Path) -> dict[str, Path]:
        """Fast path, step 1: per-(task, module) statistics of the tasks whose targets need them."""
        merger = self.m.merger.build()
        tasks = sorted({t for s in specs if needs_statistics(merger, s.method) for t in s.tasks})
        if not tasks:
            return {}
        units = [StatisticsUnit(self.m.merger, t, adapter_dirs[t],
                                statistics_key(self.adapter_key(self._task(t)), merger, mask_dir.name), mask_dir,
                                self.run_dir) for t in tasks]
        reused = sum(self.store.exists("merge-stats", u.key) for u in units)
        with self._stage("merge-statistics", len(units), reused):
            paths = self.executor.map(statistics_unit, units, desc="merge statistics")
        return dict(zip(tasks, paths))

    def decompose_and_score(self, specs: Sequence[TargetSpec], targets: dict[str, np.ndarray],
                            vectors: dict[str, np.ndarray], mask: Mask, context: RunContext | None = None) -> ResultTable:
        atom_names = tuple(t.name for t in self.m.known)
        dictionary = np.stack([vectors[a] for a in atom_names], axis=1)
        categories = {t.name: t.category for t in self.m.all_tasks}
        groups = mask.slices()
        metrics = [(r, r.build()) for r in self.m.metrics]
        table = ResultTable(atom_names=atom_names)
        units = [
            DecomposeUnit(d, DecompositionProblem(dictionary, targets[s.target_id], atom_names, groups,
                                                  derive_seed(s.seed, "decompose", d.label)), s.target_id)
            for d in self.m.decomposers for s in specs
        ]
        with self._stage("decomposer", len(units)), blas_threads():
            results = self.executor.map(decompose_unit, units, desc="decompose")
        with self._stage("metric", len(units)), blas_threads():
            by_id = {s.target_id: s for s in specs}
            for unit, result in progress(list(zip(units, results)), desc="metrics", enabled=self.progress):
                spec = by_id[unit.target_id]
                job = MergeJob(spec.target_id, spec.method, spec.tasks, spec.weights, spec.seed)
                evaluation = TargetEvaluation(spec.target_id, spec.group, spec.method, spec.tasks, spec.weights,
                                              atom_names, targets[spec.target_id], result, vectors, categories,
                                              job, context, decomposer=unit.plugin.label)
                values: dict[str, float | None] = {}
                for ref, metric in metrics:
                    with plugin_errors("metric", ref.label):
                        for k, v in dict(metric.compute(evaluation)).items():
                            values[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                table.add(unit.plugin.label, spec, result, values)
        return table

    def _task(self, name: str) -> TaskInfo:
        for t in self.m.all_tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def _write_timings(self) -> None:
        rows = [t.__dict__ for t in self.timings]
        atomic_write_json(self.run_dir / "timings.json", rows)
