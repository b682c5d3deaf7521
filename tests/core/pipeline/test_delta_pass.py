"""The shared pass over the dictionary's ΔW: the masker's mask and the merge statistics from one
formation per module, bit for bit what the two stages give on their own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import write_lora
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unmerge_plugins.maskers.topk import TopKMasker, TopKParams
from unmerge_plugins.mergers.mergekit_merger import MergekitMerger, MergekitParams

from unmerge_core import LoraAdapter, PluginError
from unmerge_core.config.manifest import load_manifest
from unmerge_core.pipeline.delta_pass import StatisticsRequest, shared_pass
from unmerge_core.pipeline.merging import compute_statistics
from unmerge_core.pipeline.runner import Runner
from unmerge_core.types import FoldingMasker, StreamingStatisticsMerger

# more rows than one 64-row block, a module of exactly one block, an odd one, a tiny one
MODULES = {"model.layers.0.q": (200, 96), "model.layers.0.k": (64, 96), "model.layers.1.q": (130, 50),
           "model.layers.1.k": (3, 5)}


def dictionary(tmp_path, n: int = 4, modules=MODULES, rank: int = 4) -> list[LoraAdapter]:
    return [LoraAdapter(write_lora(tmp_path / f"a{i}", modules, rank=rank, seed=i), f"a{i}") for i in range(n)]


def reference_indices(masker: TopKMasker, adapters, module: str) -> np.ndarray:
    """The mask of one module the direct way: the whole aggregate, then the exact top k."""
    from unmerge_plugins.lib.selection import topk_flat_indices

    plan = masker.fold_plan(adapters)
    score = masker.aggregate(adapters, module).clone()
    return topk_flat_indices(score, min(plan.per_module, score.numel()))


def test_builtins_implement_the_shared_pass() -> None:
    assert isinstance(TopKMasker(TopKParams()), FoldingMasker)
    assert isinstance(MergekitMerger(MergekitParams()), StreamingStatisticsMerger)


@pytest.mark.parametrize("aggregate", ["max", "mean", "l2"])
@pytest.mark.parametrize("budget", [8, 200, 10_000])
def test_shared_mask_equals_build_mask(tmp_path, aggregate, budget) -> None:
    adapters = dictionary(tmp_path)
    masker = TopKMasker(TopKParams(budget=budget, aggregate=aggregate))
    expected = masker.build_mask(adapters)
    got = shared_pass(masker, "topk", adapters, []).mask
    assert list(got.indices) == list(expected.indices) and dict(got.shapes) == dict(expected.shapes)
    for module in expected.indices:
        np.testing.assert_array_equal(got.indices[module], expected.indices[module])
        np.testing.assert_array_equal(expected.indices[module], reference_indices(masker, adapters, module))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 300), cols=st.integers(1, 80), rank=st.integers(1, 6), n=st.integers(1, 5),
       budget=st.integers(2, 3000), seed=st.integers(0, 10_000), aggregate=st.sampled_from(["max", "mean", "l2"]))
def test_shared_mask_equals_build_mask_on_any_shape(tmp_path_factory, rows, cols, rank, n, budget, seed,
                                                     aggregate) -> None:
    root = tmp_path_factory.mktemp("shapes")
    modules = {"model.layers.0.q": (rows, cols), "model.layers.0.k": (max(1, rows // 3), cols)}
    adapters = [LoraAdapter(write_lora(root / f"a{i}", modules, rank=rank, seed=seed + i), f"a{i}") for i in range(n)]
    masker = TopKMasker(TopKParams(budget=budget, aggregate=aggregate))
    expected = masker.build_mask(adapters)
    got = shared_pass(masker, "topk", adapters, []).mask
    for module in modules:
        np.testing.assert_array_equal(got.indices[module], expected.indices[module])
        np.testing.assert_array_equal(expected.indices[module], reference_indices(masker, adapters, module))


@pytest.mark.parametrize("density", [0.05, 0.5, 0.97, 1.0])
def test_shared_statistics_equal_the_statistics_stage(tmp_path, density) -> None:
    adapters = dictionary(tmp_path)
    masker = TopKMasker(TopKParams(budget=300))
    merger = MergekitMerger(MergekitParams(density=density))
    requests = [StatisticsRequest(i, merger, "mergekit") for i in (0, 2, 3)]
    result = shared_pass(masker, "topk", adapters, requests)
    for request, shared in zip(requests, result.statistics):
        stats, values = compute_statistics(merger, adapters[request.adapter], result.mask)
        assert shared is not None
        assert json.dumps(shared[0]) == json.dumps(stats)  # same modules, same order, same floats
        assert shared[1].dtype == values.dtype and np.array_equal(shared[1], values)


def test_a_merger_that_declines_to_stream_is_left_to_the_statistics_stage(tmp_path, monkeypatch) -> None:
    adapters = dictionary(tmp_path, n=2)
    merger = MergekitMerger(MergekitParams())
    monkeypatch.setattr(merger, "statistics_stream", lambda delta, module: None)
    result = shared_pass(TopKMasker(TopKParams(budget=100)), "topk", adapters, [StatisticsRequest(0, merger, "m")])
    assert result.statistics == [None]


def test_a_masker_that_declines_gives_no_shared_pass(tmp_path, monkeypatch) -> None:
    masker = TopKMasker(TopKParams(budget=100))
    monkeypatch.setattr(masker, "fold_plan", lambda adapters: None)
    assert shared_pass(masker, "topk", dictionary(tmp_path, n=2), []) is None


def wrapped_plan(plan, wrapper):
    """``plan`` with every fold wrapped in ``wrapper``."""

    class Plan:
        modules = plan.modules

        def fold(self, module, pool):
            return wrapper(plan.fold(module, pool))

    return Plan()


class _Liar:
    """A fold that selects a coordinate it never offered."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def add(self, adapter, start, block) -> None:
        self.inner.add(adapter, start, block)

    def candidates(self, start, stop):
        return self.inner.candidates(start, stop)[:1]

    def select(self):
        return self.inner.select()


def test_a_fold_that_selects_what_it_never_offered_is_one_line(tmp_path, monkeypatch) -> None:
    masker = TopKMasker(TopKParams(budget=100))
    monkeypatch.setattr(masker, "fold_plan", lambda adapters: wrapped_plan(TopKMasker.fold_plan(masker, adapters), _Liar))
    with pytest.raises(PluginError) as info:
        shared_pass(masker, "topk", dictionary(tmp_path, n=2), [])
    assert "masker plugin 'topk'" in str(info.value) and "never offered" in str(info.value)
    assert "\n" not in str(info.value)


def test_candidates_outside_their_rows_are_refused(tmp_path, monkeypatch) -> None:
    masker = TopKMasker(TopKParams(budget=100))

    class Outside(_Liar):
        def candidates(self, start, stop):
            return self.inner.candidates(start, stop) + 10**9

    monkeypatch.setattr(masker, "fold_plan", lambda adapters: wrapped_plan(TopKMasker.fold_plan(masker, adapters), Outside))
    with pytest.raises(PluginError, match="outside those rows"):
        shared_pass(masker, "topk", dictionary(tmp_path, n=2), [])


TIES_MANIFEST_EDIT = {"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["ties", "linear"]',
                      '"layers.1.q" = [24, 32]': '"layers.1.q" = [150, 32]'}


def run_files(write_manifest, workdir, name: str) -> tuple[Runner, dict[str, bytes]]:
    path = write_manifest(name=f"{name}.toml", **TIES_MANIFEST_EDIT,
                          **{'name = "synthetic-test"': f'name = "{name}"'})
    runner = Runner(load_manifest(path), progress=False, echo=lambda s: None)
    runner.run()
    cache = runner.store.root / "cache"
    files = {str(p.relative_to(cache)): p.read_bytes() for kind in ("masks", "merge-stats", "targets")
             for p in sorted((cache / kind).rglob("*")) if p.is_file() and p.name != "DONE"}
    files["summary.csv"] = (runner.run_dir / "summary.csv").read_bytes()
    return runner, files


def test_a_run_with_the_shared_pass_equals_one_without(write_manifest, workdir, monkeypatch) -> None:
    shared_runner, shared = run_files(write_manifest, workdir, "shared")
    stats_stage = next(t for t in shared_runner.timings if t.stage == "merge-statistics")
    dictionary_tasks = len(shared_runner.m.atoms)
    assert stats_stage.reused >= 1 and stats_stage.reused <= dictionary_tasks
    monkeypatch.delattr(MergekitMerger, "statistics_stream")
    assert not isinstance(MergekitMerger(MergekitParams()), StreamingStatisticsMerger)
    separate_runner, separate = run_files(write_manifest, workdir, "separate")
    assert next(t for t in separate_runner.timings if t.stage == "merge-statistics").reused == 0
    assert shared.keys() == separate.keys() and len(shared) > 10
    for name in shared:
        assert shared[name] == separate[name], name


# -- found by a hostile review: ties, thread-dependent bits, all-equal modules, retained buffers ------


def tied_adapter(directory, rows: int = 96, cols: int = 10):
    """A rank-1 adapter whose |ΔW| takes two values only: ties everywhere, at the k-th value too."""
    import json

    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    b = torch.tensor([[1.0 + (i % 2)] for i in range(rows)])
    save_file({"base_model.model.model.layers.0.q.lora_A.weight": torch.ones(1, cols),
               "base_model.model.model.layers.0.q.lora_B.weight": b}, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                               "target_modules": ["q"]}))
    return LoraAdapter(directory, directory.name)


@pytest.mark.parametrize("budget", [1, 50, 479, 480, 481, 959])
def test_ties_are_broken_the_same_way_by_both_routes(tmp_path, budget) -> None:
    """torch.topk breaks ties by the array it is given: the same scores gave two masks."""
    adapters = [tied_adapter(tmp_path / "a")]
    masker = TopKMasker(TopKParams(budget=budget))
    expected = masker.build_mask(adapters).indices["model.layers.0.q"]
    got = shared_pass(masker, "topk", adapters, []).mask.indices["model.layers.0.q"]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(expected, reference_indices(masker, adapters, "model.layers.0.q"))
    score = np.abs(np.repeat([[1.0 + (i % 2)] for i in range(96)], 10, axis=1)).reshape(-1)
    kth = np.sort(score)[::-1][len(expected) - 1]
    tied = np.flatnonzero(score == kth)
    assert set(np.flatnonzero(score > kth)) <= set(expected)
    np.testing.assert_array_equal(np.intersect1d(expected, tied), tied[: len(np.intersect1d(expected, tied))])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0]), min_size=6, max_size=6),
       rows=st.integers(1, 150), budget=st.integers(1, 400), n=st.integers(1, 3))
def test_discrete_factors_give_one_mask(tmp_path_factory, values, rows, budget, n) -> None:
    import json

    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("discrete")
    adapters = []
    for i in range(n):
        d = root / f"a{i}"
        d.mkdir()
        a = torch.tensor([values[:3]]) * (i + 1)
        b = torch.tensor([[values[3 + (r % 3)]] for r in range(rows)])
        save_file({"base_model.model.model.layers.0.q.lora_A.weight": a,
                   "base_model.model.model.layers.0.q.lora_B.weight": b}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                           "target_modules": ["q"]}))
        adapters.append(LoraAdapter(d, d.name))
    for aggregate in ("max", "mean", "l2"):
        masker = TopKMasker(TopKParams(budget=budget, aggregate=aggregate))
        expected = reference_indices(masker, adapters, "model.layers.0.q")
        np.testing.assert_array_equal(shared_pass(masker, "topk", adapters, []).mask.indices["model.layers.0.q"],
                                      expected)
        np.testing.assert_array_equal(masker.build_mask(adapters).indices["model.layers.0.q"], expected)


def test_the_bits_do_not_depend_on_the_number_of_workers(tmp_path) -> None:
    """Small row blocks (7 rows) were formed with different float32 bits in worker threads (BLAS
    split them over OpenMP threads there, not in the main thread)."""
    modules = {"model.layers.0.q": (150, 70), "model.layers.0.k": (7, 70), "model.layers.1.q": (64, 9)}
    adapters = [LoraAdapter(write_lora(tmp_path / f"a{i}", modules, rank=r, seed=i), f"a{i}")
                for i, r in enumerate((2, 5))]
    masker, merger = TopKMasker(TopKParams(budget=100)), MergekitMerger(MergekitParams())
    results = [shared_pass(masker, "topk", adapters, [StatisticsRequest(1, merger, "mergekit")], workers=w)
               for w in (1, 2)]
    separate = [compute_statistics(merger, adapters[1], results[0].mask, workers=w) for w in (1, 2)]
    for stats, values in [r.statistics[0] for r in results] + separate:
        assert json.dumps(stats) == json.dumps(separate[0][0])
        assert np.array_equal(values, separate[0][1])


def test_a_module_of_equal_values_keeps_k_candidates(tmp_path, monkeypatch) -> None:
    """An untrained adapter (B = 0: PEFT's initialisation) ties every entry: every entry used to stay a
    candidate and be re-selected at every block (quadratic time and memory)."""
    import json as _json

    import torch
    from safetensors.torch import save_file

    adapters = []
    for i in range(2):
        d = tmp_path / f"z{i}"
        d.mkdir()
        save_file({"base_model.model.model.layers.0.q.lora_A.weight": torch.randn(4, 512),
                   "base_model.model.model.layers.0.q.lora_B.weight": torch.zeros(1024, 4)},
                  str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(_json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q"]}))
        adapters.append(LoraAdapter(d, d.name))
    masker = TopKMasker(TopKParams(budget=100))
    offered = []

    class Counting(_Liar):
        def candidates(self, start, stop):
            out = self.inner.candidates(start, stop)
            offered.append(len(out))
            return out

    monkeypatch.setattr(masker, "fold_plan", lambda a: wrapped_plan(TopKMasker.fold_plan(masker, a), Counting))
    merger = MergekitMerger(MergekitParams())
    result = shared_pass(masker, "topk", adapters, [StatisticsRequest(0, merger, "m")])
    np.testing.assert_array_equal(result.mask.indices["model.layers.0.q"], np.arange(100))
    assert sum(offered) == 100, offered  # the first rows' own top 100, then nothing above the bound
    assert result.statistics[0][0]["model.layers.0.q"]["threshold"] == 0.0


def test_the_pass_frees_its_buffers(tmp_path, monkeypatch) -> None:
    """The masker object lives for the whole process: buffers it kept stayed allocated after the pass."""
    import gc
    import weakref

    from unmerge_core.pipeline import parallel

    handed: list[weakref.ref] = []
    real_get = parallel.BufferPool.get

    def recording(self, shape, tag=""):
        buf = real_get(self, shape, tag)
        handed.append(weakref.ref(buf))
        return buf

    monkeypatch.setattr(parallel.BufferPool, "get", recording)
    masker = TopKMasker(TopKParams(budget=100))
    result = shared_pass(masker, "topk", dictionary(tmp_path, n=2), [], workers=1)
    assert result.mask.size > 0 and handed
    gc.collect()
    assert all(ref() is None for ref in handed)
