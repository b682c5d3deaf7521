"""``unmerge attribute``: which dictionary adapters is an existing model made of, and how much of each?

The dictionary is a set of PEFT LoRA adapters (the atoms). A masker plugin chooses the coordinates of
ΔW to compare on (default ``topk``); each atom's ΔW on those coordinates is a dictionary column; each
target's ΔW (an existing full model minus the base, or an existing adapter's B·A·α/r; see
:mod:`unmerge_core.io.target_reader`) is decomposed by every requested decomposer and scored by every
metric through the same loop as ``unmerge run`` (:mod:`unmerge_core.pipeline.scoring`). The report
(:mod:`unmerge_core.report.attribution`) takes the reconstruction error and the per-atom confidence
from the ``reconstruction`` and ``unique-share`` metrics, which run with or without ground truth.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from unmerge_core.config.manifest import PER_LAYER_PLUGIN
from unmerge_core.config.registry import Registry, nearest_registry, packaged_registry
from unmerge_core.config.targets import (
    Truth,
    detect_kind,
    read_mergekit_truth,
    read_truth_json,
    truth_group,
)
from unmerge_core.errors import UnmergeError, plugin_errors
from unmerge_core.io.adapters import LoraAdapter, check_orientation, common_modules, dropped_modules, model_types
from unmerge_core.io.checkpoints import Checkpoint, model_config
from unmerge_core.io.gguf import model_source
from unmerge_core.io.masks import check_mask, masked_vector
from unmerge_core.io.store import check_output_dir, derive_seed, to_jsonable
from unmerge_core.io.target_reader import TargetReader, target_deltas
from unmerge_core.manager import PluginManager, ResolvedPlugin
from unmerge_core.pipeline.scoring import ScoreLoop, ScoreTarget, dictionary_warnings, identical_atoms
from unmerge_core.report.attribution import (
    DEFAULT_OOD_THRESHOLD,
    DEFAULT_SUPPORT_THRESHOLD,
    REPORT_METRICS,
    Attribution,
    TargetReport,
    attribution_from,
    write_report,
)
from unmerge_core.types import Capability, Mask, MergeJob, RunContext, TaskInfo

DEFAULT_DECOMPOSERS = ("skill-fdr",)
DEFAULT_METRICS = ("support", "reconstruction", "unique-share")
Echo = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Dictionary and mask
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DictionaryAtom:
    """One adapter of the dictionary and the skill it is a training of."""

    name: str
    skill: str
    adapter: LoraAdapter


def load_dictionary(directory: Path | None, pairs: Sequence[tuple[str, Path]] = (),
                    echo: Echo = _stderr) -> list[DictionaryAtom]:
    """The dictionary's adapters, each with its skill.

    ``directory`` holds one sub-folder per skill: either an adapter (one atom, named like the folder)
    or a folder of adapters — several trainings of one skill (atoms ``skill/run``). ``NAME=PATH``
    pairs add atoms of skill ``NAME``; a name given more than once (or naming a folder's skill) adds
    another training of that skill (``NAME#2``, ...).
    """
    found: list[tuple[str, str, Path]] = []
    if directory is not None:
        if not directory.is_dir():
            raise UnmergeError(f"--dictionary {directory}: not a directory")
        if (directory / "adapter_config.json").is_file():
            raise UnmergeError(f"--dictionary {directory}: is itself an adapter; pass the folder that holds one "
                               "adapter folder per skill, or --adapter NAME=PATH")
        home = directory.resolve()

        def real(path: Path) -> bool:  # not a link to the dictionary, into it, or to a folder holding it
            target = path.resolve()
            if path.is_symlink() and (target == home or home in target.parents or target in home.parents):
                echo(f"warning: --dictionary: skipping {path} (a symbolic link back into the dictionary, to "
                     f"{target}: its adapters would be counted twice)")
                return False
            return True

        for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".") and real(p)):
            if (sub / "adapter_config.json").is_file():
                found.append((sub.name, sub.name, sub))
                continue
            runs = sorted(r for r in sub.iterdir() if r.is_dir() and (r / "adapter_config.json").is_file() and real(r))
            if runs:
                found += [(f"{sub.name}/{r.name}", sub.name, r) for r in runs]
            else:
                echo(f"warning: --dictionary: skipping {sub} (no adapter_config.json, no adapter folders)")
    for skill, path in pairs:
        taken = {name for name, _, _ in found}
        name, k = skill, 1
        while name in taken:
            k += 1
            name = f"{skill}#{k}"
        found.append((name, skill, path))
    if not found:
        where = f" in {directory}" if directory is not None else ""
        raise UnmergeError(f"no dictionary adapters{where}; pass --dictionary DIR or --adapter NAME=PATH")
    return [DictionaryAtom(name, skill, LoraAdapter(path, name)) for name, skill, path in found]


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
    return check_mask(mask, adapters, label)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


@dataclass
class AttributeRequest:
    """What ``unmerge attribute`` was asked (paths resolved, strings parsed).

    ``output_dir`` ``None`` (the Python API's default, :func:`unmerge_core.api.attribute`) writes no file."""

    targets: list[tuple[str, Path]]
    output_dir: Path | None
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
    verify: bool = False
    registry: Path | None = None
    task_names: dict[str, str] = field(default_factory=dict)
    task_data: dict[str, Path] = field(default_factory=dict)
    emit_recipe: Path | None = None


@dataclass
class AttributeResult:
    run_dir: Path | None  # None: nothing was written (no output_dir)
    reports: list[TargetReport]
    atom_names: tuple[str, ...]
    warnings: list[str]


def run_attribute(request: AttributeRequest, manager: PluginManager | None = None,
                  echo: Echo = _stderr) -> AttributeResult:
    """Attribute every target of ``request`` and write the report into ``request.output_dir`` (when it is
    not ``None``)."""
    manager = manager or PluginManager()
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)
            echo(f"warning: {message}")

    check_request(request)
    names = [n for n, _ in request.targets]
    # plugins first: a typo fails before any tensor is read
    masker = resolve_plugin(manager, "masker", request.masker, request.masker_params, f"--masker {request.masker}")
    decomposers = [resolve_decomposer(manager, name, params) for name, params in request.decomposers]
    report_metrics = list(REPORT_METRICS) + ([VERIFY_METRIC] if request.verify else [])
    requested = list(request.metrics) + [(m, {}) for m in report_metrics if m not in dict(request.metrics)]
    requested = [(m, {**_verify_defaults(m, len(request.targets), request.base), **params}) for m, params in requested]
    metrics = [resolve_plugin(manager, "metric", name, _with_threshold(manager, name, params, request.support_threshold),
                              f"--metric {name}") for name, params in requested]
    provides = ATTRIBUTE_PROVIDES + (VERIFY_PROVIDES if request.verify else ())
    for plugin in [masker, *decomposers, *metrics]:
        missing = [c.value for c in plugin.spec.requires if c not in provides]
        if missing:
            raise UnmergeError(f"--{plugin.spec.stage.value} {plugin.label}: needs {', '.join(missing)}, which "
                               f"`unmerge attribute` does not have ({_WHY_MISSING.get(missing[0], 'not available')})")
    # a .gguf target or base is read from its dequantized checkpoint folder (converted once, user cache)
    request = replace(request, targets=[(n, model_source(p, what=f"target {n}")) for n, p in request.targets],
                      base=model_source(request.base, what="--base") if request.base is not None else None)
    kinds = {name: detect_kind(path, request.kind) for name, path in request.targets}
    base = None
    if request.verify and request.base is None:
        raise UnmergeError("--verify: pass --base PATH, the model the dictionary's adapters were trained on "
                           "(it is loaded to score the tasks)")
    if any(k == "model" for k in kinds.values()) or request.verify:
        if request.base is None:
            first = next(n for n, k in kinds.items() if k == "model")
            raise UnmergeError(f"target {first} is a full model: pass --base PATH (the model it was made from)")
        base = Checkpoint(request.base, allow_pickle=request.allow_pickle, name="base")

    atoms = load_dictionary(request.dictionary, request.adapters, echo)
    adapters = [a.adapter for a in atoms]
    atom_names = tuple(a.name for a in atoms)
    skills = tuple(a.skill for a in atoms) if len({a.skill for a in atoms}) < len(atoms) else ()
    skill_of = {a.name: a.skill for a in atoms}
    truths: dict[str, Truth] = {}
    for name, yaml_path in request.truth_yaml.items():  # a mergekit recipe names adapter folders: map them to skills
        truth = read_mergekit_truth(yaml_path, {a.name: a.adapter.path for a in atoms})
        truths[name] = Truth(tuple(skill_of.get(t, t) for t in truth.tasks), truth.weights, truth.source)
    for name, text in request.truth_json.items():
        if name in truths:
            raise UnmergeError(f"target {name}: give --truth or --truth-json, not both")
        truths[name] = read_truth_json(text)

    adapter_targets = [LoraAdapter(path, name) for name, path in request.targets if kinds[name] == "adapter"]
    base_types = model_types(model_config(request.base)) if request.base is not None else []
    check_orientation([*adapters, *adapter_targets], base_types)
    message = intersection_warning(adapters)
    if message:
        warn(message)
    with plugin_errors("masker", masker.label):
        built_masker = masker.build()
    mask = build_mask(adapters, built_masker, masker.label)
    vectors = {a.name: masked_vector(a, mask) for a in adapters}
    dictionary = np.stack([vectors[a] for a in atom_names], axis=1)
    for first, second in identical_atoms(dictionary, atom_names, tuple(skill_of[a] for a in atom_names))[:1]:
        paths = {a.name: a.adapter.path for a in atoms}
        raise UnmergeError(f"dictionary adapters {first!r} ({paths[first]}) and {second!r} ({paths[second]}) are "
                           "identical (the same ΔW on the mask): no decomposer can tell their skills apart; remove "
                           "one, or put both in one skill's folder if they are trainings of one skill")
    for line in dictionary_warnings(dictionary, atom_names):
        warn(line)

    reader = TargetReader(mask, base)
    targets: list[ScoreTarget] = []
    reports: dict[str, TargetReport] = {}
    for name, path in request.targets:  # every ΔW first: a bad target fails before any solver runs
        vector, target_warnings = reader.vector(path, kinds[name], name, allow_pickle=request.allow_pickle)
        for w in target_warnings:
            warn(w)
        recipe = path / "mergekit_config.yml"
        if kinds[name] == "model" and recipe.is_file() and name not in truths and recipe_has_truth(recipe):
            echo(f"note: target {name} holds mergekit_config.yml; pass --truth {name}={recipe} "
                 "to score it against its recipe")
        truth = truths.get(name)
        group = truth_group(truth, tuple(skill_of.values()))
        spec = MergeJob(name, kinds[name], truth.tasks if truth else (), truth.weights if truth else (),
                        derive_seed(request.seed, "attribute", name), group)
        targets.append(ScoreTarget(spec, vector))
        reports[name] = TargetReport(name, path, kinds[name], group, truth, list(target_warnings))

    built_metrics = []
    for plugin in metrics:
        with plugin_errors("metric", plugin.label):
            built_metrics.append((plugin, plugin.build()))
    context = None
    if request.verify:
        assert base is not None and request.base is not None and request.output_dir is not None
        tasks = verification_tasks(request, sorted(set(skill_of.values())), warn, lambda m: echo(f"note: {m}"))
        paths = dict(request.targets)
        context = RunContext({a.name: a.adapter.path for a in atoms}, tasks, mask, None, request.seed,
                             request.output_dir, tuple(t.spec for t in targets),
                             lambda job: target_deltas(paths[job.target_id], kinds[job.target_id], base,
                                                       allow_pickle=request.allow_pickle, name=job.target_id),
                             str(request.base))
    loop = ScoreLoop(atom_names, dictionary, mask.slices(), decomposers, built_metrics, task_vectors=vectors,
                     skills=skills, context=context)
    by_target: dict[str, list[Attribution]] = {name: [] for name in names}
    for scored in loop.score(loop.decompose(targets)):
        by_target[scored.spec.target_id].append(attribution_from(
            scored, support_threshold=request.support_threshold, ood_threshold=request.ood_threshold))
    ordered = []
    for name in names:
        reports[name].attributions = by_target[name]
        ordered.append(reports[name])

    meta = {
        "base": None if request.base is None else str(request.base),
        "dictionary": {a.name: str(a.adapter.path) for a in atoms},
        "skills": {a.name: a.skill for a in atoms},
        "mask": {"masker": request.masker, "params": to_jsonable(request.masker_params), "modules": len(mask.indices),
                 "coordinates": mask.size, "dropped_modules": dropped_modules(adapters)},
        "decomposers": [{"plugin": n, "params": to_jsonable(p)} for n, p in request.decomposers],
        "options": {"support_threshold": request.support_threshold, "ood_threshold": request.ood_threshold},
    }
    if request.output_dir is not None:
        write_report(request.output_dir, ordered, atom_names, meta, warnings)
    if request.emit_recipe is not None:
        for name, path in emit_recipes(request, ordered, {a.name: a.adapter.path for a in atoms}).items():
            echo(f"recipe of {name}: {path} (check it with: unmerge verify-recipe TARGET {path})")
    return AttributeResult(request.output_dir, ordered, atom_names, warnings)


def recipe_path(out: Path, name: str, n_targets: int) -> Path:
    """Where ``--emit-recipe OUT`` writes ``name``'s recipe: ``OUT`` itself for one target, else
    ``OUT``'s stem, ``-NAME`` and its suffix."""
    return out if n_targets == 1 else out.with_name(f"{out.stem}-{name}{out.suffix or '.yml'}")


def recovered_recipe(report: TargetReport, base: Path, adapter_paths: Mapping[str, Path]) -> dict[str, Any]:
    """The recovered recipe of one target as a mergekit mapping: ``task_arithmetic`` (λ = 1, no
    normalisation, so each weight is the coefficient itself) of the first decomposer's attributed
    adapters, as ``BASE+ADAPTER`` references with absolute paths."""
    attribution = report.attributions[0]
    models = [{"model": f"{base.resolve()}+{Path(adapter_paths[a.name]).resolve()}",
               "parameters": {"weight": float(a.coefficient)}} for a in attribution.attributed]
    return {"merge_method": "task_arithmetic", "base_model": str(base.resolve()),
            "parameters": {"normalize": False, "lambda": 1.0}, "dtype": "float32", "models": models}


def emit_recipes(request: AttributeRequest, reports: Sequence[TargetReport],
                 adapter_paths: Mapping[str, Path]) -> dict[str, Path]:
    """Write ``--emit-recipe``: one mergekit YAML per target (see :func:`recovered_recipe`), with a comment
    header stating what it is. A target with no attributed adapter gets no recipe (a note says so)."""
    import yaml

    from unmerge_core.io.store import atomic_write_text

    assert request.emit_recipe is not None and request.base is not None
    written: dict[str, Path] = {}
    for report in reports:
        if not report.attributions or not report.attributions[0].attributed:
            by = report.attributions[0].decomposer if report.attributions else "any decomposer"
            _stderr(f"note: target {report.name}: no adapter attributed by {by}; no recipe written")
            continue
        a = report.attributions[0]
        out = recipe_path(request.emit_recipe, report.name, len(reports))
        out.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# recovered by unmerge attribute ({a.decomposer}) from {report.path}: the attributed adapters "
                  f"and their coefficients\n# as task arithmetic; verdict {a.verdict}, reconstruction error "
                  f"{a.recon_error:.3g} on the mask.\n# Check it: unmerge verify-recipe {report.path} {out}\n")
        body = yaml.safe_dump(recovered_recipe(report, request.base, adapter_paths), sort_keys=False)
        atomic_write_text(out, header + body)
        written[report.name] = out
    return written


ATTRIBUTE_PROVIDES: tuple[Capability, ...] = ()
VERIFY_PROVIDES = (Capability.BASE_MODEL, Capability.TASK_DATA, Capability.TARGET_DELTAS)
"""What ``--verify`` adds: the base model (``--base``), task data (registry or ``--task-data``), the
targets' weights."""
VERIFY_METRIC = "causal-ablation"
"""What `unmerge attribute` gives plugins: masked vectors of the target and the dictionary only."""
_WHY_MISSING = {
    "constituent-vectors": "it only has the dictionary's vectors, not those of a target's other constituents",
    "target-deltas": "pass --verify (with --base) to read the targets' weights for causal verification",
    "base-model": "no model is loaded",
    "task-data": "no task data is loaded",
}


def _verify_defaults(metric: str, n_targets: int, base: Path | None = None) -> dict[str, Any]:
    """``--verify`` checks every target (the metric's own default samples one per cell); on an instruct
    base (its tokenizer has a chat template) by the skills' checkers on greedy answers when every skill
    has one (``score = "auto"``), else by the response loss (the metric's default)."""
    if metric != VERIFY_METRIC:
        return {}
    return {"targets_per_cell": max(n_targets, 1), **({"score": "auto"} if has_chat_template(base) else {})}


def has_chat_template(base: Path | None) -> bool:
    """Whether a base model folder's tokenizer (or a ``.gguf`` file's metadata) has a chat template."""
    if base is None:
        return False
    try:
        path = Path(base)
        ggufs = [path] if path.is_file() else sorted(path.glob("*.gguf")) if path.is_dir() else []
        if path.is_dir() and (path / "chat_template.jinja").is_file():
            return True
        config = path / "tokenizer_config.json"
        if path.is_dir() and config.is_file():
            return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        if len(ggufs) == 1 and ggufs[0].suffix == ".gguf":
            from gguf import GGUFReader  # header only (memory-mapped)

            return "tokenizer.chat_template" in GGUFReader(str(ggufs[0])).fields
    except (OSError, ValueError, ImportError, AttributeError):
        return False
    return False


CHECKER_TASK_KEY = "checker_task"  # as unmerge_plugins.lib.generation reads them (the core imports no plugin)
FALLBACK_CHECKER_KEY = "fallback_checker"


def _with_checker(task: TaskInfo, registry_task: TaskInfo | None) -> TaskInfo:
    """A skill's task data, told which registry task's checker judges its answers (when it names one)
    and to fall back to exact match of the answer and the reference response (under
    ``score = "checker"``) when there is none."""
    source: dict[str, Any] = {**task.source, FALLBACK_CHECKER_KEY: "exact"}
    if registry_task is not None:
        source[CHECKER_TASK_KEY] = {"name": registry_task.name, "category": registry_task.category,
                                    "source": dict(registry_task.source)}
    return TaskInfo(task.name, task.category, source, task.description)


def verification_tasks(request: AttributeRequest, skills: Sequence[str], warn: Callable[[str], None],
                       note: Callable[[str], None] | None = None) -> dict[str, TaskInfo]:
    """Task data for each skill to verify: ``--task-data SKILL=FILE.jsonl``, ``--task SKILL=TASK`` in the
    registry, or the registry task named like the skill. Skills without data are not verified (warned).

    The registry is ``--registry``, else the nearest ``registry.toml`` from the current folder up, else the
    one shipped with the package; which file was used is said through ``note``, and that none was found
    at all is warned once (not once per skill)."""
    registry = None
    if request.registry is not None or any(s not in request.task_data for s in skills):
        path, origin = request.registry, "--registry"
        if path is None and (path := nearest_registry(Path.cwd())) is not None:
            origin = "the nearest registry.toml to the current folder"
        if path is None and (path := packaged_registry()) is not None:
            origin = "the registry shipped with unmerge"
        if path is not None:
            registry = Registry.load(path)
            (note or warn)(f"--verify: task data from {path} ({origin})")
        else:
            warn("--verify: no registry.toml found (none in the current folder or above it, and none shipped "
                 "with this installation): pass --registry FILE, --task SKILL=TASK or --task-data SKILL=FILE.jsonl")
    if registry is None and request.task_data and (quiet := request.registry or nearest_registry(Path.cwd())
                                                   or packaged_registry()) is not None:
        try:  # only to find the checker of a --task-data skill named like a registry task
            registry = Registry.load(quiet)
        except UnmergeError:
            registry = None
    tasks: dict[str, TaskInfo] = {}
    for skill in skills:
        name = request.task_names.get(skill, skill)
        known = registry.task(name) if registry is not None and name in registry.task_names else None
        if skill in request.task_data:
            data = request.task_data[skill]
            if not data.is_file():
                raise UnmergeError(f"--task-data {skill}={data}: no such file")
            category = known.category if known is not None else "other"
            tasks[skill] = _with_checker(TaskInfo(skill, category, {"kind": "jsonl", "path": str(data.resolve())}),
                                         known)
            continue
        if known is not None:
            tasks[skill] = _with_checker(TaskInfo(skill, known.category, known.source, known.description), known)
        elif skill in request.task_names:
            where = registry.path if registry is not None else "no registry found"
            raise UnmergeError(f"--task {skill}={name}: no task {name!r} in {where}")
        elif registry is not None:  # (no registry at all was said once above)
            warn(f"--verify: no task data for skill {skill!r} (no task of that name in {registry.path}; pass "
                 f"--task {skill}=TASK or --task-data {skill}=FILE.jsonl): its attributions are not verified")
    for option, given in (("--task", request.task_names), ("--task-data", request.task_data)):
        for skill in given:
            if skill not in skills:
                raise UnmergeError(f"{option} {skill}=...: no skill {skill!r} in the dictionary "
                                   f"(skills: {', '.join(skills)})")
    if not tasks:
        raise UnmergeError("--verify: no skill of the dictionary has task data; pass --registry, --task or --task-data")
    return tasks


def check_request(request: AttributeRequest) -> None:
    """Every option of ``unmerge attribute`` that can be checked before reading a tensor."""
    for option, value in (("--support-threshold", request.support_threshold), ("--ood-threshold", request.ood_threshold)):
        if not math.isfinite(value) or value < 0:
            raise UnmergeError(f"{option} {value}: must be a finite number ≥ 0")
    if request.ood_threshold > 1:
        raise UnmergeError(f"--ood-threshold {request.ood_threshold}: must be in [0, 1] (the range of the "
                           "reconstruction error)")
    if request.seed < 0:
        raise UnmergeError(f"--seed {request.seed}: must be ≥ 0")
    if request.output_dir is None and request.verify:  # causal-ablation writes its details into the run directory
        raise UnmergeError("--verify: give an output directory (it writes each target's causal details there)")
    problem = check_output_dir(request.output_dir) if request.output_dir is not None else None
    if problem:
        raise UnmergeError(f"--output-dir {request.output_dir}: {problem}")
    if request.emit_recipe is not None and request.base is None:
        raise UnmergeError("--emit-recipe: pass --base PATH, the model the recipe's adapters apply to "
                           "(the recipe names it as base_model)")
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
    metric_labels = [m for m, _ in request.metrics]
    if len(set(metric_labels)) != len(metric_labels):
        raise UnmergeError("a --metric is listed twice")


def _with_threshold(manager: PluginManager, metric: str, params: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    """A metric's params with ``threshold`` = ``--support-threshold`` unless ``--param`` set it: the
    report and the metrics then count the same atoms as attributed."""
    out = dict(params)
    spec = manager.get("metric", metric, where=f"--metric {metric}").spec
    if "threshold" in spec.params.model_fields and "threshold" not in out:
        out["threshold"] = threshold
    return out


def recipe_has_truth(recipe: Path) -> bool:
    """Whether ``--truth`` can read a mergekit recipe: its method states each constituent's coefficient,
    and its slices or modules (if any) agree (so the suggestion printed for it works when followed)."""
    try:
        read_mergekit_truth(recipe, {})
    except (UnmergeError, OSError, ValueError):
        return False
    return True


def resolve_decomposer(manager: PluginManager, name: str, params: Mapping[str, Any]) -> ResolvedPlugin:
    """A ``--decomposer``; ``--param NAME.per_layer=true`` (or a JSON object of the ``per-layer``
    plugin's parameters) wraps it per layer, as ``per_layer`` does on a manifest's decomposer entry."""
    params = dict(params)
    given = "per_layer" in params
    per_layer = params.pop("per_layer", None)
    if given and not isinstance(per_layer, (bool, dict)):
        raise UnmergeError(f"--param {name}.per_layer: expected true, false or a JSON object of the per-layer "
                           f"plugin's parameters (got {per_layer!r})")
    if name == PER_LAYER_PLUGIN:
        raise UnmergeError(f"--decomposer {PER_LAYER_PLUGIN}: it wraps another decomposer: give that one with "
                           f"--param NAME.per_layer=true (e.g. --decomposer nnls --param nnls.per_layer=true)")
    plugin = resolve_plugin(manager, "decomposer", name, params, f"--decomposer {name}")
    if per_layer is False or per_layer is None:
        return plugin
    options = {} if per_layer is True else per_layer
    return manager.resolve("decomposer", PER_LAYER_PLUGIN, options, label=f"{name}/per-layer",
                           where=f"--decomposer {name}", inner=plugin, params_field=f"--param {name}.per_layer")


def resolve_plugin(manager: PluginManager, stage: str, name: str, params: Mapping[str, Any], where: str) -> ResolvedPlugin:
    """Look a plugin up by name and validate its parameters (one-line errors naming ``where``)."""
    return manager.resolve(stage, name, params, where=where, params_field=f"--param {name}")
