"""Run a manifest: train → mask → merge → decompose → score, reusing every finished artifact.

Order of work: adapters are trained first (one job per task); the mask depends only on the dictionary
adapters, so it is built next; targets are then merged module by module and kept only on the mask
coordinates (no merged checkpoint is written); every decomposer is run on every target; metrics score
each decomposition. Each unit of work has a serialisable input (a dataclass of paths, names and
validated params) and is run by an :class:`~unmerge_core.pipeline.executor.Executor`.

Crash safety: every unit's result is an artifact written atomically and keyed by its inputs
(:mod:`unmerge_core.io.store`), decompositions and metric values included, so a killed run loses only
the unit in progress. ``run.json`` says whether the run directory is complete: it is written
``running`` first and ``complete`` last, after every result file.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmerge_core import __version__
from unmerge_core.config.manifest import Manifest, ResolvedPlugin
from unmerge_core.config.targets import manifest_model
from unmerge_core.errors import PluginError, UnmergeError, plugin_errors
from unmerge_core.io.activations import check_input_statistics, load_input_statistics, save_input_statistics
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.code import module_closure_digest
from unmerge_core.io.gguf import model_source
from unmerge_core.io.masks import check_mask, load_mask, masked_vector, save_mask
from unmerge_core.io.store import (
    ArtifactStore,
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temporaries,
    content_key,
    derive_seed,
    load_tensors,
    remove_tree,
)
from unmerge_core.pipeline.delta_pass import StatisticsRequest, shared_pass
from unmerge_core.pipeline.executor import Executor, Progress, SequentialExecutor, progress
from unmerge_core.pipeline.external import score_external_targets
from unmerge_core.pipeline.merging import (
    STATISTICS_FILE,
    VALUES_FILE,
    StatisticsUnit,
    base_fingerprint,
    base_model_path,
    dense_masked_vector,
    lowrank_masked_vector,
    masked_target,
    needs_activations,
    needs_base_weights,
    needs_statistics,
    run_target_deltas,
    statistics_key,
    statistics_unit,
    supports_lowrank,
    supports_masked,
)
from unmerge_core.pipeline.parallel import blas_threads
from unmerge_core.pipeline.protocol import generate_targets
from unmerge_core.pipeline.run_directory import RunDirectory, check_not_in_store, manifest_identity, redo_stages
from unmerge_core.pipeline.scoring import (
    ScoreLoop,
    ScoreTarget,
    check_decomposition,
    decompose_unit,
    dictionary_warnings,
    identical_atoms,
)
from unmerge_core.report.files import write_results
from unmerge_core.report.tables import ResultTable
from unmerge_core.types import (
    FoldingMasker,
    InputStatisticsJob,
    InputStatisticsTrainer,
    Mask,
    MergeJob,
    RunContext,
    StreamingStatisticsMerger,
    TaskInfo,
    TrainJob,
)

__all__ = ["RunResult", "Runner", "StageTiming", "check_decomposition", "decompose_unit", "load_mask",
           "masked_vector", "plugin_errors", "read_status", "save_mask"]

STATUS_FILE = "run.json"



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

    @property
    def progress_name(self) -> str:  # the name a plain progress line gives it
        return self.task.name


def training_name(task: str, variant: str = "") -> str:
    """The name of one training of a task: ``task`` for the dictionary's trainer, ``task@variant`` otherwise."""
    return f"{task}@{variant}" if variant else task


def constituent_trainings(job: MergeJob) -> tuple[str, ...]:
    """The training each constituent of a target was made from."""
    return tuple(training_name(t, job.source(i)) for i, t in enumerate(job.tasks))


def train_unit(unit: TrainUnit) -> Path:
    """Train one task's adapter into the cache (no-op when it is already there)."""
    store = ArtifactStore(unit.store_root)

    def build(tmp: Path) -> None:
        unit.workspace.mkdir(parents=True, exist_ok=True)
        job = TrainJob(task=unit.task, output_dir=tmp, seed=unit.seed, workspace=unit.workspace,
                       task_index=unit.task_index)
        with plugin_errors("trainer", unit.plugin.label):
            trainer = unit.plugin.instance()
            trainer.train(job)
        try:
            LoraAdapter(tmp, unit.task.name)  # the trainer must have written a readable adapter
        except UnmergeError as exc:
            raise PluginError("trainer", unit.plugin.label, f"wrote an unreadable adapter for task "
                                                            f"{unit.task.name}: {exc}") from None

    meta = {"task": unit.task.name, "trainer": unit.plugin.config()}
    return store.produce("adapters", unit.key, build, meta)


@dataclass(frozen=True)
class RoutedDenseMerge:
    """:attr:`RunContext.dense_merge` of a run: each target's full ΔW by the merger of its method."""

    mergers: Mapping[str, ResolvedPlugin]
    adapter_dirs: Mapping[str, Path]
    base_model: Path | None = None
    # (task, batches) -> that task's input statistics, for activation-scaled methods
    input_dirs: Mapping[tuple[str, int], Path] = field(default_factory=dict)

    def __call__(self, job: MergeJob) -> Iterator[tuple[str, torch.Tensor]]:
        plugin = self.mergers[job.method]
        merger = plugin.instance()
        inputs = None
        if needs_activations(merger, job.method):
            batches = int(merger.activation_batches)
            inputs = {t: load_input_statistics(self.input_dirs[(t, batches)]) for t in job.tasks
                      if (t, batches) in self.input_dirs}
        return run_target_deltas(merger, self.adapter_dirs, plugin.label, job, self.base_model, inputs)


@dataclass(frozen=True)
class InputStatisticsUnit:
    """One task's input statistics on the base model (for activation-scaled merges)."""

    plugin: ResolvedPlugin  # the dictionary's trainer, which runs its base model on the task's data
    task: TaskInfo
    seed: int
    workspace: Path
    modules: tuple[str, ...]
    widths: tuple[int, ...]  # each module's input features
    max_batches: int
    key: str
    store_root: Path

    @property
    def progress_name(self) -> str:  # the name a plain progress line gives it
        return self.task.name


def input_statistics_unit(unit: InputStatisticsUnit) -> Path:
    """Record one task's input statistics into the cache (no-op when they are there)."""
    store = ArtifactStore(unit.store_root)

    def build(tmp: Path) -> None:
        job = InputStatisticsJob(unit.task, unit.seed, unit.workspace, unit.modules, unit.max_batches)
        with plugin_errors("trainer", unit.plugin.label):
            trainer = unit.plugin.instance()
            if not isinstance(trainer, InputStatisticsTrainer):
                raise PluginError("trainer", unit.plugin.label, "cannot record input statistics (it has no "
                                                                "input_statistics method)")
            stats = dict(trainer.input_statistics(job))
        check_input_statistics(stats, unit.modules, dict(zip(unit.modules, unit.widths)),
                               f"trainer '{unit.plugin.label}', task {unit.task.name}")
        save_input_statistics(tmp, {m: stats[m] for m in unit.modules},
                              {"task": unit.task.name, "batches": unit.max_batches})

    return store.produce("input-stats", unit.key, build, {"task": unit.task.name, "batches": unit.max_batches})


@dataclass(frozen=True)
class MergeUnit:
    plugin: ResolvedPlugin
    spec: MergeJob
    key: str
    adapter_dirs: tuple[Path, ...]
    mask_dir: Path
    store_root: Path
    # fast path (masked_merge): the run's masked task vectors and, per constituent, its statistics
    vectors_path: Path | None = None
    statistics_dirs: tuple[Path | None, ...] = ()
    trainings: tuple[str, ...] = ()  # the constituents' training names (their vectors' names)
    base_model: Path | None = None  # for methods defined on full weights
    input_dirs: tuple[Path, ...] = ()  # per constituent, its task's input statistics (activation methods)

    @property
    def progress_name(self) -> str:  # the name a plain progress line gives it
        return self.spec.target_id


ZERO_TARGET_MIN_COORDINATES = 32
"""A target that is zero on the mask is refused when a constituent is non-zero on at least this many
mask coordinates: a random drop (DARE at density 0.5) empties so many only with probability 2⁻³²,
whereas on a handful of coordinates it happens by chance and is a legitimate target."""


def merge_unit(unit: MergeUnit) -> Path:
    """Form one target's task vector on the mask coordinates, module by module.

    Fast path when the merger supports the method on masked coordinates (and the unit carries the
    task vectors); the low-rank path when it forms the method from LoRA factors; otherwise the dense
    path: each constituent's ΔW module, merged, then gathered.
    """
    store = ArtifactStore(unit.store_root)

    def build(tmp: Path) -> None:
        with plugin_errors("merger", unit.plugin.label):
            merger = unit.plugin.instance()
        mask = load_mask(unit.mask_dir)
        job = unit.spec
        if unit.vectors_path is not None and supports_masked(merger, job.method):
            vector = torch.from_numpy(masked_target(merger, job, mask, unit.vectors_path, unit.statistics_dirs,
                                                    unit.plugin.label, unit.trainings or job.tasks))
        else:
            adapters = [LoraAdapter(p, name) for p, name in zip(unit.adapter_dirs, unit.spec.tasks)]
            if supports_lowrank(merger, job.method):
                vector = torch.from_numpy(lowrank_masked_vector(merger, job, adapters, mask, unit.plugin.label))
            else:
                inputs = [load_input_statistics(d) for d in unit.input_dirs] if unit.input_dirs else None
                vector = torch.from_numpy(dense_masked_vector(merger, job, adapters, mask, unit.plugin.label,
                                                              unit.base_model, inputs))
        if not torch.isfinite(vector).all():
            raise PluginError("merger", unit.plugin.label,
                              f"target {job.target_id} ({job.method}) has NaN or inf although its constituents are "
                              "finite: the merge overflowed (check merger.params, e.g. lambda, and the adapters' scale)")
        if not vector.any() and max((int(np.count_nonzero(masked_vector(LoraAdapter(p, n), mask)))
                                     for p, n in zip(unit.adapter_dirs, unit.spec.tasks)),
                                    default=0) >= ZERO_TARGET_MIN_COORDINATES:
            raise PluginError("merger", unit.plugin.label,
                              f"target {job.target_id} ({job.method}) is zero on every mask coordinate although its "
                              "constituents are not: these merge parameters remove everything (check merger.params, "
                              "e.g. a threshold or epsilon above the weights' scale)")
        atomic_save_tensors(tmp / "target.safetensors", {"vector": vector})
        atomic_write_json(tmp / "target.json", unit.spec.as_dict())

    return store.produce("targets", unit.key, build, {"target": unit.spec.target_id})


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
class StageCount:
    """Units of work of a stage, and how many of them were reused from the store."""

    jobs: int
    reused: int


@dataclass
class RunResult:
    run_dir: Path
    table: ResultTable
    timings: list[StageTiming] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run directory's ``run.json`` (``status``: ``running`` or ``complete``), or ``None``."""
    path = run_dir / STATUS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "unknown"}
    return data if isinstance(data, dict) else {"status": "unknown"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, UnmergeError) else f"{type(exc).__name__}: {first}".rstrip(": ")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def manifest_executor(manifest: Manifest, progress: Progress = True) -> Executor:
    """The executor a manifest asks for: sequential in this process, or Ray tasks."""
    config = manifest.file.executor
    if config.kind == "local":
        return SequentialExecutor(progress=progress)
    from unmerge_core.pipeline.ray_executor import RayExecutor

    return RayExecutor(manifest.store_dir, address=config.address, num_cpus_per_task=config.num_cpus_per_task,
                       num_gpus_per_task=config.num_gpus_per_task, max_retries=config.max_retries, progress=progress)


class Runner:
    """Executes a validated :class:`Manifest`.

    Args:
        manifest: From :func:`unmerge_core.config.manifest.load_manifest`.
        executor: Runs the units of work; default: the manifest's ``executor`` (local: sequential).
        progress: Show progress bars (``"lines"``: plain progress lines, for a log or a pipe).
        plots: Write the PNG plots (``--no-plots`` turns them off).
        echo: Where to print notes and warnings (standard error by default).
        redo: Recompute this stage's cached work and every later stage's (:func:`redo_stages`):
            ``trainer``, ``masker``, ``merger``, ``decomposer``, ``metric`` or ``all``.
    """

    def __init__(self, manifest: Manifest, *, executor: Executor | None = None, progress: Progress = True,
                 echo: Callable[[str], None] = _stderr, plots: bool = True, redo: str | None = None) -> None:
        self.m = manifest
        self.run_dir = manifest.run_dir
        self.store = ArtifactStore(manifest.store_dir)
        self.executor = executor or manifest_executor(manifest, progress)
        self.progress = progress
        self.plots = plots
        self.echo = echo
        self.timings: list[StageTiming] = []
        self.warnings: list[str] = []
        self._stage_name = "start"
        self.redo = redo_stages(redo)
        self._redone: set[tuple[str, str]] = set()
        self._directory = RunDirectory(self.run_dir, manifest_identity(manifest.path, self._manifest_text()),
                                       manifest.path, keep=(self.store.root / "cache",))

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            self.echo(f"warning: {message}")

    @contextmanager
    def stage(self, name: str, jobs: int = 0, reused: int = 0) -> Iterator[StageCount]:
        """Time a stage (wall, CPU, peak RSS) and record it in ``run.json`` while it runs.

        Yields the stage's :class:`StageCount`: a stage that learns how much it reused only while it
        runs (cached decompositions, cached metric values) sets ``reused`` on it."""
        self._stage_name = name
        self._write_status("running")
        count = StageCount(jobs, reused)
        start, cpu_start = time.perf_counter(), time.process_time()
        yield count
        self.timings.append(StageTiming(name, time.perf_counter() - start, _peak_rss_mb(), count.jobs,
                                        count.reused, time.process_time() - cpu_start))

    def run(self) -> RunResult:
        """Run every stage; ``run.json`` ends ``complete``, or ``failed`` / ``interrupted`` with the error."""
        self._claim_run_dir()
        try:
            self._open_run_dir()
            return self._run()
        except KeyboardInterrupt:
            self._try_status("interrupted")
            raise
        except BaseException as exc:
            self._try_status("failed", error=_first_line(exc))
            raise
        finally:
            self._directory.release()

    def _try_status(self, status: str, error: str | None = None) -> None:
        try:
            self._write_status(status, error)
        except OSError:  # a full disk or a vanished directory: the error itself is what the user sees
            pass

    def _forget(self, stage: str, kind: str, key: str) -> None:
        """Under ``--redo``: remove a cached artifact of ``stage`` before its stage runs (once per run)."""
        if stage in self.redo and (kind, key) not in self._redone:
            self._redone.add((kind, key))
            self.store.discard(kind, key)

    def _run(self) -> RunResult:
        adapter_dirs = self.train()
        specs = generate_targets(self.m)
        mask_dir = self.build_mask(adapter_dirs, specs)
        mask = load_mask(mask_dir)
        vectors = self.task_vectors(adapter_dirs, mask)
        atoms = self.m.atoms
        atom_names = tuple(a.name for a in atoms)
        skills = tuple(a.skill for a in atoms) if self.m.file.tasks.dictionary_variants else ()
        dictionary = np.stack([vectors[a] for a in atom_names], axis=1)
        for first, second in identical_atoms(dictionary, atom_names, skills)[:1]:
            raise UnmergeError(f"dictionary tasks {first!r} and {second!r} have identical adapters (the same ΔW on "
                               "the mask): no decomposer can tell them apart; give each task its own adapter")
        for message in dictionary_warnings(dictionary, atom_names):
            self.warn(message)
        base_model = self.full_weight_base(specs, adapter_dirs)
        input_dirs = self.input_statistics(specs, adapter_dirs)
        targets = self.merge(specs, adapter_dirs, mask_dir, base_model, input_dirs)
        context = RunContext(adapter_dirs, {t.name: t for t in self.m.all_tasks}, mask, self.m.merger.instance(),
                             self.m.seed, self.run_dir, tuple(specs),
                             RoutedDenseMerge({m: self.m.merger_for(m) for m in self.m.protocol.methods},
                                              adapter_dirs, base_model, input_dirs))
        metrics = [(r, r.build()) for r in self.m.metrics]
        categories = {name: self._task(name.partition("@")[0]).category for name in adapter_dirs}
        loop = ScoreLoop(
            atom_names, dictionary, mask.slices(), self.m.decomposers, metrics, skills=skills,
            task_vectors=vectors, categories=categories, context=context,
            cache_dir=self.store.root / "cache", dictionary_key=self.dictionary_key(mask_dir.name),
            evaluation_key=self.evaluation_key(mask_dir.name, specs),
            executor=self.executor, show_progress=self.progress,
            redo_decompositions="decomposer" in self.redo, redo_metrics="metric" in self.redo)
        table = ResultTable(atom_names=atom_names)
        score_targets = [ScoreTarget(s, targets[s.target_id][0], targets[s.target_id][1]) for s in specs]
        with self.stage("decomposer", len(score_targets) * len(self.m.decomposers)) as count, blas_threads():
            decomposed = loop.decompose(score_targets)
            count.reused = loop.reused_decompositions
        with self.stage("metric", len(decomposed)) as count, blas_threads():
            for scored in loop.score(decomposed):
                table.add(scored.decomposer, scored.spec, scored.decomposition, scored.metrics)
            count.reused = loop.reused_metric_sets
        if self.m.file.targets:
            extended = loop.with_metrics([(r, r.build()) for r in self.m.report_metrics])
            with self.stage("external-targets", len(self.m.file.targets) * len(self.m.decomposers)), blas_threads():
                for scored in score_external_targets(self.m, extended, mask, self.store, self.run_dir, self.warn,
                                                     redo="merger" in self.redo):
                    table.add(scored.decomposer, scored.spec, scored.decomposition, scored.metrics)
        with self.stage("report"):
            write_results(self.run_dir, table, self.m.name, self.warnings, plots=self.plots)
        self._write_timings()
        self._write_status("complete")
        return RunResult(self.run_dir, table, self.timings, self.warnings)

    # -- run directory -----------------------------------------------------------------------------
    def _claim_run_dir(self) -> None:
        """Create the run directory and hold it for this manifest (:mod:`.run_directory`); the first run
        to hold it clears the previous run's results, after noting how that run ended."""
        check_not_in_store(self.run_dir, self.store.root / "cache")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UnmergeError(f"cannot create the run directory {self.run_dir}: {exc.strerror or exc}") from None
        previous = read_status(self.run_dir)
        self._directory.claim()
        if previous is not None and self._directory.first:
            self._note_previous(previous)

    def _open_run_dir(self) -> None:
        removed = clean_stale_temporaries(self.run_dir) + (
            clean_stale_temporaries(self.store.root) if self.store.root != self.run_dir else 0)
        if removed:
            self.echo(f"note: removed {removed} temporary file(s) left by a killed run")
        self._write_status("running")
        atomic_write_text(self.run_dir / "manifest.toml", self._manifest_text())

    def _manifest_text(self) -> str:
        return self.m.path.read_text(encoding="utf-8-sig")

    def _note_previous(self, previous: Mapping[str, Any]) -> None:
        """Say how the directory's previous run ended, when it did not complete."""
        status, stage = previous.get("status"), previous.get("stage", "unknown")
        if status == "complete":
            return
        if status == "failed":
            how = f"failed during '{stage}': {previous.get('error') or 'an error'}"
        elif status == "interrupted":
            how = f"was interrupted during '{stage}'"
        else:
            how = f"stopped during '{stage}': killed or crashed"
        self.echo(f"note: the previous run in {self.run_dir} {how}; finished work is reused")

    def _write_status(self, status: str, error: str | None = None) -> None:
        """Write ``run.json`` (and remember the run's result files for the next run to clear). Of several
        runs of one manifest at once, only the last to finish says ``complete``."""
        if status == "complete" and not self._directory.is_last():
            return
        self._directory.record_outputs()
        atomic_write_json(self.run_dir / STATUS_FILE, {
            "status": status, "stage": self._stage_name if status != "complete" else None,
            "manifest": os.path.abspath(self.m.path), "unmerge": __version__, "warnings": self.warnings,
            **({"error": error} if error else {}),
        })

    # -- stages ------------------------------------------------------------------------------------
    def adapter_key(self, task: TaskInfo, variant: str = "") -> str:
        """Cache key of one training: the trainer's configuration, the task's registry entry, the seed."""
        trainer = self.m.variant(variant).trainer if variant else self.m.trainer
        parts: list[Any] = [trainer.config(), task.name, task.category, dict(task.source),
                            self._train_seed(task, variant)]
        fingerprint = getattr(trainer.instance(), "source_fingerprint", None)
        if fingerprint is not None:  # a trainer that copies adapters: their files are part of the key
            with plugin_errors("trainer", trainer.label):
                parts.append(fingerprint(task))
        return content_key("adapter", *parts)

    def training_key(self, training: str) -> str:
        """:meth:`adapter_key` of a training name (``task`` or ``task@variant``)."""
        task, _, variant = training.partition("@")
        return self.adapter_key(self._task(task), variant)

    def _train_seed(self, task: TaskInfo, variant: str) -> int:
        # a variant is an independent training even with the trainer's parameters: its own seeds
        return derive_seed(self.m.seed, "train", task.name, *([variant] if variant else []))

    def trainings(self) -> list[tuple[str, ResolvedPlugin, TaskInfo]]:
        """Every training of the run, in the order they are trained: (variant name or ``""``, trainer, task)."""
        plans = [("", self.m.trainer, task) for task in self.m.all_tasks]
        for variant in self.m.variants:
            plans += [(variant.name, variant.trainer, self._task(t)) for t in variant.tasks]
        return plans

    def train(self) -> dict[str, Path]:
        """Every adapter of the run, by training name: ``task`` (the dictionary's trainer) and
        ``task@variant`` (each ``[[variants]]`` entry's trainer, for its tasks)."""
        workspace = self.store.root / "cache" / "workspace" / content_key(self.m.trainer.config())
        plans = self.trainings()
        units = [TrainUnit(trainer, task, self.adapter_key(task, variant), self._train_seed(task, variant),
                           self.store.root, workspace if not variant else
                           self.store.root / "cache" / "workspace" / content_key(trainer.config()), i)
                 for i, (variant, trainer, task) in enumerate(plans)]
        if "trainer" in self.redo:
            for unit in units:
                self._forget("trainer", "adapters", unit.key)
            for workspace_dir in {u.workspace for u in units}:  # what the trainer built besides adapters
                remove_tree(workspace_dir)
        reused = sum(self.store.exists("adapters", u.key) for u in units)
        with self.stage("trainer", len(units), reused):
            paths = self.executor.map(train_unit, units, desc=f"train ({self.m.trainer.label})")
        out = {training_name(task.name, variant): p for (variant, _, task), p in zip(plans, paths)}
        atomic_write_json(self.run_dir / "adapters.json", {k: str(v) for k, v in out.items()})
        self._link_by_name(out)
        return out

    def _link_by_name(self, adapter_dirs: Mapping[str, Path]) -> None:
        """``<run>/dictionary/<skill>``: a link to each dictionary adapter (the store names them by hash),
        and ``<run>/base``: a link to the local base model the adapters were trained on, so a user can
        pass ``--dictionary runs/NAME/dictionary --base runs/NAME/base`` to ``unmerge attribute`` or
        mergekit without typing a hash. Links are replaced on every run; a file system without symbolic
        links gets none (a note, nothing fails)."""
        folder = self.run_dir / "dictionary"
        try:
            remove_tree(folder)
            folder.mkdir()
            for atom in self.m.atoms:
                if atom.name in adapter_dirs:
                    (folder / atom.name).symlink_to(Path(adapter_dirs[atom.name]).resolve(), target_is_directory=True)
            bases = {LoraAdapter(Path(adapter_dirs[a.name]), a.name).base_model
                     for a in self.m.atoms if a.name in adapter_dirs}
            base = self.run_dir / "base"
            remove_tree(base)
            if len(bases) == 1:
                named = next(iter(bases))
                if named is not None and Path(named).is_dir():
                    base.symlink_to(Path(named).resolve(), target_is_directory=True)
        except OSError as exc:
            self.echo(f"note: no dictionary/ and base links in {self.run_dir} ({exc.strerror or exc})")

    def build_mask(self, adapter_dirs: dict[str, Path], specs: Sequence[MergeJob] = ()) -> Path:
        """The run's mask. When the masker and a merger can share one pass over the dictionary's ΔW
        (:mod:`unmerge_core.pipeline.delta_pass`), the merge statistics of the dictionary adapters
        that ``specs`` need are made in the same pass and stored for the merge-statistics stage."""
        atoms = self.m.atoms
        key = self.mask_key()
        self._forget("masker", "masks", key)
        reused = int(self.store.exists("masks", key))
        requests = [] if reused else self._shared_statistics(specs, key)

        def build(tmp: Path) -> None:
            adapters = [LoraAdapter(adapter_dirs[a.name], a.name) for a in atoms]
            with plugin_errors("masker", self.m.masker.label):
                masker = self.m.masker.instance()
            shared = None
            if requests and isinstance(masker, FoldingMasker):
                index = {a.name: i for i, a in enumerate(atoms)}
                shared = shared_pass(masker, self.m.masker.label, adapters,
                                     [StatisticsRequest(index[t], p.instance(), p.label) for p, t, _ in requests])
            if shared is not None:
                mask = shared.mask
            else:
                with plugin_errors("masker", self.m.masker.label):
                    mask = masker.build_mask(adapters)
            mask = check_mask(mask, adapters, self.m.masker.label)
            save_mask(tmp, mask)
            if shared is not None:  # the dictionary's statistics, for the merge-statistics stage to reuse
                for (_, training, stats_key), result in zip(requests, shared.statistics):
                    if result is not None:
                        self._store_statistics(stats_key, training, *result)

        with self.stage("masker", 1, reused):
            return self.store.produce("masks", key, build)

    def mask_key(self) -> str:
        """Cache key of the run's mask: the masker's configuration and the dictionary's trainings."""
        return content_key("mask", self.m.masker.config(), [self.training_key(a.name) for a in self.m.atoms])

    def _shared_statistics(self, specs: Sequence[MergeJob], mask_key: str) -> list[tuple[ResolvedPlugin, str, str]]:
        """(merger plugin, dictionary training, statistics key) of the statistics the shared pass can
        make: those ``specs`` need from a merger that streams them, not made yet."""
        atoms = {a.name for a in self.m.atoms}
        wanted: dict[tuple[str, str], tuple[ResolvedPlugin, str, str]] = {}
        for spec in specs:
            plugin = self.m.merger_for(spec.method)
            merger = plugin.instance()
            if not (needs_statistics(merger, spec.method) and isinstance(merger, StreamingStatisticsMerger)):
                continue
            for training in constituent_trainings(spec):
                stats_key = statistics_key(self.training_key(training), merger, mask_key)
                self._forget("merger", "merge-stats", stats_key)
                if training in atoms and not self.store.exists("merge-stats", stats_key):
                    wanted.setdefault((plugin.label, training), (plugin, training, stats_key))
        return [wanted[k] for k in sorted(wanted)]

    def _store_statistics(self, key: str, training: str, stats: dict[str, dict[str, float] | None],
                          values: np.ndarray) -> None:
        def build(tmp: Path) -> None:
            atomic_write_json(tmp / STATISTICS_FILE, stats)
            atomic_save_tensors(tmp / VALUES_FILE, {"values": values})

        self.store.produce("merge-stats", key, build, {"task": training})

    def task_vectors(self, adapter_dirs: dict[str, Path], mask: Mask) -> dict[str, np.ndarray]:
        with self.stage("task-vectors", len(adapter_dirs)):
            vectors = {
                name: masked_vector(LoraAdapter(path, name), mask)
                for name, path in progress(list(adapter_dirs.items()), desc="task vectors", enabled=self.progress,
                                           name=lambda item: item[0])
            }
            atomic_save_tensors(self.run_dir / "task_vectors.safetensors",
                                {k: torch.from_numpy(v) for k, v in vectors.items()})
        return vectors

    def full_weight_base(self, specs: Sequence[MergeJob], adapter_dirs: dict[str, Path]) -> Path | None:
        """The base model of the run's full-weight merges (``None`` when it has none): the manifest's
        ``base``, else the one model every adapter those merges use names — checked over all of them
        before any target is merged, not only within each target."""
        users = [s for s in specs if needs_base_weights(self.m.merger_for(s.method).instance(), s.method)]
        if not users:
            return None
        names = sorted({n for s in users for n in constituent_trainings(s)})
        explicit = (model_source(manifest_model(self.m.path, self.m.file.base, "base"), self.store.root,
                                 f"{self.m.path}: base:") if self.m.file.base else None)
        label = self.m.merger_for(users[0].method).label
        return base_model_path([LoraAdapter(adapter_dirs[n], n) for n in names], users[0].method, label, explicit)

    def merge(self, specs: Sequence[MergeJob], adapter_dirs: dict[str, Path], mask_dir: Path,
              base_model: Path | None = None,
              input_dirs: Mapping[tuple[str, int], Path] | None = None) -> dict[str, tuple[np.ndarray, str]]:
        """Every target's masked vector and its artifact key, by target id."""
        vectors_path = self.run_dir / "task_vectors.safetensors"
        fast = vectors_path.is_file()
        stats = self.merge_statistics(specs, adapter_dirs, mask_dir) if fast else {}
        input_dirs = input_dirs or {}
        units = []
        for spec in specs:
            names = constituent_trainings(spec)
            plugin = self.m.merger_for(spec.method)
            merger = plugin.instance()
            on_base = base_model is not None and needs_base_weights(merger, spec.method)
            inputs = (tuple(input_dirs[(t, merger.activation_batches)] for t in spec.tasks)
                      if needs_activations(merger, spec.method) else ())
            key = self.target_key(spec, mask_dir.name, base_model if on_base else None, [p.name for p in inputs])
            self._forget("merger", "targets", key)
            units.append(MergeUnit(plugin, spec, key, tuple(adapter_dirs[n] for n in names),
                                   mask_dir, self.store.root, vectors_path if fast else None,
                                   tuple(stats.get((plugin.label, n)) for n in names), names,
                                   base_model if on_base else None, inputs))
        reused = sum(self.store.exists("targets", u.key) for u in units)
        labels = ", ".join(p.label for p in self.m.mergers)
        with self.stage("merger", len(units), reused):
            paths = self.executor.map(merge_unit, units, desc=f"merge ({labels})")
        atomic_write_json(self.run_dir / "targets.json", [s.as_dict() for s in specs])
        return {u.spec.target_id: (load_tensors(p / "target.safetensors")["vector"].numpy(), u.key)
                for u, p in zip(units, paths)}

    def target_key(self, spec: MergeJob, mask_key: str, base_model: Path | None = None,
                   input_keys: Sequence[str] = ()) -> str:
        """Cache key of one target: its merger's configuration, its job, its constituents' trainings, the
        mask, for a full-weight target (``base_model`` given) the base model's files, and for an
        activation-scaled one its constituents' input statistics (``input_keys``)."""
        key_parts: list[Any] = [self.m.merger_for(spec.method).config(), spec.as_dict(),
                                [self.training_key(n) for n in constituent_trainings(spec)], mask_key]
        if base_model is not None:  # a full-weight target also depends on the base model's files
            key_parts.append(base_fingerprint(base_model))
        if input_keys:
            key_parts.append(list(input_keys))
        return content_key("target", *key_parts)

    def input_statistics_units(self, specs: Sequence[MergeJob],
                               adapter_dirs: Mapping[str, Path]) -> dict[tuple[str, int], InputStatisticsUnit]:
        """The input-statistics work of ``specs``' activation-scaled targets, by (task, batches): one
        unit per task and batch count, on every module any adapter of the run adapts, keyed by
        trainer × task × seed × modules × batches (and the recording code)."""
        wanted: set[tuple[str, int]] = set()
        for spec in specs:
            merger = self.m.merger_for(spec.method).instance()
            if needs_activations(merger, spec.method):
                wanted.update((t, int(merger.activation_batches)) for t in spec.tasks)
        if not wanted:
            return {}
        widths: dict[str, int] = {}
        for name, path in sorted(adapter_dirs.items()):
            for module, shape in LoraAdapter(path, name).shapes.items():
                widths.setdefault(module, int(shape[1]))
        modules = tuple(sorted(widths))
        trainer = self.m.trainer
        workspace = self.store.root / "cache" / "workspace" / content_key(trainer.config())
        units = {}
        for task_name, batches in sorted(wanted):
            task = self._task(task_name)
            seed = self._train_seed(task, "")
            key = content_key("input-statistics", trainer.config(), task.name, task.category, dict(task.source), seed,
                              modules, batches, module_closure_digest("unmerge_core.io.activations"))
            units[(task_name, batches)] = InputStatisticsUnit(trainer, task, seed, workspace, modules,
                                                              tuple(widths[m] for m in modules), batches, key,
                                                              self.store.root)
        return units

    def input_statistics(self, specs: Sequence[MergeJob],
                         adapter_dirs: Mapping[str, Path]) -> dict[tuple[str, int], Path]:
        """Input statistics of the base model on each task's training data, for the tasks of every
        activation-scaled target, by (task, batches): recorded by the dictionary's trainer
        (:meth:`input_statistics_units`), reused from the store when there."""
        planned = self.input_statistics_units(specs, adapter_dirs)
        if not planned:
            return {}
        keys = list(planned)
        paths = self._cached_units("input-statistics", "input-stats", [planned[k] for k in keys],
                                   input_statistics_unit, f"input statistics ({self.m.trainer.label})")
        return dict(zip(keys, paths))

    def _cached_units(self, stage: str, kind: str, units: Sequence[Any], work: Callable[[Any], Path],
                      desc: str) -> list[Path]:
        """Run a merger-stage step's units (each with a ``key`` into the store's ``kind``) as stage
        ``stage``: forgotten first under ``--redo merger``, counted as reused when already there."""
        for unit in units:
            self._forget("merger", kind, unit.key)
        reused = sum(self.store.exists(kind, u.key) for u in units)
        with self.stage(stage, len(units), reused):
            return self.executor.map(work, units, desc=desc)

    def merge_statistics(self, specs: Sequence[MergeJob], adapter_dirs: dict[str, Path],
                         mask_dir: Path) -> dict[tuple[str, str], Path]:
        """Fast path, step 1: per-(task, module) statistics of the tasks whose targets need them,
        by (merger label, training name)."""
        wanted = {(label, t): StatisticsUnit(plugin, t, adapter_dirs[t], key, mask_dir, self.store.root)
                  for (label, t), (plugin, key) in self.statistics_keys(specs, mask_dir.name).items()}
        if not wanted:
            return {}
        keys = sorted(wanted)
        paths = self._cached_units("merge-statistics", "merge-stats", [wanted[k] for k in keys], statistics_unit,
                                   "merge statistics")
        return dict(zip(keys, paths))

    def dictionary_key(self, mask_key: str) -> str:
        """Identity of the dictionary on the mask (part of every decomposition's cache key)."""
        return content_key([self.training_key(a.name) for a in self.m.atoms], mask_key)

    def evaluation_key(self, mask_key: str, specs: Sequence[MergeJob]) -> str:
        """Identity of what metrics may look at besides a decomposition (part of their cache keys)."""
        adapter_keys = {training_name(task.name, variant): self.training_key(training_name(task.name, variant))
                        for variant, _, task in self.trainings()}
        return content_key(adapter_keys, mask_key, self.m.mergers_config(), [s.target_id for s in specs])

    def statistics_keys(self, specs: Sequence[MergeJob], mask_key: str) -> dict[tuple[str, str], tuple[ResolvedPlugin, str]]:
        """(merger plugin, statistics key) of every training whose targets' merge needs its statistics,
        by (merger label, training name)."""
        wanted: dict[tuple[str, str], tuple[ResolvedPlugin, str]] = {}
        for spec in specs:
            plugin = self.m.merger_for(spec.method)
            merger = plugin.instance()
            if not needs_statistics(merger, spec.method):
                continue
            for t in constituent_trainings(spec):
                if (plugin.label, t) not in wanted:
                    wanted[(plugin.label, t)] = (plugin, statistics_key(self.training_key(t), merger, mask_key))
        return wanted

    def _task(self, name: str) -> TaskInfo:
        for t in self.m.all_tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def _write_timings(self) -> None:
        rows = [t.__dict__ for t in self.timings]
        atomic_write_json(self.run_dir / "timings.json", rows)
