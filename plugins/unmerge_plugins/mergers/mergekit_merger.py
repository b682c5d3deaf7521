"""``mergekit``: form target task vectors with mergekit's own merge methods.

Every method here is a task-vector method (the merged weight is ``base + f(θ₁ − base, …)``) or, for
``linear``, a weighted mean whose normalised form is translation invariant. So the merge is evaluated
on ΔW with a zero base, module by module, through ``mergekit.merge_methods.api.merge_tensors``: the
result equals ``merged − base`` of mergekit's full-model merge (tested against ``run_merge``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from unmerge_core.store import content_key
from unmerge_core.types import MergeJob, PluginParams

# method -> whether it takes a base model (task-vector methods) and whether it is random
METHODS: dict[str, dict[str, bool]] = {
    "linear": {"base": False, "random": False},
    "task_arithmetic": {"base": True, "random": False},
    "ties": {"base": True, "random": False},
    "dare_linear": {"base": True, "random": True},
    "dare_ties": {"base": True, "random": True},
    "breadcrumbs": {"base": True, "random": False},
}


class MergekitParams(PluginParams):
    """Shared merge parameters; defaults follow the seeds' phase 2 (TIES and DARE at density 0.5)."""

    density: float = Field(0.5, gt=0, le=1, description="kept fraction for ties / dare / breadcrumbs")
    normalize: bool | None = Field(None, description="divide by summed weights; default: mergekit's per method, "
                                                     "except linear and ties: true")
    int8_mask: bool = True
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")


class MergekitMerger:
    methods: tuple[str, ...] = tuple(METHODS)

    def __init__(self, params: MergekitParams) -> None:
        self.params = params

    def parameters(self, method: str, task_ids: Sequence[str], weights: Sequence[float]) -> dict[str, Any]:
        """The mergekit ``parameters`` mapping for one merge (what a mergekit YAML would hold)."""
        p = self.params
        out: dict[str, Any] = {"weight": dict(zip(task_ids, weights))}
        if method == "linear":
            out["normalize"] = True if p.normalize is None else p.normalize
            return out
        out["lambda"] = p.lambda_
        if method in ("ties", "dare_ties", "breadcrumbs"):
            out["int8_mask"] = p.int8_mask
        if method != "task_arithmetic":
            out["density"] = p.density
        if method == "ties":
            out["normalize"] = True if p.normalize is None else p.normalize
        elif p.normalize is not None:
            out["normalize"] = p.normalize
        return out

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        from mergekit.merge_methods.api import merge_tensors

        info = METHODS[job.method]
        ids = [f"t{i}" for i in range(len(deltas))]
        params = self.parameters(job.method, ids, job.weights)
        if info["random"]:
            # One generator state per (target, module): reruns and module order do not change the draw.
            torch.manual_seed(int(content_key(job.seed, module), 16) % 2**63)
        if info["base"]:
            base = torch.zeros_like(deltas[0])
            return merge_tensors([base, *deltas], job.method, ids=["base", *ids], base_index=0, parameters=params)
        return merge_tensors(list(deltas), job.method, ids=ids, parameters=params)
