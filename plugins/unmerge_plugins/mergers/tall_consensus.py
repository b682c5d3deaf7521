"""``tall-consensus``: TALL masks and consensus merging (Wang et al., ICML 2024, arXiv 2405.07813).

With the constituents' task vectors τₜ (each scaled by its target weight wₜ) and the multi-task vector
τ_MTL = Σₜ τₜ (task arithmetic):

    TALL mask   mₜ = 1{ |τₜ| ≥ λ · |τ_MTL − τₜ| }    per task, element-wise
    consensus   m  = 1{ Σₜ mₜ ≥ k }                  k = 2 drops weights only one task (or none) uses
    merge       Δ  = α · m ⊙ τ_MTL

``≥`` follows the paper's equation (its code uses ``>``; they differ only on exact ties, which
contribute 0). The paper tunes λ per task on validation data over 0.2–0.6; 0.4 is that grid's middle.
(FusionBench's ``tall_mask/task_arithmetic.py`` passes the pretrained weights where the pretrained
*task vector*, zero, belongs, and so computes |θ₀ − τₜ| instead of |τₜ|; this follows the paper.)

Every step is element-wise, so the mask-only fast path is this same function on the constituents'
values at the mask coordinates — exact, no statistics needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from unmerge_core import LowRankDelta, MergeJob, PluginParams, PluginSpec, Stage


class TallConsensusParams(PluginParams):
    lam: float = Field(0.4, gt=0, le=10, description="TALL mask threshold λ (paper grid 0.2–0.6)")
    k: int = Field(2, ge=1, le=16, description="keep weights that at least k tasks' TALL masks select")
    alpha: float = Field(1.0, gt=0, le=100, description="scale of the merged task vector")


def tall_consensus(values: Sequence[Any], weights: Sequence[float], params: TallConsensusParams) -> Any:
    """α · 1{Σₜ mₜ ≥ k} ⊙ τ_MTL for arrays or tensors of any (matching) shape."""
    tau = [v * w for v, w in zip(values, weights)]
    mtl = sum(tau[1:], tau[0])
    count = sum(((abs(t) >= params.lam * abs(mtl - t)) * 1 for t in tau[1:]),
                (abs(tau[0]) >= params.lam * abs(mtl - tau[0])) * 1)
    return params.alpha * mtl * (count >= params.k)


class TallConsensusMerger:
    methods = ("tall-consensus",)
    masked_methods = ("tall-consensus",)
    statistics_methods: tuple[str, ...] = ()

    def __init__(self, params: TallConsensusParams) -> None:
        self.params = params

    def coefficients(self, job: MergeJob) -> tuple[float, ...]:
        """The ground truth of ``job``: ``alpha`` scales every constituent's weight."""
        return tuple(self.params.alpha * w for w in job.weights)

    def method_tasks(self, method: str) -> tuple[int, int | None]:
        """At least ``k`` constituents: with fewer, no weight reaches the consensus and the target is zero."""
        return self.params.k, None

    def statistics_config(self) -> dict[str, Any]:
        return {}

    def module_statistics(self, delta: LowRankDelta, module: str) -> dict[str, float]:
        return {}

    def merge_masked(self, job: MergeJob, module: str, flat_indices: np.ndarray, values: Sequence[np.ndarray],
                     statistics: Sequence[Mapping[str, float] | None]) -> np.ndarray:
        return np.asarray(tall_consensus([np.asarray(v, dtype=np.float64) for v in values], job.weights,
                                         self.params), dtype=np.float64)

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        return tall_consensus(list(deltas), job.weights, self.params).to(torch.float32)


SPEC = PluginSpec("tall-consensus", Stage.MERGER, "TALL masks / consensus merging: task arithmetic restricted "
                  "to weights at least k tasks rely on", "https://arxiv.org/abs/2405.07813",
                  TallConsensusParams, TallConsensusMerger)
