"""Existing models as targets: what a target is, its optional ground truth, and its masked ΔW.

A target the toolkit did not make is either

- a full model directory (``kind = "model"``): ΔW = target − base, read module by module from
  safetensors with :class:`~unmerge_core.io.checkpoints.Checkpoint`; or
- a PEFT LoRA adapter directory (``kind = "adapter"``): ΔW = B·A·α/r, read with
  :class:`~unmerge_core.LoraAdapter`.

``kind = "auto"`` picks ``adapter`` when the directory holds ``adapter_config.json``, else ``model``.
Only the mask's coordinates of ΔW are kept, so memory stays at one module of the target.

Ground truth is optional: tasks and weights given inline, in a JSON object, or read from a mergekit
YAML (the effective coefficient of each task vector in the merged ΔW). Weights are finite, from 0 to
:data:`MAX_WEIGHT`, with a positive sum. With it, a target belongs to the group ``known`` (every true
task is a dictionary atom), ``unknown`` (none is) or ``mixed``; without it, to the group ``external``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from unmerge_core.errors import UnmergeError, format_validation_error, short_repr
from unmerge_core.io.checkpoints import Checkpoint
from unmerge_core.io.gguf import find_gguf, inspect_gguf
from unmerge_core.io.hub import HUB_ID, resolve_model_ref
from unmerge_core.io.store import is_safe_name
from unmerge_core.types import StrictNumbers

EXTERNAL_GROUP = "external"
TargetKind = Literal["auto", "model", "adapter"]
MAX_WEIGHT = 1e6
"""Largest ground-truth weight accepted: beyond it a weight is a typo, and sums overflow downstream."""
ZERO_SUM = "weights sum to 0; at least one weight must be positive"
Weight = Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]


class TruthSpec(StrictNumbers):
    """Ground truth of an existing target: its constituent tasks and their merge weights.

    Each weight is a finite number from 0 to :data:`MAX_WEIGHT`, and at least one is positive.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] = Field(min_length=1, description="the target's constituent tasks (registry names)")
    weights: list[Weight] = Field(description="their merge weights, in the same order")

    @model_validator(mode="after")
    def _aligned(self) -> TruthSpec:
        if len(self.weights) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.weights)} weights")
        dupes = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dupes:
            raise ValueError(f"tasks lists {', '.join(dupes)} more than once")
        if not sum(self.weights) > 0:
            raise ValueError(ZERO_SUM)
        return self


class ExternalTarget(StrictNumbers):
    """One ``[[targets]]`` entry of a manifest: an existing model or adapter to attribute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="a model or adapter folder (relative to the manifest), a .gguf file, or a "
                      "Hub id owner/name[@revision]")
    kind: TargetKind = Field("auto", description="model, adapter, or auto (decided from the folder's files)")
    name: str | None = Field(None, description="the target's name in results (default: the folder's name)")
    truth: TruthSpec | None = Field(None, description="its ground truth, {tasks = [...], weights = [...]}, for "
                                    "the truth metrics")

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        return Path(self.path.split("@", 1)[0] if HUB_ID.fullmatch(self.path) else self.path).name


@dataclass(frozen=True)
class Truth:
    """Validated ground truth; ``source`` says where it came from (for the report).

    Built with weights outside :class:`TruthSpec`'s rules, it raises a one-line :class:`UnmergeError`.
    """

    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        for i, w in enumerate(self.weights):
            if not 0 <= w <= MAX_WEIGHT:  # NaN and ±inf fail too
                raise UnmergeError(f"truth from {self.source}: weights[{i}]: must be a finite number from 0 to "
                                   f"{MAX_WEIGHT:,.0f} (got {w!r})")
        if not sum(self.weights) > 0:
            raise UnmergeError(f"truth from {self.source}: {ZERO_SUM}")

    @classmethod
    def from_spec(cls, spec: TruthSpec, source: str) -> Truth:
        return cls(tuple(spec.tasks), tuple(float(w) for w in spec.weights), source)


def truth_group(truth: Truth | None, atom_names: Sequence[str]) -> str:
    """``external`` without truth, else ``known`` / ``mixed`` / ``unknown`` by dictionary membership."""
    if truth is None:
        return EXTERNAL_GROUP
    inside = [t in atom_names for t in truth.tasks]
    if all(inside):
        return "known"
    return "mixed" if any(inside) else "unknown"


def detect_kind(path: Path, kind: str = "auto") -> str:
    """``model`` or ``adapter`` for a target path; raises a one-line error when neither fits."""
    if not path.exists():
        raise UnmergeError(f"target {path}: no such file or directory")
    is_adapter = path.is_dir() and (path / "adapter_config.json").is_file()
    if kind == "adapter" and not is_adapter:
        raise UnmergeError(f"target {path}: not a PEFT adapter directory (missing adapter_config.json)")
    if kind == "model" and is_adapter:
        raise UnmergeError(f"target {path}: is a PEFT adapter, not a full model (use kind 'adapter')")
    if kind in ("model", "adapter"):
        return kind
    return "adapter" if is_adapter else "model"


# --------------------------------------------------------------------------------------------------
# Ground truth files
# --------------------------------------------------------------------------------------------------


def read_truth_json(text_or_path: str) -> Truth:
    """``{"tasks": [...], "weights": [...]}`` given inline or as the path of a JSON file."""
    source = "json"
    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
        path = Path(text_or_path)
        if not path.is_file():
            raise UnmergeError(f"--truth-json: {text_or_path} is neither a JSON object nor a file")
        text, source = path.read_text(), str(path)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UnmergeError(f"--truth-json {source}: invalid JSON: {exc}") from None
    try:
        return Truth.from_spec(TruthSpec.model_validate(data), source)
    except ValidationError as exc:
        first = format_validation_error(exc).splitlines()[0].removeprefix("(top level): ")
        raise UnmergeError(f"--truth-json {source}: {first}") from None


# mergekit's task-arithmetic family (mergekit/merge_methods/registry.py): name -> default of ``normalize``.
TASK_ARITHMETIC_METHODS = {"task_arithmetic": False, "ties": True, "dare_ties": False, "dare_linear": False,
                           "breadcrumbs": False, "breadcrumbs_ties": False, "della": True, "della_linear": False}



def load_recipe_file(path: Path, where: str, missing: str) -> dict[str, Any]:
    """A mergekit YAML recipe as a mapping; one-line :class:`UnmergeError` for a missing file (``missing``),
    invalid YAML or a document that is not a mapping (``where`` starts the message)."""
    import yaml

    if not path.is_file():
        raise UnmergeError(missing)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UnmergeError(f"{where}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UnmergeError(f"{where}: not a mergekit recipe (a mapping with merge_method and models:)")
    return data

def read_mergekit_truth(path: Path, atoms: Mapping[str, Path]) -> Truth:
    """Tasks, and the coefficient of each one's task vector in the merged ΔW, from a mergekit YAML.

    Each ``model`` reference is ``PATH`` or ``BASE+ADAPTER``; its task is the dictionary atom whose
    adapter directory is that path (after resolving it against the YAML's folder, then the current
    directory), else the atom named like the path's last component, else that last component (a
    task outside the dictionary). The base model is no task: skipped when listed.

    Parameters are resolved as mergekit does: a model's ``weight`` from its own ``parameters``, else
    from the top-level ``parameters`` (else 1); ``normalize`` and ``lambda`` from the top level only.

    mergekit's three forms are read (what ``mergekit-yaml`` copies to ``mergekit_config.yml``):
    ``models:``, ``slices:`` (each slice's ``sources``) and ``modules:`` (each module's ``models`` or
    ``slices``); in a slice or module, a parameter not set on the model comes from the slice, then the
    module, then the top level. Several slices or modules are one truth only when every one gives the
    same coefficients; a recipe that weighs the models differently per layer range is refused.

    - ``linear``: ΔW = Σ wᵢ·ΔWᵢ, divided by Σ w with ``normalize`` (the default); the base takes part
      in that sum with its weight, if it has one (its own, or the top-level one), as mergekit feeds it
      to the average as one more input. (Without ``normalize``, weights not summing to 1 also leave
      (Σw − 1)·base in ΔW, which is no task.)
    - the task-arithmetic family (:data:`TASK_ARITHMETIC_METHODS`: task_arithmetic, TIES, DARE,
      breadcrumbs, DELLA): ΔW = λ·Σ wᵢ·ΔWᵢ, divided by Σ w with ``normalize`` (default on for ``ties``
      and ``della`` only); the base's weight plays no part. With sign consensus (the ``*ties`` methods
      and ``della``) mergekit divides each coordinate by the sum of the weights that agree in sign
      there, so λ·wᵢ/Σw is an approximation; sparsification (density, DARE's rescaling) is ignored.
    - any other method (slerp and its family, model_stock, sce, karcher, ...) has coefficients that
      depend on the weights' values themselves: a one-line :class:`UnmergeError`, as is a weight,
      ``lambda`` or ``normalize`` that is not a plain value (per-layer gradients and filters are not
      read), or weights outside :class:`TruthSpec`'s rules.
    """
    where = f"--truth {path}"
    data = load_recipe_file(path, where, missing=f"--truth: {path}: no such file")
    method = data.get("merge_method")
    if method is None:
        raise UnmergeError(f"{where}: merge_method: missing; the truth depends on how the models were merged")
    if method != "linear" and not (isinstance(method, str) and method in TASK_ARITHMETIC_METHODS):
        raise UnmergeError(f"{where}: merge_method: {short_repr(method)} mixes models with coefficients that cannot "
                           "be read from the YAML (supported: linear, " + ", ".join(TASK_ARITHMETIC_METHODS)
                           + "); give the truth with --truth-json")
    shared = _parameters(data.get("parameters"), f"{where}: parameters")
    resolved_atoms = {_resolve(p): name for name, p in atoms.items()}
    found: list[tuple[str, tuple[str, ...], tuple[float, ...]]] = []
    for group in _recipe_groups(data, where, [("parameters", shared)], data.get("base_model")):
        tasks, coefficients = _group_truth(group, method, where, path.parent, resolved_atoms)
        found.append((group.label, tasks, coefficients))
    first_label, tasks, coefficients = found[0]
    first = dict(zip(tasks, coefficients))

    def show(ts: Sequence[str], cs: Sequence[float]) -> str:
        return ", ".join(f"{t} {c:.4g}" for t, c in zip(ts, cs))

    for label, other_tasks, other in found[1:]:  # several slices or modules: one truth only if all agree
        theirs = dict(zip(other_tasks, other))
        if theirs.keys() != first.keys() or not all(math.isclose(c, theirs[t], rel_tol=1e-9, abs_tol=1e-12)
                                                    for t, c in first.items()):
            raise UnmergeError(f"{where}: {label} gives {show(other_tasks, other)}, {first_label} gives "
                               f"{show(tasks, coefficients)}: a recipe that weighs the models differently per layer "
                               "range or module is not one truth; give the truth with --truth-json")
    return Truth(tasks, coefficients, str(path))


@dataclass(frozen=True)
class _RecipeGroup:
    """One list of models mergekit merges with one set of parameters: the ``models:`` list, a slice's
    ``sources`` or a module's ``models`` / slices."""

    label: str  # "models", "slices[1] (layers 16-32)", "modules.text_decoder.slices[0] (layers 0-32)"
    entries: list[tuple[str, Any]]  # (field of the entry, the entry)
    chain: list[tuple[str, dict[str, Any]]]  # (field, parameters) from the innermost to the top level
    base_ref: Any
    form: str  # "models" or "sources"


def _recipe_groups(data: dict[str, Any], where: str, chain: list[tuple[str, dict[str, Any]]], base_ref: Any,
                   prefix: str = "") -> list[_RecipeGroup]:
    """The recipe's groups, in mergekit's three forms (mergekit/config.py, MergeConfiguration: exactly one
    of ``models``, ``slices`` and ``modules``; a module has ``models`` or ``slices``). Parameters resolve
    as mergekit's ConfigReader does: a source's own, its slice's, its module's, then the top level's."""
    forms = [k for k in (("models", "slices") if prefix else ("models", "slices", "modules")) if data.get(k)]
    if len(forms) != 1:
        allowed = "models: or slices:" if prefix else "models:, slices: or modules:"
        raise UnmergeError(f"{where}: {prefix.rstrip('.') or 'the recipe'}: needs exactly one of {allowed} "
                           f"(found {', '.join(forms) or 'none'})")
    form = forms[0]
    value = data[form]
    field = f"{prefix}{form}"
    if form == "modules":
        if not isinstance(value, dict):
            raise UnmergeError(f"{where}: modules: must be a mapping of module name -> models: or slices:")
        groups = []
        for name, module in value.items():
            at = f"modules.{name}"
            if not isinstance(module, dict):
                raise UnmergeError(f"{where}: {at}: must be a mapping with models: or slices:")
            params = _parameters(module.get("parameters"), f"{where}: {at}.parameters")
            groups += _recipe_groups(module, where, [(f"{at}.parameters", params), *chain], base_ref, f"{at}.")
        return groups
    if not isinstance(value, list):
        raise UnmergeError(f"{where}: {field}: must be a list")
    if form == "models":
        return [_RecipeGroup(field, [(f"{field}[{i}]", e) for i, e in enumerate(value)], chain, base_ref, "models")]
    groups = []
    for j, piece in enumerate(value):
        at = f"{field}[{j}]"
        if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list):
            raise UnmergeError(f"{where}: {at}.sources: must be a list of models")
        if piece.get("residual_weight") is not None:
            raise UnmergeError(f"{where}: {at}.residual_weight: is not read; give the truth with --truth-json")
        ranges = {tuple(s["layer_range"]) for s in piece["sources"] if isinstance(s, dict)
                  and isinstance(s.get("layer_range"), list) and len(s["layer_range"]) == 2}
        layers = f" (layers {min(r[0] for r in ranges)}-{max(r[1] for r in ranges)})" if ranges else ""
        params = _parameters(piece.get("parameters"), f"{where}: {at}.parameters")
        groups.append(_RecipeGroup(f"{at}{layers}", [(f"{at}.sources[{i}]", e) for i, e in enumerate(piece["sources"])],
                                   [(f"{at}.parameters", params), *chain], piece.get("base_model", base_ref), "sources"))
    return groups


def _group_truth(group: _RecipeGroup, method: str, where: str, yaml_dir: Path,
                 resolved_atoms: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Tasks and coefficients of one group (see :func:`read_mergekit_truth` for the rules)."""

    def inherited(name: str) -> tuple[str, Any] | None:  # (field, value) of the nearest setting of ``name``
        return next(((f"{field}.{name}", params[name]) for field, params in group.chain
                     if params.get(name) is not None), None)

    shared_weight = inherited("weight")
    default = None if shared_weight is None else _number(shared_weight[1], f"{where}: {shared_weight[0]}")
    base_ref = group.base_ref
    base_weight = None if base_ref is None else default  # linear: mergekit adds an unlisted base with it
    tasks: list[str] = []
    weights: list[float] = []
    for at, entry in group.entries:
        ref = entry.get("model") if isinstance(entry, dict) else None
        if not isinstance(ref, str):
            raise UnmergeError(f"{where}: {at}.model must be a string path")
        params = _parameters(entry.get("parameters"), f"{where}: {at}.parameters")
        own = "weight" in params
        weight = params["weight"] if own else default
        if ref == base_ref and method != "linear":  # the family never reads the base's weight
            continue
        if weight is not None:
            weight = _number(weight, f"{where}: {at}.parameters.weight" if own else f"{where}: {shared_weight[0]}"
                             if shared_weight else f"{where}: parameters.weight")
        if ref == base_ref:
            base_weight = weight
            continue
        task = _task_of_reference(ref, yaml_dir, resolved_atoms)
        if task in tasks:
            raise UnmergeError(f"{where}: {at}: task {task!r} appears twice")
        tasks.append(task)
        weights.append(1.0 if weight is None else weight)
    if not tasks:
        raise UnmergeError(f"{where}: the {group.label} list names no constituent")
    if not sum(weights) > 0:
        raise UnmergeError(f"{where}: the {group.label}' {ZERO_SUM}" if group.label == "models"
                           else f"{where}: {group.label}: the {ZERO_SUM}")
    scale = 1.0
    normalize_at = inherited("normalize")
    normalize_field = f"{where}: {normalize_at[0] if normalize_at else 'parameters.normalize'}"
    if method == "linear":
        normalize = _flag(normalize_at[1] if normalize_at else True, normalize_field)
    else:
        normalize = _flag(normalize_at[1] if normalize_at else TASK_ARITHMETIC_METHODS[method], normalize_field)
        lambda_at = inherited("lambda")
        scale = _number(lambda_at[1] if lambda_at else 1.0, f"{where}: {lambda_at[0] if lambda_at else 'parameters.lambda'}")
        if scale == 0:
            raise UnmergeError(f"{where}: {lambda_at[0] if lambda_at else 'parameters.lambda'}: must be positive "
                               f"(got {lambda_at[1] if lambda_at else 0!r})")
    coefficients = mergekit_coefficients(method, weights, normalize=normalize, lambda_=scale, base_weight=base_weight)
    assert coefficients is not None  # the method was checked above
    return tuple(tasks), coefficients


def mergekit_coefficients(method: str, weights: Sequence[float], *, normalize: bool, lambda_: float = 1.0,
                          base_weight: float | None = None) -> tuple[float, ...] | None:
    """Each constituent's coefficient in the ΔW that mergekit's ``method`` makes from ``weights``.

    The one rule for every ground truth of a mergekit merge (a run's generated targets through the
    ``mergekit`` merger's ``coefficients``, and ``unmerge attribute --truth recipe.yml``):

    - ``linear``: wᵢ, divided by Σw (plus the base's weight, when the base takes part) with ``normalize``;
    - the task-arithmetic family (:data:`TASK_ARITHMETIC_METHODS`): λ·wᵢ, divided by Σw with
      ``normalize`` (per coordinate over the agreeing weights for the sign-consensus methods, so
      λ·wᵢ/Σw is then an approximation); a negative λ gives negative coefficients (a negation);
    - ``None`` for any other method: its coefficients are not a function of the weights alone.
    """
    if method == "linear":
        total, scale = sum(weights) + (base_weight or 0.0), 1.0
    elif method in TASK_ARITHMETIC_METHODS:
        total, scale = sum(weights), lambda_
    else:
        return None
    if normalize:
        if not total > 0:
            return None
        scale /= total
    return tuple(float(w) * scale for w in weights)


def _parameters(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnmergeError(f"{field}: must be a mapping (got {short_repr(value)})")
    return value


def _number(value: Any, field: str) -> float:
    """A mergekit weight or lambda: a plain number from 0 to :data:`MAX_WEIGHT`, else a one-line error."""
    if isinstance(value, (list, dict)):
        raise UnmergeError(f"{field}: per-layer gradients and filters are not read; give one number "
                           f"(got {short_repr(value)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_WEIGHT:
        raise UnmergeError(f"{field}: must be a finite number from 0 to {MAX_WEIGHT:,.0f} (got {short_repr(value)})")
    return float(value)


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise UnmergeError(f"{field}: must be true or false (got {short_repr(value)})")
    return value


def _resolve(path: Path) -> str:
    return str(Path(path).expanduser().resolve())


def _task_of_reference(ref: str, yaml_dir: Path, atoms: Mapping[str, str]) -> str:
    part = ref.split("+", 1)[1] if "+" in ref else ref
    candidate = Path(part).expanduser()
    for option in ([candidate] if candidate.is_absolute() else [yaml_dir / candidate, candidate]):
        if _resolve(option) in atoms:
            return atoms[_resolve(option)]
    leaf = candidate.name or part
    return leaf



# --------------------------------------------------------------------------------------------------
# Manifest support
# --------------------------------------------------------------------------------------------------


def manifest_path(manifest: Path, value: str) -> Path:
    """A path from a manifest: absolute, or relative to the manifest's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else manifest.parent / p


def manifest_model(manifest: Path, value: str, what: str) -> Path:
    """A model or adapter from a manifest: a path (absolute, or relative to the manifest's folder) or a
    Hub id ``owner/name[@revision]`` resolved to its cached snapshot (see :mod:`unmerge_core.io.hub`)."""
    return resolve_model_ref(value, f"{manifest}: {what}:", relative_to=manifest.parent)


def check_manifest_targets(path: Path, file: Any, task_names: Sequence[str], errors: list[str],
                           generated_ids: Collection[str] = ()) -> None:
    """Append one line per problem of a manifest's ``[[targets]]`` and ``base`` to ``errors``."""
    targets: list[ExternalTarget] = list(file.targets)
    if not targets and not file.protocol.groups:
        errors.append(f"{path}: protocol.groups is empty and there is no [[targets]]: nothing to decompose")
    names = [t.display_name for t in targets]
    needs_base = False
    for i, target in enumerate(targets):
        where = f"{path}: targets[{i}]"
        if names.count(target.display_name) > 1:
            errors.append(f"{where}: name {target.display_name!r} is used twice; give each target a distinct 'name'")
        try:
            model = manifest_model(path, target.path, f"targets[{i}].path")
            kind = detect_kind(model, target.kind)
            if kind == "model" and (gguf := find_gguf(model, "target")) is not None:
                inspect_gguf(gguf, "GGUF file")  # its header only: converted when the run reads it
        except UnmergeError as exc:
            message = str(exc)
            errors.append(message if message.startswith(f"{path}: ") else f"{where}.path: {message}")
            continue
        needs_base |= kind == "model"
        if target.truth is not None:
            for j, task in enumerate(target.truth.tasks):
                if task not in task_names:
                    errors.append(f"{where}.truth.tasks[{j}]: '{task}' is not a task of this manifest "
                                  "(tasks.known or tasks.unknown)")
    for i, target in enumerate(targets):
        if not is_safe_name(target.display_name):
            errors.append(f"{path}: targets[{i}].name: {target.display_name!r} is not a safe name (letters, digits, "
                          "'.', '_', '-'); set name = \"...\"")
        elif target.display_name in generated_ids:
            errors.append(f"{path}: targets[{i}].name: {target.display_name!r} is also the id of a generated target; "
                          "choose another name")
    if file.base is not None:
        try:
            base = manifest_model(path, file.base, "base")
            if not base.exists():
                errors.append(f"{path}: base: no such file or directory: {base}")
            elif (gguf := find_gguf(base, "base")) is not None:
                inspect_gguf(gguf, "GGUF file")  # its header only: converted when the run reads it
            else:
                Checkpoint(base, name="base")
        except UnmergeError as exc:
            message = str(exc)
            errors.append(message if message.startswith(f"{path}: ") else f"{path}: base: {message}")
    elif needs_base:
        errors.append(f"{path}: base: full-model [[targets]] need the base model; add base = \"path/to/base\"")
