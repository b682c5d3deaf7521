"""``iso-c``: isotropic merging in the common subspace (Marczak et al., ICML 2025, arXiv 2502.04959).

Per module: the task-arithmetic sum M = Σₜ wₜ τₜ = U Σ Vᵀ, and Δ = α · σ̄ · U_R V_Rᵀ with σ̄ the mean
of the R non-zero singular values: the spectrum is flattened to its mean over the directions M has.

For the full-rank sums of the paper (dense fine-tuning) R = min(out, in) and σ̄ is the paper's
``S.mean()``. For a sum of LoRA task vectors R ≤ T·r ≪ min(out, in): the published code would average
over min(out, in) values and give the mean to min(out, in) − R null-space directions its SVD picks
arbitrarily (a full-rank, implementation-dependent result). Here the mean is over the rank R of the
sum (the README says so); the result stays inside the span of the constituents' column
and row spaces. Factored from the LoRA factors when every constituent is low-rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from unmerge_core import DeviceParams, LowRankDelta, MergeJob, PluginSpec, Stage
from unmerge_plugins.lib.spectral_merge import TaskVector, spectral_space


class IsoCParams(DeviceParams):
    alpha: float = Field(1.0, gt=0, le=100, description="scale of the merged task vector")


def iso_c(tasks: Sequence[TaskVector], weights: Sequence[float], alpha: float,
          device: torch.device | None = None) -> Any:
    """Iso-C of one module (factored for LoRA constituents)."""
    space = spectral_space(tasks, weights, device)
    u, s, v = space.sum_svd()
    mean = float(s.mean()) if s.numel() else 0.0
    return space.result(u, torch.full_like(s, alpha * mean), v)


class IsoCMerger:
    methods = ("iso-c",)
    lowrank_methods = ("iso-c",)

    def __init__(self, params: IsoCParams) -> None:
        self.params = params

    def coefficients(self, job: MergeJob) -> tuple[float, ...]:
        """The ground truth of ``job``: ``alpha`` scales every constituent's weight."""
        return tuple(self.params.alpha * w for w in job.weights)

    def merge_lowrank(self, job: MergeJob, module: str, deltas: Sequence[LowRankDelta],
                      flat_indices: np.ndarray) -> np.ndarray:
        return iso_c(deltas, job.weights, self.params.alpha, self.params.torch_device()).gather(flat_indices)

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        return iso_c(deltas, job.weights, self.params.alpha).dense().to(torch.float32)


SPEC = PluginSpec("iso-c", Stage.MERGER, "Isotropic merging: the task-arithmetic sum with its spectrum "
                  "flattened to the mean singular value; factored for LoRA constituents",
                  "https://arxiv.org/abs/2502.04959", IsoCParams, IsoCMerger)
