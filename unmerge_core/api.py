"""The Python API: ``unmerge attribute`` and ``unmerge run`` for a notebook or a script.

::

    from unmerge_core import api

    result = api.attribute("merged-model", base="base-model", dictionary="adapters/")
    result["merged-model"].verdict, result["merged-model"].skills[0].skill
    api.run("experiments/quickstart.toml").summary

Unlike the command line, these functions print nothing (notes and warnings are returned with the
result), :func:`attribute` writes files only when given ``output_dir``, and they return plain frozen
dataclasses with a JSON-able ``to_dict()``. A user's mistake raises
:class:`~unmerge_core.errors.UnmergeError` with the one-line message the command line prints.

Imports of the pipeline stay inside the functions: importing this module costs no more than
``import unmerge_core``. (It is not re-exported by ``unmerge_core/__init__.py``: the runner imports
the package for its version, which would close an import cycle; ``from unmerge_core import api``
imports the submodule.)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from unmerge_core.errors import UnmergeError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["AttributionResult", "DecomposerResult", "RunResult", "SkillResult", "TargetResult", "attribute",
           "run", "run_root"]


def _plain(value: Any) -> Any:
    """JSON types (NaN and infinities -> None, paths -> str, tuples -> lists): the store's own rule."""
    from unmerge_core.io.store import to_jsonable

    return to_jsonable(value)


# --------------------------------------------------------------------------------------------------
# Attribution results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkillResult:
    """One attributed skill of a target, by one decomposer.

    ``claim`` is how strong the attribution is (``"exact"``: this very adapter, ``"retrained"``: a
    training of this skill, ``"relative"``: a close relative of it), or ``None`` when the decomposer
    states no claim level. ``causal`` is set only by a causal verification (not offered here).
    """

    skill: str
    coefficient: float
    claim: str | None
    confidence: float | None
    atoms: tuple[str, ...]
    causal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _plain({"skill": self.skill, "coefficient": self.coefficient, "claim": self.claim,
                       "confidence": self.confidence, "atoms": self.atoms, "causal": self.causal})


@dataclass(frozen=True)
class DecomposerResult:
    """One decomposer's answer for one target.

    ``verdict`` is ``"explained"``, ``"partly-explained"`` or ``"not-explained"`` (as in the report);
    ``skills`` are the attributed skills, largest coefficient first; ``remainder_share`` is the share of
    the target's change the dictionary does not explain (``None`` when the decomposer gives none);
    ``coefficients`` holds every dictionary atom's coefficient.
    """

    decomposer: str
    verdict: str
    skills: tuple[SkillResult, ...]
    remainder_share: float | None
    recon_error: float
    coefficients: dict[str, float]
    notes: tuple[str, ...] = ()
    metrics: dict[str, float | None] = field(default_factory=dict)

    @property
    def out_of_dictionary(self) -> bool:
        """Whether part of the target (or all of it) is not made of dictionary skills."""
        return self.verdict != "explained"

    def to_dict(self) -> dict[str, Any]:
        return _plain({"decomposer": self.decomposer, "verdict": self.verdict,
                       "skills": [s.to_dict() for s in self.skills], "remainder_share": self.remainder_share,
                       "recon_error": self.recon_error, "out_of_dictionary": self.out_of_dictionary,
                       "coefficients": self.coefficients, "notes": self.notes, "metrics": self.metrics})


@dataclass(frozen=True)
class TargetResult:
    """Everything found about one target: one :class:`DecomposerResult` per decomposer, in the order
    asked. ``verdict``, ``skills`` and ``remainder_share`` are those of the first decomposer; ``sentence``
    is the report's one plain sentence on the target."""

    name: str
    path: Path
    kind: str  # "model" or "adapter"
    results: tuple[DecomposerResult, ...]
    sentence: str | None = None
    warnings: tuple[str, ...] = ()

    def __getitem__(self, decomposer: str) -> DecomposerResult:
        for r in self.results:
            if r.decomposer == decomposer:
                return r
        raise KeyError(f"no result of decomposer {decomposer!r} (decomposers: "
                       f"{', '.join(r.decomposer for r in self.results)})")

    @property
    def verdict(self) -> str:
        return self.results[0].verdict

    @property
    def skills(self) -> tuple[SkillResult, ...]:
        return self.results[0].skills

    @property
    def remainder_share(self) -> float | None:
        return self.results[0].remainder_share

    def to_dict(self) -> dict[str, Any]:
        return _plain({"name": self.name, "path": self.path, "kind": self.kind, "sentence": self.sentence,
                       "warnings": self.warnings, "results": [r.to_dict() for r in self.results]})


@dataclass(frozen=True)
class AttributionResult:
    """What :func:`attribute` found: a sequence of :class:`TargetResult` (in the order given), also
    indexable by target name. ``output_dir`` is where the report was written, ``None`` when nothing was."""

    targets: tuple[TargetResult, ...]
    atoms: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    output_dir: Path | None = None

    def __iter__(self) -> Iterator[TargetResult]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | str) -> TargetResult:
        if isinstance(key, int):
            return self.targets[key]
        for t in self.targets:
            if t.name == key:
                return t
        raise KeyError(f"no target named {key!r} (targets: {', '.join(t.name for t in self.targets)})")

    def to_dict(self) -> dict[str, Any]:
        return _plain({"atoms": self.atoms, "targets": [t.to_dict() for t in self.targets],
                       "warnings": self.warnings, "notes": self.notes, "output_dir": self.output_dir})


# --------------------------------------------------------------------------------------------------
# attribute
# --------------------------------------------------------------------------------------------------


def _path(value: Any, what: str) -> str:
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str) and text:
            return text
    raise UnmergeError(f"{what} {value!r}: expected a path (str or pathlib.Path) or a Hub id owner/name[@revision]")


def _named(values: Any, what: str) -> list[tuple[str | None, Any]]:
    """``{name: path}``, ``[(name, path), ...]``, ``[path, ...]`` or one path -> ``[(name or None, path)]``."""
    if isinstance(values, Mapping):
        return [(str(k), v) for k, v in values.items()]
    if isinstance(values, (str, os.PathLike)):
        return [(None, values)]
    if isinstance(values, Sequence):
        out: list[tuple[str | None, Any]] = []
        for v in values:
            if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
                out.append((v[0], v[1]))
            else:
                out.append((None, v))
        return out
    raise UnmergeError(f"{what}: expected a path, a list of paths or a {{name: path}} mapping, not "
                       f"{type(values).__name__}")


def attribute(
    targets: PathLike | Sequence[PathLike] | Mapping[str, PathLike],
    *,
    base: PathLike | None = None,
    dictionary: PathLike | None = None,
    adapters: Mapping[str, PathLike] | Sequence[tuple[str, PathLike]] | None = None,
    decomposers: str | Sequence[str] = ("skill-fdr",),
    metrics: Sequence[str] | None = None,
    masker: str = "topk",
    budget: int | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    kind: str = "auto",
    truth: Mapping[str, Any] | None = None,
    support_threshold: float = 1e-3,
    ood_threshold: float = 0.5,
    allow_pickle: bool = False,
    seed: int = 0,
    output_dir: PathLike | None = None,
) -> AttributionResult:
    """Which dictionary adapters is each target made of, and how much of each? (``unmerge attribute``.)

    Args:
        targets: A model or adapter folder (``str`` or ``Path``) or a Hub id ``owner/name[@revision]``;
            a list of them; or a ``{name: path}`` mapping (a bare path is named after its folder).
        base: The model the targets were made from (needed for full-model targets).
        dictionary: A folder with one sub-folder per skill (a PEFT adapter, or several trainings of it).
        adapters: More dictionary adapters, ``{skill: path}`` or ``[(skill, path), ...]``.
        decomposers: Decomposer plugins, in order (the first one's answer is ``TargetResult.verdict``).
        metrics: Metric plugins (default: support, reconstruction, unique-share).
        masker: Masker plugin; ``budget`` is its total masked coordinates (``--budget``).
        params: Plugin parameters by plugin name (``"masker"`` or its name, a decomposer, a metric):
            ``{"nnls": {"max_iter": 100}}`` is ``--param nnls.max_iter=100``.
        kind: ``"auto"``, ``"model"`` or ``"adapter"``: what the targets are.
        truth: Ground truth per target name: ``{"tasks": [...], "weights": [...]}``, its JSON text, or
            the path of a mergekit YAML recipe (``.yml`` / ``.yaml``) or a JSON file.
        support_threshold, ood_threshold, allow_pickle, seed: As the command line's options.
        output_dir: Write ``attribution.{json,md,csv}`` into this folder; ``None`` (default) writes nothing.

    Returns:
        An :class:`AttributionResult`: iterate it for one :class:`TargetResult` per target.

    Raises:
        UnmergeError: a user mistake (a missing path, an unknown plugin, ...), in one line.
    """
    from unmerge_core.io.hub import parse_hub_ref, resolve_model_ref
    from unmerge_core.pipeline.attribute import DEFAULT_METRICS, AttributeRequest, run_attribute
    from unmerge_core.quiet import quiet_third_party
    from unmerge_core.report.attribution import target_sentence

    if kind not in ("auto", "model", "adapter"):
        raise UnmergeError(f"kind {kind!r}: choose one of: auto, model, adapter")
    pairs = []
    for name, value in _named(targets, "targets"):
        text = _path(value, "target")
        ref = parse_hub_ref(text)
        path = resolve_model_ref(text, "target", allow_pickle=allow_pickle)
        pairs.append((name or (ref.name if ref else path.resolve().name), path))
    if not pairs:
        raise UnmergeError("targets: no target given")
    extra = []
    for name, value in _named(adapters or {}, "adapters"):
        if name is None:
            raise UnmergeError(f"adapters {value!r}: name each adapter by its skill, {{skill: path}}")
        extra.append((name, resolve_model_ref(_path(value, f"--adapter {name}"), f"--adapter {name}",
                                              allow_pickle=allow_pickle)))
    base_path = resolve_model_ref(_path(base, "--base"), "--base", allow_pickle=allow_pickle) if base is not None else None
    dictionary_path = Path(_path(dictionary, "--dictionary")).expanduser() if dictionary is not None else None
    decomposer_names = [decomposers] if isinstance(decomposers, str) else list(decomposers)
    if not decomposer_names:
        raise UnmergeError("decomposers: give at least one decomposer")
    metric_names = list(DEFAULT_METRICS if metrics is None else ([metrics] if isinstance(metrics, str) else metrics))
    masker_params: dict[str, Any] = {} if budget is None else {"budget": budget}
    chosen: dict[str, dict[str, Any]] = {"masker": masker_params}
    chosen.setdefault(masker, masker_params)
    for n in [*decomposer_names, *metric_names]:
        chosen.setdefault(n, {})
    for name, values in (params or {}).items():
        if name not in chosen:
            raise UnmergeError(f"params[{name!r}]: '{name}' is not the masker or a chosen decomposer or metric "
                               f"(choose one of: {', '.join(chosen)})")
        if not isinstance(values, Mapping):
            raise UnmergeError(f"params[{name!r}]: expected a mapping of parameter names to values")
        chosen[name].update(values)
    truth_yaml: dict[str, Path] = {}
    truth_json: dict[str, str] = {}
    for name, value in (truth or {}).items():
        if isinstance(value, Mapping):
            truth_json[name] = json.dumps(_plain(value))
        elif isinstance(value, (str, os.PathLike)) and str(value).lower().endswith((".yml", ".yaml")):
            truth_yaml[name] = Path(os.fspath(value))
        elif isinstance(value, (str, os.PathLike)):
            truth_json[name] = os.fspath(value)  # type: ignore[assignment]
        else:
            raise UnmergeError(f"truth[{name!r}]: expected {{'tasks': [...], 'weights': [...]}} or a file path")
    out = Path(_path(output_dir, "output_dir")).expanduser() if output_dir is not None else None
    request = AttributeRequest(
        targets=pairs, output_dir=out, base=base_path, dictionary=dictionary_path, adapters=extra, kind=kind,
        masker=masker, masker_params=masker_params,
        decomposers=[(n, chosen[n]) for n in decomposer_names], metrics=[(n, chosen[n]) for n in metric_names],
        truth_yaml=truth_yaml, truth_json=truth_json, support_threshold=float(support_threshold),
        ood_threshold=float(ood_threshold), allow_pickle=allow_pickle, seed=int(seed))
    lines: list[str] = []
    with quiet_third_party():
        result = run_attribute(request, echo=lines.append)
    targets_out = []
    for report in result.reports:
        decomposed = []
        for a in report.attributions:
            skills = tuple(SkillResult(s.name, float(s.coefficient), s.claim if a.claims_given else None,
                                       None if s.confidence is None else float(s.confidence), tuple(s.atoms),
                                       s.causal) for s in a.skills)
            decomposed.append(DecomposerResult(
                a.decomposer, a.verdict, skills, None if a.remainder_share is None else float(a.remainder_share),
                float(a.recon_error), {x.name: float(x.coefficient) for x in a.atoms}, tuple(a.notes),
                {k: (None if v is None else float(v)) for k, v in a.metrics.items()}))
        targets_out.append(TargetResult(report.name, Path(report.path), report.kind, tuple(decomposed),
                                        target_sentence(report), tuple(report.warnings)))
    warnings = list(result.warnings)
    for line in lines:  # what went to the echo only (the dictionary's skipped folders)
        text = line.removeprefix("warning: ")
        if line.startswith("warning: ") and text not in warnings:
            warnings.append(text)
    notes = tuple(line.removeprefix("note: ") for line in lines if line.startswith("note: "))
    return AttributionResult(tuple(targets_out), tuple(result.atom_names), tuple(warnings), notes, result.run_dir)


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """What :func:`run` made: the run directory and the rows of its result files.

    ``summary`` are the rows of ``summary.csv`` (mean of each metric per decomposer, group and method),
    ``per_target`` those of ``per_target.csv``, ``timings`` those of ``timings.json``."""

    run_dir: Path
    summary: list[dict[str, Any]]
    per_target: list[dict[str, Any]]
    timings: list[dict[str, Any]]
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return _plain({"run_dir": self.run_dir, "summary": self.summary, "per_target": self.per_target,
                       "timings": self.timings, "warnings": self.warnings, "notes": self.notes})


def run_root(manifest: Any) -> Path:
    """The folder a loaded manifest's relative ``output.dir`` and ``output.store`` were taken from
    (:func:`unmerge_core.config.manifest.project_root`): the folder of its registry file, the project's
    root — for ``unmerge run`` and :func:`run` alike."""
    from unmerge_core.config.manifest import project_root

    return project_root(manifest.registry)


def run(manifest_path: PathLike, *, redo: str | None = None, progress: bool = False,
        plots: bool = True) -> RunResult:
    """Run a manifest (``unmerge run``) wherever the caller's current folder is.

    Paths in the manifest are taken from fixed folders, never from the current one: ``registry``,
    ``base`` and the targets' paths from the manifest's folder (as the command line does), and a
    relative ``output.dir`` / ``output.store`` from :func:`run_root`, the folder that holds the
    manifest's registry file (the command line does the same). So ``run("experiments/quickstart.toml")`` writes ``runs/quickstart`` at the
    repository root (next to ``registry.toml``), from whichever folder it is called; an absolute
    ``output.dir`` is used as it is.

    Args:
        manifest_path: The manifest file (``str`` or ``Path``).
        redo: Recompute this stage's cached work and every later stage's (``--redo``).
        progress: Show progress on standard error (bars on a terminal, plain lines otherwise).
        plots: Write the PNG plots.

    Raises:
        UnmergeError: an invalid manifest, a plugin's failure, ... in one line (or one per problem).
    """
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.pipeline.runner import Runner
    from unmerge_core.quiet import quiet_third_party
    from unmerge_core.report.tables import per_target_records

    path = Path(_path(manifest_path, "manifest")).expanduser()
    manifest = load_manifest(path)
    shown: Any = False
    if progress:
        shown = "bar" if os.environ.get("UNMERGE_PROGRESS") or sys.stderr.isatty() else "lines"
    lines: list[str] = []
    with quiet_third_party():
        result = Runner(manifest, progress=shown, plots=plots, redo=redo, echo=lines.append).run()
    timings = [{"stage": t.stage, "seconds": t.seconds, "cpu_seconds": t.cpu_seconds, "peak_rss_mb": t.peak_rss_mb,
                "jobs": t.jobs, "reused": t.reused} for t in result.timings]
    notes = tuple(line.removeprefix("note: ") for line in lines if line.startswith("note: "))
    return RunResult(Path(result.run_dir), _plain(result.table.summary()), _plain(per_target_records(result.table)),
                     timings, tuple(result.warnings), notes)
