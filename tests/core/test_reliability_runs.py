"""Runs that meet misbehaving plugins, kills and concurrent twins: an error naming the plugin, or the
same results as an undisturbed run — never wrong numbers with exit status 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from unmerge_core import Decomposition, NoParams, PluginSpec, Stage, hookimpl
from unmerge_core.errors import PluginError
from unmerge_core.manager import PluginManager
from unmerge_core.config.manifest import load_manifest
from unmerge_core.pipeline.runner import Runner, read_status
from unmerge_core.io.store import ArtifactStore, clean_stale_temporaries, temp_prefix

from helpers import REPO  # noqa: E402
# files whose bytes must not depend on how the run got there (timings and paths excluded)
RESULT_FILES = ("summary.csv", "summary.json", "summary.md", "per_target.csv", "per_target.json", "targets.json",
                "task_vectors.safetensors", "precision_recall.png", "coefficients_nnls.png",
                "coefficients_lasso.png")


def run(path, manager=None):
    return Runner(load_manifest(path, manager), progress=False, echo=lambda s: None).run()


def decomposer_plugin(name: str, decompose) -> types.SimpleNamespace:
    class Impl:
        def __init__(self, params) -> None:
            pass

    Impl.decompose = lambda self, problem: decompose(problem)  # type: ignore[attr-defined]

    @hookimpl
    def unmerge_decomposers():
        return [PluginSpec(name, Stage.DECOMPOSER, "test", "https://example.org", NoParams, Impl)]

    return types.SimpleNamespace(unmerge_decomposers=unmerge_decomposers)


def manager_with(*plugins) -> PluginManager:
    pm = PluginManager()
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"test-{i}", distribution="test-dist")
    return pm


def with_decomposers(write_manifest, *names: str) -> Path:
    blocks = "".join(f'[[decomposers]]\nplugin = "{n}"\n' for n in names)
    return write_manifest(**{'[[decomposers]]\nplugin = "nnls"\n[[decomposers]]\nplugin = "lasso"\n': blocks})


# --------------------------------------------------------------------------------------------------
# Misbehaving plugins (items 3, 4, 12)
# --------------------------------------------------------------------------------------------------


def test_a_decomposer_cannot_corrupt_the_next_ones_input(write_manifest) -> None:
    """3: a decomposer writing into problem.dictionary / problem.target corrupted every later decomposer."""

    def vandal(problem):
        problem.dictionary[:] = 0.0
        problem.target[:] = 0.0
        return Decomposition(np.zeros(problem.dictionary.shape[1]), np.zeros(len(problem.target)))

    pm = manager_with(decomposer_plugin("vandal", vandal))
    with pytest.raises(PluginError, match=r"^decomposer plugin 'vandal': raised ValueError: assignment destination "
                                          r"is read-only"):
        run(with_decomposers(write_manifest, "vandal", "nnls"), pm)


def test_a_plugin_calling_sys_exit_is_an_error_not_a_silent_exit(write_manifest) -> None:
    """4: sys.exit(0) in a plugin ended `unmerge run` with status 0, no message, no results."""

    def quitter(problem):
        sys.exit(0)

    pm = manager_with(decomposer_plugin("quitter", quitter))
    with pytest.raises(PluginError, match=r"decomposer plugin 'quitter': called sys.exit\(0\)"):
        run(with_decomposers(write_manifest, "quitter"), pm)


OS_EXIT_SCRIPT = """
import os, sys
from unmerge_core.errors import PluginError, plugin_errors
try:
    with plugin_errors("decomposer", "quitter"):
        os._exit(0)
except PluginError as exc:
    print(exc)
    sys.exit(2)
"""


def test_a_plugin_calling_os_exit_is_an_error_not_a_silent_exit() -> None:
    """Hostile audit 20.16: os._exit(0) in a plugin ended `run` / `attribute` with status 0, nothing written
    and run.json 'running' (and, in a Ray worker, the unit was retried 4 times). Inside a plugin call it is
    the plugin's one-line error (in a subprocess here: without the guard it would end pytest itself)."""
    done = subprocess.run([sys.executable, "-c", OS_EXIT_SCRIPT], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout.strip() == "decomposer plugin 'quitter': called os._exit(0); a plugin must return or raise"


def test_os_exit_outside_a_plugin_call_or_in_a_forked_child_still_exits() -> None:
    """The guard is only for plugin code of this process: a child forked by a plugin (multiprocessing ends
    its children with os._exit) and code outside a plugin call exit as before."""
    from unmerge_core.errors import plugin_errors

    with plugin_errors("decomposer", "forker"):
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    done = subprocess.run([sys.executable, "-c", "import os, unmerge_core.errors; os._exit(5)"], timeout=120)
    assert done.returncode == 5


def test_a_plugin_calling_os_exit_in_a_run_is_named(write_manifest) -> None:
    def quitter(problem):
        os._exit(0)

    pm = manager_with(decomposer_plugin("quitter", quitter))
    with pytest.raises(PluginError, match=r"decomposer plugin 'quitter': called os._exit\(0\)"):
        run(with_decomposers(write_manifest, "quitter"), pm)


def test_a_hook_calling_sys_exit_is_a_broken_plugin() -> None:
    @hookimpl
    def unmerge_decomposers():
        sys.exit(3)

    pm = manager_with(types.SimpleNamespace(unmerge_decomposers=unmerge_decomposers))
    assert "nnls" in pm.names("decomposer")
    assert any("called sys.exit(3)" in b.error for b in pm.broken)


def test_info_that_is_not_json_fails_before_any_report(write_manifest) -> None:
    """12: a non-JSON-serialisable info failed in the report stage and left a partial report."""

    def odd(problem):
        n = problem.dictionary.shape[1]
        return Decomposition(np.zeros(n), np.zeros(len(problem.target)), info={"solver": object()})

    pm = manager_with(decomposer_plugin("odd", odd))
    path = with_decomposers(write_manifest, "odd")
    with pytest.raises(PluginError, match=r"decomposer plugin 'odd': returned info that is not JSON-serialisable "
                                          r"\(info\.solver: a object is not JSON-serialisable\)"):
        run(path, pm)
    run_dir = load_manifest(path, pm).run_dir
    assert not (run_dir / "summary.csv").exists() and read_status(run_dir)["status"] == "failed"


def test_labels_that_differ_only_in_unsafe_characters_get_distinct_files(write_manifest) -> None:
    """5: labels a/b and a_b mapped to the same plot file."""
    blocks = ('[[decomposers]]\nplugin = "nnls"\nlabel = "a/b"\n'
              '[[decomposers]]\nplugin = "lasso"\nlabel = "a_b"\n')
    path = write_manifest(**{'[[decomposers]]\nplugin = "nnls"\n[[decomposers]]\nplugin = "lasso"\n': blocks})
    out = run(path).run_dir
    plots = sorted(p.name for p in out.glob("coefficients_*.png"))
    assert len(plots) == 2 and "coefficients_a_b.png" in plots
    assert not any(p.name.startswith("coefficients_") for p in out.parent.glob("*.png"))


# --------------------------------------------------------------------------------------------------
# Kill and resume (items 14, 15 and the kill-and-resume test of the fuzz section)
# --------------------------------------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import os, signal, sys
    import importlib
    module, name, when = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    calls = [0]
    def killer(*args, **kwargs):
        calls[0] += 1
        if calls[0] == when:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(mod, name, killer)
    from unmerge_core.cli import main
    sys.exit(main(["run", sys.argv[4], "--no-progress"]))
""")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmerge_core", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def killed_run(manifest: Path, module: str, name: str, when: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, module, name, str(when), str(manifest)],
                          cwd=manifest.parent, capture_output=True, text=True, timeout=300)


def result_bytes(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in RESULT_FILES}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> dict[str, bytes]:
    """The reference: one undisturbed run of the small synthetic manifest, in a process of its own."""
    from helpers import SMALL_REGISTRY, SYNTHETIC_MANIFEST

    root = tmp_path_factory.mktemp("clean")
    (root / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    path = root / "manifest.toml"
    path.write_text(textwrap.dedent(SYNTHETIC_MANIFEST).replace("{out}", str(root / "runs")))
    done = cli("run", str(path), "--no-progress", cwd=root)
    assert done.returncode == 0, done.stderr
    return result_bytes(root / "runs" / "synthetic-test")


KILL_POINTS = [
    ("unmerge_core.pipeline.runner", "train_unit", 3, "trainer"),
    ("unmerge_core.pipeline.runner", "merge_unit", 5, "merger"),
    ("unmerge_core.pipeline.scoring", "decompose_unit", 10, "decomposer"),
    ("unmerge_core.pipeline.scoring", "metric_values", 20, "metric"),
    ("unmerge_core.report.files", "atomic_write_text", 3, "report"),
]


@pytest.mark.parametrize(("module", "name", "when", "stage"), KILL_POINTS, ids=[k[3] for k in KILL_POINTS])
def test_kill_9_and_resume_is_byte_identical_and_redoes_no_finished_work(write_manifest, clean_run, module, name,
                                                                        when, stage) -> None:
    path = write_manifest()
    killed = killed_run(path, module, name, when)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = path.parent / "runs" / "synthetic-test"
    status = read_status(run_dir)
    assert status is not None and status["status"] == "running" and status["stage"] == stage
    adapters_before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "cache" / "adapters").iterdir()
                       if not p.name.startswith(".")} if (run_dir / "cache" / "adapters").is_dir() else {}
    cached = {p: p.stat().st_mtime_ns for kind in ("decompositions", "metric-values")
              for p in (run_dir / "cache" / kind).glob("*.json")}

    resumed = cli("run", str(path), "--no-progress", cwd=path.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert f"previous run in {run_dir} stopped during '{stage}': killed or crashed" in resumed.stderr
    assert read_status(run_dir)["status"] == "complete"
    assert result_bytes(run_dir) == clean_run
    # nothing that was finished before the kill was redone
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "cache" / "adapters").iterdir()}
    assert all(after[k] == v for k, v in adapters_before.items())
    timings = {t["stage"]: t for t in json.loads((run_dir / "timings.json").read_text())}
    assert timings["trainer"]["reused"] == len(adapters_before)
    assert all(p.stat().st_mtime_ns == t for p, t in cached.items())  # finished scores were not recomputed
    # no temporary left behind by the killed process
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".unmerge-tmp")]


def test_a_killed_metric_stage_keeps_finished_decompositions(write_manifest) -> None:
    """15: a kill during the metric stage recomputed every decomposition and metric."""
    path = write_manifest()
    killed = killed_run(path, "unmerge_core.pipeline.scoring", "metric_values", 30)
    assert killed.returncode == -signal.SIGKILL
    cache = path.parent / "runs" / "synthetic-test" / "cache"
    done_decompositions = len(list((cache / "decompositions").glob("*.json")))
    done_metrics = sorted((cache / "metric-values").glob("*.json"))
    assert done_decompositions == 24 and len(done_metrics) == 29
    stamps = {p: p.stat().st_mtime_ns for p in done_metrics}
    resumed = cli("run", str(path), "--no-progress", cwd=path.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # not recomputed
    # 12 targets × 2 decomposers × 3 metrics (support, reconstruction, semantic-alignment)
    assert len(list((cache / "metric-values").glob("*.json"))) == 24 * 3


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    own = temp_prefix("x.")  # this (live) process
    stale = own.replace(f".{os.getpid()}.", f".{dead_pid}.")
    (tmp_path / "cache" / "targets").mkdir(parents=True)
    (tmp_path / "cache" / "targets" / (stale + "dir")).mkdir()
    (tmp_path / (stale + "file")).write_text("partial")
    (tmp_path / (own + "file")).write_text("in progress")
    assert clean_stale_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".unmerge")] == [own + "file"]


def test_tiny_model_with_a_corrupt_marker_is_rebuilt(tmp_path) -> None:
    """14: a kill while writing the marker left it empty: every later run failed with a JSONDecodeError."""
    from unmerge_plugins.lib.tiny_model import MARKER, TinyModelParams, build_tiny_model

    params = TinyModelParams(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                             pretrain_steps=0)
    directory = build_tiny_model(tmp_path / "tiny", params)
    (directory / MARKER).write_text("")
    (directory / "model.safetensors").write_bytes(b"")  # whatever else the kill left
    rebuilt = build_tiny_model(tmp_path / "tiny", params)
    assert json.loads((rebuilt / MARKER).read_text()) == params.model_dump()
    assert (rebuilt / "model.safetensors").stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unmerge-tmp")]


# --------------------------------------------------------------------------------------------------
# Concurrent runs (item 13)
# --------------------------------------------------------------------------------------------------


def test_two_concurrent_runs_of_one_manifest_both_finish_with_the_same_results(write_manifest, clean_run) -> None:
    """13: ArtifactStore.produce raced (OSError 39, FileNotFoundError 'DONE')."""
    path = write_manifest()
    procs = [subprocess.Popen([sys.executable, "-m", "unmerge_core", "run", str(path), "--no-progress"],
                              cwd=path.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outputs]
    run_dir = path.parent / "runs" / "synthetic-test"
    assert result_bytes(run_dir) == clean_run
    adapters = [p for p in (run_dir / "cache" / "adapters").iterdir()]
    assert len(adapters) == 7 and all((p / "DONE").is_file() for p in adapters)


def test_store_accepts_a_twin_finished_elsewhere(tmp_path) -> None:
    """Without a shared lock (another machine), the second producer keeps the first one's artifact."""
    store = ArtifactStore(tmp_path)

    def build_twin(tmp: Path) -> None:
        (tmp / "value").write_text("mine")
        # meanwhile another producer (no shared lock) installs the same artifact
        twin = store.path("k", "key")
        twin.mkdir(parents=True)
        (twin / "value").write_text("theirs")
        (twin / "DONE").write_text("{}")

    final = store.produce("k", "key", build_twin)
    assert (final / "value").read_text() == "theirs"
    assert [p.name for p in (tmp_path / "cache" / "k").iterdir()] == ["key"]


def test_concurrent_producers_of_one_artifact_build_it_once_and_both_get_it(tmp_path) -> None:
    """13: the second producer removed what the first had just finished (ENOTEMPTY, missing DONE)."""
    import threading
    import time

    store = ArtifactStore(tmp_path)
    builds: list[int] = []
    results: dict[int, Path] = {}

    def build(tmp: Path) -> None:
        builds.append(1)
        time.sleep(0.3)  # both producers are inside produce() at the same time
        (tmp / "value").write_text("42")

    def producer(i: int) -> None:
        path = store.produce("k", "key", build)
        time.sleep(0.4)  # the caller reads the artifact while the other producer is still busy
        assert (path / "value").read_text() == "42" and (path / "DONE").is_file()
        results[i] = path

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 2
