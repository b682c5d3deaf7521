"""``mergekit``: form target task vectors with mergekit's own merge methods — every one of them.

Each method of the installed mergekit's registry that merges task vectors is offered (all but
``passthrough``; :mod:`unmerge_plugins.lib.mergekit_methods` says what each needs). A merge is evaluated
module by module through ``mergekit.merge_methods.api.merge_tensors``, and the result equals
``merged − base`` of mergekit's own full-model ``run_merge`` (tested per method):

- task-vector methods (task arithmetic, TIES, DARE, DELLA, breadcrumbs, SCE, RAM, Model Stock,
  multislerp / nuslerp with a base, nearswap) are translation invariant: they run on ΔW with a zero
  base, and the base model's weights are never read;
- methods defined on full weights (slerp, Karcher, arcee_fusion, multislerp / nuslerp without a base)
  merge ``W0 + ΔWᵢ`` and subtract ``W0``; the run hands them the base module
  (:meth:`MergekitMerger.merge_module_on_base`), so they need a trainer with a real base model.

Two paths for the element-wise methods (``path`` parameter):

- ``fast`` (default): linear, task arithmetic, TIES and DARE (linear and TIES) are evaluated on the
  mask coordinates only (:mod:`unmerge_plugins.lib.elementwise_merge`), from the constituents' masked
  values and, for TIES, one magnitude threshold per (task, module) computed once
  (:meth:`MergekitMerger.module_statistics`). Equal to the dense path within float rounding for the
  deterministic methods; DARE draws its random drop with a counter-based generator instead of
  ``torch.bernoulli``. Every other method uses the dense path.
- ``dense``: every target's ΔW is formed module by module and merged by mergekit itself.

Parameters: ``density``, ``normalize``, ``int8_mask`` and ``lambda`` apply to every method that has
them; ``[merger.params.methods.<method>]`` sets any of a method's own mergekit parameters
(``epsilon``, ``gamma``, ``select_topk``, ``t``, ``filter_wise``...) and its ``base_mode`` (which
input is mergekit's ``base_model``), checked against the method's own model when the manifest is
validated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError, field_validator, model_serializer

from unmerge_core import DeviceParams, LowRankDelta, MergeJob, PluginSpec, Stage, content_key, mergekit_coefficients
from unmerge_plugins.lib.elementwise_merge import (
    MASKED_METHODS,
    STATISTICS_METHODS,
    MagnitudeStatisticsStream,
    magnitude_statistics,
    merge_values,
    settings_from_parameters,
)
from unmerge_plugins.lib.mergekit_methods import (
    METHOD_FACTS,
    mergekit_parameters,
    method_params_model,
    missing_required,
    takes_weight,
)

METHODS: tuple[str, ...] = tuple(METHOD_FACTS)


def _first_error(exc: ValidationError) -> str:
    """The first error of a per-method parameter model, on one line (odd keys quoted, e.g. a newline)."""
    err = exc.errors()[0]
    where = ".".join(str(p) if _PLAIN_KEY.fullmatch(str(p)) else repr(str(p)) for p in err["loc"])
    message = " ".join(str(err["msg"]).removeprefix("Value error, ").split())
    return f"{where}: {message}" if where else message


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


class MergekitParams(DeviceParams):
    """Shared merge parameters; defaults follow the seeds' phase 2 (TIES and DARE at density 0.5)."""

    density: float = Field(0.5, gt=0, le=1, description="kept fraction for every method with a density "
                                                        "(ties, dare, della, breadcrumbs; not task_arithmetic)")
    normalize: bool | None = Field(None, description="divide by summed weights; default: mergekit's per method, "
                                                     "except linear and ties: true")
    int8_mask: bool = True
    lambda_: float = Field(1.0, alias="lambda", ge=-100, le=100,
                           description="scale of the merged task vector (negative: task negation)")
    path: Literal["fast", "dense"] = Field(
        "fast", description="fast: element-wise methods on the mask coordinates only, per-task thresholds "
                            "computed once; dense: form each merged module with mergekit, then gather")
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method mergekit parameters and base_mode, e.g. "
                                          "{ della = { epsilon = 0.1 }, slerp = { t = 0.3 } }")

    @field_validator("lambda_")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("lambda = 0 makes every target zero")
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from difflib import get_close_matches

        for method, overrides in value.items():
            if method not in METHOD_FACTS:
                close = get_close_matches(method, METHODS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"{method!r} is not a mergekit method; {hint}choose one of {', '.join(METHODS)}")
            try:
                method_params_model(method).model_validate(overrides)
            except ValidationError as exc:
                raise ValueError(f"{method}.{_first_error(exc)}") from None
        return value

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if not self.methods:  # runs without per-method settings keep the cache keys they always had
            data.pop("methods", None)
        if data.get("device") in ("auto", "cpu"):  # an execution choice (see unmerge_core.devices)
            data.pop("device")
        return data


class MergekitMerger:
    methods: tuple[str, ...] = METHODS

    def __init__(self, params: MergekitParams) -> None:
        self.params = params
        self._settings: dict[str, BaseModel] = {}

    # -- per-method settings ------------------------------------------------------------------------
    def settings(self, method: str) -> BaseModel:
        """``method``'s resolved parameters: mergekit's defaults, then the shared parameters it has,
        then ``methods.<method>``. Raises ``ValueError`` when they do not fit together."""
        if method not in self._settings:
            self._settings[method] = self._resolve(method)
        return self._settings[method]

    def _resolve(self, method: str) -> BaseModel:
        p = self.params
        names = {q.name for q in mergekit_parameters(method)}
        shared: dict[str, Any] = {}
        if "density" in names and method != "task_arithmetic":
            shared["density"] = p.density
        if "lambda" in names:
            shared["lambda"] = p.lambda_
        if "int8_mask" in names:
            shared["int8_mask"] = p.int8_mask
        if "normalize" in names and (p.normalize is not None or method in ("linear", "ties")):
            shared["normalize"] = True if p.normalize is None else p.normalize
        try:
            return method_params_model(method).model_validate({**shared, **p.methods.get(method, {})})
        except ValidationError as exc:
            raise ValueError(_first_error(exc)) from None

    def check_method(self, method: str) -> str | None:
        """Why ``method`` cannot run with these parameters (``None`` when it can): checked at validate time."""
        try:
            settings = self.settings(method)
        except ValueError as exc:
            return f"merger.params: {exc}"
        missing = missing_required(method, settings.model_dump(by_alias=True))
        if missing:
            return (f"mergekit's {method} has no default for {', '.join(missing)}: set merger.params.methods."
                    f"{method}.{missing[0]}")
        return None

    def mode(self, method: str) -> str:
        """``method``'s input mode (``base_mode``): which input is mergekit's base model."""
        try:
            return str(self.settings(method).base_mode)  # type: ignore[attr-defined]
        except ValueError:  # settings that do not fit (reported by check_method when the method is used)
            default = next(iter(METHOD_FACTS[method].modes))
            return str(self.params.methods.get(method, {}).get("base_mode", default))

    def method_tasks(self, method: str) -> tuple[int, int | None]:
        """How many constituents ``method`` takes in its input mode (slerp: 2; model_stock: at least 2)."""
        mode = METHOD_FACTS[method].modes[self.mode(method)]
        return mode.min_tasks, mode.max_tasks

    def coefficients(self, job: MergeJob) -> tuple[float, ...] | None:
        """Each constituent's coefficient in the ΔW of ``job`` (its ground truth): mergekit's rule for the
        method's resolved ``lambda`` and ``normalize`` (:func:`unmerge_core.mergekit_coefficients`, the
        rule ``unmerge attribute --truth recipe.yml`` follows too); ``None`` for methods without one."""
        try:
            settings = self.settings(job.method).model_dump(by_alias=True)
        except ValueError:  # parameters that do not fit: check_method reports them at validate time
            return None
        return mergekit_coefficients(job.method, job.weights, normalize=bool(settings.get("normalize", False)),
                                     lambda_=float(settings.get("lambda", 1.0)))

    @property
    def base_methods(self) -> frozenset[str]:
        """Methods whose input mode merges full weights: the run hands them the base module."""
        return frozenset(m for m in METHODS if METHOD_FACTS[m].modes[self.mode(m)].needs_base_weights)

    @property
    def unweighted_methods(self) -> frozenset[str]:
        """Methods that ignore the target's per-task weights: mergekit gives them no ``weight``, or
        (slerp with ``t`` set) the plugin's parameters replace the weights."""
        out = {m for m in METHODS if not METHOD_FACTS[m].weighted}
        if self.params.methods.get("slerp", {}).get("t") is not None:
            out.add("slerp")
        return frozenset(out)

    # -- fast path (see unmerge_core.hookspecs.unmerge_mergers) -------------------------------------
    @property
    def masked_methods(self) -> frozenset[str]:
        """Methods merged on the mask coordinates only (none with ``path = "dense"``)."""
        if self.params.path != "fast":
            return frozenset()
        # the masked form has no L1 rescale after a magnitude trim: ties with rescale = true goes dense
        return frozenset(m for m in MASKED_METHODS if not (m == "ties" and self._ties_rescales()))

    def _ties_rescales(self) -> bool:
        try:
            return bool(getattr(self.settings("ties"), "rescale", False))
        except ValueError:  # reported by check_method when ties is used
            return False

    @property
    def statistics_methods(self) -> frozenset[str]:
        """Masked methods that need :meth:`module_statistics` of every constituent."""
        return STATISTICS_METHODS & self.masked_methods

    def statistics_config(self) -> dict[str, Any]:
        """What the statistics depend on (their cache key): the TIES density (and ``device = "cuda"``
        when asked for explicitly: GPU thresholds equal the CPU's only to float32 rounding)."""
        config: dict[str, Any] = {"kind": "magnitude-threshold", "density": self._ties_density}
        if self.params.device == "cuda":
            config["device"] = "cuda"
        return config

    @property
    def _ties_density(self) -> float:
        try:
            return float(self.settings("ties").density)  # type: ignore[attr-defined]
        except ValueError:  # reported by check_method when ties is used
            return float(self.params.density)

    def module_statistics(self, delta: LowRankDelta | torch.Tensor, module: str) -> dict[str, float]:
        """One task's statistics for one module: TIES's magnitude threshold at ``density`` (formed and
        selected on the GPU when ``device`` resolves to CUDA)."""
        device = self.params.torch_device()
        return magnitude_statistics(delta, self._ties_density, None if device.type == "cpu" else device)

    def statistics_stream(self, delta: LowRankDelta, module: str) -> MagnitudeStatisticsStream | None:
        """:meth:`module_statistics` fed from the core's shared pass over ΔW (``None`` on a GPU,
        where the module is formed whole on the device instead)."""
        if self.params.torch_device().type != "cpu":
            return None
        return MagnitudeStatisticsStream(delta, self._ties_density)

    def merge_masked(self, job: MergeJob, module: str, flat_indices: np.ndarray, values: Sequence[np.ndarray],
                     statistics: Sequence[Mapping[str, float] | None]) -> np.ndarray:
        """The target's ΔW at ``flat_indices`` of ``module`` from the constituents' values there."""
        ids = [f"t{i}" for i in range(len(values))]
        settings = settings_from_parameters(job.method, self.parameters(job.method, ids, job.weights))
        thresholds = None
        if settings.sparsification == "magnitude":
            thresholds = [float(s["threshold"]) if s is not None else 0.0 for s in statistics]
        return merge_values(settings, job.weights, values, thresholds=thresholds, seed=job.seed, module=module,
                            tasks=job.tasks, flat_indices=flat_indices)

    # -- mergekit -----------------------------------------------------------------------------------
    def parameters(self, method: str, task_ids: Sequence[str], weights: Sequence[float]) -> dict[str, Any]:
        """The mergekit ``parameters`` mapping for one merge (what a mergekit YAML would hold)."""
        values = self.settings(method).model_dump(by_alias=True, exclude={"base_mode"})
        out: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        if takes_weight(method):
            out["weight"] = dict(zip(task_ids, weights))
        if method == "slerp" and "t" not in out:  # from the first task (mergekit's base) towards the second
            total = sum(weights)
            out["t"] = float(weights[1] / total) if len(weights) == 2 and abs(total) > 1e-12 else 0.5
        return out

    def _seed(self, job: MergeJob, module: str) -> None:
        if METHOD_FACTS[job.method].random:
            # One generator state per (target, module): reruns and module order do not change the draw.
            torch.manual_seed(int(content_key(job.seed, module), 16) % 2**63)

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        from mergekit.merge_methods.api import merge_tensors

        if job.method in self.base_methods:
            raise ValueError(f"{job.method} (base_mode {self.mode(job.method)}) merges full weights: it needs "
                             "merge_module_on_base with the base model's module")
        ids = [f"t{i}" for i in range(len(deltas))]
        params = self.parameters(job.method, ids, job.weights)
        self._seed(job, module)
        mode = self.mode(job.method)
        if mode == "pretrained":  # translation invariant: a zero base
            base = torch.zeros_like(deltas[0])
            return merge_tensors([base, *deltas], job.method, ids=["base", *ids], base_index=0, parameters=params)
        if mode == "first_task":  # nearswap: only differences and convex combinations of the two inputs
            return merge_tensors(list(deltas), job.method, ids=ids, base_index=0, parameters=params)
        return merge_tensors(list(deltas), job.method, ids=ids, parameters=params)

    def merge_module_on_base(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor],
                             base: torch.Tensor) -> torch.Tensor:
        """A full-weight method: merge ``base + ΔWᵢ`` as mergekit would, return ``merged − base``."""
        from mergekit.merge_methods.api import merge_tensors

        ids = [f"t{i}" for i in range(len(deltas))]
        params = self.parameters(job.method, ids, job.weights)
        self._seed(job, module)
        full = [base + d for d in deltas]
        mode = self.mode(job.method)
        if mode == "pretrained":
            merged = merge_tensors([base, *full], job.method, ids=["base", *ids], base_index=0, parameters=params)
        elif mode == "first_task":
            merged = merge_tensors(full, job.method, ids=ids, base_index=0, parameters=params)
        else:
            merged = merge_tensors(full, job.method, ids=ids, parameters=params)
        if not merged.any() and any(bool(f.any()) for f in full):
            # e.g. Karcher with a tolerance above the weights' norms: the "merge" would be −W0
            raise ValueError(f"mergekit's {job.method} returned an all-zero weight for {module} from non-zero "
                             f"models; check merger.params.methods.{job.method}")
        return merged - base


SPEC = PluginSpec("mergekit", Stage.MERGER,
                  "every mergekit merge method (linear, TIES, DARE, DELLA, breadcrumbs, SCE, RAM, Model Stock, "
                  "slerp family, Karcher, nearswap, arcee_fusion) on ΔW, module by module",
                  "https://github.com/arcee-ai/mergekit", MergekitParams, MergekitMerger)
