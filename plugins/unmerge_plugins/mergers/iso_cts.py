"""``iso-cts``: isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025,
arXiv 2502.04959).

Per module, with M = Σₜ wₜ τₜ = U Σ Vᵀ of rank R:

1. sizes as the published code rounds them, with the paper's r = min(out, in) replaced by R (equal for
   the paper's full-rank sums; for LoRA sums r would put null-space directions into the "common"
   space): c₀ = ⌊f·R⌋, n = round((R − c₀) / T), n = ⌊R / T⌋ if n·T > R, c = R − n·T;
2. common subspace: the top c triplets of M;
3. task-specific: each τ̃ₜ = (I − U_c U_cᵀ) wₜ τₜ keeps its top n triplets (zero ones dropped);
4. U* = [U₁ … U_T, U_c], V* likewise, both orthogonalised by their polar factors;
5. Δ = α · mean(Σ*) · U⊥ V⊥ᵀ.

For LoRA constituents the projection is applied to the B factor, so every step works on out × T·r and
in × T·r matrices and the result is gathered at the mask; f = ``common_fraction`` (paper: 0.8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from unmerge_core import DeviceParams, LowRankDelta, MergeJob, PluginSpec, Stage
from unmerge_plugins.lib.spectral_merge import TaskVector, spectral_space


class IsoCtsParams(DeviceParams):
    alpha: float = Field(1.0, gt=0, le=100, description="scale of the merged task vector")
    common_fraction: float = Field(0.8, ge=0, le=1, description="share of the sum's rank kept as the common subspace")


def subspace_sizes(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(c, n)``: the common subspace's size and each task's, so that ``c + n·T = rank``."""
    c0 = int(rank * common_fraction)
    n = round((rank - c0) / n_tasks)
    if n * n_tasks > rank:
        n = rank // n_tasks
    return rank - n * n_tasks, n


def iso_cts(tasks: Sequence[TaskVector], weights: Sequence[float], params: IsoCtsParams,
            device: torch.device | None = None) -> Any:
    """Iso-CTS of one module (factored for LoRA constituents)."""
    space = spectral_space(tasks, weights, device)
    u, s, v = space.sum_svd()
    rank = s.numel()
    if rank == 0:
        return space.result(u, s, v)
    c, n = subspace_sizes(rank, len(tasks), params.common_fraction)
    us, ss, vs = [], [], []
    if n > 0:
        for i in range(len(tasks)):
            ut, st, vt = space.projected_svd(i, u[:, :c], ref=float(s[0]))
            us.append(ut[:, :n])
            ss.append(st[:n])
            vs.append(vt[:, :n])
    stacked_s = torch.cat([*ss, s[:c]])
    return space.result(space.polar_left(torch.cat([*us, u[:, :c]], dim=1)),
                        torch.full_like(stacked_s, params.alpha * float(stacked_s.mean())),
                        space.polar_right(torch.cat([*vs, v[:, :c]], dim=1)))


class IsoCtsMerger:
    methods = ("iso-cts",)
    lowrank_methods = ("iso-cts",)

    def __init__(self, params: IsoCtsParams) -> None:
        self.params = params

    def coefficients(self, job: MergeJob) -> tuple[float, ...]:
        """The ground truth of ``job``: ``alpha`` scales every constituent's weight."""
        return tuple(self.params.alpha * w for w in job.weights)

    def merge_lowrank(self, job: MergeJob, module: str, deltas: Sequence[LowRankDelta],
                      flat_indices: np.ndarray) -> np.ndarray:
        return iso_cts(deltas, job.weights, self.params, self.params.torch_device()).gather(flat_indices)

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        return iso_cts(deltas, job.weights, self.params).dense().to(torch.float32)


SPEC = PluginSpec("iso-cts", Stage.MERGER, "Isotropic merging in common and task-specific subspaces; "
                  "factored for LoRA constituents", "https://arxiv.org/abs/2502.04959", IsoCtsParams, IsoCtsMerger)
