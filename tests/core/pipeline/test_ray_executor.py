"""The Ray executor on a local Ray instance (2 CPUs, one per test module): the same result files as
the local executor, a unit whose worker is killed is rerun, a plugin's error is the same line, and a
node that cannot see the store is named."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from unmerge_core.config.manifest import load_manifest  # noqa: E402
from unmerge_core.errors import PluginError, UnmergeError  # noqa: E402
from unmerge_core.pipeline import ray_executor  # noqa: E402
from unmerge_core.pipeline.ray_executor import RayExecutor  # noqa: E402
from unmerge_core.pipeline.runner import Runner  # noqa: E402

RAY = '[executor]\nkind = "ray"\n[output]'
COMPARED = ("summary.csv", "summary.json", "summary.md", "per_target.csv", "per_target.json", "targets.json")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def run(path: Path):
    return Runner(load_manifest(path), progress=False, echo=lambda s: None).run()


def test_ray_gives_the_local_result_files(write_manifest, tmp_path) -> None:
    first = run(write_manifest())
    local = first.run_dir.rename(tmp_path / "local")  # the Ray run starts from an empty store, same run dir
    remote = run(write_manifest(**{"[output]": RAY}))
    assert remote.run_dir == first.run_dir
    for name in COMPARED:
        assert (local / name).read_bytes() == (remote.run_dir / name).read_bytes(), name
    for kind in ("adapters", "targets"):
        keys = sorted(p.name for p in (local / "cache" / kind).iterdir())
        assert keys == sorted(p.name for p in (remote.run_dir / "cache" / kind).iterdir())
    for target in (local / "cache" / "targets").iterdir():
        other = remote.run_dir / "cache" / "targets" / target.name / "target.safetensors"
        assert (target / "target.safetensors").read_bytes() == other.read_bytes()


def die_once(marker: Path) -> str:
    """Kill the worker process the first time (as an out-of-memory kill would), succeed the second."""
    if not marker.exists():
        marker.write_text("killed once")
        os._exit(1)
    return marker.name


def test_a_unit_whose_worker_dies_is_rerun(tmp_path) -> None:
    markers = [tmp_path / f"unit-{i}" for i in range(3)]
    assert RayExecutor(tmp_path, progress=False).map(die_once, markers, desc="die") == [m.name for m in markers]
    with pytest.raises(UnmergeError, match=r"a Ray worker died 1 time\(s\) running a unit of 'die' \(executor.max_retries = 0\)"):
        RayExecutor(tmp_path, max_retries=0, progress=False).map(die_once, [tmp_path / "again"], desc="die")


def test_a_plugin_error_in_a_ray_task_is_the_local_line(write_manifest, tmp_path) -> None:
    zeroing = {"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["ram"]',
               '[merger]\nplugin = "mergekit"': '[merger]\nplugin = "mergekit"\nparams = { methods = { ram = '
                                                '{ epsilon = 1e30 } } }'}
    with pytest.raises(PluginError) as local:
        run(write_manifest(name="local.toml", **{'name = "synthetic-test"': 'name = "local"'}, **zeroing))
    with pytest.raises(PluginError) as remote:
        run(write_manifest(name="ray.toml", **{'name = "synthetic-test"': 'name = "ray"', "[output]": RAY}, **zeroing))
    assert str(remote.value) == str(local.value) and "\n" not in str(remote.value)
    assert "(ram) is zero on every mask coordinate" in str(remote.value)


def test_a_node_that_cannot_see_the_store_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ray_executor, "_sees_store", lambda store, token: ("node-b", False))
    with pytest.raises(UnmergeError, match=r"executor: Ray node node-b cannot see the artifact store .* put output.store"):
        RayExecutor(tmp_path / "store", progress=False).map(str, [1], desc="probe")
    assert not any(p.name.startswith(".ray-probe") for p in (tmp_path / "store").iterdir())  # probe removed


def test_executor_table_is_validated(write_manifest) -> None:
    path = write_manifest(**{"[output]": '[executor]\nkind = "local"\naddress = "auto"\n[output]'})
    with pytest.raises(UnmergeError, match="executor: address and num_\\*_per_task apply to kind = 'ray' only"):
        load_manifest(path)
    path = write_manifest(**{"[output]": '[executor]\nkind = "ray"\nnum_cpus_per_task = 0\n[output]'})
    with pytest.raises(UnmergeError, match="executor.num_cpus_per_task"):
        load_manifest(path)


def test_resources_no_node_has_are_refused_not_waited_for(tmp_path) -> None:
    with pytest.raises(UnmergeError, match=r"executor.num_gpus_per_task = 1, but no Ray node has more than 0 GPU"):
        RayExecutor(tmp_path, num_gpus_per_task=1, progress=False).map(str, [1], desc="gpu")
    with pytest.raises(UnmergeError, match=r"executor.num_cpus_per_task = 1000, but no Ray node has more than 2 CPU"):
        RayExecutor(tmp_path, num_cpus_per_task=1000, progress=False).map(str, [1], desc="cpu")
