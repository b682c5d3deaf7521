"""Exact order statistics: the bracketed k-th value and the row-max top-k equal a full sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unmerge_plugins.lib.selection as selection
from unmerge_plugins.lib.selection import kth_largest_abs, magnitude_keep_count, topk_flat_indices


def low_rank(rows: int, cols: int, seed: int = 0, rank: int = 8) -> torch.Tensor:
    """A LoRA-like ``B · A`` matrix."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)


def reference_kth(values: torch.Tensor, k: int) -> float:
    a = np.abs(values.numpy().reshape(-1))
    return float(np.partition(a, a.size - k)[a.size - k])


@pytest.mark.parametrize("shape", [(7, 9), (300, 200), (1200, 1000)])  # the last one takes the bracketed path
def test_kth_largest_abs_is_exact(shape: tuple[int, int]) -> None:
    x = low_rank(*shape, seed=sum(shape))
    n = x.numel()
    for k in sorted({1, 2, n // 3, n // 2, n // 2 + 1, n - 1, n}):
        assert kth_largest_abs(x, k) == reference_kth(x, k), k


def test_bracket_miss_falls_back_to_the_exact_answer(monkeypatch) -> None:
    x = low_rank(1100, 1000, seed=3)
    expected = reference_kth(x, x.numel() // 2)
    calls = []

    def wrong_bracket(sample_abs, rank, numel, sigmas=6.0):
        calls.append(sigmas)
        return 1e9, 2e9  # nothing inside: the counts show the miss

    monkeypatch.setattr(selection, "_bracket", wrong_bracket)
    assert kth_largest_abs(x, x.numel() // 2) == expected
    assert calls == [6.0, 24.0], "the bracketed path and its wider second pass were not taken"


def test_a_narrow_miss_is_recovered_by_the_wider_second_pass(monkeypatch) -> None:
    """A first bracket just beside the answer (what a correlated sample gives): the second, wider
    pass finds it without the full partition."""
    x = low_rank(1100, 1000, seed=4)
    k = x.numel() // 2
    expected = reference_kth(x, k)
    real = selection._bracket
    partitioned: list[int] = []

    def beside(sample_abs, rank, numel, sigmas=6.0):
        lo, hi = real(sample_abs, rank, numel, sigmas)
        return (expected * 1.0001, expected * 1.001) if sigmas == 6.0 else (lo, hi)

    real_partition = np.partition

    def counting_partition(a, kth, *args, **kwargs):
        partitioned.append(np.asarray(a).size)
        return real_partition(a, kth, *args, **kwargs)

    monkeypatch.setattr(selection, "_bracket", beside)
    monkeypatch.setattr(selection.np, "partition", counting_partition)
    assert kth_largest_abs(x, k) == expected
    assert partitioned and max(partitioned) < x.numel() // 4, partitioned  # never the whole module


def test_ties_and_zeros() -> None:
    z = torch.zeros(1200, 1000)
    z[0, :10] = torch.arange(1.0, 11.0)
    assert kth_largest_abs(z, 1) == 10.0
    assert kth_largest_abs(z, 10) == 1.0
    assert kth_largest_abs(z, 11) == 0.0  # the rest are tied zeros
    with pytest.raises(ValueError):
        kth_largest_abs(z, 0)


def test_keep_count_matches_mergekit_magnitude() -> None:
    from mergekit.sparsify import magnitude

    g = torch.Generator().manual_seed(0)
    for numel, density in [(1000, 0.5), (999, 0.5), (37, 0.3), (10, 0.01), (12, 1.0), (7, 0.7)]:
        x = torch.randn(numel, generator=g)
        kept = int((magnitude(x, density) != 0).sum())
        assert magnitude_keep_count(density, numel) == kept, (numel, density)


@pytest.mark.parametrize("shape,k", [((40, 30), 25), ((2000, 700), 500), ((2000, 700), 3000), ((5, 4), 100)])
def test_topk_flat_indices_equals_torch_topk(shape: tuple[int, int], k: int) -> None:
    score = low_rank(*shape, seed=k).abs()
    expected = np.sort(torch.topk(score.reshape(-1), min(k, score.numel())).indices.numpy())
    got = topk_flat_indices(score, k)
    assert got.dtype == np.int64
    assert np.array_equal(got, expected)


def test_nan_scores_are_refused_not_ranked() -> None:
    """torch.topk ranks NaN first and no comparison with NaN holds: the top k came out empty."""
    from unmerge_plugins.lib.selection import top_k_positions

    scores = torch.arange(20, dtype=torch.float32)
    scores[7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        top_k_positions(scores, 5)
    with pytest.raises(ValueError, match="NaN"):
        topk_flat_indices(scores.reshape(4, 5), 3)
