"""``unmerge verify-recipe``: does a merged model's ΔW equal what its claimed mergekit recipe makes?

Given a merged model folder and the mergekit YAML that supposedly made it, the claimed merge is
recomputed module by module from the recipe's constituents (``BASE+ADAPTER`` LoRA references, PEFT
adapter folders or full-model folders) and compared with ΔW = model − base on every coordinate of the
compared modules. One module is dense in memory at a time (the base's, the model's, each constituent's
and the claimed ΔW of that module).

The core knows no merge algorithm: the claimed ΔW comes from the registered ``mergekit`` merger plugin
(its dense path, i.e. mergekit's own ``merge_tensors``), called by method name through the plugin
manager with the recipe's weights and parameters.

Exactly checkable methods: :data:`EXACT_METHODS`, each recomputed by the merger plugin that offers it,
and DARE / DELLA from the recipe's ``unmerge.seed``; DARE without a seed gets a statistical check
(:func:`_statistical`), DELLA without one ``cannot check exactly``. A mismatch is explained (:func:`_explain`).

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

import numpy as np
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

MERGEKIT_RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")
"""mergekit methods that draw a random drop: checked exactly only from the recipe's ``unmerge.seed``."""
RANDOM_METHODS = MERGEKIT_RANDOM
DROP_RESCALE = {"dare_linear": "task_arithmetic", "dare_ties": "ties"}
"""Random methods with a statistical check (no seed): the deterministic method a drop pattern reduces to."""
ARCEE_RANDOM_NUMEL = 1_000_000
"""arcee_fusion samples its quantiles on modules above this many entries (random there, exact below)."""
EXACT_METHODS = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "sce", "ram", "ramplus_tl",
                 "model_stock", "multislerp", "nuslerp", "nearswap", "slerp", "karcher", "arcee_fusion", "tsv-m",
                 "iso-c", "iso-cts", "tall-consensus", "scale-svd")
"""Deterministic methods recomputed exactly by the merger plugin that offers them (the mergekit family by
the ``mergekit`` plugin, the others by theirs); DARE and DELLA too when the recipe's ``unmerge.seed`` fixes
the draw (UNMERGE's own targets)."""
MERGER = "mergekit"
"""The merger plugin that recomputes mergekit's methods."""
ALTERNATIVES = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "model_stock", "ram",
                "tsv-m", "iso-c", "tall-consensus")
"""Methods tried (same constituents and weights, default parameters) to explain a mismatch."""
NOISE_FACTOR = 3.0
FLOAT32_FLOOR = 2.0**-24
SHARED_KEYS = {"weight", "density", "normalize", "lambda", "int8_mask"}
"""Recipe parameters mapped onto the merger plugin's shared parameters; other top-level ones go to its
``methods.<method>`` table (checked against mergekit's own parameters of the method)."""
WORST = 5
STAT_SAMPLE = 4096
"""Coordinates sampled per module by the statistical check of drop-and-rescale."""
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
    plugin: str = MERGER
    base_mode: str | None = None
    seed: int | None = None
    tasks: tuple[str, ...] = ()
    route: str = "fast"
    pretrained_ref: str | None = None  # the pretrained base (first_task methods: base_model is a constituent)

    @property
    def is_mergekit(self) -> bool:
        return self.plugin == MERGER

    def merger_params(self, method: str | None = None) -> dict[str, Any]:
        method = method or self.method
        if not self.is_mergekit or method != self.method:
            return self._other_params(method)
        params: dict[str, Any] = {"path": "dense" if self.route == "dense" else "fast", "normalize": self.normalize,
                                  "lambda": self.lambda_, "int8_mask": self.int8_mask, "device": "cpu"}
        if self.density is not None:
            params["density"] = self.density
        own = dict(self.extra)
        if self.base_mode is not None:
            own["base_mode"] = self.base_mode
        if own:
            params["methods"] = {self.method: own}
        return params

    def _other_params(self, method: str) -> dict[str, Any]:
        if method != self.method:  # an alternative method: its plugin's defaults
            return {"path": "dense", "device": "cpu"} if method in _mergekit_methods() else {}
        return dict(self.extra)


def _mergekit_methods() -> tuple[str, ...]:
    from unmerge_plugins.lib.mergekit_methods import METHOD_FACTS  # the merger plugin's own table

    return tuple(METHOD_FACTS)


def _plugin_of(method: str, manager: Any) -> str | None:
    """The merger plugin offering ``method`` (mergekit's names: the ``mergekit`` plugin)."""
    if method in _mergekit_methods():
        return MERGER
    for plugin in _manager(manager).plugins("merger"):
        if plugin.name != MERGER and method in plugin.merge_methods():
            return plugin.name
    return None


def _manager(manager: Any) -> Any:
    from unmerge_core.manager import PluginManager

    return manager or PluginManager()


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


def read_recipe(path: Path, *, dictionary: Path | None = None, base_override: str | None = None,
                manager: Any = None) -> Recipe:
    """The recipe's method, constituents and parameters (``models:`` form only in this version).

    Raises :class:`UnmergeError` for a file that is not a valid recipe (an unknown method too),
    :class:`CannotCheck` for a valid one this version cannot recompute exactly.

    UNMERGE's own section ``unmerge:`` (ignored by mergekit) may hold ``seed`` (a target's seed: it fixes
    DARE's and DELLA's draw), ``tasks`` (the constituents' task names the draw is keyed by; default the
    adapter folders' names), ``path`` (``fast`` or ``dense``: the merger route that drew it) and
    ``base_mode`` (which input is mergekit's base model).
    """
    where = f"recipe {path}"
    data = load_recipe_file(path, where, missing=f"{where}: no such file")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise UnmergeError(f"{where}: merge_method: missing or not a name (got {short_repr(method)})")
    manager = _manager(manager)
    plugin = _plugin_of(method, manager)
    if plugin is None:
        from difflib import get_close_matches

        known = sorted(set(_mergekit_methods()) | set(EXACT_METHODS))
        close = get_close_matches(method, known, n=1)
        raise UnmergeError(f"{where}: merge_method: unknown method {method!r}"
                           + (f" (did you mean {close[0]!r}?)" if close else "")
                           + "; no installed merger plugin offers it")
    own = data.get("unmerge") or {}
    if not isinstance(own, dict):
        raise UnmergeError(f"{where}: unmerge: must be a mapping (seed, tasks, path, base_mode)")
    unknown = sorted(set(own) - {"seed", "tasks", "path", "base_mode"})
    if unknown:
        raise UnmergeError(f"{where}: unmerge.{unknown[0]}: unknown key (seed, tasks, path, base_mode)")
    seed = own.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UnmergeError(f"{where}: unmerge.seed: must be an integer (got {short_repr(seed)})")
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
    listed = [e.get("model") if isinstance(e, dict) else None for e in models]
    first_task = plugin == MERGER and method in ("slerp", "nearswap", "arcee_fusion") and base_ref in listed
    base_mode = own.get("base_mode")
    if base_mode is None and plugin == MERGER:
        if method in ("slerp", "nearswap", "arcee_fusion"):
            base_mode = "first_task" if first_task else "pretrained"
        elif method in ("multislerp", "nuslerp"):
            base_mode = "pretrained" if base_ref is not None else "none"
        elif method == "karcher":
            base_mode = "none"
    pretrained_ref = base_ref
    if first_task or base_ref is None:  # the pretrained base: --base, else the BASE of BASE+ADAPTER references
        prefixes = {r.split("+", 1)[0] for r in listed if isinstance(r, str) and "+" in r}
        pretrained_ref = next(iter(prefixes)) if len(prefixes) == 1 else None
    if base_override is None and pretrained_ref is None:
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
        if ref == base_ref and not first_task:
            base_listed = True
            if method == "linear":
                base_weight = weight
            continue
        part = ref.split("+", 1)[1] if "+" in ref else ref
        folder = _folder(part, f"{where}: {at}.model", path.parent, dictionary)
        kind = "adapter" if (folder / ADAPTER_CONFIG).is_file() else "model"
        c = Constituent(ref, folder, 1.0 if weight is None else weight, kind)
        if ref == base_ref and first_task:
            constituents.insert(0, c)  # mergekit's base model is the first task of a two-model method
        else:
            constituents.append(c)
    if not constituents:
        raise UnmergeError(f"{where}: models: names no constituent besides the base")
    if len(densities) > 1:
        raise CannotCheck("models with different densities are not checked in this version")
    tasks = own.get("tasks")
    if tasks is None:
        tasks = [c.path.name for c in constituents]
    if not isinstance(tasks, list) or len(tasks) != len(constituents) or not all(isinstance(t, str) for t in tasks):
        raise UnmergeError(f"{where}: unmerge.tasks: must list one task name per constituent ({len(constituents)})")
    route = own.get("path", "fast")
    if route not in ("fast", "dense"):
        raise UnmergeError(f"{where}: unmerge.path: 'fast' or 'dense' (got {short_repr(route)})")
    if plugin != MERGER:
        extra = {k: v for k, v in shared.items() if k != "weight" and v is not None}
        return Recipe(path, method, base_ref, constituents, False, 1.0, None, False, extra,
                      data.get("dtype") if isinstance(data.get("dtype"), str) else None, plugin, None, seed,
                      tuple(tasks), route, pretrained_ref)
    normalize_default = True if method == "linear" else TASK_ARITHMETIC_METHODS.get(method, False)
    normalize = _flag(shared.get("normalize", normalize_default), f"{where}: parameters.normalize")
    lambda_ = 1.0
    if method != "linear" and shared.get("lambda") is not None:
        lambda_ = number(shared["lambda"], "parameters.lambda")
    if method == "linear" and base_weight is not None and (base_listed or base_ref is not None):
        constituents.append(Constituent(base_ref or "base", Path(), base_weight, "base"))
        tasks = [*tasks, "base"]
    if method == "linear" and not normalize and not math.isclose(sum(c.weight for c in constituents), 1.0):
        raise CannotCheck("linear without normalize, its weights not summing to 1, also scales the base weights; "
                          "not checked in this version")
    int8 = _flag(shared.get("int8_mask", False), f"{where}: parameters.int8_mask")
    extra = {k: v for k, v in shared.items() if k not in SHARED_KEYS and v is not None}
    dtype = data.get("dtype")
    density = next(iter(densities)) if densities else None
    if density is None and method in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                                      "della", "della_linear"):
        density = 1.0  # mergekit's default
    return Recipe(path, method, base_ref, constituents, normalize, lambda_, density, int8, extra,
                  dtype if isinstance(dtype, str) else None, MERGER, base_mode, seed, tuple(tasks), route,
                  pretrained_ref)


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------


class _Claim:
    """One method's claimed ΔW, module by module, from the plugin that offers it."""

    def __init__(self, recipe: Recipe, method: str, manager: Any, tasks: tuple[str, ...], seed: int) -> None:
        self.method = method
        plugin = recipe.plugin if method == recipe.method else _plugin_of(method, manager)
        where = f"recipe {recipe.path}:"
        self.merger = _manager(manager).resolve("merger", plugin, recipe.merger_params(method), where=where,
                                                params_field="parameters").build()
        from unmerge_core.types import MergeJob

        self.job = MergeJob(target_id="recipe", method=method, tasks=tasks,
                            weights=tuple(c.weight for c in recipe.constituents), seed=seed)
        base_methods = getattr(self.merger, "base_methods", frozenset())
        self.on_base = method in base_methods
        masked = getattr(self.merger, "masked_methods", frozenset())
        # a random method drawn on the fast path: the counter-based draw of merge_masked, over every coordinate
        self.masked = method in MERGEKIT_RANDOM and method in masked
        if plugin == MERGER:
            problem = self.merger.check_method(method)
            if problem is not None:
                raise UnmergeError(f"recipe {recipe.path}: {problem}")

    def module(self, module: str, deltas: list[torch.Tensor], w0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.masked:
                flat = np.arange(deltas[0].numel(), dtype=np.int64)
                values = [d.reshape(-1).to(torch.float64).numpy() for d in deltas]
                out = self.merger.merge_masked(self.job, module, flat, values, [None] * len(values))
                return torch.from_numpy(np.asarray(out, dtype=np.float64)).reshape(deltas[0].shape)
            if self.on_base:
                return self.merger.merge_module_on_base(self.job, module, deltas, w0.to(torch.float32)).to(torch.float64)
            return self.merger.merge_module(self.job, module, deltas).to(torch.float64)


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


def _cannot(model_path: Path, recipe_path: Path, reason: str, extra: dict[str, Any] | None = None) -> Result:
    return Result("cannot check exactly", f"cannot check exactly: {reason}",
                  {"verdict": "cannot check exactly", "reason": reason, "model": str(model_path),
                   "recipe": str(recipe_path), "exact_methods": list(EXACT_METHODS), **(extra or {})})


def verify_recipe(model_path: Path, recipe_path: Path, *, base: str | None = None, dictionary: Path | None = None,
                  manager: Any = None, explain: bool = True) -> Result:
    """The verdict on ``model_path`` being what ``recipe_path`` makes (see the module's docstring)."""
    if not model_path.is_dir():
        raise UnmergeError(f"model {model_path}: no such folder")
    if dictionary is not None and not dictionary.is_dir():
        raise UnmergeError(f"--dictionary {dictionary}: no such folder")
    manager = _manager(manager)
    try:
        recipe = read_recipe(recipe_path, dictionary=dictionary, base_override=base, manager=manager)
    except CannotCheck as exc:
        return _cannot(model_path, recipe_path, str(exc))
    if base is not None:
        base_path = resolve_model_ref(base, "--base")
    else:
        assert recipe.pretrained_ref is not None
        base_path = _local(recipe.pretrained_ref, recipe_path.parent, None) or resolve_model_ref(
            recipe.pretrained_ref, f"recipe {recipe_path}: base_model")
    base_ckpt = Checkpoint(base_path, name="base")
    model = Checkpoint(model_path, name=model_path.name)
    for c in recipe.constituents:
        if c.kind == "adapter":
            c.reader = LoraAdapter(c.path, c.path.name)
        elif c.kind == "model":
            c.reader = Checkpoint(c.path, name=c.path.name)
    _check_same_base(recipe, base_ckpt, base_path)
    modules = _modules(recipe, model, base_ckpt)
    if not modules:
        raise UnmergeError(f"recipe {recipe_path}: its constituents adapt no module")
    statistical = None
    if recipe.method in MERGEKIT_RANDOM and recipe.seed is None:
        reason = (f"{recipe.method} drops entries at random and the recipe gives no unmerge.seed that fixes the "
                  "draw, so a rerun differs coordinate by coordinate")
        if recipe.method not in DROP_RESCALE:
            return _cannot(model_path, recipe_path, reason + f"; no statistical check of {recipe.method} in this "
                           "version")
        statistical = reason
    if recipe.method == "arcee_fusion":
        big = [m for m in modules if math.prod(base_ckpt.shapes[base_ckpt.module_key(m)]) > ARCEE_RANDOM_NUMEL]
        if big:
            return _cannot(model_path, recipe_path, f"arcee_fusion samples its quantiles at random on modules above "
                           f"{ARCEE_RANDOM_NUMEL} entries ({big[0]})")
    tasks = recipe.tasks
    if statistical is not None:
        return _statistical(recipe, model, base_ckpt, modules, manager, model_path, recipe_path, base_path, statistical)
    claim = _Claim(recipe, recipe.method, manager, tasks, recipe.seed or 0)
    coefficients = (mergekit_coefficients(recipe.method, claim.job.weights, normalize=recipe.normalize,
                                          lambda_=recipe.lambda_) if recipe.is_mergekit else None) or claim.job.weights
    spread = 1.0 + math.sqrt(sum(c * c for c in coefficients))
    rows: list[dict[str, Any]] = []
    totals = {"diff": 0.0, "model": 0.0, "claimed": 0.0, "noise": 0.0, "tolerance": 0.0}
    dtypes: set[str] = set()
    for module in modules:
        key, base_key = _keys(module, model, base_ckpt)
        dtype = model.dtypes.get(key, "F32")
        dtypes.add(dtype)
        w0 = base_ckpt.tensor(base_key).to(torch.float64)
        shape = tuple(w0.shape)
        deltas = [c.delta(module, base_ckpt, shape) for c in recipe.constituents]
        claimed = claim.module(module, deltas, w0)
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
        "merger": recipe.plugin, "check": "exact",
        "constituents": [{"model": c.ref, "path": str(c.path), "kind": c.kind, "weight": c.weight}
                         for c in recipe.constituents],
        "parameters": ({"normalize": recipe.normalize, "lambda": recipe.lambda_, "density": recipe.density,
                        "int8_mask": recipe.int8_mask, **recipe.extra} if recipe.is_mergekit else dict(recipe.extra)),
        "seed": recipe.seed, "base_mode": recipe.base_mode,
        "recipe_dtype": recipe.dtype, "model_dtype": names, "modules_compared": len(rows),
        "coordinates_compared": "every coordinate of the compared modules",
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
        if explain and failing:
            explanation = _explain(recipe, model, base_ckpt, modules, manager, dictionary, details["tolerance"] or 0.0)
            details["explanation"] = explanation
            line += f"; best explanation: {explanation['line']}"
    details["verdict"] = verdict
    return Result(verdict, line, details)


def _keys(module: str, model: Checkpoint, base: Checkpoint) -> tuple[str, str]:
    key, base_key = model.module_key(module), base.module_key(module)
    if key is None or base_key is None:
        raise UnmergeError(f"{module}: adapted by the recipe but missing from the "
                           f"{'model' if key is None else 'base'}")
    if model.shapes[key] != base.shapes[base_key]:
        raise UnmergeError(f"{module}: the model's shape {model.shapes[key]} is not the base's "
                           f"{base.shapes[base_key]}")
    return key, base_key


def _check_same_base(recipe: Recipe, base: Checkpoint, base_path: Path) -> None:
    """A recipe for another base: an adapter module whose shape is not the base's is an error (exit 2)."""
    for c in recipe.constituents:
        if c.kind != "adapter":
            continue
        for module, shape in c.reader.shapes.items():
            key = base.module_key(module)
            if key is None or tuple(base.shapes[key]) != tuple(shape):
                got = "missing" if key is None else f"of shape {tuple(base.shapes[key])}"
                raise UnmergeError(f"recipe {recipe.path}: {c.ref} adapts {module} {tuple(shape)}, which is {got} in "
                                   f"the base {base_path}: the recipe is for another base")


# --------------------------------------------------------------------------------------------------
# Explaining a mismatch
# --------------------------------------------------------------------------------------------------


def _dictionary_atoms(dictionary: Path | None, recipe: Recipe) -> list[Constituent]:
    if dictionary is None:
        return []
    used = {c.path.resolve() for c in recipe.constituents if c.kind == "adapter"}
    out = []
    for folder in sorted(p for p in dictionary.iterdir() if (p / ADAPTER_CONFIG).is_file()):
        if folder.resolve() not in used:
            out.append(Constituent(folder.name, folder, 0.0, "adapter", LoraAdapter(folder, folder.name)))
    return out[:64]


def _explain(recipe: Recipe, model: Checkpoint, base: Checkpoint, modules: list[str], manager: Any,
             dictionary: Path | None, tolerance: float) -> dict[str, Any]:
    """What best explains a mismatch, each candidate with its numbers: refitted weights (least squares of
    the model's ΔW on the constituents' ΔW), a constituent missing, extra or swapped (the dictionary's
    adapters tried in), or another method with the same constituents and weights."""
    atoms = [c for c in recipe.constituents if c.kind != "base"]
    pool = atoms + _dictionary_atoms(dictionary, recipe)
    n = len(pool)
    gram = np.zeros((n, n))
    rhs = np.zeros(n)
    yy = 0.0
    others = [m for m in ALTERNATIVES if m != recipe.method and _plugin_of(m, manager) is not None]
    claims = []
    for m in others:
        try:
            claim = _Claim(recipe, m, manager, recipe.tasks, recipe.seed or 0)
        except (UnmergeError, ValueError):
            continue
        if claim.on_base or len(atoms) != len(recipe.constituents):
            continue
        if m == "model_stock" and len(atoms) < 2:
            continue
        claims.append(claim)
    alt = {c.method: 0.0 for c in claims}
    for module in modules:
        key, base_key = _keys(module, model, base)
        w0 = base.tensor(base_key).to(torch.float64)
        y = (model.tensor(key).to(torch.float64) - w0).reshape(-1)
        d = [c.delta(module, base, tuple(w0.shape)) for c in pool]
        mat = torch.stack([x.reshape(-1).to(torch.float64) for x in d], dim=1)
        gram += (mat.T @ mat).numpy()
        rhs += (mat.T @ y).numpy()
        yy += float(y @ y)
        for claim in claims:
            try:
                other = claim.module(module, d[:len(atoms)], w0).reshape(-1)
            except Exception:  # noqa: BLE001 - an alternative that cannot run here is no explanation
                alt.pop(claim.method, None)
                continue
            if claim.method in alt:
                alt[claim.method] += float(torch.linalg.vector_norm(y - other)) ** 2
        del d, mat, y, w0
    norm = math.sqrt(yy) if yy > 0 else 1.0

    def fit(idx: list[int]) -> tuple[np.ndarray, float]:
        if not idx:
            return np.zeros(0), 1.0
        g, b = gram[np.ix_(idx, idx)], rhs[idx]
        w = np.linalg.lstsq(g, b, rcond=None)[0]
        res = max(yy - 2 * float(w @ b) + float(w @ g @ w), 0.0)
        return w, math.sqrt(res) / norm

    k = len(atoms)
    names = [c.path.name or c.ref for c in pool]
    candidates: list[dict[str, Any]] = []
    w, r = fit(list(range(k)))
    claimed = (mergekit_coefficients(recipe.method, tuple(c.weight for c in recipe.constituents),
                                     normalize=recipe.normalize, lambda_=recipe.lambda_)
               if recipe.is_mergekit else None)
    said = "" if claimed is None else f", the recipe says {'/'.join(f'{c:.4g}' for c in claimed[:k])}"
    candidates.append({"kind": "refitted weights", "relative_residual": r,
                       "coefficients": {names[i]: float(w[i]) for i in range(k)},
                       "recipe_coefficients": None if claimed is None else list(claimed[:k]),
                       "line": f"coefficients {'/'.join(f'{x:.4g}' for x in w)} of {'/'.join(names[:k])} (a "
                               f"weighted sum) fit with relative residual {r:.3g}{said}"})
    for j in range(k):  # extra: the fit without constituent j
        idx = [i for i in range(k) if i != j]
        wj, rj = fit(idx)
        candidates.append({"kind": "constituent extra", "constituent": names[j], "relative_residual": rj,
                           "coefficients": {names[i]: float(x) for i, x in zip(idx, wj)},
                           "line": f"{names[j]} is extra: without it the weighted sum of the others fits with "
                                   f"relative residual {rj:.3g}"})
    missing = []
    for a in range(k, n):  # missing, or swapped for one of the recipe's constituents (a swap is the more specific)
        idx = list(range(k)) + [a]
        wa, ra = fit(idx)
        missing.append({"kind": "constituent missing", "constituent": names[a], "relative_residual": ra,
                           "coefficients": {names[i]: float(x) for i, x in zip(idx, wa)},
                           "line": f"{names[a]} is missing: with it the weighted sum fits with relative residual "
                                   f"{ra:.3g} (its coefficient {wa[-1]:.4g})"})
        for j in range(k):
            idx = [i for i in range(k) if i != j] + [a]
            ws, rs = fit(idx)
            candidates.append({"kind": "constituent swapped", "constituent": names[j], "replacement": names[a],
                               "relative_residual": rs,
                               "coefficients": {names[i]: float(x) for i, x in zip(idx, ws)},
                               "line": f"{names[j]} is {names[a]} in the model: that weighted sum fits with relative "
                                       f"residual {rs:.3g}"})
    candidates += missing
    for method, sq in alt.items():
        ra = math.sqrt(sq) / norm
        candidates.append({"kind": "another method", "method": method, "relative_residual": ra,
                           "line": f"the {method} merge of the same constituents and weights (default parameters) "
                                   f"differs by {ra:.3g} relative"})
    # prefer the smallest residual; among residuals within the tolerance, the simplest change (list order)
    floor = max(tolerance, 1e-12)
    within = [c for c in candidates if c["relative_residual"] <= floor]
    best = within[0] if within else min(candidates, key=lambda c: c["relative_residual"])
    explained = best["relative_residual"] <= floor
    line = best["line"] + ("" if explained else f" (not within the tolerance {tolerance:.3g}: no candidate explains "
                                                 "the difference)")
    order = sorted(candidates, key=lambda c: c["relative_residual"])
    return {"best": best["kind"], "explained": explained, "line": line, "tolerance": tolerance,
            "candidates": order[:20], "dictionary_adapters_tried": n - k}


# --------------------------------------------------------------------------------------------------
# Statistical check of a random drop-and-rescale (no seed)
# --------------------------------------------------------------------------------------------------


def _statistical(recipe: Recipe, model: Checkpoint, base: Checkpoint, modules: list[str], manager: Any,
                 model_path: Path, recipe_path: Path, base_path: Path, reason: str) -> Result:
    """DARE without a seed: is every coordinate a drop-and-rescale of the constituents?

    DARE keeps each constituent's entry with probability p = density and rescales it by 1/p, then merges
    as task arithmetic (``dare_linear``) or TIES without trimming (``dare_ties``). So at every coordinate
    the model's ΔW equals the deterministic merge of the rescaled constituents for one subset S of kept
    constituents. On a random sample of each module's coordinates the check finds the nearest of the 2^T
    subsets: first with the rescale 1/p and a loose tolerance (mergekit rescales by each module's
    ‖Δ‖₁/‖kept Δ‖₁, within a few 1/√numel of 1/p), then with each constituent's rescale estimated from the
    coordinates where it alone was kept and a tolerance of 1e-3 of the coordinate's scale; it states the share of coordinates so explained and, per constituent, the share kept against p
    (a binomial z-score). A statistical check, never "matches": the verdict stays "cannot check exactly",
    or "does not match" when under 90 % of the coordinates are explained or a kept share is 6 σ off p.
    """
    import itertools

    p = float(recipe.density if recipe.density is not None else 1.0)
    atoms = recipe.constituents
    t = len(atoms)
    if t > 6 or p >= 1:
        return _cannot(model_path, recipe_path, reason + ("; no statistical check above 6 constituents" if t > 6 else
                                                          "; density 1 drops nothing: check it as "
                                                          f"{DROP_RESCALE[recipe.method]}"))
    params = recipe.merger_params()
    params.update({"density": 1.0, "path": "dense"})
    params.pop("methods", None)
    merger = _manager(manager).resolve("merger", MERGER, params, where=f"recipe {recipe_path}:",
                                       params_field="parameters").build()
    from unmerge_core.types import MergeJob

    job = MergeJob(target_id="recipe", method=DROP_RESCALE[recipe.method], tasks=recipe.tasks,
                   weights=tuple(c.weight for c in atoms), seed=0)
    subsets = list(itertools.product((0, 1), repeat=t))
    gen = torch.Generator().manual_seed(0)
    explained = total = 0
    kept = np.zeros(t)
    seen = np.zeros(t)
    for module in modules:
        key, base_key = _keys(module, model, base)
        w0 = base.tensor(base_key).to(torch.float64).reshape(-1)
        numel = w0.numel()
        idx = torch.randperm(numel, generator=gen)[:STAT_SAMPLE]
        y = (model.tensor(key).to(torch.float64).reshape(-1) - w0)[idx]
        d = [c.delta(module, base, tuple(base.shapes[base_key])).reshape(-1).to(torch.float64)[idx] for c in atoms]
        def candidates(rho: list[float]) -> torch.Tensor:  # subsets × sample
            out = []
            for s in subsets:
                ds = [(x * r / p if keep else torch.zeros_like(x)).to(torch.float32).reshape(-1, 1)
                      for x, r, keep in zip(d, rho, s)]
                with torch.no_grad():
                    out.append(merger.merge_module(job, module, ds).to(torch.float64).reshape(-1))
            return torch.stack(out)

        scale = sum(abs(wi) * x.abs() / p for wi, x in zip(job.weights, d)) / max(abs(sum(job.weights)), 1e-12)
        scale = scale * max(abs(recipe.lambda_), 1.0)
        floor = 8 * FLOAT32_FLOOR * w0[idx].abs() + 1e-12
        # pass 1: the rescale 1/p, loose (mergekit's ‖Δ‖₁/‖kept Δ‖₁ is 1/p within a few 1/√numel)
        err = (candidates([1.0] * t) - y).abs()
        best = err.argmin(dim=0)
        loose = err.gather(0, best[None]).squeeze(0) <= 6.0 / math.sqrt(numel) * scale + floor
        rho = []
        for i in range(t):  # each constituent's own rescale, from the coordinates it alone was kept at
            single = subsets.index(tuple(int(j == i) for j in range(t)))
            at = loose & (best == single) & (d[i].abs() > 0)
            c1 = candidates([1.0] * t)[single][at]
            rho.append(float(torch.median(y[at] / c1)) if int(at.sum()) >= 8 else 1.0)
        # pass 2: tight, with the rescales estimated
        err = (candidates(rho) - y).abs()
        tol = 1e-3 * scale + floor
        best = err.argmin(dim=0)
        ok = err.gather(0, best[None]).squeeze(0) <= tol
        # coordinates where the subsets are told apart: the second-best subset is outside the tolerance
        second = err.sort(dim=0).values[1] > tol
        explained += int(ok.sum())
        total += len(idx)
        for i in range(t):
            nonzero = d[i].abs() > 0
            use = ok & second & nonzero
            kept[i] += float(torch.tensor([subsets[b][i] for b in best[use].tolist()], dtype=torch.float64).sum()) \
                if int(use.sum()) else 0.0
            seen[i] += int(use.sum())
    share = explained / max(total, 1)
    rates = [kept[i] / seen[i] if seen[i] else None for i in range(t)]
    z = [None if seen[i] == 0 else (kept[i] / seen[i] - p) / math.sqrt(p * (1 - p) / seen[i]) for i in range(t)]
    worst_z = max((abs(v) for v in z if v is not None), default=0.0)
    rejected = share < 0.9 or worst_z > 6
    stat = (f"statistical check of {recipe.method} at density {p:g}: {100 * share:.1f} % of {total} sampled "
            f"coordinates equal a rescaled drop of the constituents; kept shares "
            f"{'/'.join('n/a' if r is None else f'{r:.3f}' for r in rates)} against {p:g} (largest |z| {worst_z:.1f})")
    details = {"model": str(model_path), "recipe": str(recipe_path), "base": str(base_path), "method": recipe.method,
               "check": "statistical", "reason": reason, "density": p, "sampled_coordinates": total,
               "explained_share": share, "kept_shares": rates, "z_scores": z, "modules_compared": len(modules),
               "constituents": [{"model": c.ref, "path": str(c.path), "kind": c.kind, "weight": c.weight}
                                for c in atoms], "exact_methods": list(EXACT_METHODS)}
    if rejected:
        details["verdict"] = "does not match"
        return Result("does not match", f"does not match: {model_path.name} is not a {recipe.method} merge of "
                      f"{recipe_path.name} ({stat}; rejected: needs ≥ 90 % and |z| ≤ 6)", details)
    details["verdict"] = "cannot check exactly"
    return Result("cannot check exactly", f"cannot check exactly: {reason}; {stat}, consistent with the recipe",
                  details)


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
{', '.join(EXACT_METHODS)} (each recomputed by the merger plugin that offers it), and
{', '.join(RANDOM_METHODS)} when the recipe's unmerge: section gives the seed that drew them. DARE
without a seed gets a statistical check (never 'matches'); DELLA without one, slices: or modules:
recipes give 'cannot check exactly'. The tolerance is a few times the rounding error of storing base +
the claimed ΔW in the model's dtype. A mismatch names its best explanation (refitted weights, a
constituent missing, extra or swapped — with --dictionary —, another method). One line on standard
output; everything (per-module errors too) with --json.
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
