"""End to end with the synthetic trainer (seconds): outputs, reuse of artifacts, plugin failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path
import types

import numpy as np
import pytest

from unmerge_core import Decomposition, NoParams, PluginSpec, Stage, hookimpl
from unmerge_core.errors import PluginError
from unmerge_core.manager import PluginManager
from unmerge_core.config.manifest import load_manifest
from unmerge_core.pipeline.runner import Runner


def run(path, manager=None):
    return Runner(load_manifest(path, manager), progress=False, echo=lambda s: None).run()


def test_synthetic_run_writes_every_result_file(write_manifest) -> None:
    result = run(write_manifest())
    d = result.run_dir
    for name in ("summary.csv", "summary.md", "summary.json", "per_target.csv", "per_target.json",
                 "timings.json", "targets.json", "adapters.json", "task_vectors.safetensors", "manifest.toml"):
        assert (d / name).is_file(), name
    rows = list(csv.DictReader((d / "summary.csv").open()))
    # 2 decomposers × 3 groups × 4 methods
    assert len(rows) == 24
    assert {r["group"] for r in rows} == {"known", "mixed", "unknown"}
    # undefined metrics are empty cells, not zeros
    unknown = [r for r in rows if r["group"] == "unknown"]
    assert all(r["precision"] == "" and r["recall"] == "" for r in unknown)
    adapters = json.loads((d / "adapters.json").read_text())
    links = sorted((d / "dictionary").iterdir())
    assert links and all(p.is_symlink() and p.resolve() == Path(adapters[p.name]).resolve() for p in links)
    assert not (d / "base").exists()  # synthetic adapters name no base model
    targets = json.loads((d / "targets.json").read_text())
    assert len(targets) == 12 and all(len(t["tasks"]) == len(t["weights"]) for t in targets)
    stages = [t["stage"] for t in json.loads((d / "timings.json").read_text())]
    assert stages[:2] == ["trainer", "masker"]


def test_known_linear_targets_are_recovered_exactly(write_manifest) -> None:
    table = run(write_manifest()).table
    for row in table.rows:
        if row.decomposer == "nnls" and row.group == "known" and row.method in ("linear", "task_arithmetic"):
            assert row.metrics["precision"] == 1.0 and row.metrics["recall"] == 1.0
            assert row.metrics["recon_error"] < 1e-8


def test_rerun_reuses_artifacts_and_adding_a_decomposer_does_not_retrain(write_manifest) -> None:
    path = write_manifest()
    first = run(path)
    adapters = sorted((first.run_dir / "cache" / "adapters").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in adapters]
    path2 = write_manifest(**{'[[decomposers]]\nplugin = "lasso"': '[[decomposers]]\nplugin = "lasso"\n[[decomposers]]\nplugin = "omp"'})
    second = run(path2)
    timings = {t.stage: t for t in second.timings}
    assert timings["trainer"].reused == timings["trainer"].jobs == 7
    assert timings["merger"].reused == timings["merger"].jobs == 12
    assert [p.stat().st_mtime_ns for p in sorted((second.run_dir / "cache" / "adapters").iterdir())] == mtimes
    assert {r.decomposer for r in second.table.rows} == {"nnls", "lasso", "omp"}
    # the decompositions and metric values of nnls and lasso are reused; omp's are new
    per_decomposer = timings["decomposer"].jobs // 3
    assert first.timings and {t.stage: t for t in first.timings}["decomposer"].reused == 0
    assert timings["decomposer"].reused == timings["metric"].reused == 2 * per_decomposer > 0


def test_crash_keeps_finished_work(write_manifest, monkeypatch) -> None:
    import unmerge_core.pipeline.runner as runner_mod

    path = write_manifest()
    calls = {"n": 0}
    real = runner_mod.merge_unit

    def flaky(unit):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(unit)

    monkeypatch.setattr(runner_mod, "merge_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(path)
    monkeypatch.setattr(runner_mod, "merge_unit", real)
    result = run(path)
    timings = {t.stage: t for t in result.timings}
    assert timings["trainer"].reused == 7
    assert timings["merger"].reused == 4  # the four targets finished before the crash
    leftovers = [p for p in (result.run_dir / "cache" / "targets").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_same_seed_same_results(write_manifest, tmp_path) -> None:
    a = run(write_manifest())
    b = run(write_manifest(**{str(tmp_path / "runs"): str(tmp_path / "runs2")}))
    assert (a.run_dir / "per_target.csv").read_text() == (b.run_dir / "per_target.csv").read_text()


class _BadDecomposer:
    def __init__(self, params) -> None: ...

    mode = "raise"

    def decompose(self, problem):
        n = problem.dictionary.shape[1]
        if self.mode == "raise":
            raise ValueError("solver exploded")
        if self.mode == "short":
            return Decomposition(np.zeros(n - 1), problem.target * 0)
        return Decomposition(np.full(n, np.nan), problem.target * 0)


@pytest.mark.parametrize("mode,message", [
    ("raise", "decomposer plugin 'bad': raised ValueError: solver exploded"),
    ("short", "decomposer plugin 'bad': returned 4 coefficients for 5 atoms"),
    ("nan", "decomposer plugin 'bad': returned NaN or inf"),
])
def test_misbehaving_decomposer_is_named(write_manifest, mode: str, message: str, monkeypatch) -> None:
    monkeypatch.setattr(_BadDecomposer, "mode", mode)

    @hookimpl
    def unmerge_decomposers():
        return [PluginSpec("bad", Stage.DECOMPOSER, "misbehaves", "https://example.org", NoParams, _BadDecomposer)]

    pm = PluginManager()
    pm.register(types.SimpleNamespace(unmerge_decomposers=unmerge_decomposers), name="bad-plugin")
    path = write_manifest(**{'plugin = "lasso"': 'plugin = "bad"'})
    with pytest.raises(PluginError) as info:
        run(path, pm)
    assert message in str(info.value)
    assert info.value.stage == "decomposer" and info.value.plugin == "bad"


def test_hand_registered_plugins_for_every_stage_run_end_to_end(write_manifest) -> None:
    """One tiny implementation per hook, registered without an entry point, wired by name."""
    import torch
    from safetensors.torch import save_file

    from unmerge_core import Mask
    from unmerge_core.types import MetricValue

    class ConstTrainer:
        def __init__(self, params) -> None: ...

        def train(self, job) -> None:
            g = torch.Generator().manual_seed(job.seed)
            tensors = {"base_model.model.m.lora_A.weight": torch.randn(2, 6, generator=g),
                       "base_model.model.m.lora_B.weight": torch.randn(5, 2, generator=g)}
            save_file(tensors, str(job.output_dir / "adapter_model.safetensors"))
            (job.output_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2}')

    class SumMerger:
        methods = ("sum",)

        def __init__(self, params) -> None: ...

        def merge_module(self, job, module, deltas):
            return sum(w * d for w, d in zip(job.weights, deltas))

    class AllMasker:
        def __init__(self, params) -> None: ...

        def build_mask(self, adapters):
            return Mask({"m": np.arange(30)}, {"m": (5, 6)})

    class CountMetric:
        def __init__(self, params) -> None: ...

        def compute(self, evaluation) -> dict[str, MetricValue]:
            return {"n_true": float(len(evaluation.true_tasks))}

    def spec(name, stage, factory):
        return [PluginSpec(name, stage, "hand-made", "https://example.org", NoParams, factory)]

    plugin = types.SimpleNamespace(
        unmerge_trainers=hookimpl(lambda: spec("const", Stage.TRAINER, ConstTrainer)),
        unmerge_mergers=hookimpl(lambda: spec("sum", Stage.MERGER, SumMerger)),
        unmerge_maskers=hookimpl(lambda: spec("all", Stage.MASKER, AllMasker)),
        unmerge_metrics=hookimpl(lambda: spec("count", Stage.METRIC, CountMetric)),
    )
    pm = PluginManager()
    pm.register(plugin, name="hand-made")
    path = write_manifest(**{
        'plugin = "synthetic"': 'plugin = "const"',
        'params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, '
        'rank = 6, shared = 0.3 }': "",
        'plugin = "mergekit"': 'plugin = "sum"',
        'plugin = "topk"\nparams = { budget = 300 }': 'plugin = "all"',
        "targets_per_group = 4": 'targets_per_group = 2\nmethods = ["sum"]',
        "[output]": '[[metrics]]\nplugin = "count"\n[output]',
    })
    result = run(path, pm)
    assert {r.method for r in result.table.rows} == {"sum"}
    assert all(r.metrics["n_true"] == len(r.true_tasks) for r in result.table.rows)
    known = [r for r in result.table.rows if r.decomposer == "nnls" and r.group == "known"]
    for row in known:  # the sum of known atoms is recovered by NNLS
        truth = dict(zip(row.true_tasks, row.true_weights))
        assert np.allclose(row.coefficients, [truth.get(a, 0) for a in result.table.atom_names], atol=1e-6)


def test_no_plots_writes_no_png_and_removes_stale_ones(write_manifest) -> None:
    path = write_manifest()
    first = run(path)
    assert (first.run_dir / "precision_recall.png").is_file()
    assert list(first.run_dir.glob("coefficients_*.png"))
    again = Runner(load_manifest(path), progress=False, echo=lambda s: None, plots=False).run()
    assert not list(again.run_dir.glob("*.png"))  # a plot of an earlier run would describe other results
    assert (again.run_dir / "summary.md").is_file()


class _BadMasker:
    """Returns a mask on the synthetic manifest's modules with one defect (``mode``)."""

    mode = "unsorted"

    def __init__(self, params) -> None: ...

    def build_mask(self, adapters):
        from unmerge_core import Mask

        shapes = {"layers.0.q": (24, 32), "layers.0.k": (8, 32)}
        indices = {"layers.0.q": np.arange(0, 200, 2), "layers.0.k": np.arange(50)}
        if self.mode == "unsorted":
            indices["layers.0.k"] = indices["layers.0.k"][::-1]
        elif self.mode == "out-of-range":
            indices["layers.0.k"] = np.array([1, 8 * 32])
        elif self.mode == "shape":
            shapes["layers.0.k"] = (32, 8)
        elif self.mode == "module":
            indices["layers.7.v"], shapes["layers.7.v"] = np.arange(3), (4, 4)
        return Mask(indices, shapes)


@pytest.mark.parametrize("mode,message", [
    ("unsorted", "mask module 'layers.0.k': indices are not in ascending order"),
    ("out-of-range", "mask module 'layers.0.k': index 256 is out of range for its shape (8, 32)"),
    ("shape", "mask module 'layers.0.k': shape (32, 8) contradicts the adapters' (8, 32)"),
    ("module", "mask module 'layers.7.v': no dictionary adapter adapts it"),
])
def test_a_maskers_wrong_mask_stops_the_run_naming_plugin_and_module(write_manifest, monkeypatch, mode,
                                                                      message) -> None:
    """Found by a hostile audit: unsorted indices or a foreign module ran to exit 0, an index out of
    range ended in an internal error."""
    monkeypatch.setattr(_BadMasker, "mode", mode)

    @hookimpl
    def unmerge_maskers():
        return [PluginSpec("bad-mask", Stage.MASKER, "misbehaves", "https://example.org", NoParams, _BadMasker)]

    pm = PluginManager()
    pm.register(types.SimpleNamespace(unmerge_maskers=unmerge_maskers), name="bad-mask-plugin")
    path = write_manifest(**{'plugin = "topk"\nparams = { budget = 300 }': 'plugin = "bad-mask"'})
    with pytest.raises(PluginError) as info:
        run(path, pm)
    assert str(info.value).startswith(f"masker plugin 'bad-mask': {message}"), str(info.value)
    assert "\n" not in str(info.value) and info.value.stage == "masker"
    assert not list((path.parent / "runs").glob("*/cache/masks/*/mask.json"))  # nothing of it was stored


IDENTICAL_ADAPTERS_MANIFEST = """
name = "twins"
seed = 1
[tasks]
known = ["alpha", "beta", "gamma"]
[protocol]
groups = []
[trainer]
plugin = "adapters"
params = {{ paths = {{ alpha = "dict/alpha", beta = "dict/{beta}", gamma = "dict/gamma" }} }}
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = {{ budget = 64 }}
[[decomposers]]
plugin = "skill-fdr"
[[targets]]
path = "dict/gamma"
kind = "adapter"
[output]
dir = "{{out}}"
"""


@pytest.mark.parametrize("beta", ["alpha", "copy-of-alpha"])
def test_two_dictionary_tasks_with_identical_adapters_are_refused(write_manifest, workdir, beta) -> None:
    """Hostile audit 20.7, on the manifest path: two tasks whose adapters are the same ΔW (one folder named
    twice, or a copy) cannot be told apart by any decomposer; the run stops naming both tasks."""
    import shutil

    from helpers import write_lora
    from unmerge_core.errors import UnmergeError

    modules = {"model.layers.0.q": (8, 16), "model.layers.0.k": (4, 16)}
    for task, seed in (("alpha", 0), ("gamma", 2)):
        write_lora(workdir / "dict" / task, modules, seed=seed)
    shutil.copytree(workdir / "dict" / "alpha", workdir / "dict" / "copy-of-alpha")
    with pytest.raises(UnmergeError) as info:
        run(write_manifest(IDENTICAL_ADAPTERS_MANIFEST.format(beta=beta)))
    message = str(info.value)
    assert "\n" not in message and "'alpha' and 'beta'" in message and "identical" in message, message
