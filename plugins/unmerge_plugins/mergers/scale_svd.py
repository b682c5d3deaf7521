"""``scale-svd``: each task vector replaced by a scaled low-rank plus sparse approximation, then task
arithmetic — the seed framework's Scale-SVD, which applies OATS (Zhang & Papyan, ICLR 2025,
arXiv 2409.13652, Algorithm 1) to task vectors.

For one module τ (out × in) and per-input-channel scales d (OATS: the second moment of the module's
inputs; here uniform, d = 1 — see below):

    W̃ = τ · diag(√d);  S ← 0
    repeat ``iterations`` times:  L ← best rank-k approximation of W̃ − S
                                  S ← keep the largest |W̃ − L| entries (per row, or over the matrix)
    τ' = (L + S) · diag(1/√d);    Δ = α Σₜ wₜ τ'ₜ

Budget as in the seed code: ρ = ``sparsity``, κ = ``rank_ratio``, P parameters; k = ⌊κ(1−ρ)P/(out+in)⌋
and (1−κ)(1−ρ)P sparse entries. ``budget = "matrix"`` is the seed's P = out·in — on a LoRA task vector of
rank r that makes k ≫ r, L = τ, S = 0: the identity. ``budget = "task-rank"`` (the default) is
P = r·(out + in) with r the task vector's own rank, the LoRA's parameter count, which actually
compresses.

**Scaling used: uniform.** Activation statistics need the base model run on task data inside the
merge; the merger contract hands a merger tensors only, so ``scaling = "uniform"`` is the one choice
and it is recorded in the run's configuration. Dense only (the hard threshold needs every residual
entry): one out × in residual per iteration and task — fine for small models, minutes per target at
7B (``svd = "randomized"`` uses ``torch.svd_lowrank`` there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from unmerge_core import MergeJob, PluginParams, PluginSpec, Stage, content_key

RANK_RTOL = 1e-5
"""Singular values below this share of the largest do not count towards a task vector's rank."""


class ScaleSvdParams(PluginParams):
    sparsity: float = Field(0.1, ge=0, lt=1, description="ρ: fraction of the parameter budget removed")
    rank_ratio: float = Field(0.75, gt=0, le=1, description="κ: share of the kept budget given to the low-rank part")
    iterations: int = Field(10, ge=1, le=100, description="alternating low-rank / sparse rounds")
    prune: Literal["row", "global"] = Field("row", description="sparse part: largest entries per row or overall")
    budget: Literal["task-rank", "matrix"] = Field(
        "task-rank", description="P = rank(τ)·(out+in) (compresses a LoRA) or out·in (the seed's; identity on LoRA)")
    svd: Literal["full", "randomized"] = "full"
    scaling: Literal["uniform"] = Field("uniform", description="per-input-channel scales (activation statistics "
                                                               "are not available to a merger)")
    alpha: float = Field(1.0, gt=0, le=100, description="scale of the merged task vector")


def budget_sizes(shape: tuple[int, int], params: ScaleSvdParams, task_rank: int) -> tuple[int, float]:
    """``(k, pruned fraction of the sparse part)`` from the parameter budget."""
    out, inn = shape
    total = out * inn if params.budget == "matrix" else task_rank * (out + inn)
    kept = 1.0 - params.sparsity
    k = max(1, min(int(params.rank_ratio * kept * total / (out + inn)), min(out, inn)))
    pruned = 1.0 - (1.0 - params.rank_ratio) * kept * total / (out * inn)
    return k, min(max(pruned, 0.0), 1.0)


def _truncated(m: torch.Tensor, k: int, svd: str) -> torch.Tensor:
    if svd == "randomized":
        u, s, v = torch.svd_lowrank(m, q=min(k + 10, min(m.shape)), niter=4)
        return (u[:, :k] * s[:k]) @ v[:, :k].T
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _hard_threshold(r: torch.Tensor, pruned: float, prune: str) -> torch.Tensor:
    if prune == "row":
        drop = int(r.shape[1] * pruned)
        if drop == 0:
            return r
        return r.scatter(1, torch.sort(r.abs(), dim=1, stable=True).indices[:, :drop], 0.0)
    drop = int(r.numel() * pruned)
    if drop == 0:
        return r
    flat = r.flatten().clone()
    flat[torch.sort(flat.abs(), stable=True).indices[:drop]] = 0.0
    return flat.view_as(r)


@torch.no_grad()
def scale_svd(task: torch.Tensor, params: ScaleSvdParams) -> torch.Tensor:
    """τ' = low-rank + sparse approximation of one task vector (uniform scales)."""
    w = task.to(torch.float64)
    # the task vector's own rank, at float32 precision (ΔW comes from float32 factors)
    rank = int(torch.linalg.matrix_rank(w, rtol=RANK_RTOL)) if w.abs().max() > 0 else 0
    if rank == 0:
        return torch.zeros_like(w)
    k, pruned = budget_sizes((int(w.shape[0]), int(w.shape[1])), params, rank)
    sparse = torch.zeros_like(w)
    low = w
    for _ in range(params.iterations):
        low = _truncated(w - sparse, k, params.svd)
        sparse = _hard_threshold(w - low, pruned, params.prune)
    return low + sparse


class ScaleSvdMerger:
    methods = ("scale-svd",)

    def __init__(self, params: ScaleSvdParams) -> None:
        self.params = params

    def coefficients(self, job: MergeJob) -> tuple[float, ...]:
        """The ground truth of ``job``: ``alpha`` scales every constituent's weight."""
        return tuple(self.params.alpha * w for w in job.weights)

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        # the randomized SVD draws from torch's global generator: fix it per (target, module) so a
        # rerun gives the same target, without touching the caller's generator state
        with torch.random.fork_rng():
            torch.manual_seed(int(content_key("scale-svd", job.seed, module), 16) % 2**63)
            total = sum(w * scale_svd(d, self.params) for d, w in zip(deltas, job.weights))
        return (self.params.alpha * total).to(torch.float32)  # type: ignore[union-attr]


SPEC = PluginSpec("scale-svd", Stage.MERGER, "Scale-SVD: each task vector as low-rank + sparse (OATS), then "
                  "task arithmetic", "https://arxiv.org/abs/2409.13652", ScaleSvdParams, ScaleSvdMerger)
