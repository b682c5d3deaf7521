"""The run manifest: a TOML file validated by pydantic, with every plugin resolved before work starts.

:func:`load_manifest` reads the file, validates its structure (unknown keys are errors), loads the
task registry, checks every task name, resolves every plugin by name and validates its ``params``
against that plugin's own model. Any problem raises :class:`UnmergeError` with one line per problem:
``<file>: <field path>: <what is wrong>``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from unmerge_core.config.registry import Registry
from unmerge_core.config.targets import ExternalTarget, check_manifest_targets
from unmerge_core.errors import UnmergeError, choose_one_of, read_toml, short_repr
from unmerge_core.io.store import check_output_dir, is_safe_name, safe_filename
from unmerge_core.manager import PluginManager, ResolvedPlugin, format_validation_error
from unmerge_core.report.attribution import REPORT_METRICS
from unmerge_core.types import Capability, StrictNumbers, TaskInfo, method_task_range

GROUPS = ("known", "mixed", "unknown")
PER_LAYER_PLUGIN = "per-layer"
"""The decomposer plugin a ``per_layer`` table desugars to (it wraps the entry's decomposer)."""
DEFAULT_METRICS = ("support", "reconstruction", "semantic-alignment")
MAX_TARGETS_PER_GROUP = 10_000
MAX_TASKS = 10_000
MAX_PLUGINS = 100
RAY_RESOURCE_STEP = 0.0001
"""The smallest fraction of a CPU or GPU Ray reserves (its resource unit: a smaller one is refused by Ray)."""
RUN_PROVIDES = (Capability.TASK_DATA, Capability.CONSTITUENT_VECTORS, Capability.TARGET_DELTAS)
"""What every ``unmerge run`` gives its plugins; the trainer may add ``base-model``."""


class _Strict(StrictNumbers):
    """A manifest table: unknown keys, NaN and infinities refused; numbers strict (``seed = true`` is not 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _no_duplicates(field_name: str, values: list[Any]) -> None:
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{field_name} lists {', '.join(dupes)} more than once")


class PluginRef(_Strict):
    """``plugin = "<name>"`` plus its ``params`` table; ``label`` tells two uses of one plugin apart."""

    plugin: str = Field(min_length=1, max_length=100, description="the plugin's name (`unmerge plugins` lists them)")
    params: dict[str, Any] = Field(default_factory=dict, description="the plugin's parameters, validated by its "
                                   "own parameter model (`unmerge plugins --json` shows each one's schema)")
    label: str | None = Field(None, min_length=1, max_length=100, description="a name for this use of the plugin, "
                              "in results and cache keys (two entries of one plugin need different labels)")

    @field_validator("label")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (not value.isprintable() or value != value.strip()):
            raise ValueError("a label must be printable text without leading or trailing spaces")
        return value

    @property
    def display(self) -> str:
        return self.label or self.plugin


class DecomposerRef(PluginRef):
    """A decomposer entry; ``per_layer = true`` (or a table of the ``per-layer`` plugin's parameters)
    wraps it in the ``per-layer`` decomposer plugin."""

    per_layer: dict[str, Any] | None = Field(None, description="true, or a table of the per-layer plugin's "
                                             "parameters: decompose every layer on its own with this decomposer")

    @field_validator("per_layer", mode="before")
    @classmethod
    def _per_layer_flag(cls, value: Any) -> Any:
        if isinstance(value, bool):  # ``true``: default options; ``false``: off
            return {} if value else None
        return value

    @property
    def per_layer_options(self) -> dict[str, Any] | None:
        return self.per_layer

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        return f"{self.plugin}/per-layer" if self.per_layer is not None else self.plugin


class TaskSelection(_Strict):
    """Which registry tasks form the dictionary (``known``) and which stay out of it (``unknown``).

    ``dictionary_variants`` adds, for every known task, its training by each listed ``[[variants]]``
    entry to the dictionary: a skill then has several atoms (``task`` and ``task@variant``), and
    attribution is judged per skill.
    """

    known: list[str] = Field(min_length=1, max_length=MAX_TASKS, description="registry tasks whose adapters "
                             "form the dictionary")
    unknown: list[str] = Field(default_factory=list, max_length=MAX_TASKS, description="registry tasks trained "
                               "and merged into targets but kept out of the dictionary")
    dictionary_variants: list[str] = Field(default_factory=list, max_length=MAX_PLUGINS, description="[[variants]] "
                                           "names whose trainings of the known tasks join the dictionary too")

    @field_validator("dictionary_variants")
    @classmethod
    def _variants_once(cls, values: list[str]) -> list[str]:
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:  # each would add the same atoms twice, under the same names
            raise ValueError(f"lists {', '.join(map(repr, dupes))} more than once; list each [[variants]] name once")
        return values

    @model_validator(mode="after")
    def _disjoint(self) -> TaskSelection:
        both = sorted(set(self.known) & set(self.unknown))
        if both:
            raise ValueError(f"tasks both known and unknown: {', '.join(both)}")
        for field_name in ("known", "unknown"):
            _no_duplicates(field_name, getattr(self, field_name))
        return self


class Protocol(_Strict):
    """How targets are generated. Defaults are the proposal's: 24 per group, 2–5 tasks, 4 methods."""

    groups: list[Literal["known", "mixed", "unknown"]] = Field(default_factory=lambda: list(GROUPS), description=
                                                               "target groups: only known tasks, known + unknown, "
                                                               "only unknown")
    methods: list[str] = Field(default_factory=lambda: ["linear", "ties", "dare_linear", "task_arithmetic"],
                               max_length=MAX_PLUGINS, description="merge methods the targets are made with (each "
                               "offered by one of the run's mergers)")
    targets_per_group: int = Field(24, ge=1, le=MAX_TARGETS_PER_GROUP, description="split evenly over the merge methods")
    min_tasks: int = Field(2, ge=1, le=MAX_TASKS, description="fewest tasks merged into one target")
    max_tasks: int = Field(5, ge=1, le=MAX_TASKS, description="most tasks merged into one target")
    weights: Literal["uniform", "dirichlet"] = Field("uniform", description="merge weights: equal, or drawn from "
                                                     "a flat Dirichlet (from the seed)")
    constituents: list[str] = Field(
        default_factory=list, max_length=MAX_PLUGINS,
        description="[[variants]] whose trainings make the targets: for each constituent, the first listed "
                    "variant that trains its task; the dictionary's adapter when none does (the default)")

    @field_validator("groups", "methods", "constituents")
    @classmethod
    def _unique(cls, values: list[str], info: Any) -> list[str]:
        _no_duplicates(info.field_name, values)
        return values

    @model_validator(mode="after")
    def _ranges(self) -> Protocol:
        if self.max_tasks < self.min_tasks:
            raise ValueError(f"max_tasks ({self.max_tasks}) is smaller than min_tasks ({self.min_tasks})")
        if "mixed" in self.groups and self.max_tasks < 2:
            raise ValueError(f"the mixed group needs targets of at least 2 tasks (one known, one unknown); "
                             f"max_tasks is {self.max_tasks}")
        if not self.methods:
            raise ValueError("methods is empty")
        if self.targets_per_group % len(self.methods):
            raise ValueError(
                f"targets_per_group ({self.targets_per_group}) must be a multiple of the number of "
                f"methods ({len(self.methods)})"
            )
        return self


class VariantRef(PluginRef):
    """A ``[[variants]]`` entry: another training of some tasks (another seed, sample, rank, a full
    fine-tune...) by its own trainer, used as targets' constituents or as more dictionary atoms."""

    name: str = Field(description="the variant's name: its trainings are task@name")
    tasks: list[str] | None = Field(None, description="the tasks it trains (default: every task)")

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:  # as constituents it changed nothing; in the dictionary, no atom
            raise ValueError("an empty list trains nothing; list the tasks this variant trains, or leave tasks "
                             "out to train every task of the manifest")
        return value

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not is_safe_name(value):
            raise ValueError(f"{value!r} is not a safe name (letters, digits, '.', '_', '-')")
        return value

    @property
    def display(self) -> str:
        return self.label or self.name


class Output(_Strict):
    # validated on assignment too: `unmerge run --output-dir` sets dir, and `~` is expanded there as well
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)
    dir: str = Field("runs", min_length=1, description="folder holding runs/<name>/ (relative: to the folder of "
                                                       "the manifest's registry file, the project's root)")
    store: str | None = Field(None, min_length=1, description="artifact store shared by several manifests "
                                                             "(default: the run directory; relative: as dir)")

    @field_validator("dir", "store")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        """``~`` and ``~user`` are the home folder, as in the model paths (a literal ``./~`` was made)."""
        return None if value is None else os.path.expanduser(value)


class ExecutorConfig(_Strict):
    """Where the units of work run (``executor = { ... }``); never changes a result, only where it is made."""

    kind: Literal["local", "ray"] = Field("local", description="local: this process; ray: Ray tasks")
    address: str | None = Field(None, min_length=1,
                                description="Ray cluster: 'auto', 'ray://host:port' (default: start Ray on this "
                                            "machine)")
    num_cpus_per_task: float = Field(1.0, ge=RAY_RESOURCE_STEP, le=1024,
                                     description="CPUs Ray reserves for each unit")
    num_gpus_per_task: float = Field(0.0, ge=0, le=64, description="GPUs Ray reserves for each unit")
    max_retries: int = Field(3, ge=0, le=100, description="times Ray reruns a unit whose worker died")

    @field_validator("num_gpus_per_task")
    @classmethod
    def _ray_fraction(cls, value: float) -> float:
        if 0 < value < RAY_RESOURCE_STEP:
            raise ValueError(f"0 or at least {RAY_RESOURCE_STEP} (Ray's smallest fraction of a resource)")
        return value

    @model_validator(mode="after")
    def _ray_only(self) -> ExecutorConfig:
        if self.kind == "local" and (self.address is not None or self.num_gpus_per_task or self.num_cpus_per_task != 1):
            raise ValueError("address and num_*_per_task apply to kind = 'ray' only")
        return self


class ManifestFile(_Strict):
    """The top level of a manifest file."""

    name: str | None = Field(None, description="run directory name: letters, digits, '.', '_', '-'")
    description: str = Field("", description="free text, kept in run.json")
    seed: int = Field(42, ge=0, lt=2**63, description="every random choice of the run derives from it")
    registry: str | None = Field(None, min_length=1, description="task registry file, relative to the manifest "
                                 "(default: the shipped registry.toml)")
    requires: list[str] = Field(default_factory=list, description="Python requirements (PEP 508, e.g. a plugin "
                                "package 'unmerge-foo>=1.2') checked before anything runs")
    tasks: TaskSelection = Field(description="the [tasks] table")
    protocol: Protocol = Field(default_factory=Protocol, description="the [protocol] table")
    trainer: PluginRef = Field(description="the trainer of the dictionary's (and the unknown tasks') adapters")
    variants: list[VariantRef] = Field(default_factory=list, max_length=MAX_PLUGINS, description="other trainings "
                                       "of some tasks, each by its own trainer ([[variants]] tables)")
    merger: PluginRef | list[PluginRef] = Field(
        description="one merger ([merger]) or several ([[merger]]): each protocol method is made by the one "
                    "merger that offers it")
    masker: PluginRef = Field(description="the masker: which coordinates of ΔW the decomposers see")
    decomposers: list[DecomposerRef] = Field(min_length=1, max_length=MAX_PLUGINS, description="the decomposers "
                                             "compared ([[decomposers]] tables)")
    metrics: list[PluginRef] = Field(default_factory=lambda: [PluginRef(plugin=n) for n in DEFAULT_METRICS],
                                     max_length=MAX_PLUGINS, description="the metrics scored per target and "
                                     "decomposer ([[metrics]] tables)")
    output: Output = Field(default_factory=Output, description="the [output] table")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="the [executor] table")
    base: str | None = Field(None, min_length=1, description="base model directory, for full-model [[targets]] and merge methods defined on full "
                                                               "weights (default: the model the adapters name)")
    targets: list[ExternalTarget] = Field(default_factory=list, max_length=MAX_TASKS,
                                          description="existing models or adapters to attribute")

    @field_validator("merger")
    @classmethod
    def _mergers(cls, value: PluginRef | list[PluginRef]) -> PluginRef | list[PluginRef]:
        if isinstance(value, list):
            if not value:
                raise ValueError("[[merger]] lists no merger")
            if len(value) > MAX_PLUGINS:
                raise ValueError(f"at most {MAX_PLUGINS} mergers")
            _no_duplicates("merger", [ref.display for ref in value])
        return value

    @property
    def merger_refs(self) -> list[PluginRef]:
        return self.merger if isinstance(self.merger, list) else [self.merger]

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and not is_safe_name(value):
            raise ValueError(f"{value!r} is not a safe directory name: use letters, digits, '.', '_' and '-', "
                             "not starting with '.' (at most 100 characters)")
        return value

    @model_validator(mode="after")
    def _variants(self) -> ManifestFile:
        names = [v.name for v in self.variants]
        _no_duplicates("variants", names)
        for field_name, listed in (("protocol.constituents", self.protocol.constituents),
                                   ("tasks.dictionary_variants", self.tasks.dictionary_variants)):
            unknown = [n for n in listed if n not in names]
            if unknown:
                raise ValueError(f"{field_name}: {', '.join(map(repr, unknown))} is not a [[variants]] name; "
                                 f"choose one of: {', '.join(names) or '(no variants defined)'}")
        for variant in self.variants:
            if variant.name in self.tasks.dictionary_variants and variant.tasks is not None \
                    and not set(variant.tasks) & set(self.tasks.known):
                raise ValueError(f"tasks.dictionary_variants: variant {variant.name!r} trains none of tasks.known "
                                 f"(it trains {', '.join(variant.tasks)}), so it adds no atom to the dictionary; "
                                 "list known tasks in its tasks or leave it out of dictionary_variants")
        return self

    @model_validator(mode="after")
    def _labels_unique(self) -> ManifestFile:
        for field_name in ("decomposers", "metrics"):
            labels = [r.display for r in getattr(self, field_name)]
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            if dupes:
                raise ValueError(
                    f"{field_name}: {', '.join(dupes)} used twice; give each a distinct 'label'"
                )
            files = [safe_filename(x) for x in labels]
            clashes = sorted({labels[i] for i, f in enumerate(files) if files.count(f) > 1})
            if clashes:  # cannot happen with the hashing of safe_filename; kept as a guard
                raise ValueError(f"{field_name}: labels {', '.join(clashes)} map to the same file name")
        return self


@dataclass(frozen=True)
class Variant:
    """A resolved ``[[variants]]`` entry: its trainer and the tasks it trains."""

    name: str
    trainer: ResolvedPlugin
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Atom:
    """One dictionary column: the skill (task) it stands for and which training it is."""

    name: str
    task: TaskInfo
    variant: str = ""  # "" = the manifest's trainer

    @property
    def skill(self) -> str:
        return self.task.name


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with its plugins resolved and its tasks looked up."""

    path: Path
    name: str
    file: ManifestFile
    registry: Registry
    known: tuple[TaskInfo, ...]
    unknown: tuple[TaskInfo, ...]
    trainer: ResolvedPlugin
    mergers: tuple[ResolvedPlugin, ...]
    masker: ResolvedPlugin
    decomposers: tuple[ResolvedPlugin, ...]
    metrics: tuple[ResolvedPlugin, ...]
    report_metrics: tuple[ResolvedPlugin, ...] = ()
    """Metrics the ``[[targets]]`` attribution report needs that ``metrics`` does not list."""
    variants: tuple[Variant, ...] = ()

    @property
    def atoms(self) -> tuple[Atom, ...]:
        """The dictionary: every known task's adapter, then its ``dictionary_variants`` trainings."""
        out = [Atom(t.name, t) for t in self.known]
        for name in self.file.tasks.dictionary_variants:
            variant = self.variant(name)
            out += [Atom(f"{t.name}@{name}", t, name) for t in self.known if t.name in variant.tasks]
        return tuple(out)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @property
    def merger(self) -> ResolvedPlugin:
        """The first merger (the only one unless the manifest lists ``[[merger]]``)."""
        return self.mergers[0]

    def merger_for(self, method: str) -> ResolvedPlugin:
        """The merger that makes ``method`` (validation made sure exactly one offers it)."""
        for plugin in self.mergers:
            if method in plugin.instance().methods:
                return plugin
        raise KeyError(method)

    def task_range(self, method: str) -> tuple[int, int]:
        """How many constituents the targets of ``method`` draw from (the protocol's range, narrowed to
        what the method takes)."""
        lo, hi = method_task_range(self.merger_for(method).instance(), method)
        span = effective_task_range(self.protocol.min_tasks, self.protocol.max_tasks, lo, hi)
        assert span is not None, "validated"
        return span

    def mergers_config(self) -> Any:
        """What the run's targets depend on besides their jobs: the merger's config (a list when several)."""
        configs = [p.config() for p in self.mergers]
        return configs[0] if len(configs) == 1 else configs

    def source_of(self, task: str) -> str:
        """Which training of ``task`` a target's constituent uses: the first ``protocol.constituents``
        variant that trains it, else ``""`` (the dictionary's adapter)."""
        for name in self.protocol.constituents:
            if task in self.variant(name).tasks:
                return name
        return ""

    @property
    def seed(self) -> int:
        return self.file.seed

    @property
    def protocol(self) -> Protocol:
        return self.file.protocol

    @property
    def run_dir(self) -> Path:
        return Path(self.file.output.dir) / self.name

    @property
    def store_dir(self) -> Path:
        """Where the artifacts (``cache/``) live: ``output.store``, or the run directory."""
        return Path(self.file.output.store) if self.file.output.store else self.run_dir

    @property
    def all_tasks(self) -> tuple[TaskInfo, ...]:
        return self.known + self.unknown


def load_manifest(path: str | Path, manager: PluginManager | None = None) -> Manifest:
    """Read, validate and resolve a manifest. Raises :class:`UnmergeError` with one line per problem."""
    path = Path(path)
    return manifest_from_data(read_toml(path, "manifest"), path, manager)


def manifest_from_data(raw: dict[str, Any], path: Path, manager: PluginManager | None = None) -> Manifest:
    """Validate and resolve a manifest's parsed TOML; ``path`` locates relative paths and names errors."""
    try:
        file = ManifestFile.model_validate(raw)
    except ValidationError as exc:
        raise UnmergeError(format_validation_error(exc, prefix=f"{path}:")) from None

    manager = manager or PluginManager()
    errors: list[str] = []
    _check_requirements(path, file.requires, errors)
    registry = _load_registry(path, file.registry)
    _anchor_output(file, project_root(registry))
    known = _lookup_tasks(path, registry, "tasks.known", file.tasks.known, errors)
    unknown = _lookup_tasks(path, registry, "tasks.unknown", file.tasks.unknown, errors)
    _check_protocol(path, file, errors)
    per_method = file.protocol.targets_per_group // max(len(file.protocol.methods), 1)
    generated = {f"{g}-{m}-{i:02d}" for g in file.protocol.groups for m in file.protocol.methods
                 for i in range(per_method)}
    check_manifest_targets(path, file, [*file.tasks.known, *file.tasks.unknown], errors, generated)

    context = {"manifest_dir": path.parent.resolve()}  # plugins read their relative paths from here

    def resolve(stage: str, ref: PluginRef, where: str) -> ResolvedPlugin | None:
        try:
            plugin = manager.resolve(stage, ref.plugin, ref.params, label=ref.display, where=f"{path}: {where}",
                                     context=context)
            if isinstance(ref, DecomposerRef) and ref.per_layer is not None:
                plugin = manager.resolve(stage, PER_LAYER_PLUGIN, ref.per_layer, label=ref.display,
                                         where=f"{path}: {where}", inner=plugin, params_field="per_layer",
                                         context=context)
        except UnmergeError as exc:
            errors.append(str(exc))
            return None
        return plugin

    trainer = resolve("trainer", file.trainer, "trainer")
    task_names = [*file.tasks.known, *file.tasks.unknown]
    variants = []
    for i, ref in enumerate(file.variants):
        plugin = resolve("trainer", ref, f"variants[{i}]")
        for j, task in enumerate(ref.tasks or []):
            if task not in task_names:
                errors.append(f"{path}: variants[{i}].tasks[{j}]: {short_repr(task)} is not a task of this manifest "
                              "(tasks.known or tasks.unknown)")
        if plugin is not None:
            variants.append(Variant(ref.name, plugin, tuple(ref.tasks if ref.tasks is not None else task_names)))
    refs = file.merger_refs
    mergers = [resolve("merger", ref, "merger" if len(refs) == 1 else f"merger[{i}]") for i, ref in enumerate(refs)]
    masker = resolve("masker", file.masker, "masker")
    decomposers = [resolve("decomposer", r, f"decomposers[{i}]") for i, r in enumerate(file.decomposers)]
    metrics = [resolve("metric", r, f"metrics[{i}]") for i, r in enumerate(file.metrics)]
    listed = {r.plugin for r in file.metrics}
    report_metrics = [resolve("metric", PluginRef(plugin=name), "targets") for name in REPORT_METRICS
                      if file.targets and name not in listed]
    _check_capabilities(path, manager, trainer, [v.trainer for v in variants], [*[("merger" if len(refs) == 1 else f"merger[{i}]", m) for i, m in enumerate(mergers)], ("masker", masker),
                                        *[(f"decomposers[{i}]", d) for i, d in enumerate(decomposers)],
                                        *[(f"metrics[{i}]", m) for i, m in enumerate(metrics)]], errors)
    output_problem = check_output_dir(Path(file.output.dir) / (file.name or path.stem))
    if output_problem:
        errors.append(f"{path}: output.dir: {short_repr(file.output.dir, 80)} cannot hold the run directory: "
                      f"{output_problem}")
    if file.output.store and (store_problem := check_output_dir(Path(file.output.store))):
        errors.append(f"{path}: output.store: {short_repr(file.output.store, 80)} cannot hold the artifact store: "
                      f"{store_problem}")
    if file.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        errors.append(f"{path}: executor.kind: 'ray' needs Ray, which is not installed: pip install 'unmerge[ray]'")
    if all(mergers):
        _check_methods(path, file, [m for m in mergers if m is not None], trainer, errors, manager)
    if errors:
        raise UnmergeError("\n".join(errors))
    assert trainer and all(mergers) and masker
    name = file.name or path.stem
    if not is_safe_name(name):
        raise UnmergeError(f"{path}: name: the file name {name!r} is not a safe run name; set name = \"...\" "
                           "(letters, digits, '.', '_', '-')")
    return Manifest(
        path=path,
        name=name,
        file=file,
        registry=registry,
        known=tuple(known),
        unknown=tuple(unknown),
        trainer=trainer,
        mergers=tuple(m for m in mergers if m is not None),
        masker=masker,
        decomposers=tuple(d for d in decomposers if d),
        metrics=tuple(m for m in metrics if m),
        report_metrics=tuple(m for m in report_metrics if m),
        variants=tuple(variants),
    )


def project_root(registry: Registry) -> Path:
    """The folder a manifest's relative ``output.dir`` and ``output.store`` are taken from: the one
    holding its registry file (``registry = "../registry.toml"``, or the nearest ``registry.toml``
    upwards from the manifest) — the project's root, whatever the current folder. For the shipped
    ``experiments/*.toml`` that is the repository root: ``runs/quickstart`` lands there from
    ``unmerge run``, from ``unmerge_core.api.run`` and from a notebook in any folder alike."""
    return Path(registry.path).resolve().parent


def _anchor_output(file: ManifestFile, root: Path) -> None:
    """Make relative ``output.dir`` / ``output.store`` absolute under ``root`` (:func:`project_root`)."""
    if not Path(file.output.dir).is_absolute():
        file.output.dir = str(root / file.output.dir)
    if file.output.store is not None and not Path(file.output.store).is_absolute():
        file.output.store = str(root / file.output.store)


def _load_registry(manifest_path: Path, registry: str | None) -> Registry:
    if registry is not None:
        candidate = Path(registry)
        if not candidate.is_absolute():
            candidate = manifest_path.parent / candidate
        if not candidate.is_file():
            raise UnmergeError(f"{manifest_path}: registry: file not found: {candidate}")
        return Registry.load(candidate)
    for parent in [manifest_path.parent.resolve(), *manifest_path.parent.resolve().parents]:
        candidate = parent / "registry.toml"
        if candidate.is_file():
            return Registry.load(candidate)
    raise UnmergeError(f"{manifest_path}: registry: no registry.toml found next to the manifest or above it")


def _lookup_tasks(path: Path, registry: Registry, field: str, names: list[str], errors: list[str]) -> list[TaskInfo]:
    found = []
    for i, name in enumerate(names):
        if name not in registry.data.tasks:
            errors.append(
                f"{path}: {field}[{i}]: unknown task {short_repr(name)} (not in {registry.path.name}); "
                f"{choose_one_of(name, registry.task_names)}"
            )
        else:
            found.append(registry.task(name))
    return found


def _check_protocol(path: Path, file: ManifestFile, errors: list[str]) -> None:
    proto = file.protocol
    n_known, n_unknown = len(file.tasks.known), len(file.tasks.unknown)
    if "known" in proto.groups and n_known < proto.min_tasks:
        errors.append(
            f"{path}: protocol.min_tasks: the known group needs {proto.min_tasks} known tasks, "
            f"tasks.known has {n_known}"
        )
    if "unknown" in proto.groups and n_unknown < proto.min_tasks:
        errors.append(
            f"{path}: protocol.groups: the unknown group needs {proto.min_tasks} unknown tasks, "
            f"tasks.unknown has {n_unknown}"
        )
    if "mixed" in proto.groups and (n_unknown < 1 or max(proto.min_tasks, 2) > n_known + n_unknown):
        errors.append(f"{path}: protocol.groups: the mixed group needs at least one unknown task in tasks.unknown")


def _check_capabilities(path: Path, manager: PluginManager, trainer: ResolvedPlugin | None,
                        variant_trainers: list[ResolvedPlugin], plugins: list[tuple[str, ResolvedPlugin | None]],
                        errors: list[str]) -> None:
    """Every plugin's ``requires`` must be provided by the run or by every trainer's adapters."""
    if trainer is None:
        return
    provided = set(RUN_PROVIDES) | set(trainer.spec.provides)
    for variant in variant_trainers:
        provided &= set(RUN_PROVIDES) | set(variant.spec.provides)
    for where, plugin in plugins:
        if plugin is None:
            continue
        missing = [c for c in plugin.spec.requires if c not in provided]
        if missing:
            able = [p.name for p in manager.plugins("trainer") if set(missing) <= set(p.spec.provides)]
            errors.append(
                f"{path}: {where}.plugin: {plugin.spec.stage.value} plugin '{plugin.spec.name}' needs "
                f"{', '.join(c.value for c in missing)}, which trainer '{trainer.spec.name}' does not provide "
                f"(trainers that do: {', '.join(able) or 'none installed'})")


def effective_task_range(min_tasks: int, max_tasks: int, lo: int, hi: int | None) -> tuple[int, int] | None:
    """The constituent counts a method's targets draw from: the protocol's range within what the
    method takes (``None`` when they do not overlap)."""
    low, high = max(min_tasks, lo), min(max_tasks, hi if hi is not None else max_tasks)
    return (low, high) if low <= high else None


def _count_phrase(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"at least {lo} tasks"
    return f"exactly {lo} task{'s' if lo != 1 else ''}" if lo == hi else f"{lo} to {hi} tasks"


def _check_methods(path: Path, file: ManifestFile, mergers: list[ResolvedPlugin], trainer: ResolvedPlugin | None,
                   errors: list[str], manager: PluginManager) -> None:
    """Each protocol method is offered by exactly one merger, takes the protocol's task counts, and has
    the base weights and input statistics it needs."""
    proto = file.protocol
    offered: dict[str, list[ResolvedPlugin]] = {}
    for plugin in mergers:
        for method in plugin.instance().methods:
            offered.setdefault(method, []).append(plugin)
    names = ", ".join(f"'{p.label}'" for p in mergers)
    for i, method in enumerate(proto.methods):
        where = f"{path}: protocol.methods[{i}]"
        owners = offered.get(method, [])
        if not owners:
            who = f"merger {names} has no method" if len(mergers) == 1 else f"no merger ({names}) has method"
            elsewhere = [p.name for p in manager.plugins("merger") if method in p.merge_methods()]
            hint = (f"; the installed merger plugin '{elsewhere[0]}' offers it: add [[merger]] plugin = "
                    f"\"{elsewhere[0]}\"" if elsewhere else f"; {choose_one_of(method, sorted(offered))}")
            errors.append(f"{where}: {who} {short_repr(method)}{hint}")
            continue
        if len(owners) > 1:
            errors.append(f"{where}: method {short_repr(method)} is offered by several mergers "
                          f"({', '.join(repr(p.label) for p in owners)}); list only one of them")
            continue
        plugin = owners[0]
        merger = plugin.instance()
        check = getattr(merger, "check_method", None)
        problem = check(method) if callable(check) else None
        if problem:
            errors.append(f"{where}: {method} (merger '{plugin.label}'): {problem}")
            continue
        if proto.weights == "dirichlet" and method in getattr(merger, "unweighted_methods", ()):
            errors.append(f"{where}: {method} ignores per-task weights (merger '{plugin.label}'), so dirichlet "
                          "target weights would be recorded as truth without being used; set protocol.weights "
                          "= \"uniform\" or leave the method out")
        lo, hi = method_task_range(merger, method)
        span = effective_task_range(proto.min_tasks, proto.max_tasks, lo, hi)
        if span is None:
            errors.append(f"{where}: {method} merges {_count_phrase(lo, hi)} (merger '{plugin.label}'), "
                          f"but protocol.min_tasks..max_tasks is {proto.min_tasks}..{proto.max_tasks}")
        elif "mixed" in proto.groups and span[1] < 2:
            errors.append(f"{where}: {method} merges {_count_phrase(lo, hi)} (merger '{plugin.label}'): the mixed "
                          "group needs at least 2 (one known, one unknown); drop mixed from protocol.groups")
        else:
            available = {"known": len(file.tasks.known), "unknown": len(file.tasks.unknown),
                         "mixed": len(file.tasks.known) + len(file.tasks.unknown)}
            for group in proto.groups:
                low = max(span[0], 2) if group == "mixed" else span[0]
                if low > min(span[1], available[group]):
                    errors.append(f"{where}: {method} targets need at least {low} tasks (merger '{plugin.label}', "
                                  f"protocol.min_tasks {proto.min_tasks}), but the {group} group draws from "
                                  f"{available[group]}")
                    break
        if method in getattr(merger, "base_methods", ()) and trainer is not None \
                and Capability.BASE_MODEL not in trainer.spec.provides:
            errors.append(f"{where}: {method} is defined on full weights and needs the base model's weights "
                          f"(merger '{plugin.label}'), which trainer '{trainer.spec.name}' does not provide")
        if method in getattr(merger, "activation_methods", ()) and trainer is not None \
                and Capability.ACTIVATION_STATISTICS not in trainer.spec.provides:
            errors.append(f"{where}: {method} (merger '{plugin.label}') scales each task vector by the base model's "
                          f"input statistics on the task's training data, which trainer '{trainer.spec.name}' cannot "
                          "record (no base model or no training data); set scaling = \"uniform\" in the merger's "
                          "params for the unscaled variant")


def _check_requirements(path: Path, requires: list[str], errors: list[str]) -> None:
    import importlib.metadata as md

    for i, text in enumerate(requires):
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            errors.append(f"{path}: requires[{i}]: {exc}")
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            errors.append(f"{path}: requires[{i}]: '{req.name}' is not installed; run: pip install '{text}'")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            errors.append(
                f"{path}: requires[{i}]: '{req.name}' {version} is installed but '{text}' is required; "
                f"run: pip install --upgrade '{text}'"
            )
