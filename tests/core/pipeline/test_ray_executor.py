"""The Ray executor on a local Ray instance (2 CPUs, one per test module): the same result files as
the local executor, a unit whose worker is killed is rerun, a plugin's error is the same line, and a
node that cannot see the store is named."""

from __future__ import annotations

import os
import re
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


class Named:
    def __init__(self, name: str) -> None:
        self.progress_name = name  # what a plain progress line calls the unit


def name_of(unit: Named) -> str:
    return unit.progress_name


def test_plain_progress_lines_for_ray_units(tmp_path, capsys) -> None:
    """Issue 24, item 6: standard error that is not a terminal gets one-line messages, not a bar."""
    units = [Named(f"u{i}") for i in range(3)]
    assert RayExecutor(tmp_path, progress="lines").map(name_of, units, desc="x") == ["u0", "u1", "u2"]
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert all(re.fullmatch(r"x \[ray\] [123]/3 u\d \(elapsed [\d.]+ s\)", line) for line in lines), err
    assert lines[-1].startswith("x [ray] 3/3 "), err  # a slow unit (a worker starting) has its own line too


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


def test_an_unreachable_ray_address_is_one_line_within_seconds(write_manifest) -> None:
    """Hostile audit 20.12: `address = "127.0.0.1:1"` printed nothing for minutes (Ray retries the GCS
    connection for ever); now one line within the connection timeout."""
    import subprocess
    import time

    path = write_manifest(**{"[output]": '[executor]\nkind = "ray"\naddress = "127.0.0.1:1"\n[output]'})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "unmerge_core", "run", "--no-progress", str(path)], capture_output=True,
                          text=True, timeout=90)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("unmerge: running", "warning:", "note:"))]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: executor: cannot join Ray at 127.0.0.1:1: ") and "Traceback" not in done.stderr
    assert seconds < 45, seconds


def exit_in_plugin(marker: Path) -> str:
    """A plugin that ends its process with os._exit(0); counts its attempts."""
    from unmerge_core.errors import plugin_errors

    with marker.open("a") as f:
        f.write("x")
    with plugin_errors("trainer", "quitter"):
        os._exit(0)
    return "unreachable"


def test_a_plugin_calling_os_exit_in_a_ray_unit_is_its_error_and_not_retried(tmp_path) -> None:
    """Hostile audit 20.16: os._exit in a plugin killed the worker and Ray reran the unit 4 times (a worker
    death looks like a machine failure); it is the plugin's deterministic error: raised once, as locally."""
    marker = tmp_path / "attempts"
    with pytest.raises(PluginError, match=r"trainer plugin 'quitter': called os._exit\(0\); a plugin must return"):
        RayExecutor(tmp_path, max_retries=3, progress=False).map(exit_in_plugin, [marker], desc="train")
    assert marker.read_text() == "x"


def train_peft_adapter(paths: tuple[Path, Path]) -> bytes:
    """One peft-lora training on the tiny model (a few seconds); the adapter's bytes."""
    from unmerge_core.types import TaskInfo, TrainJob
    from unmerge_plugins.lib.tiny_model import TinyModelParams
    from unmerge_plugins.trainers.peft_lora import PeftLoraParams, PeftLoraTrainer

    out, workspace = paths
    out.mkdir(parents=True)
    params = PeftLoraParams(tiny=TinyModelParams(pretrain_steps=20), rank=4, alpha=8, learning_rate=1e-2, epochs=1,
                            batch_size=8, num_examples=48, max_length=48)
    task = TaskInfo("python-function", "code", {"kind": "procedural", "generator": "python-function"})
    PeftLoraTrainer(params).train(TrainJob(task, out, 5, workspace, 0))
    return (out / "adapter_model.safetensors").read_bytes()


def test_an_adapter_trained_in_a_ray_worker_is_byte_identical_to_a_local_one(tmp_path) -> None:
    """Hostile audit 20.10: a Ray worker (Ray sets OMP_NUM_THREADS = its CPUs) trained with other thread
    counts than the driver, and PEFT adapters differed by ~1e-7 under the same cache key: a store shared by
    local and Ray runs mixed two answers. Units now run with the driver's numeric settings."""
    import torch

    local = train_peft_adapter((tmp_path / "local", tmp_path / "workspace"))  # builds the tiny base too
    [remote] = RayExecutor(tmp_path, progress=False).map(train_peft_adapter, [(tmp_path / "ray", tmp_path / "workspace")],
                                                         desc="train")
    assert torch.get_num_threads() > 1 or os.cpu_count() == 1  # a worker on one thread would differ
    assert remote == local


def settings_here(_: object) -> dict:
    return ray_executor.numeric_settings()


def test_ray_units_run_with_the_drivers_numeric_settings(tmp_path) -> None:
    """Hostile audit 20.10: a worker ran torch on 1 thread (Ray's OMP_NUM_THREADS) where the driver ran it on
    every core; reductions then round differently. Units see the driver's settings."""
    from unmerge_core.pipeline.parallel import blas_threads

    with blas_threads(1):
        driver = ray_executor.numeric_settings()
        [worker] = RayExecutor(tmp_path, progress=False).map(settings_here, [0], desc="settings")
    assert worker == driver
