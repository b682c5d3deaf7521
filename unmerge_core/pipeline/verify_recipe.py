"""``unmerge verify-recipe``: does a merged model's ΔW equal what its claimed mergekit recipe makes?

Given a merged model folder and the mergekit YAML that supposedly made it, the claimed merge is
recomputed module by module from the recipe's constituents (``BASE+ADAPTER`` LoRA references, PEFT
adapter folders or full-model folders) and compared with ΔW = model − base on every coordinate of the
compared modules. One module is dense in memory at a time (the base's, the model's, each constituent's
and the claimed ΔW of that module).

The core knows no merge algorithm: the claimed ΔW comes from the registered ``mergekit`` merger plugin
(its dense path, i.e. mergekit's own ``merge_tensors``), called by method name through the plugin
manager with the recipe's weights and parameters.

Exactly checkable (deterministic) methods: :data:`EXACT_METHODS` (linear, task_arithmetic, ties).
Methods that draw at random (:data:`RANDOM_METHODS`: DARE, DELLA) cannot be recomputed bit for bit;
any other method is not checked in this version. Both give the verdict ``cannot check exactly``.

Tolerance. The model stores base + ΔW in its dtype, so even a faithful merge differs from the exact
claim by rounding. For each module the rounding error of storing the claim,
``e = ‖round_dtype(W0 + ΔW_claimed) − (W0 + ΔW_claimed)‖``, is measured; constituents materialised by
mergekit (base + LoRA, stored before the merge) carry about the same rounding, scaled by their
coefficients c. A module matches when ``‖ΔW_model − ΔW_claimed‖ ≤ K·e·(1 + ‖c‖₂) + 2⁻²⁴·‖W0 + ΔW_claimed‖``
(:data:`NOISE_FACTOR` K = 3; the last term covers float32 arithmetic). The model matches when every
module does and no other float tensor changed (:func:`~unmerge_core.io.checkpoints.changed_outside`).

Exit codes (the command's): 0 matches, 1 does not match, 2 cannot check exactly or an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmerge_core.config.targets import (
    TASK_ARITHMETIC_METHODS,
    _flag,
    _number,
    _parameters,
    load_recipe_file,
    mergekit_coefficients,
)
from unmerge_core.errors import UnmergeError, short_repr
from unmerge_core.io.adapters import ADAPTER_CONFIG, LoraAdapter
from unmerge_core.io.checkpoints import FLOAT_DTYPES, Checkpoint, _natural_key, changed_outside
from unmerge_core.io.hub import resolve_model_ref

EXACT_METHODS = ("linear", "task_arithmetic", "ties")
"""Methods recomputed exactly (deterministic given the recipe)."""
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
"""mergekit methods that draw a random drop: a rerun differs coordinate by coordinate."""
MERGER = "mergekit"
"""The merger plugin that recomputes the claim."""
NOISE_FACTOR = 3.0
FLOAT32_FLOOR = 2.0**-24
SHARED_KEYS = {"weight", "density", "normalize", "lambda", "int8_mask"}
"""Recipe parameters mapped onto the merger plugin's shared parameters; other top-level ones go to its
``methods.<method>`` table (checked against mergekit's own parameters of the method)."""
WORST = 5
EXIT = {"matches": 0, "does not match": 1, "cannot check exactly": 2}
_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class CannotCheck(Exception):
    """The recipe is valid but cannot be recomputed exactly (the reason is the message)."""


@dataclass
class Constituent:
    ref: str
    path: Path
    weight: float
    kind: str  # "adapter", "model" or "base" (the base itself as a linear input: a zero ΔW)
    reader: Any = None

    def delta(self, module: str, base: Checkpoint, shape: tuple[int, ...]) -> torch.Tensor:
        if self.kind == "adapter":
            if module in self.reader.module_names:
                return self.reader.delta(module)
            return torch.zeros(shape, dtype=torch.float32)
        if self.kind == "base":
            return torch.zeros(shape, dtype=torch.float32)
        key, base_key = self.reader.module_key(module), base.module_key(module)
        if key is None or self.reader.shapes[key] != base.shapes[base_key]:
            raise UnmergeError(f"recipe model {self.ref}: no weight of {module} with the base's shape")
        return (self.reader.tensor(key).to(torch.float64) - base.tensor(base_key).to(torch.float64)).to(torch.float32)


@dataclass
class Recipe:
    path: Path
    method: str
    base_ref: str | None
    constituents: list[Constituent]
    normalize: bool
    lambda_: float
    density: float | None
    int8_mask: bool
    extra: dict[str, Any]
    dtype: str | None

    def merger_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"path": "dense", "normalize": self.normalize, "lambda": self.lambda_,
                                  "int8_mask": self.int8_mask, "device": "cpu"}
        if self.density is not None:
            params["density"] = self.density
        if self.extra:
            params["methods"] = {self.method: dict(self.extra)}
        return params


@dataclass
class Result:
    verdict: str
    line: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT[self.verdict]


# --------------------------------------------------------------------------------------------------
# Reading the recipe
# --------------------------------------------------------------------------------------------------


def _local(part: str, yaml_dir: Path, dictionary: Path | None) -> Path | None:
    candidate = Path(part).expanduser()
    options = [candidate] if candidate.is_absolute() else [yaml_dir / candidate, candidate]
    if dictionary is not None:
        options += [dictionary / candidate, dictionary / (candidate.name or part)]
    return next((p for p in options if p.is_dir()), None)


def _folder(part: str, where: str, yaml_dir: Path, dictionary: Path | None) -> Path:
    found = _local(part, yaml_dir, dictionary)
    if found is not None:
        return found
    path = resolve_model_ref(part, where)  # a Hub id owner/name[@revision]: its cached snapshot
    if not path.is_dir():
        hint = "" if dictionary is None else f" nor in --dictionary {dictionary}"
        raise UnmergeError(f"{where}: {part}: no such folder (looked beside the recipe, in the current directory"
                           f"{hint})")
    return path


def read_recipe(path: Path, *, dictionary: Path | None = None, base_override: str | None = None) -> Recipe:
    """The recipe's method, constituents and parameters (``models:`` form only in this version).

    Raises :class:`UnmergeError` for a file that is not a valid recipe, :class:`CannotCheck` for a
    valid one this version cannot recompute exactly.
    """
    where = f"recipe {path}"
    data = load_recipe_file(path, where, missing=f"{where}: no such file")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise UnmergeError(f"{where}: merge_method: missing or not a name (got {short_repr(method)})")
    if method in RANDOM_METHODS:
        raise CannotCheck(f"{method} drops entries at random, so a rerun differs coordinate by coordinate; "
                          f"exactly checkable: {', '.join(EXACT_METHODS)}")
    if method not in EXACT_METHODS:
        raise CannotCheck(f"{method} is not checked in this version; exactly checkable: {', '.join(EXACT_METHODS)}")
    for form in ("slices", "modules"):
        if data.get(form):
            raise CannotCheck(f"a recipe with {form}: is not checked in this version (models: only)")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise UnmergeError(f"{where}: models: must be a non-empty list of models")
    shared = _parameters(data.get("parameters"), f"{where}: parameters")
    base_ref = data.get("base_model")
    if base_ref is not None and not isinstance(base_ref, str):
        raise UnmergeError(f"{where}: base_model: must be a path or a Hub id (got {short_repr(base_ref)})")
    if base_override is None and base_ref is None:
        raise UnmergeError(f"{where}: base_model: missing; give the base with --base")

    def number(value: Any, at: str) -> float:
        return _number(value, f"{where}: {at}")

    default_weight = None if shared.get("weight") is None else number(shared["weight"], "parameters.weight")
    densities: set[float] = set()
    if shared.get("density") is not None:
        densities.add(number(shared["density"], "parameters.density"))
    constituents: list[Constituent] = []
    base_weight: float | None = default_weight if method == "linear" and base_ref is not None else None
    base_listed = False
    for i, entry in enumerate(models):
        at = f"models[{i}]"
        ref = entry.get("model") if isinstance(entry, dict) else None
        if not isinstance(ref, str):
            raise UnmergeError(f"{where}: {at}.model must be a string path")
        params = _parameters(entry.get("parameters"), f"{where}: {at}.parameters")
        other = sorted(set(params) - {"weight", "density"})
        if other:
            raise CannotCheck(f"{at}.parameters.{other[0]}: per-model values other than weight and density are not "
                              "checked in this version")
        weight = number(params["weight"], f"{at}.parameters.weight") if params.get("weight") is not None \
            else default_weight
        if params.get("density") is not None:
            densities.add(number(params["density"], f"{at}.parameters.density"))
        if ref == base_ref:
            base_listed = True
            if method == "linear":
                base_weight = weight
            continue
        part = ref.split("+", 1)[1] if "+" in ref else ref
        folder = _folder(part, f"{where}: {at}.model", path.parent, dictionary)
        kind = "adapter" if (folder / ADAPTER_CONFIG).is_file() else "model"
        constituents.append(Constituent(ref, folder, 1.0 if weight is None else weight, kind))
    if not constituents:
        raise UnmergeError(f"{where}: models: names no constituent besides the base")
    if len(densities) > 1:
        raise CannotCheck("models with different densities are not checked in this version")
    normalize_default = True if method == "linear" else TASK_ARITHMETIC_METHODS[method]
    normalize = _flag(shared.get("normalize", normalize_default), f"{where}: parameters.normalize")
    lambda_ = 1.0
    if method != "linear" and shared.get("lambda") is not None:
        lambda_ = number(shared["lambda"], "parameters.lambda")
    if method == "linear" and base_weight is not None and (base_listed or base_ref is not None):
        constituents.append(Constituent(base_ref or "base", Path(), base_weight, "base"))
    if method == "linear" and not normalize and not math.isclose(sum(c.weight for c in constituents), 1.0):
        raise CannotCheck("linear without normalize, its weights not summing to 1, also scales the base weights; "
                          "not checked in this version")
    int8 = _flag(shared.get("int8_mask", False), f"{where}: parameters.int8_mask")
    extra = {k: v for k, v in shared.items() if k not in SHARED_KEYS and v is not None}
    dtype = data.get("dtype")
    return Recipe(path, method, base_ref, constituents, normalize, lambda_,
                  next(iter(densities)) if densities and method == "ties" else (1.0 if method == "ties" else None),
                  int8, extra, dtype if isinstance(dtype, str) else None)


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------


def _merger(recipe: Recipe, manager: Any) -> Any:
    from unmerge_core.manager import PluginManager

    manager = manager or PluginManager()
    return manager.resolve("merger", MERGER, recipe.merger_params(), where=f"recipe {recipe.path}:",
                           params_field="parameters").build()


def _modules(recipe: Recipe, model: Checkpoint, base: Checkpoint) -> list[str]:
    """The compared modules: those the recipe's adapters adapt; every 2-D float weight the model shares with
    the base when a constituent is a full model (it may change any of them)."""
    names: set[str] = set()
    for c in recipe.constituents:
        if c.kind == "adapter":
            names.update(c.reader.module_names)
    if any(c.kind == "model" for c in recipe.constituents):
        for key, shape in model.shapes.items():
            if (key.endswith(".weight") and len(shape) == 2 and base.shapes.get(key) == shape
                    and model.dtypes.get(key) in FLOAT_DTYPES):
                names.add(key[: -len(".weight")])
    return sorted(names, key=_natural_key)


def verify_recipe(model_path: Path, recipe_path: Path, *, base: str | None = None, dictionary: Path | None = None,
                  manager: Any = None) -> Result:
    """The verdict on ``model_path`` being what ``recipe_path`` makes (see the module's docstring)."""
    if not model_path.is_dir():
        raise UnmergeError(f"model {model_path}: no such folder")
    if dictionary is not None and not dictionary.is_dir():
        raise UnmergeError(f"--dictionary {dictionary}: no such folder")
    try:
        recipe = read_recipe(recipe_path, dictionary=dictionary, base_override=base)
    except CannotCheck as exc:
        return Result("cannot check exactly", f"cannot check exactly: {exc}",
                      {"verdict": "cannot check exactly", "reason": str(exc), "model": str(model_path),
                       "recipe": str(recipe_path), "exact_methods": list(EXACT_METHODS)})
    if base is not None:
        base_path = resolve_model_ref(base, "--base")
    else:
        assert recipe.base_ref is not None
        base_path = _local(recipe.base_ref, recipe_path.parent, None) or resolve_model_ref(
            recipe.base_ref, f"recipe {recipe_path}: base_model")
    base_ckpt = Checkpoint(base_path, name="base")
    model = Checkpoint(model_path, name=model_path.name)
    for c in recipe.constituents:
        if c.kind == "adapter":
            c.reader = LoraAdapter(c.path, c.path.name)
        elif c.kind == "model":
            c.reader = Checkpoint(c.path, name=c.path.name)
    merger = _merger(recipe, manager)
    from unmerge_core.types import MergeJob

    job = MergeJob(target_id="recipe", method=recipe.method,
                   tasks=tuple(f"m{i}" for i in range(len(recipe.constituents))),
                   weights=tuple(c.weight for c in recipe.constituents), seed=0)
    coefficients = mergekit_coefficients(recipe.method, job.weights, normalize=recipe.normalize,
                                         lambda_=recipe.lambda_) or job.weights
    spread = 1.0 + math.sqrt(sum(c * c for c in coefficients))
    modules = _modules(recipe, model, base_ckpt)
    if not modules:
        raise UnmergeError(f"recipe {recipe_path}: its constituents adapt no module")
    rows: list[dict[str, Any]] = []
    totals = {"diff": 0.0, "model": 0.0, "claimed": 0.0, "noise": 0.0, "tolerance": 0.0}
    dtypes: set[str] = set()
    for module in modules:
        key, base_key = model.module_key(module), base_ckpt.module_key(module)
        if key is None or base_key is None:
            raise UnmergeError(f"{module}: adapted by the recipe but missing from the "
                               f"{'model' if key is None else 'base'}")
        if model.shapes[key] != base_ckpt.shapes[base_key]:
            raise UnmergeError(f"{module}: the model's shape {model.shapes[key]} is not the base's "
                               f"{base_ckpt.shapes[base_key]}")
        dtype = model.dtypes.get(key, "F32")
        dtypes.add(dtype)
        w0 = base_ckpt.tensor(base_key).to(torch.float64)
        shape = tuple(w0.shape)
        deltas = [c.delta(module, base_ckpt, shape) for c in recipe.constituents]
        with torch.no_grad():
            claimed = merger.merge_module(job, module, deltas).to(torch.float64)
        del deltas
        observed = model.tensor(key).to(torch.float64) - w0
        claimed_w = w0 + claimed
        noise = float(torch.linalg.vector_norm(claimed_w.to(_TORCH.get(dtype, torch.float32)).to(torch.float64)
                                               - claimed_w))
        diff = float(torch.linalg.vector_norm(observed - claimed))
        norm_model = float(torch.linalg.vector_norm(observed))
        norm_claimed = float(torch.linalg.vector_norm(claimed))
        tolerance = NOISE_FACTOR * noise * spread + FLOAT32_FLOOR * float(torch.linalg.vector_norm(claimed_w))
        del w0, claimed, observed, claimed_w
        rows.append({"module": module, "dtype": dtype, "relative_error": _ratio(diff, norm_model),
                     "rounding_noise": _ratio(noise, norm_model), "tolerance": _ratio(tolerance, norm_model),
                     "difference": diff, "norm_model": norm_model, "norm_claimed": norm_claimed,
                     "matches": diff <= tolerance})
        for name, value in (("diff", diff), ("model", norm_model), ("claimed", norm_claimed), ("noise", noise),
                            ("tolerance", tolerance)):
            totals[name] += value * value
    totals = {k: math.sqrt(v) for k, v in totals.items()}
    outside = changed_outside(base_ckpt, model, modules) if all(c.kind != "model" for c in recipe.constituents) \
        else []
    failing = [r for r in rows if not r["matches"]]
    worst = sorted(rows, key=lambda r: -(r["difference"] / max(r["tolerance"] * r["norm_model"], 1e-300)
                                         if r["norm_model"] else r["difference"]))[:WORST]
    relative = _ratio(totals["diff"], totals["model"])
    names = "/".join(sorted(dtypes))
    details: dict[str, Any] = {
        "model": str(model_path), "recipe": str(recipe_path), "base": str(base_path), "method": recipe.method,
        "constituents": [{"model": c.ref, "path": str(c.path), "kind": c.kind, "weight": c.weight}
                         for c in recipe.constituents],
        "parameters": {"normalize": recipe.normalize, "lambda": recipe.lambda_, "density": recipe.density,
                       "int8_mask": recipe.int8_mask, **recipe.extra},
        "recipe_dtype": recipe.dtype, "model_dtype": names, "modules_compared": len(rows),
        "relative_error": relative, "rounding_noise": _ratio(totals["noise"], totals["model"]),
        "tolerance": _ratio(totals["tolerance"], totals["model"]), "noise_factor": NOISE_FACTOR,
        "modules_not_matching": len(failing), "changed_outside": outside,
        "worst_modules": [r["module"] for r in worst], "modules": rows, "exact_methods": list(EXACT_METHODS),
    }
    summary = (f"relative difference {_fmt(relative)} over {len(rows)} modules; {names} rounding noise "
               f"{_fmt(details['rounding_noise'])}, tolerance {_fmt(details['tolerance'])}")
    if not failing and not outside:
        verdict, line = "matches", f"matches: {model_path.name} is the {recipe.method} merge of {recipe_path.name} ({summary})"
    else:
        verdict = "does not match"
        reasons = []
        if failing:
            shown = ", ".join(f"{r['module']} ({_fmt(r['relative_error'])})" for r in worst if not r["matches"])
            reasons.append(f"{len(failing)} of {len(rows)} modules differ beyond rounding; worst: {shown}")
        if outside:
            reasons.append(f"{len(outside)} tensors outside the merged modules changed too (e.g. {outside[0]})")
        line = f"does not match: {model_path.name} is not the {recipe.method} merge of {recipe_path.name} ({summary}); " \
               + "; ".join(reasons)
    details["verdict"] = verdict
    return Result(verdict, line, details)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else (0.0 if a == 0 else None)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def write_json(result: Result, out: Path) -> None:
    from unmerge_core.io.store import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"line": result.line, **result.details}, indent=2, allow_nan=False) + "\n")


def run_verify_recipe(model: str, recipe: str, *, base: str | None = None, dictionary: str | None = None,
                      json_out: str | None = None, manager: Any = None) -> Result:
    """The command: a :class:`Result` whose ``exit_code`` is the command's."""
    result = verify_recipe(Path(model), Path(recipe), base=base,
                           dictionary=None if dictionary is None else Path(dictionary), manager=manager)
    if json_out is not None:
        write_json(result, Path(json_out))
    return result




# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

HELP = f"""Recompute the merge a mergekit recipe claims and compare it with the model's ΔW = MODEL − BASE on
every coordinate of the merged modules, one module at a time. Exactly checkable methods:
{', '.join(EXACT_METHODS)} (recomputed by the '{MERGER}' merger plugin); random methods
({', '.join(RANDOM_METHODS)}) and any other method, slices: or modules: recipes give 'cannot check
exactly'. The tolerance is a few times the rounding error of storing base + the claimed ΔW in the
model's dtype. One line on standard output; everything (per-module errors too) with --json.
Exit status: 0 matches, 1 does not match, 2 cannot check exactly or an error."""


def add_parser(sub: Any) -> None:
    """The ``verify-recipe`` subcommand (registered by :mod:`unmerge_core.cli`)."""
    import argparse

    p = sub.add_parser("verify-recipe", help="check that a merged model is what its mergekit recipe says",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="the merged model's folder")
    p.add_argument("recipe", metavar="RECIPE.yml", help="the mergekit YAML that supposedly made it")
    p.add_argument("--base", help="base model (default: the recipe's base_model): a directory or a Hub id")
    p.add_argument("--dictionary", metavar="DIR",
                   help="folder of adapters: a recipe model not found beside the recipe or in the current "
                        "directory is looked up here by name")
    p.add_argument("--json", metavar="OUT", dest="json_out", help="write the verdict and every number to this file")
    p.add_argument("--verbose", action="store_true", help="also show third-party warnings and progress output")
    p.set_defaults(func=_cmd)


def _cmd(args: Any) -> int:
    """Exit 0, 1 or 2 as the verdict says. A bug is exit 2 too (the CLI's own bug exit, 1, would read "does
    not match"), in one line unless ``--debug``."""
    import sys

    try:
        result = run_verify_recipe(args.model, args.recipe, base=args.base, dictionary=args.dictionary,
                                   json_out=args.json_out)
    except (UnmergeError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug, not a user mistake: one line, exit 2
        if getattr(args, "debug", False):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal error ({type(exc).__name__}: {first}); this is a bug in unmerge or a plugin, "
              "please report it; rerun with --debug for the traceback", file=sys.stderr)
        return 2
    print(result.line)
    return result.exit_code
