"""CPU against CUDA for every stage with a ``device`` option (marked ``gpu``: skipped without CUDA).

Equal top-k sets and k-th values (except entries within float32 rounding of the k-th value, where
the two BLAS libraries' summation orders may order them differently); values to float32 rounding;
the float64 factored merges to 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_lora
from unmerge_plugins.lib.elementwise_merge import magnitude_statistics
from unmerge_plugins.maskers.topk import TopKMasker, TopKParams

from unmerge_core import LoraAdapter, LowRankDelta

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# 7B-like aspect ratios at a size a test can afford: a q_proj-like and a k_proj-like module
MODULES = {"model.layers.0.q": (1024, 1024), "model.layers.0.k": (256, 1024)}
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[LoraAdapter]:
    root = tmp_path_factory.mktemp("gpu")
    return [LoraAdapter(write_lora(root / f"a{i}", MODULES, rank=16, seed=i)) for i in range(4)]


def near_tie_only(reference: torch.Tensor, a: np.ndarray, b: np.ndarray, k: int) -> None:
    kth = float(torch.topk(reference.reshape(-1), k).values[-1])
    flat = reference.reshape(-1)
    for i in set(a.tolist()) ^ set(b.tolist()):
        assert abs(float(flat[i]) - kth) <= 1e-6 * abs(kth)


@pytest.mark.parametrize("aggregate", ["max", "mean", "l2"])
def test_masker_cuda_equals_cpu(adapters, aggregate) -> None:
    cpu = TopKMasker(TopKParams(budget=4000, aggregate=aggregate, device="cpu")).build_mask(adapters)
    gpu = TopKMasker(TopKParams(budget=4000, aggregate=aggregate, device="cuda")).build_mask(adapters)
    masker = TopKMasker(TopKParams(aggregate=aggregate))
    for module in MODULES:
        score = masker.aggregate(adapters, module)
        near_tie_only(score, cpu.indices[module], gpu.indices[module], len(cpu.indices[module]))
        torch.testing.assert_close(masker.aggregate_on(adapters, module, CUDA).cpu(), score, rtol=1e-5, atol=0)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_statistics_cuda_equal_cpu(adapters, density) -> None:
    for adapter in adapters:
        for module in MODULES:
            a, b = adapter.factors(module)
            gather = np.arange(0, a.shape[1] * b.shape[0], 997, dtype=np.int64)
            cpu = LowRankDelta(a, b, adapter.scale(module), gather=gather)
            gpu = LowRankDelta(a, b, adapter.scale(module), gather=gather)
            expected = magnitude_statistics(cpu, density)
            got = magnitude_statistics(gpu, density, CUDA)
            assert got["threshold"] == pytest.approx(expected["threshold"], rel=1e-6)
            if cpu.gathered is None:
                cpu.dense()
            np.testing.assert_allclose(gpu.gathered, cpu.gathered, rtol=1e-5)


def test_factored_merges_cuda_equal_cpu(adapters) -> None:
    from unmerge_plugins.mergers.iso_c import iso_c
    from unmerge_plugins.mergers.iso_cts import IsoCtsParams, iso_cts
    from unmerge_plugins.mergers.tsv_m import TsvMParams, tsv_m

    module = "model.layers.0.q"
    deltas = [LowRankDelta(*a.factors(module), a.scale(module)) for a in adapters]
    weights = [0.4, 0.3, 0.2, 0.1]
    idx = np.arange(0, 1024 * 1024, 101)
    for merge in (lambda d: tsv_m(deltas, weights, TsvMParams(), d),
                  lambda d: iso_c(deltas, weights, 1.0, d),
                  lambda d: iso_cts(deltas, weights, IsoCtsParams(), d)):
        cpu, gpu = merge(None).gather(idx), merge(CUDA).gather(idx)
        np.testing.assert_allclose(gpu, cpu, rtol=1e-9, atol=1e-12 * np.abs(cpu).max())
