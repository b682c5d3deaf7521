"""Typed values that cross the boundary between the core and its plugins.

Everything a plugin receives or returns is defined here, so a plugin author reads one module to know
the shapes involved. Tensors are ``torch.Tensor`` while they are still in model space (one module of
ΔW); once a mask has reduced them to vectors they are ``numpy.ndarray`` of float64.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler
from pydantic_core import CoreSchema

if TYPE_CHECKING:
    import torch

    from unmerge_core.io.adapters import LoraAdapter
    from unmerge_core.io.lowrank import LowRankDelta
    from unmerge_core.pipeline.parallel import BufferPool


class Stage(str, Enum):
    """The five stages of an UNMERGE run, in the order the runner executes them."""

    TRAINER = "trainer"
    MERGER = "merger"
    MASKER = "masker"
    DECOMPOSER = "decomposer"
    METRIC = "metric"


STAGE_NAMES: tuple[str, ...] = tuple(s.value for s in Stage)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
CLAIMS: tuple[str, ...] = ("exact", "retrained", "relative")
"""Claim levels of an attributed atom (:attr:`Decomposition.claims`): this exact adapter; this skill,
another training; this skill or a close relative (cannot tell apart here, not a claim of the skill)."""


def strict_numbers(schema: Any) -> Any:
    """``schema`` (a pydantic core schema) with every ``int``, ``bool`` and ``float`` made strict, in place.

    An integer field then takes only an integer (not ``true``, ``2.0`` or ``"3"``), a boolean field only
    ``true`` or ``false`` (not ``1`` or ``1.0``), a float field a number but not a boolean — while a
    float field still takes a TOML integer (``alpha = 1``), and strings, paths, tuples and enums are
    read as before (only the number schemas change).
    """
    if isinstance(schema, dict):
        if schema.get("type") in ("int", "bool", "float"):
            schema["strict"] = True
        for value in schema.values():
            strict_numbers(value)
    elif isinstance(schema, list):
        for value in schema:
            strict_numbers(value)
    return schema


class StrictNumbers(BaseModel):
    """A model whose numbers are strict (:func:`strict_numbers`): a user's ``true`` is never a count,
    a ``1.0`` never a switch. Base of plugin parameters and of the manifest's tables."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return strict_numbers(handler(source))


class PluginParams(StrictNumbers):
    """Base class of every plugin's parameter model: unknown keys, NaN and infinities are errors, and
    numbers are strict (:class:`StrictNumbers`: ``true`` is not an integer, ``1.0`` not a boolean)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoParams(PluginParams):
    """Parameter model of a plugin that takes no parameters."""


class Capability(str, Enum):
    """What a plugin may need from the run around it, and what a trainer or command provides.

    A plugin lists what it ``requires`` in its :class:`PluginSpec`; ``unmerge validate`` rejects a
    manifest (or ``unmerge attribute`` a request) that cannot provide it, in one line, before any work.
    """

    BASE_MODEL = "base-model"
    """A loadable transformers model (and tokenizer) that the adapters were trained on; provided by
    trainers that train or load real adapters, not by the ``synthetic`` trainer."""
    TASK_DATA = "task-data"
    """Examples of every task of the run (the registry's data sources)."""
    CONSTITUENT_VECTORS = "constituent-vectors"
    """Masked task vectors of every constituent of a target, including those outside the dictionary."""
    ACTIVATION_STATISTICS = "activation-statistics"
    """Per-input-feature statistics of the base model's inputs to every adapted linear module, on each
    task's own training data (:class:`InputStatistics`); provided by trainers that implement
    :class:`InputStatisticsTrainer` on a real base model. Needed by mergers with ``activation_methods``
    (:class:`ActivationMerger`)."""
    TARGET_DELTAS = "target-deltas"
    """Each target's full ΔW, module by module (:meth:`RunContext.target_deltas`): made again by the run's
    merger for the targets a run made, read from the files for existing models (``unmerge attribute
    --verify``)."""


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin declares about itself; returned by the stage hooks in :mod:`hookspecs`.

    Attributes:
        name: Normalised name used in manifests (lower case, digits, ``-``, ``_``, ``.``).
        stage: The stage the plugin serves.
        summary: One line shown by ``unmerge plugins``.
        reference: URL of the paper or library the algorithm comes from.
        params: Pydantic model of the plugin's parameters (subclass of :class:`PluginParams`).
        factory: Called with a validated ``params`` instance, returns the implementation object
            (a :class:`Trainer`, :class:`Merger`, :class:`Masker`, :class:`Decomposer` or :class:`Metric`).
        requires: :class:`Capability` values the plugin cannot work without (checked at validation).
        provides: For trainers, the :class:`Capability` values their adapters come with
            (``base-model`` when the adapters were trained on a real, loadable model).
        wraps: The plugin wraps another plugin of its stage: ``factory(params, inner)`` receives the
            inner plugin's object too (the ``per-layer`` decomposer; a manifest asks for it with
            ``per_layer = ...`` on the inner plugin's entry).
    """

    name: str
    stage: Stage
    summary: str
    reference: str
    params: type[PluginParams]
    factory: Callable[[Any], Any]
    requires: tuple[Capability, ...] = ()
    provides: tuple[Capability, ...] = ()
    wraps: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"plugin name {self.name!r} must match {_NAME_RE.pattern}")
        object.__setattr__(self, "stage", Stage(self.stage))
        object.__setattr__(self, "requires", tuple(Capability(c) for c in self.requires))
        object.__setattr__(self, "provides", tuple(Capability(c) for c in self.provides))


# --------------------------------------------------------------------------------------------------
# Tasks and adapters (trainer stage)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """One micro-task of the registry.

    Attributes:
        name: Registry key, e.g. ``"reverse-words"``.
        category: One of ``code``, ``structured``, ``reasoning``, ``style``, ``other``.
        source: The registry's data-source table for this task, as a plain dict (``kind`` says
            which loader reads it: ``procedural``, ``hf`` or ``jsonl``). Plugins interpret it.
        description: Free text from the registry.
    """

    name: str
    category: str
    source: Mapping[str, Any]
    description: str = ""


@dataclass(frozen=True)
class TrainJob:
    """One unit of work for a trainer: produce the adapter of one task.

    Attributes:
        task: The micro-task to train.
        output_dir: Empty directory the trainer must fill with a PEFT adapter
            (``adapter_config.json`` + ``adapter_model.safetensors``). The runner moves it into the
            cache atomically once ``train`` returns.
        seed: Seed derived from the manifest's seed and the task name.
        workspace: Directory shared by all jobs of this trainer in this run, for reusable inputs
            (for example a locally built base model). Keyed by the trainer's parameters.
        task_index: Position of the task in the manifest's task list (some trainers use it).
    """

    task: TaskInfo
    output_dir: Path
    seed: int
    workspace: Path
    task_index: int = 0


# --------------------------------------------------------------------------------------------------
# Masks and merge jobs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mask:
    """A binary mask over ΔW coordinates, stored sparsely as flat indices per module.

    Attributes:
        indices: Module name -> sorted int64 array of flat (row-major) indices into that module's
            ΔW of shape ``shapes[module]``.
        shapes: Module name -> ``(out_features, in_features)``.

    The masked vector of a task is the concatenation, in ``modules`` order, of ``ΔW.flatten()[idx]``.
    """

    indices: Mapping[str, np.ndarray]
    shapes: Mapping[str, tuple[int, int]]

    @property
    def modules(self) -> list[str]:
        return list(self.indices)

    @property
    def size(self) -> int:
        return int(sum(len(v) for v in self.indices.values()))

    def slices(self) -> dict[str, slice]:
        """Module name -> slice of the masked vector holding that module's coordinates."""
        out: dict[str, slice] = {}
        start = 0
        for name, idx in self.indices.items():
            out[name] = slice(start, start + len(idx))
            start += len(idx)
        return out


@dataclass(frozen=True)
class MergeJob:
    """One target of a run: how it is merged (what a merger needs besides the tensors) and its truth.

    Attributes:
        target_id: Stable identifier, e.g. ``"mixed-ties-03"``.
        method: Merge method name (one of the merger's ``methods``); for an existing model given to
            the run, its kind (``model`` or ``adapter``).
        tasks: Constituent task names, in order (the ground truth).
        weights: One weight per constituent.
        seed: Seed for random methods (DARE); derived from the manifest seed and ``target_id``.
        group: ``known``, ``mixed`` or ``unknown`` (which constituents are in the dictionary);
            ``external`` for an existing model without ground truth.
        sources: Which training of each constituent the target was made from: ``""`` for the
            dictionary's own adapter (the default), else the name of a manifest ``[[variants]]``
            entry (an independent retraining, a full fine-tune...). Empty when all are ``""``.
        coefficients: Each constituent's coefficient in the target's ΔW where the method scales the
            weights (mergekit's ``lambda`` and ``normalize``: see :func:`method_coefficients`); empty
            when they are the weights themselves. :attr:`true_weights` is the ground truth metrics score.
    """

    target_id: str
    method: str
    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    seed: int
    group: str = ""
    sources: tuple[str, ...] = ()
    coefficients: tuple[float, ...] = ()

    def source(self, i: int) -> str:
        return self.sources[i] if self.sources else ""

    @property
    def true_weights(self) -> tuple[float, ...]:
        """The ground truth: each constituent's coefficient in the target's ΔW."""
        return self.coefficients or self.weights

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain values (saved with every target; part of the target's cache key)."""
        out: dict[str, Any] = {"target_id": self.target_id, "group": self.group, "method": self.method,
                               "tasks": list(self.tasks), "weights": list(self.weights), "seed": self.seed}
        if any(self.sources):
            out["sources"] = list(self.sources)
        if self.coefficients:
            out["coefficients"] = list(self.coefficients)
        return out


# --------------------------------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DictionaryGram:
    """``gram = DᵀD`` of one dictionary matrix, with the matrix it was formed from (read only)."""

    dictionary: np.ndarray = field(repr=False)
    gram: np.ndarray

    @classmethod
    def of(cls, dictionary: np.ndarray) -> DictionaryGram:
        gram = np.ascontiguousarray(dictionary.T @ dictionary)
        gram.setflags(write=False)
        return cls(dictionary, gram)


@dataclass(frozen=True)
class DecompositionProblem:
    """A target vector to express with a dictionary of atoms.

    Attributes:
        dictionary: ``(n_coords, n_atoms)`` float64 matrix; column ``j`` is atom ``atom_names[j]``
            restricted to the mask.
        target: ``(n_coords,)`` float64 target task vector restricted to the same mask.
        atom_names: Names of the dictionary tasks, one per column.
        groups: Module name -> slice of rows belonging to that module (for per-layer methods).
        seed: Seed for randomised solvers.
        skills: The skill (task) of each atom when the dictionary holds several trainings of one
            skill; empty when every atom is its own skill. A decomposer may decide per skill
            (pooling its atoms); metrics judge attributions per skill either way.
        gram: ``DᵀD`` when the caller formed it once for the dictionary (a run does: every target
            shares it), else ``None``. Use :meth:`normal_equations` rather than this field: it
            checks that the Gram matrix belongs to this problem's ``dictionary`` (a sub-problem made
            with ``dataclasses.replace`` keeps the field but not the matrix it was formed from).
    """

    dictionary: np.ndarray
    target: np.ndarray
    atom_names: tuple[str, ...]
    groups: Mapping[str, slice] = field(default_factory=dict)
    seed: int = 0
    skills: tuple[str, ...] = ()
    gram: DictionaryGram | None = field(default=None, repr=False)

    def normal_equations(self) -> tuple[np.ndarray, np.ndarray]:
        """``(DᵀD, Dᵀy)``: the Gram matrix shared by every target of the dictionary (formed here only
        when the caller gave none, or one formed from another matrix) and this target's right-hand
        side. A least-squares decomposer working from them costs ``n_coords × n_atoms`` per target
        instead of ``n_coords × n_atoms²``. The Gram matrix is read only (shared): copy it to change it."""
        if self.gram is not None and self.gram.dictionary is self.dictionary:
            gram = self.gram.gram
        else:
            gram = self.dictionary.T @ self.dictionary
            gram.setflags(write=False)  # read only either way: a decomposer copies before changing it
        return gram, self.dictionary.T @ self.target

    @property
    def skill_of_atom(self) -> tuple[str, ...]:
        """One skill name per atom (the atom names themselves when ``skills`` is empty)."""
        return self.skills or self.atom_names


@dataclass
class Decomposition:
    """A decomposer's answer.

    Attributes:
        coefficients: ``(n_atoms,)`` float array, one coefficient per dictionary atom.
        reconstruction: ``(n_coords,)`` the dictionary times the coefficients (or the decomposer's own
            reconstruction if it is not linear in the coefficients).
        support: Optional boolean ``(n_atoms,)``: the atoms the decomposer itself declares present.
            When ``None`` the metrics derive the support from ``|coefficients|`` and their threshold.
        out_of_dictionary: Optional verdict: ``True`` when the decomposer judges that the target is
            not (or not wholly) made of dictionary atoms.
        info: Free-form JSON-serialisable diagnostics (chosen penalty, iterations, scores...).
        claims: Optional claim level per atom (one of :data:`CLAIMS`, or ``None`` for an atom that is not
            attributed): what an attributed atom stands for — ``"exact"`` this very adapter,
            ``"retrained"`` this skill from another training, ``"relative"`` this skill *or a close
            relative of it* (the dictionary cannot tell them apart). A ``"relative"`` atom is listed but is
            not a claim of its skill (:meth:`claimed`). ``None`` (no levels): every attributed atom is
            claimed as ``"exact"``, the only thing a plain fit of the atoms states.
    """

    coefficients: np.ndarray
    reconstruction: np.ndarray
    support: np.ndarray | None = None
    out_of_dictionary: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)
    claims: tuple[str | None, ...] | None = None

    def selected(self, threshold: float = 1e-3, relative: bool = False) -> np.ndarray:
        """The support rule every metric and report uses: the atoms this decomposition attributes.

        The decomposer's own ``support`` when it declares one; otherwise ``|c| > threshold``
        (``threshold × max |c|`` when ``relative``). Boolean array, one entry per atom.
        """
        if self.support is not None:
            return np.asarray(self.support, dtype=bool).reshape(-1)
        coef = np.abs(np.asarray(self.coefficients, dtype=np.float64)).reshape(-1)
        limit = threshold * (float(coef.max()) if relative and coef.size else 1.0)
        return coef > limit

    def claim_levels(self, threshold: float = 1e-3, relative: bool = False) -> list[str | None]:
        """The claim level of every atom: ``None`` where it is not attributed, else its level in
        :attr:`claims` (``"exact"`` when the decomposer gives none)."""
        chosen = self.selected(threshold, relative)
        given = self.claims if self.claims is not None else (None,) * chosen.shape[0]
        return [(given[j] or "exact") if on else None for j, on in enumerate(chosen)]

    def claimed(self, threshold: float = 1e-3, relative: bool = False) -> np.ndarray:
        """The atoms claimed as their skill: attributed with any level except ``"relative"`` (every
        metric and suite that counts claims counts these)."""
        return np.array([c is not None and c != "relative" for c in self.claim_levels(threshold, relative)],
                        dtype=bool)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """What a run knows beyond masked vectors; for metrics that act on models (causal verification).

    Attributes:
        adapter_dirs: Task name -> PEFT adapter directory, for every task of the run.
        tasks: Task name -> registry entry (data source for held-out evaluation).
        mask: The mask the vectors were taken on.
        merger: The first merger object of the run (a run may list several); use
            :meth:`target_deltas` for a target's full ΔW — it picks the merger of the target's method
            and hands full-weight methods the base model.
        seed: The manifest's seed.
        run_dir: The run directory (for metric artifacts).
        targets: Every target the run made, in run order (with its group), so a metric can choose
            which targets to look at without depending on the order it is called in.
        dense_merge: What :meth:`target_deltas` calls (set by the runner or the attribute command).
        base_model: The base model to load for model-level metrics (``None``: the one the adapters name).
    """

    adapter_dirs: Mapping[str, Path]
    tasks: Mapping[str, TaskInfo]
    mask: Mask
    merger: Any
    seed: int
    run_dir: Path
    targets: tuple[MergeJob, ...] = ()
    dense_merge: Callable[[MergeJob], Iterator[tuple[str, torch.Tensor]]] | None = field(default=None, repr=False)
    base_model: str | None = None

    def target_deltas(self, job: MergeJob) -> Iterator[tuple[str, torch.Tensor]]:
        """The target's full ΔW, ``(module, tensor)`` one module at a time: for a target the run made,
        every module a constituent adapts, merged by the run's merger exactly as the run made it; for
        an existing model, every weight that differs from the base."""
        if self.dense_merge is None:
            raise RuntimeError("this RunContext was made without the run's dense merge")
        return self.dense_merge(job)


@dataclass(frozen=True)
class TargetEvaluation:
    """Everything a metric may look at for one (target, decomposer) pair.

    Attributes:
        target_id: The target's identifier.
        group: ``known``, ``mixed`` or ``unknown``; ``external`` for an existing model without ground truth
            (``unmerge attribute``, manifest ``[[targets]]``): metrics that need the truth return ``None``.
        method: Merge method that produced the target (``model`` or ``adapter`` for existing targets).
        true_tasks: Constituent task names (ground truth).
        true_weights: Their merge weights.
        atom_names: Dictionary task names, aligned with ``decomposition.coefficients``.
        target: Masked target vector.
        decomposition: The decomposer's answer.
        task_vectors: Masked vectors of every task of the run (dictionary and unknown), by name.
        categories: Registry category of every task of the run, by name.
        merge_job: The job that formed the target (method, weights, seed), when the run made it.
        context: Paths and objects of the run, for metrics that need models (may be ``None``).
        decomposer: Label of the decomposer that produced ``decomposition`` (for metric artifacts).
        skills: The skill of each atom (see :class:`DecompositionProblem`); empty = one atom per skill.
    """

    target_id: str
    group: str
    method: str
    true_tasks: tuple[str, ...]
    true_weights: tuple[float, ...]
    atom_names: tuple[str, ...]
    target: np.ndarray
    decomposition: Decomposition
    task_vectors: Mapping[str, np.ndarray]
    categories: Mapping[str, str]
    merge_job: MergeJob | None = None
    context: RunContext | None = None
    decomposer: str | None = None
    skills: tuple[str, ...] = ()

    @property
    def skill_of_atom(self) -> tuple[str, ...]:
        """One skill name per atom (the atom names themselves when the dictionary has one atom per skill)."""
        return self.skills or self.atom_names

    @property
    def known_true_tasks(self) -> tuple[str, ...]:
        """The constituents that are in the dictionary (as skills)."""
        known = set(self.skill_of_atom)
        return tuple(t for t in self.true_tasks if t in known)

    def selected_skills(self, threshold: float = 1e-3, relative: bool = False) -> set[str]:
        """The skills the decomposition claims (a skill is claimed when any of its atoms is attributed with a
        claim level other than ``"relative"``, :meth:`Decomposition.claimed`)."""
        chosen = self.decomposition.claimed(threshold, relative)
        return {skill for skill, on in zip(self.skill_of_atom, chosen) if on}

    def skill_coefficients(self) -> dict[str, float]:
        """Coefficient per skill: the sum over its atoms."""
        out: dict[str, float] = {}
        for skill, c in zip(self.skill_of_atom, np.asarray(self.decomposition.coefficients, dtype=np.float64)):
            out[skill] = out.get(skill, 0.0) + float(c)
        return out


MetricValue = float | None


# --------------------------------------------------------------------------------------------------
# Implementation protocols (what a PluginSpec.factory returns)
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Trainer(Protocol):
    """What a trainer's ``factory(params)`` returns (see :func:`unmerge_core.hookspecs.unmerge_trainers`)."""

    def train(self, job: TrainJob) -> None: ...


@runtime_checkable
class Merger(Protocol):
    """What a merger's ``factory(params)`` returns (see :func:`unmerge_core.hookspecs.unmerge_mergers`)."""

    methods: Sequence[str]

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor: ...


@runtime_checkable
class MaskedMerger(Merger, Protocol):
    """A merger with the optional fast path: methods evaluated on the mask's coordinates only."""

    masked_methods: Collection[str]
    statistics_methods: Collection[str]

    def statistics_config(self) -> Mapping[str, Any]: ...

    def module_statistics(self, delta: LowRankDelta, module: str) -> Mapping[str, float]: ...

    def merge_masked(self, job: MergeJob, module: str, flat_indices: np.ndarray, values: Sequence[np.ndarray],
                     statistics: Sequence[Mapping[str, float] | None]) -> np.ndarray: ...


@runtime_checkable
class BaseWeightMerger(Merger, Protocol):
    """A merger with methods defined on full weights (slerp, Karcher mean...): they need the base's weights."""

    base_methods: Collection[str]

    def merge_module_on_base(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor],
                             base: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class InputStatistics:
    """What one linear module of the base model received as input on one task's training data.

    Sums over every non-padding token of the batches (float64, one entry per input feature), so two
    sets of batches combine by adding them. Any statistic a method scales by follows from them; a
    constant factor (sum or mean) makes no difference to a method that scales and unscales.

    Attributes:
        count: Tokens seen.
        total: Σ x over the tokens, shape ``(in,)``.
        squares: Σ x² over the tokens, shape ``(in,)`` (OATS's squared column norms of the inputs).
    """

    count: int
    total: torch.Tensor
    squares: torch.Tensor

    def second_moment(self) -> torch.Tensor:
        """E[x²] per input feature: the squared L2 norm of each input column over the tokens, divided by their count."""
        return self.squares / max(self.count, 1)

    def variance(self) -> torch.Tensor:
        """E[(x − E[x])²] per input feature (clipped at zero against rounding)."""
        mean = self.total / max(self.count, 1)
        return (self.second_moment() - mean * mean).clamp_min(0.0)


@dataclass(frozen=True)
class InputStatisticsJob:
    """One unit of work for an :class:`InputStatisticsTrainer`: record a task's inputs on the base model.

    Attributes:
        task: Whose training data to run through the base model.
        seed: The seed the trainer trains this task with (:attr:`TrainJob.seed`), so the examples are
            the ones the adapter was trained on.
        workspace: The trainer's workspace (:attr:`TrainJob.workspace`).
        modules: The linear modules to record, by the names adapters use (``model.layers.0.self_attn.q_proj``).
        max_batches: At most this many of the trainer's batches (of its own batch size).
    """

    task: TaskInfo
    seed: int
    workspace: Path
    modules: tuple[str, ...]
    max_batches: int


@runtime_checkable
class InputStatisticsTrainer(Protocol):
    """A trainer that can run its base model on a task's training data and record the inputs of linear
    modules (with :func:`unmerge_core.io.activations.record_input_statistics`); declares
    ``provides=(Capability.ACTIVATION_STATISTICS, ...)``. Must return an entry for every module asked for."""

    def train(self, job: TrainJob) -> None: ...

    def input_statistics(self, job: InputStatisticsJob) -> Mapping[str, InputStatistics]: ...


@runtime_checkable
class ActivationMerger(Merger, Protocol):
    """A merger with methods that scale each task vector by its task's input statistics (Scale-SVD, OATS).

    ``activation_methods`` may depend on the parameters (empty when the merger is set to uniform
    scaling); ``activation_batches`` is how many of the trainer's batches per task to record. The core
    computes the statistics once per (base, task, batches), caches them, and calls
    ``merge_module_scaled`` with one :class:`InputStatistics` per constituent for every module — a
    module without statistics is an error naming it, never a fallback to uniform scaling."""

    activation_methods: Collection[str]
    activation_batches: int

    def merge_module_scaled(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor],
                            inputs: Sequence[InputStatistics]) -> torch.Tensor: ...


@runtime_checkable
class LowRankMerger(Merger, Protocol):
    """A merger with methods computed from the constituents' low-rank factors, gathered at the mask."""

    lowrank_methods: Collection[str]

    def merge_lowrank(self, job: MergeJob, module: str, deltas: Sequence[LowRankDelta],
                      flat_indices: np.ndarray) -> np.ndarray: ...


def method_coefficients(merger: Any, job: MergeJob) -> tuple[float, ...]:
    """The ground truth of a generated target: each constituent's coefficient in its ΔW.

    A merger whose method scales the weights (mergekit's ``lambda``, ``normalize``) says so through an
    optional ``coefficients(job)`` returning one float per constituent, or ``None`` where the method has
    no such coefficients (slerp); otherwise, and then, the target's weights are its truth.
    """
    coefficients = getattr(merger, "coefficients", None)
    if coefficients is None:
        return job.weights
    out = coefficients(job)
    if out is None:
        return job.weights
    values = tuple(float(c) for c in out)
    if len(values) != len(job.tasks):
        raise ValueError(f"coefficients({job.target_id}) gave {len(values)} values for {len(job.tasks)} constituents")
    return values


def method_task_range(merger: Any, method: str) -> tuple[int, int | None]:
    """How many constituents ``method`` of ``merger`` takes: its ``method_tasks(method)`` when it has
    one (``(min, max)``, ``max`` ``None`` for no limit), else any number from one."""
    bounds = getattr(merger, "method_tasks", None)
    if bounds is None:
        return 1, None
    lo, hi = bounds(method)
    return int(lo), (None if hi is None else int(hi))


@runtime_checkable
class Masker(Protocol):
    """What a masker's ``factory(params)`` returns (see :func:`unmerge_core.hookspecs.unmerge_maskers`)."""

    def build_mask(self, adapters: Sequence[LoraAdapter]) -> Mask: ...


class ModuleFold(Protocol):
    """One module's share of a :class:`FoldingMasker`'s mask, fed block of rows by block of rows.

    The core forms each dictionary adapter's ΔW once per module, :data:`BLOCK_ROWS` rows at a time,
    and hands every block to the fold (and, in the same pass, to the merge statistics of the
    adapters that need them), so the masker and the statistics share one formation of ΔW.
    """

    def add(self, adapter: int, start: int, block: torch.Tensor) -> None:
        """Fold rows ``start … start + len(block)`` of adapter ``adapter``'s ΔW (float32, read only:
        the same block goes to other consumers)."""
        ...

    def candidates(self, start: int, stop: int) -> np.ndarray:
        """Called once every adapter's block of rows ``start … stop`` was added: the flat indices
        (ascending, int64) in those rows that :meth:`select` may still return."""
        ...

    def select(self) -> np.ndarray:
        """The module's mask indices (ascending, int64), every one among the offered candidates."""
        ...


class FoldPlan(Protocol):
    """One shared pass of a :class:`FoldingMasker` over a dictionary: its modules and their folds."""

    modules: Sequence[str]
    """The mask's modules, in the mask's order."""

    def fold(self, module: str, pool: BufferPool) -> ModuleFold:
        """A fresh fold for one module (called on worker threads, one module per thread at a time);
        ``pool`` gives the calling thread reusable buffers that live as long as the pass."""
        ...


@runtime_checkable
class FoldingMasker(Masker, Protocol):
    """A masker whose mask is made module by module from streamed ΔW blocks (the shared pass).

    ``build_mask(adapters)`` must equal the mask assembled from the plan's folds' ``select()``:
    the shared pass is only a faster way to the same mask.
    """

    def fold_plan(self, adapters: Sequence[LoraAdapter]) -> FoldPlan | None:
        """The pass over ``adapters`` (``None`` declines it: the core calls :meth:`build_mask`)."""
        ...


class StatisticsStream(Protocol):
    """One (task, module)'s merge statistics computed from ΔW given block of rows by block of rows."""

    def add(self, block: np.ndarray) -> None:
        """The next :data:`BLOCK_ROWS` rows of ΔW, flattened (float32, read only), in row order."""
        ...

    def finish(self) -> Mapping[str, float]:
        """The statistics, equal to ``module_statistics`` of the same ΔW."""
        ...


@runtime_checkable
class StreamingStatisticsMerger(MaskedMerger, Protocol):
    """A fast-path merger whose statistics can be fed from the shared pass over ΔW."""

    def statistics_stream(self, delta: LowRankDelta, module: str) -> StatisticsStream: ...


@runtime_checkable
class Decomposer(Protocol):
    """What a decomposer's ``factory(params)`` returns (see :func:`unmerge_core.hookspecs.unmerge_decomposers`)."""

    def decompose(self, problem: DecompositionProblem) -> Decomposition: ...


@runtime_checkable
class Metric(Protocol):
    """What a metric's ``factory(params)`` returns (see :func:`unmerge_core.hookspecs.unmerge_metrics`)."""

    def compute(self, evaluation: TargetEvaluation) -> Mapping[str, MetricValue]: ...


STAGE_PROTOCOLS: dict[Stage, tuple[type, tuple[str, ...]]] = {
    Stage.TRAINER: (Trainer, ("train",)),
    Stage.MERGER: (Merger, ("methods", "merge_module")),
    Stage.MASKER: (Masker, ("build_mask",)),
    Stage.DECOMPOSER: (Decomposer, ("decompose",)),
    Stage.METRIC: (Metric, ("compute",)),
}
"""Each stage's Protocol and the members a built plugin object must have."""

MASKED_MERGER_MEMBERS: tuple[str, ...] = ("masked_methods", "statistics_methods", "statistics_config",
                                          "module_statistics", "merge_masked")
"""The fast-path members of :class:`MaskedMerger`: a merger has all of them or none."""

OPTIONAL_MERGER_PARTS: dict[str, tuple[str, ...]] = {
    "fast merge path": MASKED_MERGER_MEMBERS,
    "low-rank path": ("lowrank_methods", "merge_lowrank"),
    "full-weight methods": ("base_methods", "merge_module_on_base"),
    "activation-scaled methods": ("activation_methods", "activation_batches", "merge_module_scaled"),
}
"""Each optional part of the merger contract and its members: a merger has all of a part's members or none."""
