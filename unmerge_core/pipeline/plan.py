"""``unmerge plan MANIFEST``: what a run will download, store and compute, before anything runs.

Nothing is trained, merged, downloaded or loaded: models are described from what is on disk without
reading weights (``config.json``, safetensors headers, a GGUF file's header, the local Hugging Face
cache), and a Hub id is never asked of the network (``HF_HUB_OFFLINE`` is set while the plan is made).

The work units per stage and how many are cached come from the :class:`~unmerge_core.pipeline.runner.Runner`'s
own key functions, so "cached" is what ``unmerge run`` would reuse.

The core knows no algorithm: sizes that depend on a plugin come from the plugin's optional ``plan``
method, and are "unknown" without it.

* A trainer's ``plan(task) -> dict`` may give:
  ``base_model`` (the path or Hub id it loads), ``reads_task_data`` (bool, default true),
  ``modules`` (adapted module -> ``[out, in]``), ``rank`` (or ``ranks``: module -> rank),
  ``adapter_bytes`` (instead of the LoRA formula), ``workspace_bytes`` (what it builds once besides
  adapters, e.g. a local base model) and ``training``: ``parameters`` (of the base), ``trainable``,
  ``lora`` (bool), ``dtype``, ``batch_size``, ``max_length``, ``hidden_size``, ``num_layers``,
  ``vocab_size``, ``device`` and ``gradient_checkpointing`` — the peak-memory estimate's inputs.
* A masker's ``plan(modules) -> dict`` may give ``coordinates``: the mask's size for those module shapes.

:func:`unmerge_core.describe_model` (:mod:`unmerge_core.io.model_info`) is exported for plugins: a
trainer's ``plan`` reads its base model's config with it.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unmerge_core.config.manifest import Manifest, manifest_from_data
from unmerge_core.errors import UnmergeError, plugin_errors, read_toml
from unmerge_core.io.hub import parse_hub_ref
from unmerge_core.io.masks import load_mask
from unmerge_core.io.model_info import ModelInfo, describe_model, human
from unmerge_core.io.store import ArtifactStore, dumps_json
from unmerge_core.pipeline.executor import SequentialExecutor
from unmerge_core.pipeline.merging import needs_activations, needs_base_weights
from unmerge_core.pipeline.parallel import worker_count
from unmerge_core.pipeline.protocol import generate_targets
from unmerge_core.pipeline.runner import Runner, training_name
from unmerge_core.pipeline.scoring import decomposition_key, decomposition_seed, metric_key
from unmerge_core.types import Capability, FoldingMasker, MergeJob

__all__ = ["Plan", "format_plan", "plan_manifest", "training_memory"]

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8}
ACTIVATION_VALUES = 17
"""Activation values kept per token, per layer, per hidden unit for the backward pass (a rule of thumb
for a decoder layer with fused attention: Korthikanti et al. 2022 count 34 bytes at 16 bits)."""
GGUF_EXTRA_BYTES = 4 * 2**20
"""A dequantized GGUF folder besides its float32 weights: config, tokenizer, the noise record."""
ARTIFACT_OVERHEAD = 200
"""Bytes of a store artifact besides its payload: its ``DONE`` file."""
SAFETENSORS_TENSOR_OVERHEAD = 110
"""Bytes of a safetensors header per tensor (its name, dtype, shape, offsets)."""

# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything ``unmerge plan`` prints (:meth:`to_dict` is its ``--json``)."""

    manifest: str
    run_dir: str
    store: str
    downloads: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    disk: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cache_bytes(self) -> int | None:
        rows = [r for r in self.disk if r.get("kind")]
        if any(r["bytes"] is None for r in rows):
            return None
        return sum(r["bytes"] for r in rows)

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "run_dir": self.run_dir, "store": self.store, "downloads": self.downloads,
                "stages": self.stages, "disk": self.disk, "cache_bytes": self.cache_bytes, "memory": self.memory,
                "notes": self.notes}


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextmanager
def _offline() -> Iterator[None]:
    """No Hugging Face library may reach the network while the plan is made."""
    saved = {k: os.environ.get(k) for k in OFFLINE_VARIABLES}
    os.environ.update({k: "1" for k in OFFLINE_VARIABLES})
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _deferred(value: str, manifest_dir: Path) -> bool:
    """A model reference validation would fetch or dequantize (a Hub id, a GGUF file): the plan
    describes it itself instead."""
    if parse_hub_ref(value, manifest_dir) is not None or value.endswith(".gguf"):
        return True
    path = Path(value).expanduser()
    path = path if path.is_absolute() else manifest_dir / path
    return path.is_dir() and len(list(path.glob("*.gguf"))) == 1 and not any(path.glob("*.safetensors"))


def load_for_plan(path: Path) -> tuple[Manifest, list[tuple[str, str]]]:
    """The manifest, validated without resolving its Hub ids or GGUF files, and those references
    as ``(role, value)``."""
    raw = read_toml(path, "manifest")
    deferred: list[tuple[str, str]] = []
    base = raw.get("base")
    if isinstance(base, str) and _deferred(base, path.parent):
        deferred.append(("base", base))
        raw = {k: v for k, v in raw.items() if k != "base"}
    targets = raw.get("targets")
    if isinstance(targets, list):
        kept = []
        for i, entry in enumerate(targets):
            value = entry.get("path") if isinstance(entry, dict) else None
            if isinstance(value, str) and _deferred(value, path.parent):
                deferred.append((f"targets[{i}]", value))
            else:
                kept.append(entry)
        raw = {**raw, "targets": kept}
    return manifest_from_data(raw, path), deferred


def _optional_plan(plugin: Any, stage: str, *args: Any) -> dict[str, Any]:
    """A plugin's ``plan(...)`` estimates, or ``{}`` when it has none."""
    with plugin_errors(stage, plugin.label):
        method = getattr(plugin.instance(), "plan", None)
        out = method(*args) if callable(method) else {}
    return dict(out) if isinstance(out, Mapping) else {}


def plan_manifest(path: str | Path) -> Plan:
    """Plan a run of the manifest at ``path`` (see the module docstring)."""
    path = Path(path)
    with _offline():
        return _Planner(path).plan()


class _Planner:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.m, self.deferred = load_for_plan(path)
        self.runner = Runner(self.m, executor=SequentialExecutor(progress=False), progress=False, echo=lambda s: None)
        self.store = ArtifactStore(self.m.store_dir)
        self.out = Plan(str(path), str(self.m.run_dir), str(self.m.store_dir))

    def plan(self) -> Plan:
        m, runner, store = self.m, self.runner, self.store
        trainings = runner.trainings()
        estimates = {(variant, task.name): _optional_plan(trainer, "trainer", task) for variant, trainer, task in trainings}
        self._downloads(trainings, estimates)

        # -- work units, with the runner's own keys
        adapter_keys = {training_name(t.name, v): runner.adapter_key(t, v) for v, _, t in trainings}
        trained = sum(store.exists("adapters", k) for k in adapter_keys.values())
        specs = generate_targets(m)
        mask_key = runner.mask_key()
        mask_cached = store.exists("masks", mask_key)
        statistics = runner.statistics_keys(specs, mask_key)
        base, base_note = self._full_weight_base(specs, adapter_keys)
        # activation-scaled targets: their statistics' keys need the trained adapters' modules
        all_trained = trained == len(adapter_keys)
        inputs = (runner.input_statistics_units(specs, {n: store.path("adapters", k) for n, k in adapter_keys.items()})
                  if all_trained else None)
        activation_tasks = {(t, int(m.merger_for(s.method).instance().activation_batches))
                            for s in specs if needs_activations(m.merger_for(s.method).instance(), s.method)
                            for t in s.tasks}
        target_keys = {}
        for spec in specs:
            merger = m.merger_for(spec.method).instance()
            on_base = needs_base_weights(merger, spec.method)
            input_keys: list[str] | None = []
            if needs_activations(merger, spec.method):
                batches = int(merger.activation_batches)
                input_keys = [inputs[(t, batches)].key for t in spec.tasks] if inputs is not None else None
            target_keys[spec.target_id] = (runner.target_key(spec, mask_key, base if on_base else None, input_keys)
                                           if not (on_base and base is None) and input_keys is not None else None)
        dictionary_key = runner.dictionary_key(mask_key)
        evaluation_key = runner.evaluation_key(mask_key, specs)
        cache = store.root / "cache"
        decompositions = metric_sets = 0
        for plugin in m.decomposers:
            for spec in specs:
                target = target_keys[spec.target_id]
                if target is None:
                    continue
                key = decomposition_key(plugin, dictionary_key, target, decomposition_seed(spec, plugin.label))
                decompositions += (cache / "decompositions" / f"{key}.json").is_file()
                metric_sets += bool(m.metrics) and all(
                    (cache / "metric-values" / f"{metric_key(ref, key, evaluation_key)}.json").is_file()
                    for ref in m.metrics)
        n_targets, n_decomposers = len(specs), len(m.decomposers)
        external = len(m.file.targets) + sum(1 for role, _ in self.deferred if role.startswith("targets"))
        stages = [("trainer", len(trainings), trained, "adapters (incl. [[variants]])" if m.variants else "adapters"),
                  ("masker", 1, int(mask_cached), "mask")]
        shared = 0  # statistics the masker's pass over ΔW makes with the mask (the stage then reuses them)
        if statistics and not mask_cached and isinstance(m.masker.instance(), FoldingMasker):
            shared = len(runner._shared_statistics(specs, mask_key))
        if statistics:
            stages.append(("merge-statistics", len(statistics),
                           sum(store.exists("merge-stats", k) for _, k in statistics.values()),
                           f"merge statistics ({shared} made with the mask)" if shared else "merge statistics"))
        if activation_tasks:
            stages.append(("input-statistics", len(activation_tasks),
                           sum(store.exists("input-stats", u.key) for u in inputs.values()) if inputs else 0,
                           "input statistics (the base model on each task's training data)"))
        stages += [("merger", n_targets, sum(k is not None and store.exists("targets", k) for k in target_keys.values()),
                    "targets"),
                   ("decomposer", n_targets * n_decomposers, decompositions,
                    f"{n_targets} targets × {n_decomposers} decomposers"),
                   ("metric", n_targets * n_decomposers, metric_sets, f"decompositions × {len(m.metrics)} metrics")]
        if external:
            stages.append(("external-targets", external * n_decomposers, 0,
                           f"{external} [[targets]] × {n_decomposers} decomposers"))
        self.out.stages = [{"stage": s, "units": u, "cached": c, "what": w} for s, u, c, w in stages]
        for row in self.out.stages:
            if row["stage"] == "merge-statistics":
                row["made_by_masker"] = shared
        if base_note:
            self.out.notes.append(base_note)

        # -- disk and memory
        modules = self._modules(estimates)
        coordinates = self._coordinates(mask_key, modules)
        self._disk(trainings, estimates, specs, coordinates, len(statistics), external, modules)
        self._memory(estimates, modules, coordinates)
        return self.out

    # -- downloads ---------------------------------------------------------------------------------
    def _downloads(self, trainings: Sequence[Any], estimates: Mapping[tuple[str, str], dict[str, Any]]) -> None:
        m, here = self.m, self.path.parent
        models: list[tuple[str, str, Path | None]] = []
        if m.file.base:
            models.append(("base", m.file.base, here))
        models += [(role, value, here) for role, value in self.deferred if role == "base"]
        seen_trainers = set()
        for variant, trainer, task in trainings:
            value = estimates[(variant, task.name)].get("base_model")
            if value and (variant, value) not in seen_trainers:
                seen_trainers.add((variant, value))
                models.append((f"{'variants.' + variant if variant else 'trainer'} base_model", str(value), None))
        models += [(f"targets[{i}]", t.path, here) for i, t in enumerate(m.file.targets)]
        models += [(role, value, here) for role, value in self.deferred if role != "base"]
        described: dict[str, ModelInfo] = {}
        rows: dict[str, dict[str, Any]] = {}
        self.model_roles: list[tuple[str, ModelInfo]] = []
        for role, value, relative in models:
            info = described.get(value) or describe_model(value, relative)
            described[value] = info
            self.model_roles.append((role, info))
            if value in rows:  # one row per model, naming every use
                rows[value]["role"] += f", {role}"
            else:
                rows[value] = {"kind": "model", "role": role, **info.as_dict()}
        self.out.downloads += list(rows.values())

        readers = {task.name for variant, _, task in trainings
                   if estimates[(variant, task.name)].get("reads_task_data", True)}
        if any(Capability.TASK_DATA in p.spec.requires for p in [*m.metrics, *m.decomposers, *m.mergers, m.masker]):
            readers = {t.name for t in m.all_tasks}
        datasets: dict[tuple[Any, ...], dict[str, Any]] = {}
        for task in m.all_tasks:
            source = dict(task.source)
            if task.name not in readers or source.get("kind") != "hf":
                continue
            key = (source.get("dataset"), source.get("config"), source.get("split", "train"))
            row = datasets.setdefault(key, {"kind": "dataset", "role": task.name, "source": key[0],
                                            "config": key[1], "split": key[2], "status": "download", "bytes": None,
                                            "limit": source.get("limit"), "note": "streamed; size unknown offline"})
            if row["role"] != task.name:
                row["role"] += f", {task.name}"
        self.out.downloads += list(datasets.values())

    # -- shapes --------------------------------------------------------------------------------------
    def _modules(self, estimates: Mapping[tuple[str, str], dict[str, Any]]) -> dict[str, tuple[int, int]] | None:
        """The dictionary trainer's adapted modules (out, in), when its plan gives them."""
        first = next((e for (v, _), e in estimates.items() if not v), None)
        raw = (first or {}).get("modules")
        if not isinstance(raw, Mapping):
            return None
        return {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}

    def _coordinates(self, mask_key: str, modules: Mapping[str, tuple[int, int]] | None) -> int | None:
        if self.store.exists("masks", mask_key):
            try:
                return int(sum(len(v) for v in load_mask(self.store.path("masks", mask_key)).indices.values()))
            except (UnmergeError, OSError, ValueError):
                pass
        if modules is None:
            return None
        value = _optional_plan(self.m.masker, "masker", dict(modules)).get("coordinates")
        return int(value) if isinstance(value, (int, float)) else None

    def _full_weight_base(self, specs: Sequence[MergeJob], adapter_keys: Mapping[str, str]) -> tuple[Path | None, str]:
        """The base model a full-weight merge fingerprints, when the plan can know it without fetching."""
        users = [s for s in specs if needs_base_weights(self.m.merger_for(s.method).instance(), s.method)]
        if not users:
            return None, ""
        if self.m.file.base:
            return (self.path.parent / Path(self.m.file.base).expanduser()).resolve(), ""
        if all(self.store.exists("adapters", k) for k in adapter_keys.values()):
            dirs = {name: self.store.path("adapters", key) for name, key in adapter_keys.items()}
            try:
                return self.runner.full_weight_base(specs, dirs), ""
            except UnmergeError:
                pass
        return None, ("the full-weight merges' base model is known only once the adapters are trained (or it is a Hub "
                      "id / GGUF file): their targets are counted as not cached")

    # -- disk ----------------------------------------------------------------------------------------
    def _disk(self, trainings: Sequence[Any], estimates: Mapping[tuple[str, str], dict[str, Any]],
              specs: Sequence[MergeJob], coordinates: int | None, n_statistics: int, external: int,
              modules: Mapping[str, tuple[int, int]] | None) -> None:
        rows: list[dict[str, Any]] = []

        def row(item: str, kind: str | None, count: int, each: int | None, note: str = "",
                total: int | None = None) -> None:
            if total is None and each is not None:
                total = each * count
            rows.append({"item": item, "kind": kind, "count": count, "bytes_each": each, "bytes": total, "note": note})

        sizes = [_adapter_bytes(estimates[(v, t.name)], len(dumps_json({"key": "0" * 16, "task": t.name,
                                                                        "trainer": trainer.config()})))
                 for v, trainer, t in trainings]
        known = [s for s in sizes if s is not None]
        total = sum(known) if len(known) == len(sizes) else None
        first = estimates.get(("", trainings[0][2].name), {}) if trainings else {}
        rank = first.get("rank")
        row("adapters", "adapters", len(trainings), max(known) if known and total is not None else None,
            f"rank {rank} × (in + out) × 4 B × {len(modules or ())} modules" if rank and modules else
            ("unknown: the trainer gives no plan" if total is None else "from the trainer's plan"), total)
        workspaces: dict[Any, int] = {}
        for variant, trainer, task in trainings:
            size = estimates[(variant, task.name)].get("workspace_bytes")
            if isinstance(size, int) and size > 0:
                workspaces[json.dumps(trainer.config(), sort_keys=True, default=str)] = size
        if workspaces:
            row("trainer workspace", "workspace", len(workspaces), max(workspaces.values()),
                "what the trainer builds once (a local base model)", sum(workspaces.values()))
        cap = coordinates
        n_modules = len(modules) if modules is not None else 0
        mask_each = None if cap is None else 8 * cap + (SAFETENSORS_TENSOR_OVERHEAD + 90) * n_modules + ARTIFACT_OVERHEAD
        row("mask", "masks", 1, mask_each, "" if cap is None else f"{cap:,} coordinates × 8 B (int64)")
        if n_statistics:
            each = None if cap is None else 8 * cap + SAFETENSORS_TENSOR_OVERHEAD + 60 * n_modules + ARTIFACT_OVERHEAD
            row("merge statistics", "merge-stats", n_statistics, each, "mask × 8 B (float64) + per-module statistics")
        spec_json = sum(len(dumps_json(s.as_dict())) for s in specs) // max(len(specs), 1)
        each = None if cap is None else 8 * cap + SAFETENSORS_TENSOR_OVERHEAD + spec_json + ARTIFACT_OVERHEAD
        row("targets", "targets", len(specs), each, "mask size × 8 B each (float64)")
        n_atoms = len(self.m.atoms)
        decomposition = 130 + 26 * n_atoms  # indented JSON: coefficients, verdicts, a short info
        pairs = len(specs) * len(self.m.decomposers)
        row("decompositions", "decompositions", pairs, decomposition,
            f"JSON, {n_atoms} coefficients (+ mask × 8 B if not exactly D·c)")
        if self.m.metrics:
            row("metric values", "metric-values", pairs, 230 * len(self.m.metrics),
                f"JSON per decomposition × {len(self.m.metrics)} metrics")
        if external:
            each = None if cap is None else 8 * cap + 800
            row("[[targets]] on the mask", "external", external, each, "mask size × 8 B each")
        for where, in_store in (("store", True), ("user cache", False)):
            ggufs = {info.path: info for role, info in self.model_roles
                     if info.note.startswith("GGUF") and role.startswith(("base", "targets")) == in_store}
            if ggufs:
                sizes = [i.float32_bytes for i in ggufs.values()]
                total = None if None in sizes else sum(s + GGUF_EXTRA_BYTES for s in sizes if s is not None)
                row(f"GGUF dequantized ({where})", "gguf" if in_store else None, len(ggufs),
                    None if total is None else total // len(ggufs), "float32: ≈ 4 B × parameters + tokenizer", total)
        vectors = None if cap is None else (8 * cap + SAFETENSORS_TENSOR_OVERHEAD) * len(trainings)
        row("task vectors (run dir)", None, 1, vectors, "every training on the mask × 8 B")
        self.out.disk = rows

    # -- memory --------------------------------------------------------------------------------------
    def _memory(self, estimates: Mapping[tuple[str, str], dict[str, Any]],
                modules: Mapping[str, tuple[int, int]] | None, coordinates: int | None) -> None:
        rows: list[dict[str, Any]] = []
        seen = set()
        for (variant, _), estimate in estimates.items():
            training = estimate.get("training")
            if not isinstance(training, Mapping):
                continue
            signature = json.dumps(training, sort_keys=True, default=str)
            if signature in seen:
                continue
            seen.add(signature)
            rows.append(training_memory(training, "trainer" if not variant else f"trainer ({variant})"))
        if not any(r["stage"].startswith("trainer") for r in rows):
            rows.append({"stage": "trainer", "device": "RAM", "bytes": None,
                         "formula": "unknown: the trainer gives no training estimate", "terms": {}})
        workers = worker_count()
        largest = max((o * i for o, i in (modules or {}).values()), default=None)
        rows.append({"stage": "masker", "device": "RAM", "workers": workers,
                     "bytes": None if largest is None else 4 * largest * workers,
                     "formula": f"largest module's dense ΔW out·in·4 B × {workers} workers (upper bound)",
                     "terms": {"largest_module_entries": largest}})
        rows.append({"stage": "merger", "device": "RAM", "workers": workers,
                     "bytes": None if largest is None else 4 * largest * workers,
                     "formula": f"dense path: out·in·4 B × {workers} workers (masked / low-rank paths: less)",
                     "terms": {"largest_module_entries": largest}})
        n_atoms = len(self.m.atoms)
        rows.append({"stage": "decomposer", "device": "RAM",
                     "bytes": None if coordinates is None else 8 * coordinates * (n_atoms + 2) + 8 * n_atoms ** 2,
                     "formula": f"dictionary + target float64: mask·({n_atoms} atoms + 2)·8 B + Gram atoms²·8 B",
                     "terms": {"coordinates": coordinates, "atoms": n_atoms}})
        self.out.memory = rows


def _adapter_bytes(estimate: Mapping[str, Any], done_bytes: int = ARTIFACT_OVERHEAD) -> int | None:
    """One adapter's size on disk from a trainer's plan: rank × (in + out) × 4 B per module (+ headers)."""
    if isinstance(estimate.get("adapter_bytes"), int):
        return int(estimate["adapter_bytes"]) + done_bytes
    modules = estimate.get("modules")
    if not isinstance(modules, Mapping):
        return None
    ranks = estimate.get("ranks") if isinstance(estimate.get("ranks"), Mapping) else {}
    rank = estimate.get("rank")
    total = 0
    for name, (n_out, n_in) in modules.items():
        r = ranks.get(name, rank)  # type: ignore[union-attr]
        if r is None:
            return None
        total += int(r) * (int(n_in) + int(n_out)) * 4 + 2 * SAFETENSORS_TENSOR_OVERHEAD
    return total + 400 + done_bytes  # adapter_config.json, the header's rest, DONE (with the trainer's config)


def training_memory(training: Mapping[str, Any], stage: str = "trainer") -> dict[str, Any]:
    """Peak memory of one training, from a trainer's estimate (see the module docstring), with its formula."""
    if "bytes" in training:  # the trainer's own estimate
        return {"stage": stage, "device": str(training.get("device", "RAM")), "bytes": training["bytes"],
                "formula": str(training.get("formula", "the trainer's estimate")), "terms": {}}
    dtype = str(training.get("dtype") or "float32")
    bw = DTYPE_BYTES.get(dtype, 4)
    ba = DTYPE_BYTES.get(str(training.get("activation_dtype") or dtype), bw)  # autocast: half-precision activations
    get = training.get
    P, T = get("parameters"), get("trainable")
    B, S, h, L, V = get("batch_size"), get("max_length"), get("hidden_size"), get("num_layers"), get("vocab_size")
    lora = bool(get("lora", True))
    checkpointing = bool(get("gradient_checkpointing", False))
    device = {"cpu": "RAM", "cuda": "GPU"}.get(str(get("device", "auto")), "GPU or RAM") + f", {dtype}"
    terms: dict[str, int | None] = {}
    terms["weights"] = None if P is None else P * bw
    terms["adapter"] = None if T is None else (T * 4 if lora else 0)
    terms["gradients_adam"] = None if T is None else T * 12
    if None in (B, S, h, L):
        terms["activations"] = None
    else:
        layers = (L + ACTIVATION_VALUES) if checkpointing else L * ACTIVATION_VALUES
        terms["activations"] = B * S * h * layers * ba
    terms["logits"] = None if None in (B, S, V) else B * S * V * 8
    total = None if any(v is None for v in terms.values()) else sum(v for v in terms.values() if v is not None)
    acts = f"B·S·h·(L+{ACTIVATION_VALUES})·{ba}" if checkpointing else f"B·S·h·L·{ACTIVATION_VALUES}·{ba}"
    formula = (f"P·{bw} + " + ("A·16" if lora else "P·12") + f" + {acts} + B·S·V·8 (P={_count(P)}"
               + (f" A={_count(T)}" if lora else "") + f" B={B} S={S} h={h} L={L} V={_count(V)})")
    return {"stage": stage, "device": device, "bytes": total, "formula": formula, "terms": terms, "legend": LEGEND}


LEGEND = (f"P base parameters, A LoRA parameters, B batch_size, S max_length, h hidden, L layers, V vocabulary; "
          f"A·16 = float32 weight + gradient + 2 Adam moments; {ACTIVATION_VALUES} activations kept per token, layer "
          "and hidden unit; logits and their gradient in float32")


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _download_text(row: Mapping[str, Any]) -> str:
    if row["kind"] == "dataset":
        limit = f"first {row['limit']:,} examples" if isinstance(row.get("limit"), int) else "whole split (no limit)"
        config = f" [{row['config']}]" if row.get("config") else ""
        return f"download: {row['source']}{config} {row['split']}, {limit}, size unknown offline"
    status, size = row["status"], row.get("bytes")
    if status == "download":
        return f"download: {row['source']} ({'size unknown offline' if size is None else human(size)})" + (
            f"; {_count(row['parameters'])} parameters" if row.get("parameters") else "")
    if status == "cached":
        return f"cached: {row['source']} ({human(size)} in the Hugging Face cache)"
    if status == "local":
        extra = f", {_count(row['parameters'])} parameters" if row.get("parameters") else ""
        float32 = row.get("float32_bytes")
        dequant = f", ≈ {human(float32)} float32 once dequantized" if float32 and row["source"].endswith(".gguf") else ""
        return f"local: {row['source']} ({human(size)}{extra}{dequant})"
    return f"{status}: {row['source']} ({row.get('note') or 'unknown'})"


def format_plan(plan: Plan) -> str:
    """The human output: a few aligned tables on one screen."""
    from tabulate import tabulate

    store = "" if plan.store == plan.run_dir else f" (artifact store: {plan.store})"
    lines = [f"plan for {plan.manifest}", f"run directory: {plan.run_dir}{store}", ""]
    if plan.downloads:
        rows = [[d["kind"], d["role"], _download_text(d)] for d in plan.downloads]
        lines += [tabulate(rows, headers=["input", "for", "what a run reads or downloads"], disable_numparse=True), ""]
    else:
        lines += ["downloads: none (every input is built or read locally)", ""]
    disk = {r["kind"]: r for r in plan.disk if r["kind"]}
    by_stage = {"trainer": "adapters", "masker": "masks", "merge-statistics": "merge-stats", "merger": "targets",
                "decomposer": "decompositions", "metric": "metric-values", "external-targets": "external"}
    rows = []
    for s in plan.stages:
        d = disk.get(by_stage.get(s["stage"], ""))
        rows.append([s["stage"], s["what"], s["units"], s["cached"], s["units"] - s["cached"],
                     human(d["bytes_each"]) if d else "", human(d["bytes"]) if d else ""])
    for r in plan.disk:
        if r["kind"] not in by_stage.values():
            rows.append(["", r["item"], "", "", "", human(r["bytes_each"]), human(r["bytes"])])
    rows.append(["", "cache total", "", "", "", "", human(plan.cache_bytes)])
    lines += [tabulate(rows, headers=["stage", "work units", "units", "cached", "to do", "disk each", "disk"],
                       disable_numparse=True, colalign=("left", "left", "right", "right", "right", "right", "right")), ""]
    rows = [[m["stage"], m["device"], human(m["bytes"]), m["formula"]] for m in plan.memory]
    lines += [tabulate(rows, headers=["peak memory", "where", "estimate", "formula"], disable_numparse=True)]
    legends = {m["legend"] for m in plan.memory if m.get("legend")}
    lines += [line for legend in sorted(legends) for line in textwrap.wrap(f"({legend})", 118, initial_indent="  ",
                                                                            subsequent_indent="   ")]
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
