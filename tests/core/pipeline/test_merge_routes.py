"""Several mergers in one run, and the three merge routes besides the fast path: low-rank factors
(TSV-M, Iso-C), full weights with the base model (slerp, Karcher), and the method's task counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import SMALL_REGISTRY, random_adapter, tiny_base

from unmerge_core.config.manifest import load_manifest
from unmerge_core.errors import UnmergeError
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.masks import load_mask
from unmerge_core.io.store import load_tensors
from unmerge_core.pipeline.merging import dense_masked_vector
from unmerge_core.pipeline.runner import Runner
from unmerge_core.types import MergeJob

SEVERAL = '''[[merger]]
plugin = "mergekit"
[[merger]]
plugin = "tsv-m"
[[merger]]
plugin = "iso-c"
[[merger]]
plugin = "tall-consensus"'''


def error_of(path) -> str:
    with pytest.raises(UnmergeError) as info:
        load_manifest(path)
    return str(info.value)


@pytest.mark.parametrize("replace,expected", [
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["ties", "slerp"]'},
     "protocol.methods[1]: slerp is defined on full weights and needs the base model's weights (merger "
     "'mergekit'), which trainer 'synthetic' does not provide"),
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["scale-svd"]',
      '[merger]\nplugin = "mergekit"': '[merger]\nplugin = "scale-svd"'},
     "protocol.methods[0]: scale-svd (merger 'scale-svd') scales each task vector by the base model's input "
     "statistics on the task's training data, which trainer 'synthetic' cannot record (no base model or no "
     "training data); set scaling = \"uniform\""),
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["ram"]\nweights = "dirichlet"'},
     "protocol.methods[0]: ram ignores per-task weights"),
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["nearswap"]'},
     "protocol.methods[0]: nearswap (merger 'mergekit'): mergekit's nearswap has no default for t: set "
     "merger.params.methods.nearswap.t"),
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["nuslerp"]\ngroups = ["known"]',
      "min_tasks = 2": "min_tasks = 3"},
     "protocol.methods[0]: nuslerp merges exactly 2 tasks (merger 'mergekit'), but protocol.min_tasks..max_tasks "
     "is 3..3"),
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["tsv-m"]',
      '[merger]\nplugin = "mergekit"': '[[merger]]\nplugin = "tsv-m"\n[[merger]]\nplugin = "tsv-m"\nlabel = "again"'},
     "protocol.methods[0]: method 'tsv-m' is offered by several mergers ('tsv-m', 'again'); list only one"),
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["isoc"]', '[merger]\nplugin = "mergekit"': SEVERAL},
     "protocol.methods[0]: no merger ('mergekit', 'tsv-m', 'iso-c', 'tall-consensus') has method 'isoc'; "
     "did you mean 'iso-c'?"),
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["tall-consensus"]',
      '[merger]\nplugin = "mergekit"': '[merger]\nplugin = "tall-consensus"\nparams = { k = 4 }'},
     "tall-consensus merges at least 4 tasks (merger 'tall-consensus'), but protocol.min_tasks..max_tasks is 2..3"),
    ({'[merger]\nplugin = "mergekit"': '[merger]\nplugin = "mergekit"\nparams = { methods = { dela = {} } }'},
     "merger.params.methods: 'dela' is not a mergekit method; did you mean 'della'?"),
    ({'unknown = ["zeta", "eta"]': 'unknown = ["zeta"]', "min_tasks = 2": "min_tasks = 1",
      "targets_per_group = 4": 'targets_per_group = 4\nmethods = ["model_stock"]'},
     "protocol.methods[0]: model_stock targets need at least 2 tasks (merger 'mergekit', protocol.min_tasks 1), "
     "but the unknown group draws from 1"),
    ({"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["tsv-m"]'},
     "protocol.methods[0]: merger 'mergekit' has no method 'tsv-m'; the installed merger plugin 'tsv-m' offers it: "
     'add [[merger]] plugin = "tsv-m"'),
    ({'[merger]\nplugin = "mergekit"': '[merger]\nplugin = "mergekit"\nparams = { methods = { task_arithmetic = '
                                       '{ lambda = 0.0 } } }'},
     "merger.params.methods: task_arithmetic.lambda = 0 makes every target zero"),
    ({'[merger]\nplugin = "mergekit"': '[merger]\nplugin = "mergekit"\nparams = { methods = { task_arithmetic = '
                                       '{ lambda_ = 2.0 } } }'},
     "merger.params.methods: task_arithmetic.lambda_: Extra inputs are not permitted"),
    ({'[merger]\nplugin = "mergekit"': '[merger]\nplugin = "mergekit"\nparams = { methods = { karcher = '
                                       '{ tol = 0.5 } } }'},
     "merger.params.methods: karcher.tol: Input should be less than or equal to 0.01"),
])
def test_method_problems_are_one_line_at_validate_time(write_manifest, replace, expected) -> None:
    message = error_of(write_manifest(**replace))
    assert expected in message and "\n" not in message


def test_scale_svd_uniform_runs_without_a_base_model(write_manifest) -> None:
    path = write_manifest(**{"targets_per_group = 4": 'targets_per_group = 2\nmethods = ["scale-svd"]',
                             '[merger]\nplugin = "mergekit"': '[merger]\nplugin = "scale-svd"\n'
                                                              'params = { scaling = "uniform" }'})
    result = Runner(load_manifest(path), progress=False, echo=lambda s: None).run()
    assert {r.method for r in result.table.rows} == {"scale-svd"}
    assert not any(t.stage == "input-statistics" for t in result.timings)


def test_a_merge_that_removes_everything_is_refused(write_manifest) -> None:
    # RAM with a threshold far above every weight returns zeros: an error, not a target of zeros
    path = write_manifest(**{"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["ram"]',
                             '[merger]\nplugin = "mergekit"': '[merger]\nplugin = "mergekit"\nparams = { methods = '
                                                              '{ ram = { epsilon = 1e30 } } }'})
    with pytest.raises(UnmergeError, match=r"\(ram\) is zero on every mask coordinate although its constituents"):
        Runner(load_manifest(path), progress=False, echo=lambda s: None).run()


def test_a_random_drop_emptying_a_tiny_mask_is_not_refused(write_manifest) -> None:
    # one 1 × 1 module: DARE drops the only coordinate with probability 1 − density; that target is
    # legitimate (found by the fuzz suite after the zero-target check was added)
    path = write_manifest(**{
        'params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, '
        'rank = 6, shared = 0.3 }': 'params = { module_shapes = { "a.0.q" = [1, 1] }, rank = 3 }',
        "min_tasks = 2": "min_tasks = 1", "max_tasks = 3": "max_tasks = 1",
        "targets_per_group = 4": 'targets_per_group = 8\nmethods = ["dare_linear"]\ngroups = ["known", "unknown"]'})
    result = Runner(load_manifest(path), progress=False, echo=lambda s: None).run()
    assert (result.run_dir / "summary.csv").is_file()


def test_several_mergers_in_one_run(write_manifest) -> None:
    path = write_manifest(**{"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["ties", "tsv-m", "iso-c", '
                                                      '"tall-consensus"]',
                             '[merger]\nplugin = "mergekit"': SEVERAL})
    manifest = load_manifest(path)
    assert [m.label for m in manifest.mergers] == ["mergekit", "tsv-m", "iso-c", "tall-consensus"]
    result = Runner(manifest, progress=False, echo=lambda s: None).run()
    rows = result.table.rows
    assert {r.method for r in rows} == {"ties", "tsv-m", "iso-c", "tall-consensus"}
    # every route's target equals the plugin's own dense merge gathered at the mask
    mask = load_mask(next((result.run_dir / "cache" / "masks").iterdir()))
    adapters_of = json.loads((result.run_dir / "adapters.json").read_text())
    for target_dir in (result.run_dir / "cache" / "targets").iterdir():
        job_data = json.loads((target_dir / "target.json").read_text())
        if job_data["method"] == "ties":
            continue
        job = MergeJob(job_data["target_id"], job_data["method"], tuple(job_data["tasks"]),
                       tuple(job_data["weights"]), job_data["seed"], job_data["group"])
        merger = manifest.merger_for(job.method).instance()
        adapters = [LoraAdapter(adapters_of[t], t) for t in job.tasks]
        expected = dense_masked_vector(merger, job, adapters, mask)
        got = load_tensors(target_dir / "target.safetensors")["vector"].numpy()
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max()), job.method
        assert np.abs(got).max() > 0


@pytest.fixture(scope="module")
def real_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    base = tiny_base(root / "base")
    paths = {name: random_adapter(base, root / name, seed=20 + i) for i, name in enumerate(["alpha", "beta", "gamma", "zeta"])}
    (root / "registry.toml").write_text(SMALL_REGISTRY)
    return root, base, paths


FULL_WEIGHT_MANIFEST = """
name = "full-weights"
seed = 3
registry = "{registry}"
[tasks]
known = ["alpha", "beta", "gamma"]
unknown = ["zeta"]
[protocol]
groups = ["known", "mixed"]
methods = ["slerp", "karcher", "model_stock"]
targets_per_group = 3
min_tasks = 1
max_tasks = 3
[trainer]
plugin = "adapters"
params = {{ root = "{root}" }}
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = {{ budget = 400 }}
[[decomposers]]
plugin = "nnls"
[output]
dir = "{out}"
"""


def test_full_weight_methods_get_the_base_module_and_their_task_counts(real_adapters, tmp_path) -> None:
    root, base, paths = real_adapters
    path = tmp_path / "m.toml"
    path.write_text(FULL_WEIGHT_MANIFEST.format(registry=root / "registry.toml", root=root, out=tmp_path / "runs"))
    manifest = load_manifest(path)
    result = Runner(manifest, progress=False, echo=lambda s: None).run()
    targets = json.loads((result.run_dir / "targets.json").read_text())
    assert {len(t["tasks"]) for t in targets if t["method"] == "slerp"} == {2}  # two models, whatever the protocol
    assert min(len(t["tasks"]) for t in targets if t["method"] == "model_stock") >= 2
    merger = manifest.merger.instance()
    assert {"slerp", "karcher"} <= merger.base_methods
    mask = load_mask(next((result.run_dir / "cache" / "masks").iterdir()))
    for target_dir in (result.run_dir / "cache" / "targets").iterdir():
        data = json.loads((target_dir / "target.json").read_text())
        job = MergeJob(data["target_id"], data["method"], tuple(data["tasks"]), tuple(data["weights"]), data["seed"],
                       data["group"])
        adapters = [LoraAdapter(paths[t], t) for t in job.tasks]
        expected = dense_masked_vector(merger, job, adapters, mask)
        got = load_tensors(target_dir / "target.safetensors")["vector"].numpy()
        assert np.allclose(got, expected, rtol=1e-6, atol=1e-9) and np.abs(got).max() > 0
    known_linear = [r for r in result.table.rows if r.group == "known" and r.method == "karcher"]
    assert known_linear and all(r.metrics["recall"] == 1.0 for r in known_linear)


def _slerp_run(tmp_path, root, registry, base_line: str = ""):
    """Run slerp targets; return the manifest, the result and the vectors of the targets made now."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "m.toml"
    text = FULL_WEIGHT_MANIFEST.format(registry=registry, root=root, out=tmp_path / "runs")
    path.write_text(base_line + text.replace('methods = ["slerp", "karcher", "model_stock"]', 'methods = ["slerp"]'))
    cache = tmp_path / "runs" / "full-weights" / "cache" / "targets"
    before = set(cache.iterdir()) if cache.is_dir() else set()
    manifest = load_manifest(path)
    result = Runner(manifest, progress=False, echo=lambda s: None).run()
    vectors = {}
    for target_dir in set(cache.iterdir()) - before:
        data = json.loads((target_dir / "target.json").read_text())
        vectors[data["target_id"]] = load_tensors(target_dir / "target.safetensors")["vector"].numpy()
    return manifest, result, vectors


def test_full_weight_methods_use_the_manifest_base_and_follow_its_changes(real_adapters, tmp_path) -> None:
    root, base, paths = real_adapters
    other = tiny_base(tmp_path / "other-base", seed=9)  # same architecture, other weights
    _, _, named = _slerp_run(tmp_path / "a", root, root / "registry.toml")
    manifest, result, explicit = _slerp_run(tmp_path / "b", root, root / "registry.toml", f'base = "{other}"\n')
    mask = load_mask(next((result.run_dir / "cache" / "masks").iterdir()))
    merger = manifest.merger.instance()
    targets = {t["target_id"]: t for t in json.loads((result.run_dir / "targets.json").read_text())}
    for target_id, got in explicit.items():
        t = targets[target_id]
        job = MergeJob(target_id, t["method"], tuple(t["tasks"]), tuple(t["weights"]), t["seed"], t["group"])
        adapters = [LoraAdapter(paths[n], n) for n in job.tasks]
        assert np.allclose(got, dense_masked_vector(merger, job, adapters, mask, base=other), rtol=1e-6, atol=1e-9)
        assert not np.allclose(got, named[target_id], rtol=1e-3, atol=0)  # slerp depends on the base
    # replacing the base model's weights in place invalidates the cached full-weight targets
    tiny_base(other, seed=10)
    _, _, again = _slerp_run(tmp_path / "b", root, root / "registry.toml", f'base = "{other}"\n')
    assert again.keys() == explicit.keys() and len(again) == 6
    assert all(not np.allclose(again[k], explicit[k], rtol=1e-3, atol=0) for k in explicit)


def test_adapters_on_different_bases_are_refused_for_full_weight_methods(real_adapters, tmp_path) -> None:
    root, base, paths = real_adapters
    mixed = tmp_path / "adapters"
    mixed.mkdir()
    for name in ("alpha", "beta", "gamma"):
        (mixed / name).symlink_to(paths[name], target_is_directory=True)
    random_adapter(tiny_base(tmp_path / "elsewhere", seed=4), mixed / "zeta", seed=40)
    with pytest.raises(UnmergeError, match=r"slerp needs one base model, but the adapters name different ones"):
        _slerp_run(tmp_path, mixed, root / "registry.toml")
