"""The seed framework's merge methods: TSV-M, Iso-C, Iso-CTS (factored == dense, the papers'
definitions), TALL consensus (element-wise, exact on the mask) and Scale-SVD (OATS budget)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from unmerge_plugins.lib.spectral_merge import dense
from unmerge_plugins.mergers.iso_c import IsoCMerger, IsoCParams, iso_c
from unmerge_plugins.mergers.iso_cts import IsoCtsMerger, IsoCtsParams, iso_cts, subspace_sizes
from unmerge_plugins.mergers.scale_svd import ScaleSvdMerger, ScaleSvdParams, budget_sizes, scale_svd
from unmerge_plugins.mergers.tall_consensus import TallConsensusMerger, TallConsensusParams, tall_consensus
from unmerge_plugins.mergers.tsv_m import TsvMerger, TsvMParams, tsv_m

from unmerge_core import LowRankDelta, MergeJob

DT = torch.float64


def loras(shape: tuple[int, int], ranks: tuple[int, ...], seed: int, zero: tuple[int, ...] = ()) -> list[LowRankDelta]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, r in enumerate(ranks):
        a = torch.randn(r, shape[1], generator=g) / shape[1] ** 0.5
        b = torch.randn(shape[0], r, generator=g) * (0.5 + t)
        out.append(LowRankDelta(a, torch.zeros_like(b) if t in zero else b, 2.0 / r))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


SPECTRAL = {
    "tsv-m": lambda ts, w: tsv_m(ts, w, TsvMParams(alpha=0.7)),
    "tsv-m-rank2": lambda ts, w: tsv_m(ts, w, TsvMParams(rank=2)),
    "iso-c": lambda ts, w: iso_c(ts, w, 1.3),
    "iso-cts": lambda ts, w: iso_cts(ts, w, IsoCtsParams(alpha=1.1)),
    "iso-cts-half": lambda ts, w: iso_cts(ts, w, IsoCtsParams(common_fraction=0.5)),
}
CASES = [((48, 40), ranks, seed) for seed, ranks in enumerate([(2, 3), (4, 4, 4), (6, 2, 5, 3), (2, 3, 4, 5, 6)])]
CASES += [((40, 48), (3, 5, 4), 11), ((48, 40), (6,), 12), ((20, 16), (6, 6, 6, 6, 6), 21)]  # T·r > min(out, in)


@pytest.mark.parametrize("method", sorted(SPECTRAL))
@pytest.mark.parametrize("case", CASES, ids=[f"{s[0]}x{s[1]}-r{''.join(map(str, r))}" for s, r, _ in CASES])
def test_factored_equals_dense(method, case) -> None:
    shape, ranks, seed = case
    tasks = loras(shape, ranks, seed)
    weights = list(np.random.default_rng(seed).uniform(0.2, 1.0, len(tasks)))
    factored = SPECTRAL[method](tasks, weights)
    reference = SPECTRAL[method]([dense(t) for t in tasks], weights).dense()
    assert factored.shape == shape
    assert rel(factored.dense(), reference) <= 1e-9
    idx = np.random.default_rng(0).choice(shape[0] * shape[1], size=200, replace=False)
    assert rel(torch.from_numpy(factored.gather(idx)), reference.flatten()[idx]) <= 1e-9


@pytest.mark.parametrize("method", sorted(SPECTRAL))
def test_zero_constituents(method) -> None:
    tasks = loras((48, 40), (4, 3, 5), 31, zero=(1,))
    factored = SPECTRAL[method](tasks, [1 / 3] * 3)
    assert rel(factored.dense(), SPECTRAL[method]([dense(t) for t in tasks], [1 / 3] * 3).dense()) <= 1e-9
    assert float(SPECTRAL[method](loras((12, 10), (2, 3), 41, zero=(0, 1)), [0.5, 0.5]).dense().abs().max()) == 0


@pytest.mark.parametrize("method", sorted(SPECTRAL))
def test_a_tiny_constituent_keeps_its_directions(method) -> None:
    # one adapter a million times smaller than the others: the factored route once dropped its
    # directions as round-off of the stacked Gram matrices; the dense route keeps them
    tasks = loras((48, 40), (4, 3, 5), 33)
    tasks[1] = LowRankDelta(tasks[1].a, tasks[1].b * 1e-7, tasks[1].scale)
    factored = SPECTRAL[method](tasks, [1 / 3] * 3).dense()
    reference = SPECTRAL[method]([dense(t) for t in tasks], [1 / 3] * 3).dense()
    assert rel(factored, reference) <= 1e-9
    if method.startswith("tsv-m"):  # TSV-M keeps each task's own top directions: the tiny one's are there
        u1 = torch.linalg.svd(dense(tasks[1]))[0][:, :1]
        assert float(torch.linalg.norm(u1.T @ factored)) > 1e-9 * float(torch.linalg.norm(factored))


def test_single_task_identities_and_isotropy() -> None:
    (t,) = loras((48, 40), (5,), 51)
    d = dense(t)
    assert rel(tsv_m([t], [1.0], TsvMParams(alpha=0.5)).dense(), 0.5 * d) <= 1e-10  # one task: α τ
    u, s, vh = torch.linalg.svd(d)
    assert rel(iso_c([t], [1.0], 1.0).dense(), s[:5].mean() * u[:, :5] @ vh[:5]) <= 1e-10
    tasks = loras((48, 40), (3, 4, 5), 61)
    for f in (iso_c(tasks, [1.0] * 3, 1.0), iso_cts(tasks, [1.0] * 3, IsoCtsParams()), tsv_m(tasks, [1.0] * 3, TsvMParams())):
        k = f.S.numel()
        u, v = f.frame.left @ f.coef_left, f.frame.right.T @ f.coef_right  # the factored singular vectors
        assert torch.allclose(u.T @ u, torch.eye(k, dtype=DT), atol=1e-10)
        assert torch.allclose(v.T @ v, torch.eye(k, dtype=DT), atol=1e-10)
    spectrum = torch.linalg.svdvals(iso_cts(tasks, [1.0] * 3, IsoCtsParams(alpha=2.0)).dense())
    assert torch.allclose(spectrum[:12], spectrum[0].expand(12), rtol=1e-9) and float(spectrum[12:].max()) < 1e-9


# -- the papers' algorithms written out literally, on full-rank dense task vectors (r = min(out, in)) --
def paper_tsv_m(taus: list[torch.Tensor], alpha: float) -> torch.Tensor:
    k = int(min(taus[0].shape) / len(taus))
    parts = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    u = torch.cat([p[0][:, :k] for p in parts], 1)
    s = torch.cat([p[1][:k] for p in parts])
    vh = torch.cat([p[2][:k] for p in parts], 0)
    a, _, b = torch.linalg.svd(u, full_matrices=False)
    c, _, d = torch.linalg.svd(vh, full_matrices=False)
    return alpha * (a @ b) @ torch.diag(s) @ (c @ d)


def paper_iso_c(taus: list[torch.Tensor], alpha: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return alpha * s.mean() * u @ vh


def paper_iso_cts(taus: list[torch.Tensor], alpha: float, f: float) -> torch.Tensor:
    r, n_tasks = min(taus[0].shape), len(taus)
    c = r - round((r - int(r * f)) / n_tasks) * n_tasks
    n = int((r - c) / n_tasks)
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [], [], []
    for t in taus:
        a, b, e = torch.linalg.svd(t - u[:, :c] @ u[:, :c].T @ t, full_matrices=False)
        us.append(a[:, :n])
        ss.append(b[:n])
        vs.append(e[:n])
    big_u, big_s, big_vh = torch.cat(us + [u[:, :c]], 1), torch.cat(ss + [s[:c]]), torch.cat(vs + [vh[:c]], 0)
    a, _, b = torch.linalg.svd(big_u, full_matrices=False)
    e, _, g = torch.linalg.svd(big_vh, full_matrices=False)
    return alpha * big_s.mean() * (a @ b) @ (e @ g)


@pytest.mark.parametrize("n_tasks", [2, 3, 4])
def test_equal_to_the_papers_on_full_rank_task_vectors(n_tasks) -> None:
    g = torch.Generator().manual_seed(n_tasks)
    taus = [torch.randn(48, 40, generator=g, dtype=DT) * (1 + t) for t in range(n_tasks)]
    ones = [1.0] * n_tasks
    assert rel(tsv_m(taus, ones, TsvMParams(alpha=0.9)).dense(), paper_tsv_m(taus, 0.9)) <= 1e-9
    assert rel(iso_c(taus, ones, 1.2).dense(), paper_iso_c(taus, 1.2)) <= 1e-9
    assert rel(iso_cts(taus, ones, IsoCtsParams(alpha=1.2)).dense(), paper_iso_cts(taus, 1.2, 0.8)) <= 1e-9


def test_iso_c_of_a_lowrank_sum_keeps_its_rank() -> None:
    """The published code averages σ over min(out, in) values and fills the null space arbitrarily
    (full rank); the plugin averages over the sum's rank R and stays in its span (documented)."""
    tasks = loras((48, 40), (3, 4), 71)
    assert int(torch.linalg.matrix_rank(iso_c(tasks, [1.0, 1.0], 1.0).dense())) == 7
    assert int(torch.linalg.matrix_rank(paper_iso_c([dense(t) for t in tasks], 1.0))) == 40


def test_subspace_sizes_add_up() -> None:
    for rank, n_tasks, f in itertools.product(range(1, 40), range(1, 6), (0.0, 0.3, 0.5, 0.8, 1.0)):
        c, n = subspace_sizes(rank, n_tasks, f)
        assert c >= 0 and n >= 0 and c + n * n_tasks == rank
    assert subspace_sizes(40, 4, 0.8) == (32, 2)


@pytest.mark.parametrize("merger", [TsvMerger(TsvMParams()), IsoCMerger(IsoCParams()), IsoCtsMerger(IsoCtsParams())])
def test_lowrank_route_equals_dense_route_of_the_plugin(merger) -> None:
    tasks = loras((24, 20), (3, 2, 4), 5)
    job = MergeJob("t", merger.methods[0], ("a", "b", "c"), (0.5, 0.3, 0.2), seed=0)
    idx = np.arange(0, 24 * 20, 7)
    fast = merger.merge_lowrank(job, "m", tasks, idx)
    slow = merger.merge_module(job, "m", [dense(t).float() for t in tasks]).reshape(-1)[idx].double().numpy()
    assert np.allclose(fast, slow, rtol=1e-5, atol=1e-7 * np.abs(slow).max())


# -- TALL consensus ------------------------------------------------------------------------------------
def test_tall_hand_example() -> None:
    t1, t2, t3 = torch.tensor([1.0, 0.1, -1.0]), torch.tensor([1.0, -2.0, 1.0]), torch.tensor([0.0, 0.0, 0.05])
    # τ_MTL = [2, −1.9, 0.05]; λ = 1: masks [1,0,0], [1,1,1], [0,0,1]; counts [2, 1, 2]
    out = tall_consensus([t1, t2, t3], [1.0] * 3, TallConsensusParams(lam=1.0, k=2))
    assert out.tolist() == pytest.approx([2.0, 0.0, 0.05])


def test_tall_masked_route_is_exact_and_limits_hold() -> None:
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(30, 20, generator=g) * (t + 1) for t in range(4)]
    weights = (0.25,) * 4
    merger = TallConsensusMerger(TallConsensusParams())
    job = MergeJob("t", "tall-consensus", ("a", "b", "c", "d"), weights, seed=0)
    full = merger.merge_module(job, "m", taus)
    idx = np.sort(np.random.default_rng(1).choice(600, 50, replace=False))
    masked = merger.merge_masked(job, "m", idx, [t.reshape(-1).double().numpy()[idx] for t in taus], [None] * 4)
    assert np.allclose(masked, full.reshape(-1).double().numpy()[idx], rtol=1e-6, atol=1e-7)
    assert float(tall_consensus(taus, weights, TallConsensusParams(k=5)).abs().max()) == 0.0
    assert merger.method_tasks("tall-consensus") == (2, None)


# -- Scale-SVD -----------------------------------------------------------------------------------------
def test_scale_svd_matrix_budget_is_the_identity_on_lora() -> None:
    (t,) = loras((48, 40), (4,), 81)
    d = dense(t)
    assert rel(scale_svd(d, ScaleSvdParams(budget="matrix")), d) < 1e-9


@pytest.mark.parametrize("prune", ["row", "global"])
def test_scale_svd_task_rank_budget_compresses(prune) -> None:
    g = torch.Generator().manual_seed(3)
    low_rank = (torch.randn(48, 8, generator=g) @ torch.randn(8, 40, generator=g)).double()
    params = ScaleSvdParams(sparsity=0.3, rank_ratio=0.6, prune=prune, scaling="uniform")
    k, pruned = budget_sizes((48, 40), params, 8)
    assert k == int(0.6 * 0.7 * 8) and 0 < pruned < 1
    out = scale_svd(low_rank, params)
    assert float(torch.linalg.norm(out - low_rank) / torch.linalg.norm(low_rank)) < 0.5  # an approximation...
    assert rel(out, low_rank) > 1e-6  # ...not the identity
    u, s, vh = torch.linalg.svd(low_rank)
    err_k = torch.linalg.norm(low_rank - (u[:, :k] * s[:k]) @ vh[:k])
    assert torch.linalg.norm(low_rank - out) <= err_k + 1e-12  # never worse than the rank-k truncation
    merger = ScaleSvdMerger(params)
    merged = merger.merge_module(MergeJob("t", "scale-svd", ("a", "b"), (0.5, 0.25), 0), "m",
                                 [low_rank.float(), 2 * low_rank.float()])
    assert rel(merged.double(), 0.5 * out + 0.25 * scale_svd(2 * low_rank.float(), params)) < 1e-5


def test_scale_svd_randomized_is_reproducible_and_leaves_the_global_generator_alone() -> None:
    g = torch.Generator().manual_seed(4)
    deltas = [(torch.randn(48, 8, generator=g) @ torch.randn(8, 40, generator=g)) for _ in range(2)]
    merger = ScaleSvdMerger(ScaleSvdParams(svd="randomized", sparsity=0.3, rank_ratio=0.5, scaling="uniform"))
    job = MergeJob("t", "scale-svd", ("a", "b"), (0.5, 0.5), seed=11)
    torch.manual_seed(0)
    first = merger.merge_module(job, "m", deltas)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    second = merger.merge_module(job, "m", deltas)
    torch.manual_seed(0)
    assert torch.equal(first, second)  # the same target whatever the caller's generator state
    assert torch.equal(torch.rand(3), after_first)  # and the caller's generator is not advanced

