"""``unmerge attribute``: which dictionary adapters is an existing model made of, and how much of each?

The dictionary is a set of PEFT LoRA adapters (the atoms). A masker plugin chooses the coordinates of
ΔW to compare on (default ``topk``); each atom's ΔW on those coordinates is a dictionary column; each
target's ΔW (an existing full model minus the base, or an existing adapter's B·A·α/r; see
:mod:`unmerge_core.targets`) is decomposed by every requested decomposer plugin.

Per target and decomposer the report gives:

- the *attributed atoms*: the decomposer's own ``support`` when it declares one, else the atoms with
  ``|coefficient| > support_threshold``; with their coefficients;
- a per-atom *confidence*: the decomposer's own when its ``info`` carries one (``confidence``, else
  ``1 − p_values``, else ``layer_consistency``), otherwise the fallback **unique share**: the share of
  the target's energy ‖y‖² that the fit loses when the atom is removed from the attributed atoms and
  the others are refitted by non-negative least squares (0: another atom can stand in for it;
  1: it alone explains the whole target);
- the *reconstruction error* ``1 − max(0, cos(target, reconstruction))²`` (the ``reconstruction``
  metric's definition);
- the *out-of-dictionary verdict*: the decomposer's ``out_of_dictionary`` when it gives one, otherwise
  the fallback rule ``recon_error > ood_threshold``; the report says which rule produced it;
- with ground truth, the metric plugins' values (default ``support`` and ``reconstruction``).

The same code scores a manifest's ``[[targets]]`` (:func:`score_external_targets`, called by the runner).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import nnls
from tabulate import tabulate

from .adapters import LoraAdapter, common_modules, dropped_modules
from .checkpoints import Checkpoint
from .errors import PluginError, UnmergeError
from .manager import PluginManager
from .protocol import TargetSpec, derive_seed
from .runner import DecomposeUnit, check_decomposition, decompose_unit, masked_vector, plugin_errors
from .store import atomic_save_tensors, atomic_write_json, atomic_write_text, content_key, load_tensors, to_jsonable
from .targets import (
    EXTERNAL_GROUP,
    TargetReader,
    Truth,
    detect_kind,
    manifest_path,
    read_mergekit_truth,
    read_truth_json,
    truth_group,
)
from .types import Decomposition, DecompositionProblem, Mask, RunContext, TargetEvaluation

if TYPE_CHECKING:
    from .results import ResultTable
    from .runner import Runner

DEFAULT_DECOMPOSERS = ("nnls",)
DEFAULT_METRICS = ("support", "reconstruction")
DEFAULT_SUPPORT_THRESHOLD = 1e-3
DEFAULT_OOD_THRESHOLD = 0.5
Echo = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# One attribution
# --------------------------------------------------------------------------------------------------


@dataclass
class AtomScore:
    """One dictionary atom in one decomposition."""

    name: str
    coefficient: float
    selected: bool
    confidence: float | None = None


@dataclass
class Attribution:
    """A decomposer's answer for one target, with the verdict and confidences of the report."""

    decomposer: str
    atoms: list[AtomScore]
    recon_error: float
    out_of_dictionary: bool
    verdict_rule: str
    confidence_source: str | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def attributed(self) -> list[AtomScore]:
        """The selected atoms, largest coefficient first."""
        return sorted((a for a in self.atoms if a.selected), key=lambda a: -a.coefficient)

    @property
    def verdict(self) -> str:
        return "out-of-dictionary" if self.out_of_dictionary else "in-dictionary"

    def as_dict(self) -> dict[str, Any]:
        return {
            "decomposer": self.decomposer,
            "attributed": [{"atom": a.name, "coefficient": a.coefficient, "confidence": a.confidence}
                           for a in self.attributed],
            "coefficients": {a.name: a.coefficient for a in self.atoms},
            "confidence": {a.name: a.confidence for a in self.atoms if a.confidence is not None},
            "confidence_source": self.confidence_source,
            "support": [a.name for a in self.attributed],
            "recon_error": self.recon_error,
            "out_of_dictionary": self.out_of_dictionary,
            "verdict": self.verdict,
            "verdict_rule": self.verdict_rule,
            "metrics": self.metrics,
            "info": to_jsonable(self.info),
        }


@dataclass
class TargetReport:
    """Everything reported about one target."""

    name: str
    path: Path
    kind: str
    group: str
    truth: Truth | None
    warnings: list[str] = field(default_factory=list)
    attributions: list[Attribution] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        truth = None if self.truth is None else {
            "tasks": list(self.truth.tasks), "weights": list(self.truth.weights), "source": self.truth.source}
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "group": self.group, "truth": truth,
                "warnings": self.warnings, "results": [a.as_dict() for a in self.attributions]}


def reconstruction_error(target: np.ndarray, reconstruction: np.ndarray) -> float:
    """``1 − max(0, cos)²``; 1 when either vector is zero (the ``reconstruction`` metric's definition)."""
    nt, nr = float(np.linalg.norm(target)), float(np.linalg.norm(reconstruction))
    if nt == 0 or nr == 0:
        return 1.0
    cos = min(1.0, float(target @ reconstruction) / (nt * nr))
    return 1.0 - max(0.0, cos) ** 2


def decomposer_confidence(info: Mapping[str, Any], atom_names: Sequence[str]) -> tuple[list[float | None], str] | None:
    """Per-atom confidence the decomposer reports in ``info``, when it reports one.

    Looked up in this order: ``confidence`` (list aligned with the atoms, or atom -> value),
    ``p_values`` (confidence ``1 − p``), ``layer_consistency`` (the per-layer mode's share of layers).
    """
    for key, transform, source in (("confidence", lambda v: v, "decomposer: confidence"),
                                   ("p_values", lambda v: 1.0 - v, "decomposer: 1 − p-value"),
                                   ("layer_consistency", lambda v: v, "decomposer: share of layers")):
        raw = info.get(key)
        if raw is None:
            continue
        if isinstance(raw, Mapping):
            values = [raw.get(a) for a in atom_names]
        elif isinstance(raw, (list, tuple, np.ndarray)) and len(raw) == len(atom_names):
            values = list(raw)
        else:
            continue
        out = [None if v is None or not math.isfinite(float(v)) else float(transform(float(v))) for v in values]
        return out, source
    return None


def unique_share(dictionary: np.ndarray, target: np.ndarray, selected: Sequence[int]) -> dict[int, float]:
    """Share of ‖y‖² the non-negative fit on ``selected`` loses when one atom is left out, per atom."""
    energy = float(target @ target)
    if energy == 0 or not selected:
        return {}
    cols = list(selected)

    def residual(columns: list[int]) -> float:
        if not columns:
            return energy
        _, rnorm = nnls(dictionary[:, columns], target)
        return float(rnorm) ** 2

    full = residual(cols)
    return {j: float(np.clip((residual([c for c in cols if c != j]) - full) / energy, 0.0, 1.0)) for j in cols}


def attribute(problem: DecompositionProblem, label: str, result: Decomposition, *,
              support_threshold: float = DEFAULT_SUPPORT_THRESHOLD,
              ood_threshold: float = DEFAULT_OOD_THRESHOLD) -> Attribution:
    """Turn a checked decomposition into the report's attribution (support, confidence, verdict)."""
    coef = np.asarray(result.coefficients, dtype=np.float64)
    if result.support is not None:
        support = np.asarray(result.support, dtype=bool)
    else:
        support = np.abs(coef) > support_threshold
    error = reconstruction_error(problem.target, np.asarray(result.reconstruction, dtype=np.float64))
    names = problem.atom_names
    reported = decomposer_confidence(result.info, names)
    if reported is not None:
        confidence, source = reported
    else:
        shares = unique_share(problem.dictionary, problem.target, [int(j) for j in np.flatnonzero(support)])
        confidence = [shares.get(j) for j in range(len(names))]
        source = "unique-share (fallback)"
    if result.out_of_dictionary is not None:
        ood, rule = bool(result.out_of_dictionary), "decomposer"
    else:
        ood = error > ood_threshold
        rule = f"fallback: recon_error {'>' if ood else '≤'} {ood_threshold:g}"
    atoms = [AtomScore(n, float(c), bool(s), confidence[j]) for j, (n, c, s) in enumerate(zip(names, coef, support))]
    return Attribution(label, atoms, error, ood, rule, source, {}, dict(result.info))


def metric_values(metrics: Sequence[tuple[str, Any]], evaluation: TargetEvaluation) -> dict[str, float | None]:
    """Every metric's values for one evaluation; NaN becomes ``None`` (undefined)."""
    values: dict[str, float | None] = {}
    for label, metric in metrics:
        with plugin_errors("metric", label):
            for key, value in dict(metric.compute(evaluation)).items():
                undefined = value is None or (isinstance(value, float) and math.isnan(value))
                values[key] = None if undefined else float(value)
    return values


# --------------------------------------------------------------------------------------------------
# Dictionary and mask
# --------------------------------------------------------------------------------------------------


def load_dictionary(directory: Path | None, pairs: Sequence[tuple[str, Path]] = (),
                    echo: Echo = _stderr) -> list[LoraAdapter]:
    """Adapters from a folder of adapter sub-folders (atom = sub-folder name) plus ``NAME=PATH`` pairs."""
    found: list[tuple[str, Path]] = []
    if directory is not None:
        if not directory.is_dir():
            raise UnmergeError(f"--dictionary {directory}: not a directory")
        if (directory / "adapter_config.json").is_file():
            raise UnmergeError(f"--dictionary {directory}: is itself an adapter; pass the folder that holds one "
                               "adapter folder per atom, or --adapter NAME=PATH")
        for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
            if (sub / "adapter_config.json").is_file():
                found.append((sub.name, sub))
            elif not sub.name.startswith("."):
                echo(f"warning: --dictionary: skipping {sub} (no adapter_config.json)")
    found.extend(pairs)
    if not found:
        where = f" in {directory}" if directory is not None else ""
        raise UnmergeError(f"no dictionary adapters{where}; pass --dictionary DIR or --adapter NAME=PATH")
    names = [n for n, _ in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UnmergeError(f"dictionary atom name {dupes[0]!r} is used twice")
    return [LoraAdapter(path, name) for name, path in found]


def intersection_warning(adapters: Sequence[LoraAdapter]) -> str | None:
    """A warning when the adapters adapt different module sets (the mask uses their intersection)."""
    dropped = dropped_modules(list(adapters))
    if not dropped:
        return None
    common = common_modules(list(adapters))
    first, owners = next(iter(dropped.items()))
    return (f"dictionary adapters adapt different modules: using the {len(common)} they all adapt, "
            f"dropping {len(dropped)} (first: {first}, adapted by {', '.join(owners)} only)")


def build_mask(adapters: Sequence[LoraAdapter], masker: Any, label: str) -> Mask:
    if not common_modules(list(adapters)):
        raise UnmergeError("the dictionary adapters share no module: nothing to compare on")
    with plugin_errors("masker", label):
        mask = masker.build_mask(list(adapters))
    if not isinstance(mask, Mask) or mask.size == 0:
        raise PluginError("masker", label, "returned an empty mask or not a Mask")
    return mask


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


@dataclass
class AttributeRequest:
    """What ``unmerge attribute`` was asked (paths resolved, strings parsed)."""

    targets: list[tuple[str, Path]]
    output_dir: Path
    base: Path | None = None
    dictionary: Path | None = None
    adapters: list[tuple[str, Path]] = field(default_factory=list)
    kind: str = "auto"
    masker: str = "topk"
    masker_params: dict[str, Any] = field(default_factory=dict)
    decomposers: list[tuple[str, dict[str, Any]]] = field(
        default_factory=lambda: [(d, {}) for d in DEFAULT_DECOMPOSERS])
    metrics: list[tuple[str, dict[str, Any]]] = field(default_factory=lambda: [(m, {}) for m in DEFAULT_METRICS])
    truth_yaml: dict[str, Path] = field(default_factory=dict)
    truth_json: dict[str, str] = field(default_factory=dict)
    support_threshold: float = DEFAULT_SUPPORT_THRESHOLD
    ood_threshold: float = DEFAULT_OOD_THRESHOLD
    allow_pickle: bool = False
    seed: int = 0


@dataclass
class AttributeResult:
    run_dir: Path
    reports: list[TargetReport]
    atom_names: tuple[str, ...]
    warnings: list[str]


def run_attribute(request: AttributeRequest, manager: PluginManager | None = None,
                  echo: Echo = _stderr) -> AttributeResult:
    """Attribute every target of ``request`` and write the report into ``request.output_dir``."""
    manager = manager or PluginManager()
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        echo(f"warning: {message}")

    names = [n for n, _ in request.targets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UnmergeError(f"two targets are named {dupes[0]!r}; name them with NAME=PATH")
    for option, given in (("--truth", request.truth_yaml), ("--truth-json", request.truth_json)):
        for key in given:
            if key not in names:
                raise UnmergeError(f"{option} {key}=...: no target named {key!r} (targets: {', '.join(names)})")
    labels = [d for d, _ in request.decomposers]
    if len(set(labels)) != len(labels):
        raise UnmergeError("a --decomposer is listed twice")
    # plugins first: a typo fails before any tensor is read
    masker = manager.instantiate("masker", request.masker, request.masker_params, where=f"--masker {request.masker}")
    decomposers = [(name, manager.instantiate("decomposer", name, params, where=f"--decomposer {name}"))
                   for name, params in request.decomposers]
    kinds = {name: detect_kind(path, request.kind) for name, path in request.targets}
    base = None
    if any(k == "model" for k in kinds.values()):
        if request.base is None:
            first = next(n for n, k in kinds.items() if k == "model")
            raise UnmergeError(f"target {first} is a full model: pass --base PATH (the model it was made from)")
        base = Checkpoint(request.base, allow_pickle=request.allow_pickle, name="base")

    adapters = load_dictionary(request.dictionary, request.adapters, echo)
    atom_names = tuple(a.name for a in adapters)
    atom_dirs = {a.name: a.path for a in adapters}
    truths: dict[str, Truth] = {name: read_mergekit_truth(p, atom_dirs) for name, p in request.truth_yaml.items()}
    for name, text in request.truth_json.items():
        if name in truths:
            raise UnmergeError(f"target {name}: give --truth or --truth-json, not both")
        truths[name] = read_truth_json(text)
    metrics = [(name, manager.instantiate("metric", name, params, where=f"--metric {name}"))
               for name, params in request.metrics]

    message = intersection_warning(adapters)
    if message:
        warn(message)
    mask = build_mask(adapters, masker, request.masker)
    vectors = {a.name: masked_vector(a, mask) for a in adapters}
    dictionary = np.stack([vectors[a] for a in atom_names], axis=1)
    groups = mask.slices()

    reader = TargetReader(mask, base)
    extracted = []
    for name, path in request.targets:  # every ΔW first: a bad target fails before any solver runs
        vector, target_warnings = reader.vector(path, kinds[name], name, allow_pickle=request.allow_pickle)
        for w in target_warnings:
            warn(w)
        if kinds[name] == "model" and (path / "mergekit_config.yml").is_file() and name not in truths:
            echo(f"note: target {name} holds mergekit_config.yml; pass --truth {name}={path / 'mergekit_config.yml'} "
                 "to score it against its recipe")
        extracted.append((name, path, vector, target_warnings))

    reports: list[TargetReport] = []
    for name, path, vector, target_warnings in extracted:
        truth = truths.get(name)
        group = truth_group(truth, atom_names)
        report = TargetReport(name, path, kinds[name], group, truth, list(target_warnings))
        for label, decomposer in decomposers:
            problem = DecompositionProblem(dictionary, vector, atom_names, groups,
                                           derive_seed(request.seed, "attribute", name, label))
            with plugin_errors("decomposer", label):
                raw = decomposer.decompose(problem)
            result = check_decomposition(raw, problem, label, name)
            attribution = attribute(problem, label, result, support_threshold=request.support_threshold,
                                    ood_threshold=request.ood_threshold)
            if truth is not None:
                evaluation = TargetEvaluation(name, group, kinds[name], truth.tasks, truth.weights, atom_names,
                                              vector, result, vectors, {}, merge_job=None, context=None,
                                              decomposer=label)
                attribution.metrics = metric_values(metrics, evaluation)
            report.attributions.append(attribution)
        reports.append(report)

    meta = {
        "base": None if request.base is None else str(request.base),
        "dictionary": {a.name: str(a.path) for a in adapters},
        "mask": {"masker": request.masker, "params": to_jsonable(request.masker_params), "modules": len(mask.indices),
                 "coordinates": mask.size, "dropped_modules": dropped_modules(adapters)},
        "decomposers": [{"plugin": n, "params": to_jsonable(p)} for n, p in request.decomposers],
        "options": {"support_threshold": request.support_threshold, "ood_threshold": request.ood_threshold},
    }
    write_report(request.output_dir, reports, atom_names, meta, warnings)
    return AttributeResult(request.output_dir, reports, atom_names, warnings)


# --------------------------------------------------------------------------------------------------
# Manifest ``[[targets]]``
# --------------------------------------------------------------------------------------------------


def score_external_targets(runner: Runner, table: ResultTable, vectors: Mapping[str, np.ndarray], mask: Mask,
                           context: RunContext | None = None) -> None:
    """Decompose and score a manifest's ``[[targets]]``; rows join ``table``, the report goes to the run dir.

    Targets without ``truth`` get the group ``external`` (metrics treat it as "no ground truth");
    with truth, ``known`` / ``mixed`` / ``unknown``. The method column holds the kind (``model`` or
    ``adapter``). Each target's masked ΔW is cached in the run's store, keyed by the files' sizes and
    modification times, the base's and the mask.
    """
    m = runner.m
    refs = list(getattr(m.file, "targets", []) or [])
    if not refs:
        return
    atom_names = tuple(t.name for t in m.known)
    dictionary = np.stack([vectors[a] for a in atom_names], axis=1)
    categories = {t.name: t.category for t in m.all_tasks}
    groups = mask.slices()
    base_path = manifest_path(m.path, m.file.base) if m.file.base else None
    reader = TargetReader(mask, Checkpoint(base_path, name="base") if base_path is not None else None)
    mask_digest = _mask_digest(mask)
    metrics = [(r.label, r.build()) for r in m.metrics]
    reports: list[TargetReport] = []
    with runner._stage("external-targets", len(refs) * len(m.decomposers)):
        for ref in refs:
            path = manifest_path(m.path, ref.path)
            name = ref.display_name
            kind = detect_kind(path, ref.kind)
            key = content_key("external", kind, str(path.resolve()), _signature(path),
                              None if base_path is None or kind == "adapter" else _signature(base_path), mask_digest)
            vector, target_warnings = _cached_vector(runner, key, reader, path, kind, name)
            for w in target_warnings:
                _stderr(f"warning: {w}")
            truth = Truth.from_spec(ref.truth, "manifest") if ref.truth is not None else None
            group = truth_group(truth, atom_names)
            spec = TargetSpec(name, group, kind, truth.tasks if truth else (), truth.weights if truth else (),
                              derive_seed(m.seed, "target", name))
            units = [DecomposeUnit(d, DecompositionProblem(dictionary, vector, atom_names, groups,
                                                           derive_seed(spec.seed, "decompose", d.label)), name)
                     for d in m.decomposers]
            results = runner.executor.map(decompose_unit, units, desc=f"decompose {name}")
            report = TargetReport(name, path, kind, group, truth, list(target_warnings))
            for unit, result in zip(units, results):
                evaluation = TargetEvaluation(name, group, kind, spec.tasks, spec.weights, atom_names, vector, result,
                                              vectors, categories, merge_job=None, context=context,
                                              decomposer=unit.plugin.label)
                values = metric_values(metrics, evaluation)
                table.add(unit.plugin.label, spec, result, values)
                attribution = attribute(unit.problem, unit.plugin.label, result)
                attribution.metrics = values
                report.attributions.append(attribution)
            reports.append(report)
        meta = {"base": None if base_path is None else str(base_path), "manifest": str(m.path),
                "mask": {"masker": m.masker.label, "modules": len(mask.indices), "coordinates": mask.size},
                "decomposers": [d.config() for d in m.decomposers],
                "options": {"support_threshold": DEFAULT_SUPPORT_THRESHOLD, "ood_threshold": DEFAULT_OOD_THRESHOLD}}
        write_report(runner.run_dir, reports, atom_names, meta, [])


def _cached_vector(runner: Runner, key: str, reader: TargetReader, path: Path, kind: str,
                   name: str) -> tuple[np.ndarray, list[str]]:
    def build(tmp: Path) -> None:
        vector, target_warnings = reader.vector(path, kind, name)
        atomic_save_tensors(tmp / "target.safetensors", {"vector": vector})
        atomic_write_json(tmp / "target.json", {"name": name, "path": str(path), "kind": kind,
                                                "warnings": target_warnings})

    directory = runner.store.produce("external", key, build, {"target": name})
    meta = json.loads((directory / "target.json").read_text())
    return load_tensors(directory / "target.safetensors")["vector"].numpy(), list(meta["warnings"])


def _signature(path: Path) -> list[tuple[str, int, int]]:
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _mask_digest(mask: Mask) -> str:
    h = hashlib.sha256()
    for module, idx in mask.indices.items():
        h.update(module.encode())
        h.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def format_atoms(attribution: Attribution, sep: str = "\n") -> str:
    """``atom coefficient (confidence)`` per attributed atom, largest first; ``—`` when none."""
    parts = []
    for a in attribution.attributed:
        conf = "" if a.confidence is None else f" ({a.confidence:.2f})"
        parts.append(f"{a.name} {a.coefficient:.3f}{conf}")
    return sep.join(parts) if parts else "—"


def _metrics_cell(metrics: Mapping[str, float | None]) -> str:
    shown = [(k, v) for k, v in metrics.items() if k != "recon_error"]
    return " ".join(f"{k}={'n/a' if v is None else f'{v:.3g}'}" for k, v in shown) or "—"


def format_reports(reports: Sequence[TargetReport], tablefmt: str = "simple") -> str:
    """The on-screen (or markdown, ``tablefmt="github"``) table: one row per target × decomposer."""
    sep = "<br>" if tablefmt == "github" else "\n"
    with_truth = any(r.truth is not None for r in reports)
    headers = ["target", "group", "decomposer", "atoms: coef (confidence)", "recon err", "verdict (rule)"]
    if with_truth:
        headers.append("metrics vs truth")
    rows = []
    for r in reports:
        for a in r.attributions:
            row = [r.name, r.group, a.decomposer, format_atoms(a, sep), f"{a.recon_error:.3f}",
                   f"{a.verdict}{sep}[{a.verdict_rule}]"]
            if with_truth:
                row.append(_metrics_cell(a.metrics) if r.truth is not None else "—")
            rows.append(row)
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def _legend(reports: Sequence[TargetReport]) -> str:
    sources = sorted({a.confidence_source for r in reports for a in r.attributions if a.confidence_source})
    lines = ["Confidence: " + "; ".join(sources) + "." if sources else "",
             "unique-share (fallback): share of the target's energy lost when the atom is left out and the other "
             "attributed atoms are refitted (NNLS).",
             "Verdict rule `decomposer`: the decomposer's own out-of-dictionary decision; `fallback`: "
             "recon_error = 1 − cos(target, reconstruction)² compared with the threshold."]
    return "\n".join(line for line in lines if line)


def write_report(run_dir: Path, reports: Sequence[TargetReport], atom_names: Sequence[str],
                 meta: Mapping[str, Any], warnings: Sequence[str]) -> None:
    """Write ``attribution.json``, ``attribution.md`` and ``attribution.csv`` into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "attribution.json", {**meta, "atom_names": list(atom_names),
                                                     "targets": [r.as_dict() for r in reports],
                                                     "warnings": list(warnings)})
    md = ["# UNMERGE attribution", "", f"Dictionary: {', '.join(atom_names)}", "",
          format_reports(reports, "github"), "", _legend(reports)]
    if warnings:
        md += ["", "Warnings:", "", *[f"- {w}" for w in warnings]]
    atomic_write_text(run_dir / "attribution.md", "\n".join(md) + "\n")
    atomic_write_text(run_dir / "attribution.csv", _csv(reports, atom_names))


def _csv(reports: Sequence[TargetReport], atom_names: Sequence[str]) -> str:
    fixed = ["target", "kind", "group", "decomposer", "attributed", "recon_error", "verdict", "verdict_rule",
             "confidence_source", "true_tasks", "true_weights"]
    metric_names: list[str] = []
    for r in reports:
        for a in r.attributions:
            metric_names += [k for k in a.metrics if k not in metric_names and k not in fixed]
    fields = ["target", "kind", "group", "decomposer", "attributed", "recon_error", "verdict", "verdict_rule",
              "confidence_source", "true_tasks", "true_weights", *metric_names,
              *[f"coef[{n}]" for n in atom_names], *[f"conf[{n}]" for n in atom_names]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in reports:
        for a in r.attributions:
            row: dict[str, Any] = {
                "target": r.name, "kind": r.kind, "group": r.group, "decomposer": a.decomposer,
                "attributed": ";".join(f"{x.name}={x.coefficient:.4g}" for x in a.attributed),
                "recon_error": a.recon_error, "verdict": a.verdict, "verdict_rule": a.verdict_rule,
                "confidence_source": a.confidence_source or "",
                "true_tasks": ";".join(r.truth.tasks) if r.truth else "",
                "true_weights": ";".join(f"{w:.4g}" for w in r.truth.weights) if r.truth else "",
            }
            row.update({k: "" if a.metrics.get(k) is None else a.metrics[k] for k in metric_names})
            row.update({f"coef[{x.name}]": x.coefficient for x in a.atoms})
            row.update({f"conf[{x.name}]": "" if x.confidence is None else x.confidence for x in a.atoms})
            writer.writerow(row)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Command-line parsing helpers (the parser itself lives in cli.py)
# --------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def split_named(value: str, option: str, *, required: bool) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> ``(NAME, VALUE)``; a bare value -> ``(None, value)`` unless ``required``."""
    if "=" in value:
        name, rest = value.split("=", 1)
        if _NAME_RE.match(name) and not Path(value).exists():
            return name, rest
    if required:
        raise UnmergeError(f"{option} {value}: expected NAME=PATH")
    return None, value


def parse_params(items: Sequence[str], known: Mapping[str, dict[str, Any]]) -> None:
    """Apply ``--param NAME.KEY=VALUE`` items to the params dicts in ``known`` (by plugin name).

    ``VALUE`` is read as JSON when it parses (numbers, booleans, lists, quoted strings), else taken as a
    plain string. ``KEY`` may be dotted to reach a nested table.
    """
    for item in items:
        head, sep, raw = item.partition("=")
        name, dot, key = head.partition(".")
        if not sep or not dot or not key:
            raise UnmergeError(f"--param {item}: expected NAME.KEY=VALUE (NAME: masker, a decomposer or a metric)")
        if name not in known:
            raise UnmergeError(f"--param {item}: '{name}' is not the masker or a chosen decomposer or metric "
                               f"(choose one of: {', '.join(known)})")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target = known[name]
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UnmergeError(f"--param {item}: '{part}' is not a table")
        target[leaf] = value


def request_from_args(args: Any) -> AttributeRequest:
    """Build an :class:`AttributeRequest` from the parsed ``unmerge attribute`` arguments."""
    targets = []
    for value in args.targets:
        name, path = split_named(value, "target", required=False)
        p = Path(path)
        targets.append((name or p.resolve().name, p))
    adapters = []
    for value in args.adapter or []:
        name, path = split_named(value, "--adapter", required=True)
        assert name is not None
        adapters.append((name, Path(path)))
    decomposer_names = list(args.decomposer or DEFAULT_DECOMPOSERS)
    metric_names = list(args.metric or DEFAULT_METRICS)
    masker_params: dict[str, Any] = {}
    if args.budget is not None:
        masker_params["budget"] = args.budget
    if args.aggregate is not None:
        masker_params["aggregate"] = args.aggregate
    params: dict[str, dict[str, Any]] = {"masker": masker_params}
    for n in [*decomposer_names, *metric_names]:
        params.setdefault(n, {})
    parse_params(args.param or [], params)

    def named(values: Sequence[str] | None, option: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for value in values or []:
            name, rest = split_named(value, option, required=False)
            if name is None:
                if len(targets) != 1:
                    raise UnmergeError(f"{option}: with several targets write {option} TARGET={value}")
                name = targets[0][0]
            out[name] = rest
        return out

    truth_yaml = {k: Path(v) for k, v in named(args.truth, "--truth").items()}
    truth_json = named(args.truth_json, "--truth-json")
    label = args.name or (targets[0][0] if len(targets) == 1 else "multi")
    output_dir = Path(args.output_dir) if args.output_dir else Path("runs") / f"attribute-{label}"
    return AttributeRequest(
        targets=targets, output_dir=output_dir, base=Path(args.base) if args.base else None,
        dictionary=Path(args.dictionary) if args.dictionary else None, adapters=adapters, kind=args.kind,
        masker=args.masker, masker_params=masker_params,
        decomposers=[(n, params[n]) for n in decomposer_names], metrics=[(n, params[n]) for n in metric_names],
        truth_yaml=truth_yaml, truth_json=truth_json, support_threshold=args.support_threshold,
        ood_threshold=args.ood_threshold, allow_pickle=args.allow_pickle, seed=args.seed,
    )


__all__ = [
    "AttributeRequest",
    "AttributeResult",
    "Attribution",
    "EXTERNAL_GROUP",
    "TargetReport",
    "attribute",
    "format_reports",
    "run_attribute",
    "score_external_targets",
]
