"""The fast merge path: targets computed on the mask coordinates only, never as dense modules.

A merger opts in by implementing the optional interface documented in
:func:`unmerge_core.hookspecs.unmerge_mergers` (``masked_methods``, ``statistics_methods``,
``statistics_config``, ``module_statistics``, ``merge_masked``). The runner then

1. computes, once per (task, module), the statistics the merger asks for (for TIES: the magnitude
   threshold) from that module's ΔW, streamed in row blocks or formed densely
   (:func:`statistics_unit`), cached in the run's :class:`~unmerge_core.io.store.ArtifactStore` under
   ``merge-stats/<key>`` where the key hashes the adapter's key, the merger's
   ``statistics_config()`` and the mask. The same pass records the module's entries at the mask
   coordinates: targets use those values for that task, so a coordinate is compared with the
   threshold in exactly the float32 numbers the threshold was taken from — no decision can flip
   on rounding;
2. merges every target from the constituents' masked values and those statistics
   (:func:`merge_masked_vector`): a few thousand numbers per module instead of millions. Tasks
   without statistics use the run's masked task vectors (formed from the LoRA factors without
   any dense module).

Peak memory of step 1 is at most one dense module per worker thread (none when the merger
streams), whatever the number of layers, tasks or targets; step 2 holds only masked vectors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmerge_core.errors import PluginError, UnmergeError, plugin_errors
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.checkpoints import Checkpoint
from unmerge_core.io.code import package_source_digest, source_identity
from unmerge_core.io.hub import resolve_model_ref
from unmerge_core.io.lowrank import BLOCK_ROWS, LowRankDelta
from unmerge_core.io.masks import load_mask
from unmerge_core.io.store import ArtifactStore, atomic_save_tensors, atomic_write_json, content_key, load_tensors
from unmerge_core.pipeline.parallel import BufferPool, thread_map
from unmerge_core.types import (
    ActivationMerger,
    BaseWeightMerger,
    InputStatistics,
    LowRankMerger,
    Mask,
    MaskedMerger,
    MergeJob,
)

STATISTICS_FILE = "statistics.json"
VALUES_FILE = "masked_values.safetensors"


def supports_lowrank(merger: Any, method: str) -> bool:
    """Whether ``merger`` forms ``method`` from the constituents' low-rank factors (:class:`LowRankMerger`)."""
    return isinstance(merger, LowRankMerger) and method in merger.lowrank_methods


def needs_base_weights(merger: Any, method: str) -> bool:
    """Whether ``method`` is defined on full weights (:class:`BaseWeightMerger`): it gets the base's module."""
    return isinstance(merger, BaseWeightMerger) and method in merger.base_methods


def needs_activations(merger: Any, method: str) -> bool:
    """Whether ``method`` scales task vectors by input statistics (:class:`ActivationMerger`)."""
    return isinstance(merger, ActivationMerger) and method in merger.activation_methods


ModuleInputs = Mapping[str, InputStatistics]
"""One task's input statistics, by module."""


def base_model_path(adapters: Sequence[LoraAdapter], method: str, label: str, base: Path | None = None) -> Path:
    """The base model a full-weight ``method`` merges on: ``base`` (the manifest's ``base``) when given,
    else the one local directory every constituent's ``base_model_name_or_path`` names."""
    if base is not None:
        return Path(base).resolve()
    named = {a.base_model for a in adapters}
    if None in named:
        raise PluginError("merger", label, f"{method} needs the base model's weights, but an adapter names no "
                                           "base model in adapter_config.json; set base = \"<model dir>\" in the manifest")
    paths = {resolve_model_ref(str(n), f"{method}: the adapters' base model").resolve() for n in named}
    if len(paths) != 1:
        shown = ", ".join(sorted(str(n) for n in named))
        raise PluginError("merger", label, f"{method} needs one base model, but the adapters name different ones "
                                           f"({shown})")
    path = next(iter(paths))
    if not path.exists():
        raise PluginError("merger", label, f"{method} needs the base model's weights: {next(iter(named))} (the "
                                           "adapters' base_model_name_or_path) is neither a local model directory "
                                           "nor a Hub id; set base = \"<model dir>\" in the manifest")
    return path


def base_fingerprint(path: Path) -> list[Any]:
    """What a full-weight target depends on besides its adapters: the base's weight files (name, size,
    modification time), so replacing the base model invalidates those targets."""
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    return [str(path), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


class BaseWeights:
    """The base model's weight of each module, read on demand from its checkpoint."""

    def __init__(self, path: Path) -> None:
        self.checkpoint = Checkpoint(path)

    def module(self, module: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = self.checkpoint.module_key(module)
        if key is None:
            raise UnmergeError(f"{self.checkpoint.path}: the base model has no weight for {module}")
        weight = self.checkpoint.tensor(key).to(torch.float32)
        if tuple(weight.shape) != tuple(shape):
            raise UnmergeError(f"{self.checkpoint.path}: {key} has shape {tuple(weight.shape)}, the adapters' "
                               f"ΔW has {tuple(shape)}")
        return weight


def supports_masked(merger: Any, method: str) -> bool:
    """Whether ``merger`` merges ``method`` on masked coordinates (the :class:`MaskedMerger` fast path)."""
    return isinstance(merger, MaskedMerger) and method in merger.masked_methods


def needs_statistics(merger: Any, method: str) -> bool:
    """Whether the masked form of ``method`` needs ``module_statistics`` of each constituent."""
    return supports_masked(merger, method) and method in merger.statistics_methods


def statistics_key(adapter_key: str, merger: Any, mask_key: str) -> str:
    """Cache key of one adapter's statistics: adapter, what the statistics depend on, the mask, and
    the code that computes them (the merger's package and the core, :mod:`unmerge_core.io.code`)."""
    config = merger.statistics_config() if isinstance(merger, MaskedMerger) else None
    code = [source_identity(merger), package_source_digest("unmerge_core")]
    return content_key("merge-stats", adapter_key, type(merger).__qualname__, config, mask_key, code)


@dataclass(frozen=True)
class StatisticsUnit:
    """Compute one adapter's per-module statistics (picklable, for any executor)."""

    plugin: Any  # ResolvedPlugin of the merger
    task: str
    adapter_dir: Path
    key: str
    mask_dir: Path
    store_root: Path
    workers: int | None = None

    @property
    def progress_name(self) -> str:  # the name a plain progress line gives it
        return self.task


def statistics_unit(unit: StatisticsUnit) -> Path:
    """One adapter's statistics and masked values, every module once (``workers`` at a time), cached."""
    store = ArtifactStore(unit.store_root)

    def build(tmp: Path) -> None:
        merger = unit.plugin.instance()
        mask = load_mask(unit.mask_dir)
        stats, values = compute_statistics(merger, LoraAdapter(unit.adapter_dir, unit.task), mask,
                                           workers=unit.workers, label=unit.plugin.label)
        atomic_write_json(tmp / STATISTICS_FILE, stats)
        atomic_save_tensors(tmp / VALUES_FILE, {"values": values})

    return store.produce("merge-stats", unit.key, build, {"task": unit.task})


def compute_statistics(merger: Any, adapter: LoraAdapter, mask: Mask, *, workers: int | None = None,
                       label: str = "merger") -> tuple[dict[str, dict[str, float] | None], np.ndarray]:
    """Per mask module, ``merger.module_statistics(ΔW, module)`` and ΔW gathered at the mask.

    Returns ``({module: statistics or None}, masked_values)``: ``None`` (and zeros) where the
    adapter lacks the module; ``masked_values`` is float64 in ``mask.slices()`` order, gathered
    from the same float32 numbers the statistics were computed on. Modules are processed largest
    first on ``workers`` threads. The merger gets a :class:`~unmerge_core.LowRankDelta`
    that it may stream in row blocks (nothing dense) or form densely into the thread's reused
    buffer, so at most ``workers`` dense modules exist at once.
    """
    pool = BufferPool()
    modules = mask.modules
    present = [m for m in modules if m in adapter.modules]
    order = sorted(present, key=lambda m: -adapter.modules[m].shape[0] * adapter.modules[m].shape[1])

    def one(module: str) -> tuple[dict[str, float], np.ndarray]:
        shape = adapter.modules[module].shape
        delta = adapter.lowrank(module, gather=np.asarray(mask.indices[module], dtype=np.int64),
                                dense_buffer=lambda: pool.get(shape, "dense"),
                                block_buffer=pool.get((min(BLOCK_ROWS, shape[0]), shape[1]), "rows"))
        try:
            result = merger.module_statistics(delta, module)
        except Exception as exc:  # noqa: BLE001
            raise PluginError("merger", label, f"module_statistics raised {type(exc).__name__}: {exc}") from exc
        if delta.gathered is None:  # the merger made no full pass: gather from the dense module
            delta.dense()
        assert delta.gathered is not None
        return {str(k): float(v) for k, v in dict(result).items()}, delta.gathered

    computed = dict(zip(order, thread_map(one, order, workers)))
    stats = {m: (computed[m][0] if m in computed else None) for m in modules}
    pieces = [computed[m][1] if m in computed else np.zeros(len(mask.indices[m])) for m in modules]
    return stats, (np.concatenate(pieces) if pieces else np.zeros(0))


def load_statistics(directory: Path) -> dict[str, dict[str, float] | None]:
    return json.loads((directory / STATISTICS_FILE).read_text())


def load_statistics_values(directory: Path) -> np.ndarray | None:
    """The masked values gathered with the statistics (``None`` for an artifact without them)."""
    path = directory / VALUES_FILE
    if not path.is_file():
        return None
    return load_tensors(path)["values"].numpy()


def merge_masked_vector(merger: Any, job: MergeJob, mask: Mask, values: Sequence[np.ndarray],
                        statistics: Sequence[Mapping[str, Mapping[str, float] | None] | None],
                        label: str = "merger") -> np.ndarray:
    """The target's masked vector: ``merger.merge_masked`` module by module.

    Args:
        values: Per constituent, its full masked vector (``Mask.slices()`` order).
        statistics: Per constituent, ``{module: statistics}`` (or ``None`` when the method needs none).
    """
    pieces = []
    for module, sl in mask.slices().items():
        idx = np.asarray(mask.indices[module])
        module_values = [np.asarray(v[sl], dtype=np.float64) for v in values]
        module_stats = [None if s is None else s.get(module) for s in statistics]
        try:
            merged = merger.merge_masked(job, module, idx, module_values, module_stats)
        except Exception as exc:  # noqa: BLE001
            raise PluginError("merger", label, f"merge_masked raised {type(exc).__name__}: {exc}") from exc
        merged = np.asarray(merged, dtype=np.float64).reshape(-1)
        if merged.shape[0] != len(idx):
            raise PluginError("merger", label,
                              f"merge_masked returned {merged.shape[0]} values for {module}, expected {len(idx)}")
        pieces.append(merged)
    return np.concatenate(pieces) if pieces else np.zeros(0)


def masked_target(merger: Any, job: MergeJob, mask: Mask, vectors_path: Path,
                  statistics_dirs: Sequence[Path | None] = (), label: str = "merger",
                  vector_names: Sequence[str] = ()) -> np.ndarray:
    """One target from files: the run's masked task vectors and the constituents' statistics.

    ``vector_names`` name each constituent's vector in ``vectors_path`` (default: ``job.tasks``).
    """
    names = list(vector_names) or list(job.tasks)
    from safetensors import safe_open

    dirs = list(statistics_dirs) + [None] * (len(job.tasks) - len(statistics_dirs))
    if not needs_statistics(merger, job.method):
        dirs = [None] * len(job.tasks)  # the task vectors themselves (the dictionary's own values)
    statistics = [None if d is None else load_statistics(d) for d in dirs]
    # values recorded with the statistics (the numbers the thresholds came from), else task vectors
    dense_values = [None if d is None else load_statistics_values(d) for d in dirs]
    with safe_open(str(vectors_path), framework="np") as fh:
        missing = [t for t, v in zip(names, dense_values) if v is None and t not in fh.keys()]
        if missing:
            raise PluginError("merger", label, f"no masked task vector for {', '.join(missing)} in {vectors_path}")
        values = [np.asarray(v if v is not None else fh.get_tensor(t), dtype=np.float64)
                  for t, v in zip(names, dense_values)]
    if needs_statistics(merger, job.method) and any(s is None for s in statistics):
        raise PluginError("merger", label, f"target {job.target_id}: {job.method} needs module statistics")
    return merge_masked_vector(merger, job, mask, values, statistics, label)


def dense_target_modules(merger: Any, job: MergeJob, adapters: Sequence[LoraAdapter], modules: Sequence[str],
                         shapes: Mapping[str, tuple[int, int]], label: str = "merger",
                         base: Path | None = None,
                         inputs: Sequence[ModuleInputs] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense route — the one loop that forms a target's full ΔW, module by module.

    For each module: every constituent's dense ΔW (zeros where it does not adapt the module), merged
    by ``merger.merge_module`` — or, for a method defined on full weights, by
    ``merger.merge_module_on_base`` with the base model's weight of the module (``base``, else the
    model the adapters name); for an activation-scaled method, by ``merger.merge_module_scaled`` with
    each constituent's input statistics of the module (``inputs``, one mapping per constituent: a
    module missing from one is an error naming it). One module of every constituent is in memory at a time.
    """
    weights = (BaseWeights(base_model_path(adapters, job.method, label, base))
               if needs_base_weights(merger, job.method) else None)
    scaled = needs_activations(merger, job.method)
    if scaled and (inputs is None or len(inputs) != len(adapters)):
        raise PluginError("merger", label, f"{job.method} scales task vectors by the base model's input statistics, "
                                           f"and target {job.target_id} was given none")
    for module in modules:
        shape = tuple(shapes[module])
        deltas = [a.delta(module) if module in a.modules else torch.zeros(shape) for a in adapters]
        base_weight = weights.module(module, shape) if weights is not None else None
        with plugin_errors("merger", label):
            if scaled:
                assert inputs is not None
                merged = merger.merge_module_scaled(job, module, deltas, module_inputs(inputs, module, job, shape))
            elif base_weight is not None:
                merged = merger.merge_module_on_base(job, module, deltas, base_weight)
            else:
                merged = merger.merge_module(job, module, deltas)
        if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != shape:
            got = tuple(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
            raise PluginError("merger", label, f"returned {got} for {module}, expected a tensor of {shape}")
        del deltas
        yield module, merged


def module_inputs(inputs: Sequence[ModuleInputs], module: str, job: MergeJob,
                  shape: tuple[int, ...]) -> list[InputStatistics]:
    """Each constituent's input statistics of ``module``; a missing or misshapen entry is an error naming it."""
    out = []
    for task, stats in zip(job.tasks, inputs):
        entry = stats.get(module)
        if entry is None:
            raise UnmergeError(f"target {job.target_id}: no input statistics of module {module!r} for task {task} "
                               "(an activation-scaled merge never falls back to uniform scaling)")
        if tuple(entry.squares.shape) != (shape[1],):
            raise UnmergeError(f"target {job.target_id}: input statistics of {module!r} for task {task} have "
                               f"{tuple(entry.squares.shape)} features, the module takes {shape[1]}")
        out.append(entry)
    return out


def lowrank_masked_vector(merger: Any, job: MergeJob, adapters: Sequence[LoraAdapter], mask: Mask,
                          label: str = "merger", workers: int | None = None) -> np.ndarray:
    """A target on the mask from the constituents' LoRA factors (``merger.merge_lowrank``), module by
    module on ``workers`` threads: no dense module is formed by the core (float64, ``mask.slices()`` order)."""

    def one(module: str) -> np.ndarray:
        shape = tuple(mask.shapes[module])
        deltas = []
        for adapter in adapters:
            if module in adapter.modules:
                a, b = adapter.factors(module)
                deltas.append(LowRankDelta(a, b, adapter.scale(module)))
            else:  # rank 0: this constituent does not adapt the module
                deltas.append(LowRankDelta(torch.zeros(0, shape[1]), torch.zeros(shape[0], 0), 1.0))
        idx = np.asarray(mask.indices[module], dtype=np.int64)
        with plugin_errors("merger", label):
            merged = merger.merge_lowrank(job, module, deltas, idx)
        merged = np.asarray(merged, dtype=np.float64).reshape(-1)
        if merged.shape[0] != len(idx):
            raise PluginError("merger", label,
                              f"merge_lowrank returned {merged.shape[0]} values for {module}, expected {len(idx)}")
        return merged

    pieces = thread_map(one, list(mask.modules), workers)
    return np.concatenate(pieces) if pieces else np.zeros(0)


def dense_masked_vector(merger: Any, job: MergeJob, adapters: Sequence[LoraAdapter], mask: Mask,
                        label: str = "merger", base: Path | None = None,
                        inputs: Sequence[ModuleInputs] | None = None) -> np.ndarray:
    """A target on the mask by the dense route (float64, ``mask.slices()`` order): what the runner does
    for methods without a masked form, and the reference the fast path is compared with."""
    pieces = [merged.reshape(-1).to(torch.float64).numpy()[np.asarray(mask.indices[module], dtype=np.int64)]
              for module, merged in dense_target_modules(merger, job, adapters, mask.modules, mask.shapes, label, base,
                                                         inputs)]
    return np.concatenate(pieces) if pieces else np.zeros(0)


def run_target_deltas(merger: Any, adapter_dirs: Mapping[str, Path], label: str,
                      job: MergeJob, base: Path | None = None,
                      inputs: Mapping[str, ModuleInputs] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every module any constituent of ``job`` adapts, merged densely (what :meth:`RunContext.target_deltas` gives).

    ``adapter_dirs`` maps training names (``task``, or ``task@variant`` for ``job.sources``) to adapters;
    ``inputs`` each task's input statistics, for activation-scaled methods.
    """
    names = [f"{t}@{job.source(i)}" if job.source(i) else t for i, t in enumerate(job.tasks)]
    adapters = [LoraAdapter(adapter_dirs[n], n) for n in names]
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for module, shape in adapter.shapes.items():
            shapes.setdefault(module, shape)
    per_constituent = None
    if needs_activations(merger, job.method):
        if inputs is None or any(t not in inputs for t in job.tasks):
            absent = [t for t in job.tasks if inputs is None or t not in inputs]
            raise PluginError("merger", label, f"{job.method} needs input statistics of task {absent[0]} for target "
                                               f"{job.target_id}, and the run has none")
        per_constituent = [inputs[t] for t in job.tasks]
    yield from dense_target_modules(merger, job, adapters, list(shapes), shapes, label, base, per_constituent)
