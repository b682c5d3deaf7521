"""Scale-SVD with activation statistics: against a literal transcription of the algorithm, the
all-ones property, and the refusals (no statistics, no silent fallback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unmerge_core import InputStatistics, MergeJob
from unmerge_plugins.mergers.scale_svd import ScaleSvdMerger, ScaleSvdParams, feature_scales


def literal_scale_svd(w: np.ndarray, s: np.ndarray, sparsity: float, rank_ratio: float, iterations: int,
                      per_row: bool) -> np.ndarray:
    """The algorithm as the seed framework describes it, written out in NumPy with the seed's budget
    (P = m·n): W·diag(√s); alternate a rank-k truncated SVD, k = rank_ratio·(1−sparsity)·mn/(m+n), and
    a sparse residual keeping the largest entries (row by row, or over the matrix); unscale."""
    m, n = w.shape
    root = np.sqrt(s)
    scaled = w * root[None, :]
    k = max(1, min(int(rank_ratio * (1 - sparsity) * m * n / (m + n)), min(m, n)))
    kept_sparse = (1 - rank_ratio) * (1 - sparsity) * m * n  # entries of the sparse part
    pruned = min(max(1 - kept_sparse / (m * n), 0.0), 1.0)
    sparse = np.zeros_like(scaled)
    low = scaled
    for _ in range(iterations):
        u, sv, vt = np.linalg.svd(scaled - sparse, full_matrices=False)
        low = (u[:, :k] * sv[:k]) @ vt[:k]
        residual = scaled - low
        sparse = residual.copy()
        if per_row:
            drop = int(n * pruned)
            for row in range(m):
                sparse[row, np.argsort(np.abs(residual[row]), kind="stable")[:drop]] = 0.0
        else:
            drop = int(m * n * pruned)
            flat = sparse.reshape(-1)
            flat[np.argsort(np.abs(residual.reshape(-1)), kind="stable")[:drop]] = 0.0
    return (low + sparse) / root[None, :]


def stats_of(second_moment: torch.Tensor, count: int = 50) -> InputStatistics:
    """Statistics whose second moment is ``second_moment`` (and whose mean is zero)."""
    values = second_moment.to(torch.float64)
    return InputStatistics(count, torch.zeros_like(values), values * count)


@pytest.mark.parametrize("prune", ["row", "global"])
def test_matches_a_literal_transcription_on_small_matrices(prune: str) -> None:
    g = torch.Generator().manual_seed(5)
    deltas = [torch.randn(12, 10, generator=g), torch.randn(12, 10, generator=g)]
    moments = [torch.rand(10, generator=g, dtype=torch.float64) * 4 + 0.1 for _ in deltas]
    params = ScaleSvdParams(budget="matrix", sparsity=0.1, rank_ratio=0.75, iterations=10, prune=prune, alpha=1.5)
    merger = ScaleSvdMerger(params)
    job = MergeJob("t", "scale-svd", ("a", "b"), (0.6, 0.4), seed=0)
    merged = merger.merge_module_scaled(job, "m", deltas, [stats_of(s) for s in moments])
    expected = 1.5 * sum(w * literal_scale_svd(d.double().numpy(), s.numpy(), 0.1, 0.75, 10, prune == "row")
                         for d, s, w in zip(deltas, moments, job.weights))
    np.testing.assert_allclose(merged.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # and the scales matter: the uniform variant is another answer
    uniform = ScaleSvdMerger(params.model_copy(update={"scaling": "uniform"})).merge_module(job, "m", deltas)
    assert float((uniform - merged).abs().max()) > 1e-3


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 14), inn=st.integers(2, 14), rank=st.integers(1, 4), seed=st.integers(0, 2**16),
       sparsity=st.floats(0.0, 0.9), rank_ratio=st.floats(0.05, 1.0), prune=st.sampled_from(["row", "global"]),
       budget=st.sampled_from(["task-rank", "matrix"]))
def test_scaling_by_ones_is_the_uniform_variant_bit_for_bit(out, inn, rank, seed, sparsity, rank_ratio, prune,
                                                            budget) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(out, rank, generator=g) @ torch.randn(rank, inn, generator=g) for _ in range(2)]
    params = ScaleSvdParams(sparsity=sparsity, rank_ratio=rank_ratio, prune=prune, budget=budget, iterations=3)
    job = MergeJob("t", "scale-svd", ("a", "b"), (0.5, 0.5), seed=seed)
    ones = [stats_of(torch.ones(inn), count=7), stats_of(torch.ones(inn), count=3)]
    scaled = ScaleSvdMerger(params).merge_module_scaled(job, "m", deltas, ones)
    uniform = ScaleSvdMerger(params.model_copy(update={"scaling": "uniform"})).merge_module(job, "m", deltas)
    assert torch.equal(scaled, uniform)


def test_scaled_low_rank_is_best_in_the_activation_weighted_norm() -> None:
    # rank_ratio 1: no sparse part, L is the best rank-k approximation of W·diag(√s), so its error
    # weighted by √s is never larger than the uniform variant's (OATS's objective)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(20, 16, generator=g, dtype=torch.float64)
    s = torch.rand(16, generator=g, dtype=torch.float64) ** 4 * 10 + 1e-3
    params = ScaleSvdParams(budget="matrix", rank_ratio=1.0, sparsity=0.6)
    job = MergeJob("t", "scale-svd", ("a",), (1.0,), seed=0)
    scaled = ScaleSvdMerger(params).merge_module_scaled(job, "m", [w.float()], [stats_of(s)]).double()
    uniform = ScaleSvdMerger(params.model_copy(update={"scaling": "uniform"})).merge_module(job, "m",
                                                                                             [w.float()]).double()
    root = s.sqrt()
    weighted = lambda approx: float(torch.linalg.norm((w - approx) * root))  # noqa: E731
    assert weighted(scaled) < weighted(uniform)


def test_activation_scaling_without_statistics_is_an_error_not_a_fallback() -> None:
    merger = ScaleSvdMerger(ScaleSvdParams())
    assert merger.activation_methods == ("scale-svd",)
    job = MergeJob("t", "scale-svd", ("a",), (1.0,), seed=0)
    with pytest.raises(ValueError, match="scaling = 'activation' scales by input statistics, and m of t came without"):
        merger.merge_module(job, "m", [torch.ones(3, 4)])
    assert ScaleSvdMerger(ScaleSvdParams(scaling="uniform")).activation_methods == ()


def test_unexcited_features_are_floored_not_divided_by_zero() -> None:
    # the variance of a feature that is constant over the tokens is 0
    stats = InputStatistics(4, torch.tensor([4.0, 0.0, 8.0], dtype=torch.float64),
                            torch.tensor([4.0, 0.0, 20.0], dtype=torch.float64))
    d = feature_scales(stats, "variance")
    assert d[0] > 0 and d[1] > 0 and torch.isfinite(d).all()
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(5, 3, generator=g)
    merged = ScaleSvdMerger(ScaleSvdParams(statistic="variance")).merge_module_scaled(
        MergeJob("t", "scale-svd", ("a",), (1.0,), seed=0), "m", [delta], [stats])
    assert torch.isfinite(merged).all()
    with pytest.raises(ValueError, match="every input feature is zero"):
        feature_scales(InputStatistics(2, torch.zeros(3), torch.zeros(3)), "second-moment")
