"""The one decompose → score loop, shared by ``unmerge run`` (generated targets and a manifest's
``[[targets]]``) and ``unmerge attribute``.

For every target and every decomposer the loop builds a :class:`~unmerge_core.types.DecompositionProblem`
(read-only arrays: a plugin that writes into its input fails with an error naming it instead of
corrupting the next decomposer's input), runs the decomposer, checks what it returned
(:func:`check_decomposition`), then runs every metric on the result (:func:`metric_values`).

With a store, each decomposition and each metric's values are cached as one file per
(target, decomposer) and per (decomposition, metric), keyed by everything they depend on, so a run
killed in the middle of scoring loses only the pair in progress.

**Details beside the values.** A metric that writes files of its own into the run directory (the
``causal-ablation`` metric's ``causal/`` folder) loses them on a rerun: the first run to claim a run
directory removes the previous run's results (:mod:`.run_directory`), and a metric whose values come from
the cache is not called. Such a metric defines two optional methods (duck-typed; the Metric protocol
needs only ``compute``):

- ``metric_details(evaluation)``: right after ``compute``, what it wrote for that evaluation, as a
  JSON-serialisable value (``None``: nothing); kept in the metric-values cache file beside the values;
- ``restore_details(evaluation, details)``: called instead of ``compute`` when the values come from the
  cache (with the kept value, unless it is ``None``): write those files again.

A cached file without kept details for such a metric (written before details were kept) is a cache miss:
the metric is computed again, so its files come back.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from unmerge_core.errors import PluginError, plugin_errors, short_repr
from unmerge_core.io.store import (
    atomic_save_tensors,
    atomic_write_json,
    content_key,
    derive_seed,
    load_tensors,
    to_jsonable,
)
from unmerge_core.pipeline.executor import Executor, Progress, SequentialExecutor, progress
from unmerge_core.types import (
    CLAIMS,
    Decomposition,
    DecompositionProblem,
    DictionaryGram,
    MergeJob,
    RunContext,
    TargetEvaluation,
)

NEAR_DUPLICATE_COSINE = 0.99
"""Two atoms whose masked vectors have at least this cosine are reported as near-duplicates."""


def read_only(array: np.ndarray) -> np.ndarray:
    """A read-only float64 view of ``array`` (what plugins are handed)."""
    view = np.asarray(array, dtype=np.float64).view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True)
class ScoreTarget:
    """One target to decompose: its specification (ground truth) and its masked vector.

    ``key`` identifies the vector's content (the target artifact's key); ``None`` disables caching.
    """

    spec: MergeJob
    vector: np.ndarray
    key: str | None = None


@dataclass(frozen=True)
class Scored:
    """One (target, decomposer) result with its metric values.

    ``decomposition`` is kept compact: when its reconstruction is exactly ``D @ c`` the array is
    dropped (empty) — a run holds every target × decomposer result — and :attr:`full_decomposition`
    recomputes it, bit for bit (metrics are given the full one).
    """

    spec: MergeJob
    decomposer: str
    problem: DecompositionProblem
    decomposition: Decomposition
    metrics: dict[str, float | None]

    @property
    def full_decomposition(self) -> Decomposition:
        return restored(self.decomposition, self.problem)


# --------------------------------------------------------------------------------------------------
# One decomposition
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecomposeUnit:
    """One decomposition (picklable, for any executor); ``cache`` is the result's file path, if cached."""

    plugin: Any  # ResolvedPlugin of the decomposer
    problem: DecompositionProblem
    target_id: str
    cache: Path | None = None

    @property
    def progress_name(self) -> str:  # the name a plain progress line gives it
        return f"{self.target_id} {self.plugin.label}"


def _pair_name(item: tuple[ScoreTarget, Any, Any, Any, Any]) -> str:
    """What a plain progress line calls one (target, decomposer) pair."""
    return f"{item[0].spec.target_id} {item[1].label}"


def decompose_unit(unit: DecomposeUnit) -> Decomposition:
    """Run one decomposer on one problem (or load its cached result) and check the answer."""
    if unit.cache is not None:
        cached = load_decomposition(unit.cache, unit.problem)
        if cached is not None:
            return compact(cached, unit.problem)
    with plugin_errors("decomposer", unit.plugin.label):
        decomposer = unit.plugin.instance()  # one object per run: decomposers keep no state between calls
        raw = decomposer.decompose(unit.problem)
    result = check_decomposition(raw, unit.problem, unit.plugin.label, unit.target_id)
    linear = is_linear(result, unit.problem)
    if unit.cache is not None:
        save_decomposition(unit.cache, result, unit.problem, linear)
    return compact(result, unit.problem, linear)


def is_linear(result: Decomposition, problem: DecompositionProblem) -> bool:
    """Whether the reconstruction is exactly ``D @ c`` (then it need not be kept: it is recomputed)."""
    return bool(np.array_equal(result.reconstruction, problem.dictionary @ result.coefficients))


def compact(result: Decomposition, problem: DecompositionProblem, linear: bool | None = None) -> Decomposition:
    """``result`` without its reconstruction when that is exactly ``D @ c`` (an empty array stands for
    it; :func:`restored` recomputes it, bit for bit): a run keeps every target × decomposer result
    until it is scored and reported, and 99,904 float64s each add up (3.7 GB at 1,152 targets × 4)."""
    if result.reconstruction.size == 0 or not (is_linear(result, problem) if linear is None else linear):
        return result
    return replace(result, reconstruction=np.zeros(0))


def restored(result: Decomposition, problem: DecompositionProblem) -> Decomposition:
    """The full decomposition of a :func:`compact` one (what metrics are given)."""
    if result.reconstruction.size == 0 and problem.target.size:
        return replace(result, reconstruction=problem.dictionary @ result.coefficients)
    return result


def check_decomposition(result: Any, problem: DecompositionProblem, label: str, target_id: str) -> Decomposition:
    """Reject what a decomposer may not return, naming the plugin; return a clean copy."""
    if not isinstance(result, Decomposition):
        raise PluginError("decomposer", label, f"returned {type(result).__name__}, expected Decomposition")
    n_atoms = problem.dictionary.shape[1]
    try:
        coef = np.array(result.coefficients, dtype=np.float64).reshape(-1)
        recon = np.array(result.reconstruction, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise PluginError("decomposer", label, f"returned coefficients or a reconstruction that are not "
                                               f"numbers ({exc}) (target {target_id})") from None
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
        support = np.array(result.support).reshape(-1)
        if support.dtype != bool and not np.isin(support, (0, 1)).all():
            raise PluginError("decomposer", label, "returned a support that is not boolean")
        support = support.astype(bool)
        if support.shape[0] != n_atoms:
            raise PluginError("decomposer", label, f"returned a support of length {support.shape[0]}")
    ood = result.out_of_dictionary
    if ood is not None and not isinstance(ood, (bool, np.bool_)):
        raise PluginError("decomposer", label, f"returned out_of_dictionary={ood!r}; expected True, False or None")
    if not isinstance(result.info, Mapping):
        raise PluginError("decomposer", label, f"returned info of type {type(result.info).__name__}, expected a dict")
    try:
        info = to_jsonable(dict(result.info), "info")
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PluginError("decomposer", label, f"returned info that is not JSON-serialisable ({exc})") from None
    claims = None
    if result.claims is not None:
        claims = tuple(None if c is None else str(c) for c in result.claims)
        if len(claims) != n_atoms or any(c is not None and c not in CLAIMS for c in claims):
            raise PluginError("decomposer", label, f"returned claims {list(claims)!r}; expected one of {list(CLAIMS)} "
                                                   f"or None per atom ({n_atoms} atoms)")
    return Decomposition(coef, recon, support, None if ood is None else bool(ood), info, claims)


def save_decomposition(path: Path, result: Decomposition, problem: DecompositionProblem,
                       linear: bool | None = None) -> None:
    """Cache one decomposition: JSON, plus the reconstruction when it is not exactly ``D @ c``."""
    linear = is_linear(result, problem) if linear is None else linear
    if not linear:
        atomic_save_tensors(path.with_suffix(".safetensors"), {"reconstruction": result.reconstruction})
    atomic_write_json(path, {
        "coefficients": [float(c) for c in result.coefficients],
        "support": None if result.support is None else [bool(s) for s in result.support],
        "out_of_dictionary": result.out_of_dictionary,
        "claims": None if result.claims is None else list(result.claims),
        "info": result.info,
        "reconstruction": "linear" if linear else "stored",
    })


def load_decomposition(path: Path, problem: DecompositionProblem) -> Decomposition | None:
    """A cached decomposition, or ``None`` when there is none (or it does not fit the problem)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        coef = np.asarray(data["coefficients"], dtype=np.float64)
        if coef.shape != (problem.dictionary.shape[1],):
            return None
        if data["reconstruction"] == "linear":
            recon = problem.dictionary @ coef
        else:
            recon = load_tensors(path.with_suffix(".safetensors"))["reconstruction"].numpy()
        support = None if data["support"] is None else np.asarray(data["support"], dtype=bool)
        claims = data.get("claims")
        return Decomposition(coef, recon, support, data["out_of_dictionary"], dict(data["info"]),
                             None if claims is None else tuple(claims))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: recompute


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


TABLE_COLUMNS = ("decomposer", "target_id", "group", "method", "true_tasks", "true_weights", "n")
"""The results table's own columns (``per_target.*``, ``summary.*``; and every ``coef[atom]``): no metric's."""


def metric_values(metric: Any, label: str, evaluation: TargetEvaluation) -> dict[str, float | None]:
    """One metric's values for one evaluation; NaN becomes ``None`` (undefined); non-numbers, and a
    column of the results table's own (:data:`TABLE_COLUMNS`), are refused."""
    with plugin_errors("metric", label):
        raw = metric.compute(evaluation)
    if not isinstance(raw, Mapping):
        raise PluginError("metric", label, f"returned {type(raw).__name__}, expected a mapping of column -> value")
    values: dict[str, float | None] = {}
    for key, value in raw.items():
        if str(key) in TABLE_COLUMNS or str(key).startswith("coef["):
            raise PluginError("metric", label, f"returned column {short_repr(str(key))} (one of the results "
                                               f"table's own columns: {', '.join(TABLE_COLUMNS)}, coef[atom]); "
                                               "name it otherwise")
        if value is None:
            values[str(key)] = None
            continue
        if isinstance(value, (bool, np.bool_)):
            value = float(value)
        if not isinstance(value, (int, float, np.integer, np.floating)):
            raise PluginError("metric", label, f"column {key!r} is {type(value).__name__}, expected a number or None")
        try:
            number = float(value)
        except OverflowError:
            raise PluginError("metric", label, f"column {key!r} is an integer too large for a float "
                                               f"(target {evaluation.target_id})") from None
        values[str(key)] = None if math.isnan(number) else number
        if math.isinf(number):
            raise PluginError("metric", label, f"column {key!r} is infinite (target {evaluation.target_id})")
    return values


def has_details(metric: Any) -> bool:
    """Whether a metric writes details of its own that a cached run must restore (both optional methods
    of the module docstring: ``metric_details`` and ``restore_details``)."""
    return callable(getattr(metric, "metric_details", None)) and callable(getattr(metric, "restore_details", None))


# --------------------------------------------------------------------------------------------------
# Dictionary checks
# --------------------------------------------------------------------------------------------------


def dictionary_warnings(dictionary: np.ndarray, atom_names: Sequence[str]) -> list[str]:
    """Warnings about atoms no decomposer can tell apart: zero on the mask, identical, near-duplicates."""
    out: list[str] = []
    norms = np.linalg.norm(dictionary, axis=0)
    for name, norm in zip(atom_names, norms):
        if norm == 0:
            out.append(f"dictionary atom {name!r} is zero on the mask: it can never be attributed")
    live = [j for j, n in enumerate(norms) if n > 0]
    if len(live) < 2:
        return out
    unit = dictionary[:, live] / norms[live]
    cos = unit.T @ unit
    for a in range(len(live)):
        for b in range(a + 1, len(live)):
            c = float(cos[a, b])
            first, second = atom_names[live[a]], atom_names[live[b]]
            if c >= 1 - 1e-9:
                out.append(f"dictionary atoms {first!r} and {second!r} are identical on the mask (cosine {c:.6f}): "
                           "no decomposer can tell them apart; remove one or group them into one skill")
            elif c >= NEAR_DUPLICATE_COSINE:
                out.append(f"dictionary atoms {first!r} and {second!r} are near-duplicates on the mask "
                           f"(cosine {c:.4f}): attributions between them are not reliable")
    return out


IDENTICAL_ATOM_TOLERANCE = 1e-6
"""Two atoms are the same when ``‖a − b‖ ≤ IDENTICAL_ATOM_TOLERANCE · max(‖a‖, ‖b‖)`` on the mask (a copy,
or the same ΔW factored differently: equal up to float rounding)."""


def identical_atoms(dictionary: np.ndarray, atom_names: Sequence[str],
                    skills: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Pairs of non-zero atoms of different skills whose masked vectors are the same (see
    :data:`IDENTICAL_ATOM_TOLERANCE`), in dictionary order.

    No decomposer can say which of two such atoms a target holds, and a skill test (``skill-fdr``) then
    finds neither skill significant: callers refuse such a dictionary. Identical trainings of one skill
    (``skills`` equal) are left to :func:`dictionary_warnings`: the skill is still one group of columns.
    ``skills`` empty: every atom is its own skill."""
    columns = np.asarray(dictionary, dtype=np.float64)
    norms = np.linalg.norm(columns, axis=0)
    order = [j for j in np.argsort(norms, kind="stable") if norms[j] > 0]
    pairs: list[tuple[str, str]] = []
    for i, a in enumerate(order):  # equal vectors have equal norms: compare neighbours in norm order only
        for b in order[i + 1:]:
            scale = max(norms[a], norms[b])
            if norms[b] - norms[a] > IDENTICAL_ATOM_TOLERANCE * scale:
                break
            if skills and skills[a] == skills[b]:
                continue
            if np.linalg.norm(columns[:, a] - columns[:, b]) <= IDENTICAL_ATOM_TOLERANCE * scale:
                pairs.append((atom_names[min(a, b)], atom_names[max(a, b)]))
    return sorted(pairs, key=lambda p: (list(atom_names).index(p[0]), list(atom_names).index(p[1])))


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def decomposition_seed(spec: MergeJob, label: str) -> int:
    """The seed a decomposer is given for one target."""
    return derive_seed(spec.seed, "decompose", label)


def decomposition_key(plugin: Any, dictionary_key: str, target_key: str, seed: int) -> str:
    """Cache key of one decomposition (``decompositions/<key>.json``)."""
    return content_key("decomposition", plugin.config(), dictionary_key, target_key, seed)


def metric_key(ref: Any, decomposition_key: str, evaluation_key: str) -> str:
    """Cache key of one metric's values on one decomposition (``metric-values/<key>.json``)."""
    return content_key("metric", ref.config(), decomposition_key, evaluation_key)


class ScoreLoop:
    """Decompose targets with every decomposer and score each result with every metric.

    Args:
        atom_names: Dictionary atom names, one per column of ``dictionary``.
        dictionary: ``(n_coords, n_atoms)`` masked atoms.
        groups: Module name -> row slice of the masked vectors.
        decomposers: Resolved decomposer plugins (``label``, ``build()``, ``config()``).
        metrics: ``(resolved plugin, built metric)`` pairs; one built object serves every evaluation.
        task_vectors: Masked vectors of every task (dictionary and others), by name.
        categories: Registry category of every task, by name.
        context: What model-level metrics need (``None`` outside a run).
        cache_dir: Where decompositions and metric values are cached (``None``: no caching).
        dictionary_key: Identity of the dictionary and mask (part of every cache key).
        evaluation_key: Identity of what metrics may look at besides the decomposition.
        executor: Runs the decomposition units.
        show_progress: Progress bars (``"lines"``: plain progress lines).
        skills: The skill of each atom when a skill has several atoms (empty: one atom per skill).
        redo_decompositions: Recompute cached decompositions once (``unmerge run --redo decomposer``).
        redo_metrics: Recompute cached metric values once (``--redo metric``).
    """

    def __init__(self, atom_names: Sequence[str], dictionary: np.ndarray, groups: Mapping[str, slice],
                 decomposers: Sequence[Any], metrics: Sequence[tuple[Any, Any]], *,
                 task_vectors: Mapping[str, np.ndarray] | None = None, categories: Mapping[str, str] | None = None,
                 context: RunContext | None = None, cache_dir: Path | None = None, dictionary_key: str = "",
                 evaluation_key: str = "", executor: Executor | None = None, show_progress: Progress = False,
                 skills: Sequence[str] = (), redo_decompositions: bool = False, redo_metrics: bool = False) -> None:
        self.atom_names = tuple(atom_names)
        self.skills = tuple(skills)
        self.dictionary = read_only(dictionary)
        self.groups = dict(groups)
        self.decomposers = list(decomposers)
        self.metrics = list(metrics)
        self.task_vectors = {k: read_only(v) for k, v in (task_vectors or {}).items()}
        self.categories = dict(categories or {})
        self.context = context
        self.cache_dir = cache_dir
        self.dictionary_key = dictionary_key
        self.evaluation_key = evaluation_key
        self.executor = executor or SequentialExecutor(progress=show_progress)
        self.show_progress = show_progress
        self._made = {t.target_id for t in context.targets} if context is not None else set()
        self._gram: DictionaryGram | None = None
        self.reused_decompositions = 0  # decompositions loaded from the cache instead of computed
        self.reused_metric_sets = 0  # decompositions whose every metric value came from the cache
        self.redo_decompositions = redo_decompositions
        self.redo_metrics = redo_metrics
        self._redone: set[Path] = set()  # cache files recomputed by this loop under ``redo_*``

    @property
    def gram(self) -> DictionaryGram:
        """``DᵀD`` of the dictionary, formed once and shared by every problem (read only)."""
        if self._gram is None:
            self._gram = DictionaryGram.of(self.dictionary)
        return self._gram

    def with_metrics(self, extra: Sequence[tuple[Any, Any]]) -> ScoreLoop:
        """The same loop with more metrics (those whose label is already there are not added twice)."""
        have = {ref.label for ref, _ in self.metrics}
        clone = copy.copy(self)
        clone.metrics = self.metrics + [(ref, metric) for ref, metric in extra if ref.label not in have]
        return clone

    def _decomposition_key(self, target: ScoreTarget, plugin: Any, seed: int) -> str | None:
        if self.cache_dir is None or target.key is None:
            return None
        return decomposition_key(plugin, self.dictionary_key, target.key, seed)

    def decompose(self, targets: Sequence[ScoreTarget], desc: str = "decompose") -> list[tuple[ScoreTarget, Any, DecompositionProblem, Decomposition, str | None]]:
        """Every decomposer on every target (decomposer-major order, as the tables list them)."""
        units, meta = [], []
        for plugin in self.decomposers:
            for target in targets:
                seed = decomposition_seed(target.spec, plugin.label)
                problem = DecompositionProblem(self.dictionary, read_only(target.vector), self.atom_names,
                                               self.groups, seed, self.skills, self.gram)
                key = self._decomposition_key(target, plugin, seed)
                cache = None if key is None else self.cache_dir / "decompositions" / f"{key}.json"  # type: ignore[operator]
                if cache is not None and self.redo_decompositions and cache not in self._redone:
                    self._redone.add(cache)
                    cache.unlink(missing_ok=True)
                units.append(DecomposeUnit(plugin, problem, target.spec.target_id, cache))
                meta.append((target, plugin, problem, key))
        self.reused_decompositions += sum(1 for u in units if u.cache is not None and u.cache.is_file())
        results = self.executor.map(decompose_unit, units, desc=desc)
        return [(t, p, prob, res, key) for (t, p, prob, key), res in zip(meta, results)]

    def score(self, decomposed: Iterable[tuple[ScoreTarget, Any, DecompositionProblem, Decomposition, str | None]],
              desc: str = "metrics") -> list[Scored]:
        """Every metric on every decomposition (cached per pair and metric when a key is known)."""
        items = list(decomposed)
        out: list[Scored] = []
        for target, plugin, problem, result, key in progress(items, desc=desc, enabled=self.show_progress,
                                                             name=_pair_name):
            evaluation = self.evaluation(target, plugin.label, restored(result, problem))
            values: dict[str, float | None] = {}
            owners: dict[str, str] = {}  # column -> the metric that returned it
            all_cached = True
            for ref, metric in self.metrics:
                computed, cached = self._metric(ref, metric, evaluation, key)
                for column in computed:
                    if column in owners:
                        raise PluginError("metric", ref.label, f"returned column {short_repr(column)}, which metric "
                                                               f"'{owners[column]}' returns too; a column belongs to "
                                                               f"one metric: rename it (e.g. "
                                                               f"{short_repr(f'{ref.label}.{column}')})")
                    owners[column] = ref.label
                values.update(computed)
                all_cached &= cached
            self.reused_metric_sets += int(all_cached and bool(self.metrics))
            out.append(Scored(target.spec, plugin.label, problem, result, values))
        return out

    def evaluation(self, target: ScoreTarget, label: str, result: Decomposition) -> TargetEvaluation:
        spec = target.spec
        return TargetEvaluation(spec.target_id, spec.group, spec.method, spec.tasks, spec.true_weights, self.atom_names,
                                read_only(target.vector), result, self.task_vectors, self.categories,
                                spec if spec.target_id in self._made else None,
                                self.context, decomposer=label, skills=self.skills)

    def _metric(self, ref: Any, metric: Any, evaluation: TargetEvaluation,
                decomposition_key: str | None) -> tuple[dict[str, float | None], bool]:
        """One metric's values on one decomposition, and whether they came from the cache."""
        if decomposition_key is None or self.cache_dir is None:
            return metric_values(metric, ref.label, evaluation), False
        path = self.cache_dir / "metric-values" / (metric_key(ref, decomposition_key, self.evaluation_key) + ".json")
        if self.redo_metrics and path not in self._redone:
            self._redone.add(path)
            path.unlink(missing_ok=True)
        keeps_details = has_details(metric)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                values = {str(k): (None if v is None else float(v)) for k, v in data["values"].items()}
                if not keeps_details:
                    return values, True
                if "details" in data:  # else: cached before details were kept; recompute to write them
                    if data["details"] is not None:
                        with plugin_errors("metric", ref.label):
                            metric.restore_details(evaluation, data["details"])
                    return values, True
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # unreadable: recompute
        values = metric_values(metric, ref.label, evaluation)
        record: dict[str, Any] = {"metric": ref.label, "target": evaluation.target_id,
                                  "decomposer": evaluation.decomposer, "values": values}
        if keeps_details:
            with plugin_errors("metric", ref.label):
                details = metric.metric_details(evaluation)
            record["details"] = None if details is None else to_jsonable(details, "details")
        atomic_write_json(path, record)
        return values, False
