"""What the ``mergekit`` merger knows about each of mergekit's merge methods beyond mergekit's own spec.

mergekit describes each method's parameters (name, scope, default) in ``method.spec``; that stays
the source of truth for names and defaults. This module adds what a toolkit that *makes* targets
from task vectors needs and mergekit does not say:

- **input modes** — which input plays mergekit's ``base_model``, how many task constituents the
  method takes then, and whether the base model's weights W0 are needed:

  - ``pretrained``: the pretrained base is mergekit's base (task-vector methods). Translation
    invariant methods give ``merged − W0`` from the ΔW alone (a zero base; checked against
    ``run_merge`` to float rounding), so W0 is not needed; full-weight methods (slerp, Karcher)
    need it.
  - ``first_task``: the first constituent's full model is mergekit's base (the two-model methods
    slerp, nearswap and arcee_fusion merging two fine-tunes).
  - ``none``: no base; the full weights W0 + ΔWᵢ are merged (Karcher, multislerp / nuslerp without
    a base; ``linear``, which is translation invariant when it normalises).

- **value ranges** of each parameter (mergekit checks types, not ranges): a value outside them is
  refused when the manifest is validated instead of failing (or doing nothing) mid-run. DELLA's
  ``density ± epsilon`` window, which mergekit only checks while merging, is checked too.
- whether the method uses the target's per-task **weights** (sce, ram, ramplus_tl, model_stock,
  karcher, nearswap and arcee_fusion take none) and whether it is **random** (DARE and DELLA always;
  arcee_fusion samples its quantiles on modules above one million entries).

``passthrough`` is left out: it copies one input, it does not merge task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from unmerge_core import StrictNumbers


@dataclass(frozen=True)
class InputMode:
    """One way of feeding a method: how many task constituents it takes and whether W0 is needed."""

    min_tasks: int = 1
    max_tasks: int | None = None
    needs_base_weights: bool = False


@dataclass(frozen=True)
class MethodFacts:
    """What UNMERGE adds to mergekit's spec of one method (see the module docstring)."""

    modes: dict[str, InputMode]  # the first is the default
    weighted: bool = True
    random: bool = False
    ranges: dict[str, dict[str, float]] = field(default_factory=dict)  # parameter -> pydantic Field bounds
    summary: str = ""


_GTA_RANGES = {"density": {"gt": 0.0, "le": 1.0}, "lambda": {"ge": -100.0, "le": 100.0}}
_PRETRAINED = {"pretrained": InputMode()}

METHOD_FACTS: dict[str, MethodFacts] = {
    "linear": MethodFacts({"none": InputMode()}, summary="Σ wᵢ ΔWᵢ / Σ wᵢ"),
    "task_arithmetic": MethodFacts(_PRETRAINED, ranges=_GTA_RANGES, summary="λ Σ wᵢ ΔWᵢ"),
    "ties": MethodFacts(_PRETRAINED, ranges=_GTA_RANGES, summary="trim by magnitude, elect signs, mean of agreeing"),
    "dare_linear": MethodFacts(_PRETRAINED, random=True, ranges=_GTA_RANGES,
                               summary="random drop with rescale, weighted sum"),
    "dare_ties": MethodFacts(_PRETRAINED, random=True, ranges=_GTA_RANGES,
                             summary="random drop with rescale, TIES sign election"),
    "breadcrumbs": MethodFacts(_PRETRAINED, ranges={**_GTA_RANGES, "gamma": {"ge": 0.0, "lt": 1.0}},
                               summary="drop the largest (gamma) and smallest entries, weighted sum"),
    "breadcrumbs_ties": MethodFacts(_PRETRAINED, ranges={**_GTA_RANGES, "gamma": {"ge": 0.0, "lt": 1.0}},
                                    summary="breadcrumbs with TIES sign election"),
    "della": MethodFacts(_PRETRAINED, random=True, ranges={**_GTA_RANGES, "epsilon": {"ge": 0.0, "lt": 0.5}},
                         summary="magnitude-ranked random drop per row (MagPrune), TIES sign election"),
    "della_linear": MethodFacts(_PRETRAINED, random=True,
                                ranges={**_GTA_RANGES, "epsilon": {"ge": 0.0, "lt": 0.5}},
                                summary="MagPrune drop, weighted sum"),
    "sce": MethodFacts(_PRETRAINED, weighted=False, ranges={"select_topk": {"gt": 0.0, "le": 1.0}},
                       summary="select by variance across tasks, calculate weights from ‖ΔWᵢ‖², erase minority signs"),
    "ram": MethodFacts(_PRETRAINED, weighted=False, ranges={"epsilon": {"ge": 0.0}},
                       summary="average where several tasks change an entry, keep unique entries"),
    "ramplus_tl": MethodFacts(_PRETRAINED, weighted=False,
                              ranges={"epsilon": {"ge": 0.0}, "r": {"ge": 0.0}, "alpha": {"ge": 0.0}},
                              summary="ram with a boost of unique entries"),
    "model_stock": MethodFacts({"pretrained": InputMode(min_tasks=2)}, weighted=False,
                               summary="mean ΔW scaled by the tasks' mutual cosine"),
    "multislerp": MethodFacts({"pretrained": InputMode(), "none": InputMode(needs_base_weights=True)},
                              ranges={"eps": {"gt": 0.0, "le": 1e-3}}, summary="spherical barycentre of the inputs"),
    "nuslerp": MethodFacts({"pretrained": InputMode(2, 2), "none": InputMode(2, 2, needs_base_weights=True)},
                           summary="slerp of two task vectors (or two models)"),
    "slerp": MethodFacts({"first_task": InputMode(2, 2, needs_base_weights=True),
                          "pretrained": InputMode(1, 1, needs_base_weights=True)},
                         ranges={"t": {"gt": 0.0, "lt": 1.0}},  # 0 or 1 would return one model alone
                         summary="spherical interpolation of two full models (t: default w₂ / (w₁ + w₂))"),
    "karcher": MethodFacts({"none": InputMode(needs_base_weights=True),
                            "pretrained": InputMode(needs_base_weights=True)}, weighted=False,
                           # a tolerance near the norms' scale makes mergekit return zeros (target = −W0)
                           ranges={"max_iter": {"ge": 1, "le": 1000}, "tol": {"gt": 0.0, "le": 1e-2}},
                           summary="Riemannian (Karcher) mean of the full models"),
    "nearswap": MethodFacts({"first_task": InputMode(2, 2), "pretrained": InputMode(1, 1)}, weighted=False,
                            ranges={"t": {"gt": 0.0}},
                            summary="take the other model's entries where the two are within t (weight units)"),
    "arcee_fusion": MethodFacts({"first_task": InputMode(2, 2, needs_base_weights=True),
                                 "pretrained": InputMode(1, 1, needs_base_weights=True)}, weighted=False,
                                random=True,
                                summary="keep the other model's changes where a KL-weighted importance is high"),
}
EXCLUDED = {"passthrough": "copies one input; not a merge of task vectors"}


@dataclass(frozen=True)
class MethodParameter:
    """One of mergekit's parameters of a method (from ``method.spec``)."""

    name: str
    per_task: bool
    default: Any  # ``...``: required


def mergekit_parameters(method: str) -> list[MethodParameter]:
    """mergekit's own parameter list of ``method`` (names, per-task or shared, defaults), ``weight`` excluded."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import MISSING, ParameterScope

    spec = registry.get(method).spec
    return [MethodParameter(p.name, p.scope != ParameterScope.SHARED, ... if p.default is MISSING else p.default)
            for p in spec.parameters if p.name != "weight"]


def takes_weight(method: str) -> bool:
    """Whether mergekit's ``method`` has a per-input ``weight`` parameter (slerp derives ``t`` instead)."""
    from mergekit.merge_methods import registry

    return any(p.name == "weight" for p in registry.get(method).spec.parameters)


class _MethodParams(StrictNumbers):
    """Base of the per-method models: unknown keys refused, numbers strict (``normalize = 1`` is not true)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def method_params_model(method: str) -> type[BaseModel]:
    """A pydantic model of the parameters a manifest may set for ``method`` (unknown keys refused).

    Fields are mergekit's parameters with mergekit's defaults (``weight`` comes from the target) plus
    ``base_mode`` (the input mode, default: the method's first). Parameters mergekit requires (slerp's
    and nearswap's ``t``) are optional here: slerp derives ``t`` from the weights, nearswap refuses to
    run without it (:func:`missing_required`).
    """
    facts = METHOD_FACTS[method]
    fields: dict[str, Any] = {}
    for p in mergekit_parameters(method):
        kind: Any = bool if isinstance(p.default, bool) else int if isinstance(p.default, int) else float
        default = None if p.default is ... else p.default
        bounds = facts.ranges.get(p.name, {})
        fields[p.name.replace("lambda", "lambda_")] = (
            kind | None if default is None else kind,
            Field(default, alias=p.name if p.name == "lambda" else None, **bounds))
    modes = tuple(facts.modes)
    fields["base_mode"] = (Literal[modes], Field(modes[0], description="which input is mergekit's base_model"))  # type: ignore[valid-type]
    validators: dict[str, Any] = {}
    if "lambda_" in fields:
        def _nonzero(self: Any) -> Any:
            if self.lambda_ == 0:
                raise ValueError("lambda = 0 makes every target zero")
            return self

        validators["lambda_nonzero"] = model_validator(mode="after")(_nonzero)
    if "epsilon" in fields and "density" in fields:
        def _window(self: Any) -> Any:
            if self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
                raise ValueError(f"density ± epsilon ({self.density} ± {self.epsilon}) must lie inside (0, 1)")
            return self

        validators["della_window"] = model_validator(mode="after")(_window)
    return create_model(f"{method.title().replace('_', '')}Params",  # type: ignore[call-overload]
                        __base__=_MethodParams, __validators__=validators, **fields)


def missing_required(method: str, values: dict[str, Any]) -> list[str]:
    """mergekit parameters of ``method`` that have no default, are not set and cannot be derived."""
    derived = {"slerp": {"t"}}.get(method, set())
    return [p.name for p in mergekit_parameters(method)
            if p.default is ... and values.get(p.name) is None and p.name not in derived]
