"""``scale-svd``: each task vector replaced by an activation-scaled low-rank plus sparse approximation,
then task arithmetic — the seed framework's Scale-SVD, which applies OATS (Zhang & Papyan, ICLR 2025,
arXiv 2409.13652, Algorithm 1) to task vectors.

For one module τ (out × in) of task t and per-input-feature scales d (the statistics of the module's
inputs on task t's own training data, recorded by the core on the base model):

    W̃ = τ · diag(√d);  S ← 0
    repeat ``iterations`` times:  L ← best rank-k approximation of W̃ − S
                                  S ← keep the largest |W̃ − L| entries (per row, or over the matrix)
    τ' = (L + S) · diag(1/√d);    Δ = α Σₜ wₜ τ'ₜ

Budget as in the seed code: ρ = ``sparsity``, κ = ``rank_ratio``, P parameters; k = ⌊κ(1−ρ)P/(out+in)⌋
and (1−κ)(1−ρ)P sparse entries. ``budget = "matrix"`` is the seed's P = out·in — on a LoRA task vector of
rank r that makes k ≫ r, L = τ, S = 0: the identity. ``budget = "task-rank"`` (the default) is
P = r·(out + in) with r the task vector's own rank, the LoRA's parameter count, which actually
compresses.

**Scaling.** ``scaling = "activation"`` (the default) scales by the inputs' ``statistic``:
``"second-moment"`` (the default) is OATS's — the squared L2 norm of each input feature over the
tokens (here divided by their count, which changes nothing: scaling and unscaling cancel a constant);
``"variance"`` centres it first, as the seed's public fork does in code although its documentation
says the squared norm. The core records the statistics of the base model on ``calibration_batches``
of the trainer's batches of each task (non-padding tokens; :class:`~unmerge_core.ActivationMerger`),
caches them, and a module without statistics is an error naming it — never the silent all-ones
fallback of the fork. A feature no token excites (d = 0, possible with ``"variance"``) gets
d = ``SCALE_FLOOR`` · mean(d), so nothing is divided by zero. ``scaling = "uniform"`` is d = 1 (the
variant that needs neither a base model nor task data; identical to "activation" with all-ones
statistics, bit for bit). Dense only (the hard threshold needs every residual entry): one out × in
residual per iteration and task — fine for small models, minutes per target at 7B
(``svd = "randomized"`` uses ``torch.svd_lowrank`` there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from unmerge_core import InputStatistics, MergeJob, PluginParams, PluginSpec, Stage, content_key

RANK_RTOL = 1e-5
"""Singular values below this share of the largest do not count towards a task vector's rank."""
SCALE_FLOOR = 1e-8
"""Input statistics below this share of their mean are raised to it (an unexcited feature is not divided by zero)."""


class ScaleSvdParams(PluginParams):
    sparsity: float = Field(0.1, ge=0, lt=1, description="ρ: fraction of the parameter budget removed")
    rank_ratio: float = Field(0.75, gt=0, le=1, description="κ: share of the kept budget given to the low-rank part")
    iterations: int = Field(10, ge=1, le=100, description="alternating low-rank / sparse rounds")
    prune: Literal["row", "global"] = Field("row", description="sparse part: largest entries per row or overall")
    budget: Literal["task-rank", "matrix"] = Field(
        "task-rank", description="P = rank(τ)·(out+in) (compresses a LoRA) or out·in (the seed's; identity on LoRA)")
    svd: Literal["full", "randomized"] = "full"
    scaling: Literal["activation", "uniform"] = Field(
        "activation", description="per-input-feature scales: the base model's input statistics on each task's "
                                  "training data (needs a trainer with a base model), or uniform (d = 1)")
    statistic: Literal["second-moment", "variance"] = Field(
        "second-moment", description="which input statistic scales (OATS: the second moment, i.e. squared norm)")
    calibration_batches: int = Field(16, ge=1, le=100_000, description="trainer batches per task the statistics "
                                                                        "are recorded on (scaling = activation)")
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


def _keep_largest(values: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
    """``values`` with all but its ``keep`` largest-magnitude entries along ``dim`` set to zero: a
    partial selection (``topk``) when few are kept, else a stable sort. Among entries of exactly equal
    magnitude at the cut, which are kept is the selection's (deterministic) choice."""
    n = values.shape[dim]
    if keep >= n:
        return values
    if keep <= 0:
        return torch.zeros_like(values)
    if keep < n // 2:  # selecting the few kept is cheaper than sorting everything
        kept = torch.topk(values.abs(), keep, dim=dim, sorted=False).indices
        return torch.zeros_like(values).scatter(dim, kept, values.gather(dim, kept))
    dropped = torch.sort(values.abs(), dim=dim, stable=True).indices.narrow(dim, 0, n - keep)
    return values.scatter(dim, dropped, 0.0)


def _hard_threshold(r: torch.Tensor, pruned: float, prune: str) -> torch.Tensor:
    if prune == "row":
        return _keep_largest(r, r.shape[1] - int(r.shape[1] * pruned), 1)
    return _keep_largest(r.flatten(), r.numel() - int(r.numel() * pruned), 0).view_as(r)


def feature_scales(inputs: InputStatistics, statistic: str) -> torch.Tensor:
    """d of one task and module: its ``statistic`` per input feature, floored at ``SCALE_FLOOR`` · mean."""
    d = (inputs.second_moment() if statistic == "second-moment" else inputs.variance()).to(torch.float64)
    mean = float(d.mean()) if d.numel() else 0.0
    if not mean > 0.0:
        raise ValueError(f"the {statistic} of every input feature is zero: no scale to apply")
    return d.clamp_min(SCALE_FLOOR * mean)


@torch.no_grad()
def scale_svd(task: torch.Tensor, params: ScaleSvdParams, scales: torch.Tensor | None = None) -> torch.Tensor:
    """τ' = low-rank + sparse approximation of one task vector, in the space scaled by √``scales``
    (per input feature; ``None``: uniform)."""
    w = task.to(torch.float64)
    # the task vector's own rank, at float32 precision (ΔW comes from float32 factors); positive
    # column scales do not change it
    rank = int(torch.linalg.matrix_rank(w, rtol=RANK_RTOL)) if w.abs().max() > 0 else 0
    if rank == 0:
        return torch.zeros_like(w)
    root = None
    if scales is not None:
        root = scales.to(torch.float64).sqrt()
        w = w * root
    k, pruned = budget_sizes((int(w.shape[0]), int(w.shape[1])), params, rank)
    sparse = torch.zeros_like(w)
    low = w
    for _ in range(params.iterations):
        low = _truncated(w - sparse, k, params.svd)
        sparse = _hard_threshold(w - low, pruned, params.prune)
    out = low + sparse
    return out / root if root is not None else out


class ScaleSvdMerger:
    methods = ("scale-svd",)

    def __init__(self, params: ScaleSvdParams) -> None:
        self.params = params
        self.activation_methods: tuple[str, ...] = ("scale-svd",) if params.scaling == "activation" else ()
        self.activation_batches = params.calibration_batches

    def coefficients(self, job: MergeJob) -> tuple[float, ...]:
        """The ground truth of ``job``: ``alpha`` scales every constituent's weight."""
        return tuple(self.params.alpha * w for w in job.weights)

    def merge_module(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.params.scaling != "uniform":
            raise ValueError(f"scaling = '{self.params.scaling}' scales by input statistics, and {module} of "
                             f"{job.target_id} came without them (set scaling = 'uniform' for the unscaled variant)")
        return self._merge(job, module, deltas, [None] * len(deltas))

    def merge_module_scaled(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor],
                            inputs: Sequence[InputStatistics]) -> torch.Tensor:
        if len(inputs) != len(deltas):
            raise ValueError(f"{module}: {len(inputs)} input statistics for {len(deltas)} constituents")
        scales = []
        for task, entry in zip(job.tasks, inputs):
            try:
                scales.append(feature_scales(entry, self.params.statistic))
            except ValueError as exc:
                raise ValueError(f"{module}, task {task}: {exc}") from None
        return self._merge(job, module, deltas, scales)

    def _merge(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor],
               scales: Sequence[torch.Tensor | None]) -> torch.Tensor:
        # the randomized SVD draws from torch's global generator: fix it per (target, module) so a
        # rerun gives the same target, without touching the caller's generator state
        with torch.random.fork_rng():
            torch.manual_seed(int(content_key("scale-svd", job.seed, module), 16) % 2**63)
            total = sum(w * scale_svd(d, self.params, s) for d, w, s in zip(deltas, job.weights, scales))
        return (self.params.alpha * total).to(torch.float32)  # type: ignore[union-attr]


SPEC = PluginSpec("scale-svd", Stage.MERGER, "Scale-SVD: each task vector as activation-scaled low-rank + sparse "
                  "(OATS), then task arithmetic", "https://arxiv.org/abs/2409.13652", ScaleSvdParams, ScaleSvdMerger)
