"""``tsv-m``: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per module, for the T constituents' task vectors τₜ (each scaled by its target weight wₜ):

1. thin SVD of each, τₜ = Uₜ Σₜ Vₜᵀ; keep its top ``k`` triplets, ``k = ⌊fraction · min(out, in) / T⌋``
   as in the paper (``rank`` sets k directly); a task keeps ``min(k, rank τₜ)`` — zero singular values
   have arbitrary vectors and are dropped;
2. stack U = [U₁ … U_T], Σ = diag(Σ₁ … Σ_T), V = [V₁ … V_T];
3. orthogonalise U and V by their polar factors (the paper's whitening: the closest matrices with
   orthonormal columns);
4. Δ = α · U⊥ Σ V⊥ᵀ.

For LoRA task vectors of rank r ≤ ⌊min(out, in) / T⌋ (r = 32 at 7B, T ≤ 5: k ≥ 716) every task keeps
its whole spectrum and TSV-M is its decorrelation step; ``fraction`` or ``rank`` truncates. When every
constituent is low-rank the merge is formed from the factors and gathered at the mask
(:mod:`unmerge_plugins.lib.spectral_merge`); no module is ever dense.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from unmerge_core import DeviceParams, LowRankDelta, MergeJob, PluginSpec, Stage
from unmerge_plugins.lib.spectral_merge import TaskVector, spectral_space


class TsvMParams(DeviceParams):
    alpha: float = Field(1.0, gt=0, le=100, description="scale of the merged task vector")
    fraction: float = Field(1.0, gt=0, le=1, description="per-task budget k = ⌊fraction · min(out, in) / T⌋")
    rank: int | None = Field(None, ge=1, description="per-task number of singular directions (overrides fraction)")


def per_task_rank(shape: tuple[int, int], n_tasks: int, fraction: float) -> int:
    """The paper's per-task budget ``⌊fraction · min(out, in) / T⌋`` (at least 1)."""
    return max(1, int(fraction * min(shape) / n_tasks))


def tsv_m(tasks: Sequence[TaskVector], weights: Sequence[float], params: TsvMParams,
          device: torch.device | None = None) -> Any:
    """TSV-M of one module: a :class:`~unmerge_plugins.lib.spectral_merge.FramedResult` for LoRA
    constituents (factored), a :class:`~unmerge_plugins.lib.spectral_merge.Factored` for dense ones."""
    space = spectral_space(tasks, weights, device)
    k = params.rank if params.rank is not None else per_task_rank(space.shape, len(tasks), params.fraction)
    parts = [space.task_svd(i) for i in range(len(tasks))]
    u = torch.cat([p[0][:, :k] for p in parts], dim=1)
    s = torch.cat([p[1][:k] for p in parts])
    v = torch.cat([p[2][:, :k] for p in parts], dim=1)
    return space.result(space.polar_left(u), params.alpha * s, space.polar_right(v))


class TsvMerger:
    methods = ("tsv-m",)
    lowrank_methods = ("tsv-m",)

    def __init__(self, params: TsvMParams) -> None:
        self.params = params

    def coefficients(self, job: MergeJob) -> tuple[float, ...]:
        """The ground truth of ``job``: ``alpha`` scales every constituent's weight."""
        return tuple(self.params.alpha * w for w in job.weights)

    def merge_lowrank(self, job: MergeJob, module: str, deltas: Sequence[LowRankDelta],
                      flat_indices: np.ndarray) -> np.ndarray:
        return tsv_m(deltas, job.weights, self.params, self.params.torch_device()).gather(flat_indices)

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        return tsv_m(deltas, job.weights, self.params).dense().to(torch.float32)


SPEC = PluginSpec("tsv-m", Stage.MERGER, "Task Singular Vectors merging: per-task top singular directions, "
                  "decorrelated; factored for LoRA constituents", "https://arxiv.org/abs/2412.00081",
                  TsvMParams, TsvMerger)
