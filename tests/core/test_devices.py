"""The ``device`` option (auto | cpu | cuda) of the heavy stages, on a machine with or without CUDA.

The GPU code paths (whole modules formed with one product on a device, ``torch.kthvalue``,
``torch.topk`` there, the factored SVD merges on device tensors) are run here on the CPU device and
compared with the CPU streaming paths; ``tests/plugins/test_gpu_paths.py`` (marked ``gpu``) makes
the same comparisons on CUDA when a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_lora
from unmerge_plugins.lib.elementwise_merge import magnitude_statistics
from unmerge_plugins.lib.selection import kth_largest_abs, kth_largest_abs_torch, topk_flat_indices
from unmerge_plugins.maskers.topk import TopKMasker, TopKParams
from unmerge_plugins.mergers.mergekit_merger import MergekitMerger, MergekitParams
from unmerge_plugins.mergers.tsv_m import TsvMParams

import unmerge_core.devices as devices
from unmerge_core import DeviceParams, LoraAdapter, LowRankDelta, resolve_device
from unmerge_core.cli import main

MODULES = {"model.layers.0.q": (48, 40), "model.layers.0.k": (16, 40), "model.layers.1.q": (48, 40)}


def test_resolve_device_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_auto_picks_cuda_when_present(monkeypatch) -> None:
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_and_cpu_keep_the_cache_keys_cuda_gets_its_own(monkeypatch) -> None:
    """The option is an execution choice on the CPU: configurations (cache keys) are those of before."""
    assert TopKParams().model_dump(mode="json") == {"budget": 99_904, "aggregate": "max"}
    assert TopKParams(device="cpu").model_dump(mode="json") == TopKParams().model_dump(mode="json")
    assert "device" not in MergekitParams().model_dump(mode="json")
    assert MergekitMerger(MergekitParams()).statistics_config() == {"kind": "magnitude-threshold", "density": 0.5}
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert TopKParams(device="cuda").model_dump(mode="json")["device"] == "cuda"
    assert MergekitMerger(MergekitParams(device="cuda")).statistics_config()["device"] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line_at_validation(write_manifest, capsys) -> None:
    path = write_manifest(**{'params = { budget = 300 }': 'params = { budget = 300, device = "cuda" }'})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "masker" in err[0] and "device" in err[0] and "sees no CUDA device" in err[0], err


def test_an_unknown_device_is_refused_with_the_choices(write_manifest, capsys) -> None:
    path = write_manifest(**{'plugin = "mergekit"': 'plugin = "mergekit"\nparams = { device = "gpu" }'})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device" in err[0] and "'auto'" in err[0] and "'cuda'" in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_attribute_device_cuda_without_cuda_is_one_line(tmp_path, capsys) -> None:
    for i, name in enumerate(("alpha", "beta")):
        write_lora(tmp_path / "dict" / name, MODULES, rank=4, seed=i)
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)
    code = main(["attribute", "--dictionary", str(tmp_path / "dict"), "--device", "cuda",
                 "--output-dir", str(tmp_path / "o"), str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "device" in err[0] and "sees no CUDA device" in err[0], err


def test_device_params_is_exported_for_third_party_plugins() -> None:
    class Params(DeviceParams):
        size: int = 3

    assert Params().torch_device() == resolve_device("auto")
    assert Params(device="cpu").model_dump() == {"size": 3}


# -- the device code paths, run on the CPU device -----------------------------------------------------


@pytest.fixture
def adapters(tmp_path) -> list[LoraAdapter]:
    return [LoraAdapter(write_lora(tmp_path / f"a{i}", MODULES, rank=4, seed=i)) for i in range(3)]


@pytest.mark.parametrize("aggregate", ["max", "mean", "l2"])
def test_masker_device_path_equals_the_streamed_one(adapters, aggregate) -> None:
    masker = TopKMasker(TopKParams(budget=60, aggregate=aggregate))
    for module in MODULES:
        streamed = masker.aggregate(adapters, module).clone()
        on_device = masker.aggregate_on(adapters, module, torch.device("cpu"))
        torch.testing.assert_close(on_device, streamed, rtol=1e-6, atol=0)
        k = 20
        assert_same_top_k(streamed, on_device, k)


def assert_same_top_k(reference: torch.Tensor, other: torch.Tensor, k: int) -> None:
    """Equal top-k sets, except entries within float32 rounding of the k-th value (near-ties)."""
    ref_idx, other_idx = set(topk_flat_indices(reference, k)), set(topk_flat_indices(other, k))
    kth = float(torch.topk(reference.reshape(-1), k).values[-1])
    flat = reference.reshape(-1)
    for i in ref_idx ^ other_idx:
        assert abs(float(flat[i]) - kth) <= 1e-6 * abs(kth), (i, float(flat[i]), kth)


def test_masker_device_cpu_builds_the_default_mask(adapters) -> None:
    default = TopKMasker(TopKParams(budget=60)).build_mask(adapters)
    explicit = TopKMasker(TopKParams(budget=60, device="cpu")).build_mask(adapters)
    for module in MODULES:
        assert np.array_equal(default.indices[module], explicit.indices[module])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_statistics_device_path_equals_the_streamed_one(adapters, density) -> None:
    for adapter in adapters:
        for module in MODULES:
            a, b = adapter.factors(module)
            gather = np.array([0, 5, 77, 300], dtype=np.int64)
            cpu = LowRankDelta(a, b, adapter.scale(module), gather=gather)
            dev = LowRankDelta(a, b, adapter.scale(module), gather=gather)
            expected = magnitude_statistics(cpu, density)
            got = magnitude_statistics(dev, density, torch.device("cpu"))
            assert got["keep"] == expected["keep"] and got["numel"] == expected["numel"]
            assert got["threshold"] == pytest.approx(expected["threshold"], rel=1e-6)
            if cpu.gathered is None:
                cpu.dense()
            np.testing.assert_allclose(dev.gathered, cpu.gathered, rtol=1e-6)


def test_kth_largest_abs_torch_is_exact() -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal(10_001).astype(np.float32)
    values[:50] = 0.25  # ties
    for k in (1, 17, 5_000, 10_001):
        assert kth_largest_abs_torch(torch.from_numpy(values), k) == kth_largest_abs(values, k)
    with pytest.raises(ValueError, match="outside"):
        kth_largest_abs_torch(torch.from_numpy(values), 0)


def test_factored_merges_take_a_device(adapters) -> None:
    from unmerge_plugins.mergers.iso_c import iso_c
    from unmerge_plugins.mergers.iso_cts import IsoCtsParams, iso_cts
    from unmerge_plugins.mergers.tsv_m import tsv_m

    module = "model.layers.0.q"
    deltas = [LowRankDelta(*a.factors(module), a.scale(module)) for a in adapters]
    idx = np.arange(0, 48 * 40, 7)
    cpu = torch.device("cpu")
    for merge in (lambda d: tsv_m(deltas, [0.5, 0.3, 0.2], TsvMParams(), d),
                  lambda d: iso_c(deltas, [0.5, 0.3, 0.2], 1.0, d),
                  lambda d: iso_cts(deltas, [0.5, 0.3, 0.2], IsoCtsParams(), d)):
        np.testing.assert_array_equal(merge(cpu).gather(idx), merge(None).gather(idx))
