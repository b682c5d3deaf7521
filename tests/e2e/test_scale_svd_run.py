"""Scale-SVD with activation statistics through the runner, on real (tiny) PEFT adapters: the
statistics stage, its cache, the targets it makes, and the dense route causal verification uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import REPO, SCALE_SVD_MANIFEST  # noqa: E402
from unmerge_core.config.manifest import load_manifest
from unmerge_core.io.activations import load_input_statistics
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.masks import load_mask
from unmerge_core.io.store import load_tensors
from unmerge_core.pipeline.merging import dense_masked_vector
from unmerge_core.pipeline.runner import RoutedDenseMerge, Runner
from unmerge_core.types import MergeJob
from unmerge_plugins.mergers.scale_svd import ScaleSvdMerger



@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("scale-svd")
    path = root / "m.toml"
    path.write_text(SCALE_SVD_MANIFEST.format(name="scale-svd-e2e", seed=5, groups='["known", "mixed"]',
                                          scale_params="calibration_batches = 2, sparsity = 0.3, rank_ratio = 0.5",
                                          metrics="", registry=REPO / "registry.toml", out=root / "runs"))
    manifest = load_manifest(path)
    return manifest, Runner(manifest, progress=False, echo=lambda s: None).run()


def _stats_dirs(run_dir):
    out = {}
    for folder in (run_dir / "cache" / "input-stats").iterdir():
        done = json.loads((folder / "DONE").read_text())
        out[(done["task"], done["batches"])] = folder
    return out


def test_the_statistics_stage_records_each_task_once_and_is_reused(run, tmp_path) -> None:
    manifest, result = run
    targets = json.loads((result.run_dir / "targets.json").read_text())
    tasks = {t for target in targets if target["method"] == "scale-svd" for t in target["tasks"]}
    stage = next(t for t in result.timings if t.stage == "input-statistics")
    assert stage.jobs == len(tasks) and stage.reused == 0
    dirs = _stats_dirs(result.run_dir)
    assert set(dirs) == {(t, 2) for t in tasks}
    adapters = json.loads((result.run_dir / "adapters.json").read_text())
    modules = set(LoraAdapter(adapters["python-function"]).module_names)
    for folder in dirs.values():
        stats = load_input_statistics(folder)
        assert set(stats) == modules  # every adapted module, none missing
        assert all(s.count > 0 and bool((s.squares > 0).all()) for s in stats.values())
    again = Runner(manifest, progress=False, echo=lambda s: None).run()
    stage = next(t for t in again.timings if t.stage == "input-statistics")
    assert stage.reused == stage.jobs


def test_targets_are_the_merger_on_the_recorded_statistics_and_not_the_uniform_variant(run) -> None:
    manifest, result = run
    adapters = json.loads((result.run_dir / "adapters.json").read_text())
    dirs = _stats_dirs(result.run_dir)
    mask = load_mask(next((result.run_dir / "cache" / "masks").iterdir()))
    plugin = manifest.merger_for("scale-svd")
    merger = plugin.instance()
    uniform = ScaleSvdMerger(merger.params.model_copy(update={"scaling": "uniform"}))
    checked = 0
    for target_dir in (result.run_dir / "cache" / "targets").iterdir():
        data = json.loads((target_dir / "target.json").read_text())
        if data["method"] != "scale-svd":
            continue
        job = MergeJob(data["target_id"], data["method"], tuple(data["tasks"]), tuple(data["weights"]), data["seed"],
                       data["group"])
        constituents = [LoraAdapter(adapters[t], t) for t in job.tasks]
        inputs = [load_input_statistics(dirs[(t, 2)]) for t in job.tasks]
        expected = dense_masked_vector(merger, job, constituents, mask, inputs=inputs)
        got = load_tensors(target_dir / "target.safetensors")["vector"].numpy()
        assert np.allclose(got, expected, rtol=1e-6, atol=1e-9) and np.abs(got).max() > 0
        flat = dense_masked_vector(uniform, job, constituents, mask)
        assert not np.allclose(got, flat, rtol=1e-3, atol=0)  # the statistics changed the target
        # the dense route causal verification uses gives the same target
        routed = RoutedDenseMerge({"scale-svd": plugin}, adapters, None, dirs)
        deltas = dict(routed(job))
        idx = {m: np.asarray(mask.indices[m]) for m in mask.modules}
        again = np.concatenate([deltas[m].reshape(-1).double().numpy()[idx[m]] for m in mask.modules])
        assert np.allclose(again, got, rtol=1e-5, atol=1e-8)
        checked += 1
    assert checked >= 2


def test_a_missing_module_is_an_error_naming_it(run) -> None:
    manifest, result = run
    adapters = json.loads((result.run_dir / "adapters.json").read_text())
    dirs = _stats_dirs(result.run_dir)
    mask = load_mask(next((result.run_dir / "cache" / "masks").iterdir()))
    merger = manifest.merger_for("scale-svd").instance()
    drawn = next(t for t in json.loads((result.run_dir / "targets.json").read_text()) if t["method"] == "scale-svd")
    job = MergeJob("t", "scale-svd", tuple(drawn["tasks"]), tuple(drawn["weights"]), 0, "known")
    inputs = [load_input_statistics(dirs[(t, 2)]) for t in job.tasks]
    first = mask.modules[0]
    inputs[1] = {m: s for m, s in inputs[1].items() if m != first}
    constituents = [LoraAdapter(adapters[t], t) for t in job.tasks]
    with pytest.raises(Exception, match=f"no input statistics of module '{first}' for task {job.tasks[1]}"):
        dense_masked_vector(merger, job, constituents, mask, inputs=inputs)
    assert torch.is_tensor(next(iter(inputs[0].values())).squares)
