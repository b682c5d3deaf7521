"""A run directory holds this run's results only, made by this code: cache keys that include the plugins'
code, ``--redo``, stale files, one manifest per directory at a time, ``failed`` status, ground truth
that follows the merger's scaling."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from unmerge_core.config.manifest import load_manifest
from unmerge_core.errors import UnmergeError
from unmerge_core.io.code import module_closure_digest, package_source_digest
from unmerge_core.manager import PluginManager
from unmerge_core.pipeline.runner import Runner, read_status

PLUGIN_SOURCE = '''
import numpy as np
from unmerge_core import Decomposition, NoParams, PluginSpec, Stage, hookimpl
from scipy.optimize import nnls

SCALE = {scale}


class Scaled:
    def __init__(self, params):
        pass

    def decompose(self, problem):
        coef, _ = nnls(problem.dictionary.astype(np.float64), problem.target.astype(np.float64))
        coef = coef * SCALE
        return Decomposition(coefficients=coef, reconstruction=problem.dictionary @ coef)


@hookimpl
def unmerge_decomposers():
    return [PluginSpec(name="scaled-nnls", stage=Stage.DECOMPOSER, summary="test", reference="https://example.org",
                       params=NoParams, factory=Scaled)]
'''


def run(path: Path, manager: PluginManager | None = None, **options):
    return Runner(load_manifest(path, manager), progress=False, echo=lambda s: None, plots=False, **options).run()


def coefficients(result) -> dict[str, np.ndarray]:
    return {f"{r.decomposer}/{r.target_id}": np.asarray(r.decomposition.coefficients) for r in result.table.rows}


def with_decomposer(write_manifest, name: str) -> Path:
    return write_manifest(**{'[[decomposers]]\nplugin = "nnls"\n[[decomposers]]\nplugin = "lasso"\n':
                             f'[[decomposers]]\nplugin = "{name}"\n'})


def load_plugin(tmp_path: Path, scale: float, version: str = "0.1.0") -> PluginManager:
    """Install (write, import, register) the ``scaled-nnls`` plugin as a plugin author's local package."""
    package = tmp_path / "plugin_src" / "scaled_plugin"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(PLUGIN_SOURCE.format(scale=scale))
    if str(package.parent) not in sys.path:
        sys.path.insert(0, str(package.parent))
    sys.modules.pop("scaled_plugin", None)
    package_source_digest.cache_clear()  # a new process would hash the new source
    module_closure_digest.cache_clear()
    module = importlib.import_module("scaled_plugin")
    manager = PluginManager()
    manager.register(module, name="scaled", distribution="scaled-plugin", version=version)
    return manager


@pytest.fixture
def plugin_path():
    yield
    sys.modules.pop("scaled_plugin", None)
    sys.path[:] = [p for p in sys.path if not p.endswith("plugin_src")]
    package_source_digest.cache_clear()
    module_closure_digest.cache_clear()


# --------------------------------------------------------------------------------------------------
# Item 1: cached results never outlive the code that made them
# --------------------------------------------------------------------------------------------------


def test_a_decomposer_whose_code_changed_is_run_again_not_read_from_the_cache(write_manifest, tmp_path,
                                                                                plugin_path) -> None:
    path = with_decomposer(write_manifest, "scaled-nnls")
    first = coefficients(run(path, load_plugin(tmp_path, 1.0)))
    again = coefficients(run(path, load_plugin(tmp_path, 1.0)))
    assert all(np.array_equal(first[k], again[k]) for k in first)  # same code: reused, same numbers
    halved = coefficients(run(path, load_plugin(tmp_path, 0.5)))  # the author halves the coefficients
    assert first.keys() == halved.keys()
    for k in first:
        np.testing.assert_allclose(halved[k], first[k] * 0.5, rtol=1e-12, atol=0)


def test_a_new_version_of_the_same_code_is_another_cache_identity(tmp_path, plugin_path) -> None:
    def config(version: str) -> dict:
        manager = load_plugin(tmp_path, 1.0, version)
        return manager.resolve("decomposer", "scaled-nnls").config()

    old, new = config("0.1.0"), config("0.1.1")
    assert old["code"]["scaled-nnls"]["version"] == "0.1.0" and old["code"]["scaled-nnls"]["module"] == "scaled_plugin"
    assert old != new and old["code"]["scaled-nnls"]["source"] == new["code"]["scaled-nnls"]["source"]


def test_the_source_digest_follows_every_python_file_of_the_package(tmp_path) -> None:
    package = tmp_path / "digest_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "helper.py").write_text("X = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        before = package_source_digest("digest_pkg")
        package_source_digest.cache_clear()
        (package / "sub" / "helper.py").write_text("X = 2\n")  # a helper the plugin imports
        changed = package_source_digest("digest_pkg")
        package_source_digest.cache_clear()
        (package / "sub" / "notes.txt").write_text("not code")
        assert package_source_digest("digest_pkg") == changed != before
    finally:
        sys.path.remove(str(tmp_path))
        package_source_digest.cache_clear()
    assert package_source_digest("no_such_package_anywhere").startswith("no-source-")


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.fixture
def source_tree(tmp_path):
    """A folder on sys.path for packages a test writes; caches and imports of them forgotten after."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in set(sys.modules) - before:
        sys.modules.pop(name, None)
    package_source_digest.cache_clear()
    module_closure_digest.cache_clear()


def fresh(function, *args):
    package_source_digest.cache_clear()
    module_closure_digest.cache_clear()
    importlib.invalidate_caches()
    return function(*args)


def test_a_plugins_source_identity_follows_the_helpers_it_imports_and_not_the_others(source_tree) -> None:
    """Hostile review: hashing the whole package retrained every adapter when any decomposer changed."""
    write_tree(source_tree, {"cpkg/__init__.py": "", "cpkg/lib/__init__.py": "", "cpkg/lib/helper.py": "X = 1\n",
                             "cpkg/lib/other.py": "Y = 1\n", "cpkg/plugin.py": "from .lib import helper\n",
                             "cpkg/unrelated.py": "Z = 1\n"})
    before = fresh(module_closure_digest, "cpkg.plugin")
    (source_tree / "cpkg/unrelated.py").write_text("Z = 2\n")
    (source_tree / "cpkg/lib/other.py").write_text("Y = 2\n")
    assert fresh(module_closure_digest, "cpkg.plugin") == before
    (source_tree / "cpkg/lib/helper.py").write_text("X = 2\n")
    after_helper = fresh(module_closure_digest, "cpkg.plugin")
    assert after_helper != before
    (source_tree / "cpkg/lib/__init__.py").write_text("# a package's __init__ runs on import\n")
    assert fresh(module_closure_digest, "cpkg.plugin") != after_helper


def test_namespace_portions_and_linked_folders_are_all_hashed(source_tree, tmp_path_factory) -> None:
    """Hostile review: only a namespace package's first portion was hashed; a linked sub-folder not at all."""
    second = tmp_path_factory.mktemp("portion")
    write_tree(source_tree, {"nsp/a.py": "A = 1\n"})
    write_tree(second, {"nsp/b.py": "B = 1\n"})
    sys.path.insert(1, str(second))
    try:
        before = fresh(package_source_digest, "nsp")
        (second / "nsp/b.py").write_text("B = 2\n")
        assert fresh(package_source_digest, "nsp") != before
    finally:
        sys.path.remove(str(second))
    real = tmp_path_factory.mktemp("real")
    write_tree(real, {"w.py": "W = 1\n"})
    write_tree(source_tree, {"lpkg/__init__.py": ""})
    (source_tree / "lpkg" / "sub").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(real, target_is_directory=True)  # a link loop is visited once
    before = fresh(package_source_digest, "lpkg")
    (real / "w.py").write_text("W = 2\n")
    assert fresh(package_source_digest, "lpkg") != before


def test_factories_behind_partial_or_without_source_are_never_reused_wrongly(source_tree) -> None:
    import functools

    from unmerge_core.io.code import PROCESS_NONCE, source_identity

    write_tree(source_tree, {"ppkg/__init__.py": "def make(params, scale=1):\n    return scale\n"})
    module = importlib.import_module("ppkg")
    assert source_identity(functools.partial(module.make, scale=2)) == fresh(module_closure_digest, "ppkg")

    def factory(params):
        return params

    factory.__module__ = "__main__"  # as in `python -c` or a notebook: no file to hash
    main = sys.modules["__main__"]
    saved = getattr(main, "__file__", None)
    try:
        if saved is not None:
            del main.__file__
        assert source_identity(factory) == f"no-source-{PROCESS_NONCE}"  # unique to this process
    finally:
        if saved is not None:
            main.__file__ = saved


def test_a_trainers_identity_leaves_out_the_core_and_other_stages_keep_it(write_manifest) -> None:
    manifest = load_manifest(write_manifest())
    assert "core" not in manifest.trainer.config()["code"]["synthetic"]
    assert "core" in manifest.decomposers[0].config()["code"]["nnls"]
    assert manifest.trainer.config()["code"]["synthetic"]["module"] == "unmerge_plugins.trainers.synthetic"


# --------------------------------------------------------------------------------------------------
# Item 2: the merger's scaling (lambda, alpha) is part of a generated target's ground truth
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [100.0, -1.0])
def test_lambda_scales_the_ground_truth_of_generated_targets(write_manifest, scale) -> None:
    path = write_manifest(**{'[merger]\nplugin = "mergekit"\n':
                             f'[merger]\nplugin = "mergekit"\nparams = {{ lambda = {scale} }}\n',
                             "[protocol]\n": '[protocol]\nmethods = ["task_arithmetic", "linear"]\ngroups = ["known"]\n'})
    result = run(path)
    rows = [r for r in result.table.rows if r.decomposer == "nnls"]
    arithmetic = [r for r in rows if r.method == "task_arithmetic"]
    linear = [r for r in rows if r.method == "linear"]  # mergekit's linear has no lambda
    assert arithmetic and linear
    for row in arithmetic:
        assert row.true_weights == pytest.approx([scale * w for w in row.target.weights])
        if scale > 0:  # exact task arithmetic of dictionary atoms: a perfect recovery scores ~0
            assert row.metrics["coef_mae"] < 1e-3 * scale
    for row in linear:
        assert row.true_weights == row.target.weights
    targets = json.loads((result.run_dir / "targets.json").read_text())
    assert all(t["coefficients"] == pytest.approx([scale * w for w in t["weights"]])
               for t in targets if t["method"] == "task_arithmetic")


# --------------------------------------------------------------------------------------------------
# Item 1: --redo STAGE recomputes that stage and every later one
# --------------------------------------------------------------------------------------------------


def cache_stamps(run_dir: Path, kind: str) -> dict[str, int]:
    folder = run_dir / "cache" / kind
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.name.startswith(".")} \
        if folder.is_dir() else {}


@pytest.mark.parametrize("redo", ["decomposer", "merger", "all"])
def test_redo_recomputes_that_stage_and_the_later_ones_and_reuses_the_earlier(write_manifest, redo) -> None:
    path = write_manifest()
    first = run(path)
    kinds = {"trainer": "adapters", "masker": "masks", "merger": "targets", "decomposer": "decompositions",
             "metric": "metric-values"}
    before = {stage: cache_stamps(first.run_dir, kind) for stage, kind in kinds.items()}
    again = run(path, redo=redo)
    after = {stage: cache_stamps(first.run_dir, kind) for stage, kind in kinds.items()}
    redone = {"decomposer": {"decomposer", "metric"}, "merger": {"merger", "decomposer", "metric"},
              "all": set(kinds)}[redo]
    for stage in kinds:
        assert after[stage].keys() == before[stage].keys(), stage
        changed = {name for name in before[stage] if after[stage][name] != before[stage][name]}
        assert changed == (set(before[stage]) if stage in redone else set()), stage
    reused = {t.stage: t.reused for t in again.timings}
    assert reused["decomposer"] == 0 and reused["metric"] == 0
    assert reused["trainer"] == (0 if redo == "all" else len(before["trainer"]))
    assert (first.run_dir / "summary.csv").read_bytes() == (again.run_dir / "summary.csv").read_bytes()


def test_redo_names_the_stages_it_knows(write_manifest) -> None:
    with pytest.raises(UnmergeError, match=r"--redo report: unknown stage; choose one of: all, trainer, masker"):
        run(write_manifest(), redo="report")


# --------------------------------------------------------------------------------------------------
# Item 3: a rerun leaves no file of the previous run's results
# --------------------------------------------------------------------------------------------------


def test_a_rerun_removes_the_results_the_manifest_no_longer_makes(write_manifest, workdir) -> None:
    from helpers import write_lora

    adapter = write_lora(workdir / "found", {"layers.0.q": (24, 32), "layers.0.k": (8, 32), "layers.1.q": (24, 32)})
    path = write_manifest()
    path.write_text(path.read_text() + f'\n[[targets]]\npath = "{adapter}"\nname = "found"\n')
    first = Runner(load_manifest(path), progress=False, echo=lambda s: None).run()
    (first.run_dir / "my-notes.txt").write_text("a person's notes beside the results")
    assert {"coefficients_lasso.png", "attribution.json", "attribution.md", "attribution.csv"} <= \
        {p.name for p in first.run_dir.iterdir()}
    second = run(with_decomposer(write_manifest, "nnls"))  # lasso and the [[targets]] entry removed
    names = {p.name for p in second.run_dir.iterdir()}
    assert not names & {"coefficients_lasso.png", "attribution.json", "attribution.md", "attribution.csv"}
    assert {"run.json", "manifest.toml", "summary.csv", "cache", "my-notes.txt"} <= names  # no run wrote the notes
    assert {r.decomposer for r in second.table.rows} == {"nnls"}
    assert cache_stamps(second.run_dir, "adapters")  # the store inside the run directory is kept


def test_what_a_folder_held_before_unmerge_used_it_is_never_removed(write_manifest, workdir) -> None:
    """Hostile review: the second run into an existing folder removed the user's files in it."""
    path = write_manifest()
    run_dir = workdir / "runs" / "synthetic-test"
    (run_dir / "src").mkdir(parents=True)
    (run_dir / "src" / "code.py").write_text("keep")
    (run_dir / "my-thesis.tex").write_text("precious")
    run(path)
    run(with_decomposer(write_manifest, "nnls"))
    run(path)
    assert (run_dir / "my-thesis.tex").read_text() == "precious" and (run_dir / "src" / "code.py").is_file()


def test_a_folder_with_a_run_json_unmerge_did_not_write_is_refused_untouched(write_manifest, workdir) -> None:
    """Hostile review: any run.json made a folder UNMERGE's, and everything in it was removed."""
    run_dir = workdir / "runs" / "synthetic-test"
    (run_dir / "Documents").mkdir(parents=True)
    (run_dir / "run.json").write_text('{"x": 1}')
    with pytest.raises(UnmergeError, match="holds a run.json that UNMERGE did not write"):
        run(write_manifest())
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".unmerge-run")) == \
        ["Documents", "run.json"]


def test_a_run_directory_of_an_older_version_loses_only_its_known_results(write_manifest, workdir) -> None:
    run_dir = workdir / "runs" / "synthetic-test"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "complete", "unmerge": "0.1.0", "stage": null}')
    for name in ("summary.csv", "coefficients_old.png", "notes.txt"):
        (run_dir / name).write_text("old")
    run(write_manifest())
    assert (run_dir / "notes.txt").read_text() == "old" and not (run_dir / "coefficients_old.png").exists()
    assert (run_dir / "summary.csv").read_text() != "old"


@pytest.mark.parametrize("layout", ["named-cache", "inside-cache"])
def test_a_run_directory_inside_the_stores_cache_is_refused(write_manifest, workdir, layout) -> None:
    """Hostile review: name = "cache" with dir = store wrote results into the store and cleared it."""
    store = workdir / "s1"
    out = store if layout == "named-cache" else store / "cache"
    name = "cache" if layout == "named-cache" else "adapters"
    path = write_manifest(**{'name = "synthetic-test"': f'name = "{name}"',
                             f'dir = "{workdir / "runs"}"': f'dir = "{out}"\nstore = "{store}"'})
    with pytest.raises(UnmergeError, match=r"lies inside the artifact store's cache"):
        run(path)


def test_a_store_inside_a_run_directory_reached_through_a_link_is_kept(write_manifest, workdir) -> None:
    """Hostile review: the store's path was compared without resolving links, and removed."""
    (workdir / "real").mkdir()
    (workdir / "link").symlink_to(workdir / "real", target_is_directory=True)
    store = workdir / "real" / "synthetic-test" / "mystore"
    path = write_manifest(**{f'dir = "{workdir / "runs"}"': f'dir = "{workdir / "link"}"\nstore = "{store}"'})
    run(path)
    again = run(path)
    assert {t.stage: t.reused for t in again.timings}["trainer"] == 7 and (store / "cache" / "adapters").is_dir()


# --------------------------------------------------------------------------------------------------
# Item 4: one run directory, one manifest at a time
# --------------------------------------------------------------------------------------------------


def test_a_different_manifest_with_the_same_name_is_refused_while_the_directory_is_held(write_manifest) -> None:
    from unmerge_core.pipeline.run_directory import RunDirectory, manifest_identity

    first = write_manifest()
    other = write_manifest(name="other.toml", **{"seed = 7": "seed = 8"})
    run_dir = first.parent / "runs" / "synthetic-test"
    run_dir.mkdir(parents=True)
    holder = RunDirectory(run_dir, manifest_identity(first, first.read_text()), first)
    holder.claim()  # a run of the first manifest is under way
    try:
        with pytest.raises(UnmergeError, match=r"is in use by a run of another manifest with the same name \(.*"
                                               r"manifest.toml, process \d+\)"):
            run(other)
        assert not (run_dir / "run.json").exists()  # the refused run wrote nothing there
        joined = run(first)  # the same manifest may join
        assert joined.table.rows
    finally:
        holder.release()
    assert run(other).table.rows  # free again


def test_a_run_that_joins_a_running_one_never_calls_the_directory_complete_before_it(write_manifest) -> None:
    """Hostile review: the joiner wrote complete while the first run still worked (then was killed)."""
    from unmerge_core.pipeline.run_directory import RunDirectory, manifest_identity

    path = write_manifest()
    run_dir = path.parent / "runs" / "synthetic-test"
    run_dir.mkdir(parents=True)
    first = RunDirectory(run_dir, manifest_identity(path, path.read_text()), path)
    first.claim()  # the first run of this manifest, still working
    try:
        run(path)
        assert read_status(run_dir)["status"] == "running"
    finally:
        first.release()  # the first run ends (here: dies)
    notes: list[str] = []
    Runner(load_manifest(path), progress=False, echo=notes.append, plots=False).run()
    assert any("killed or crashed" in n for n in notes) and read_status(run_dir)["status"] == "complete"


def test_two_different_manifests_with_one_name_run_at_once_never_mix(write_manifest) -> None:
    import subprocess

    paths = [write_manifest(), write_manifest(name="other.toml", **{"seed = 7": "seed = 8"})]
    procs = [subprocess.Popen([sys.executable, "-m", "unmerge_core", "run", str(p), "--no-progress", "--no-plots"],
                              cwd=p.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in paths]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    run_dir = paths[0].parent / "runs" / "synthetic-test"
    if codes == [0, 0]:  # one finished before the other started: the later one's files are all there
        pass
    else:
        assert sorted(codes) == [0, 2], outputs
        refused = outputs[codes.index(2)][1]
        assert "in use by a run of another manifest with the same name" in refused
    status = read_status(run_dir)
    assert status["status"] == "complete"
    manifest = (run_dir / "manifest.toml").read_text()
    assert status["manifest"] in {str(p) for p in paths}
    assert manifest == Path(status["manifest"]).read_text()  # the summary belongs to that manifest
    from unmerge_core.pipeline.protocol import generate_targets

    winner = {(s.target_id, tuple(s.tasks), tuple(s.true_weights))
              for s in generate_targets(load_manifest(Path(status["manifest"])))}
    rows = json.loads((run_dir / "per_target.json").read_text())["rows"]
    assert {(r["target_id"], tuple(r["true_tasks"]), tuple(r["true_weights"])) for r in rows} == winner


# --------------------------------------------------------------------------------------------------
# Item 17: a run that ends in an error says so in run.json
# --------------------------------------------------------------------------------------------------


def test_a_failed_run_records_failed_with_its_error_and_the_next_run_says_so(write_manifest, tmp_path,
                                                                             plugin_path) -> None:
    import types

    from unmerge_core import Decomposition, NoParams, PluginSpec, Stage, hookimpl

    class Failing:
        def __init__(self, params) -> None:
            pass

        def decompose(self, problem) -> Decomposition:
            raise ValueError("the solver diverged")

    @hookimpl
    def unmerge_decomposers():
        return [PluginSpec("failing", Stage.DECOMPOSER, "test", "https://example.org", NoParams, Failing)]

    manager = PluginManager()
    manager.register(types.SimpleNamespace(unmerge_decomposers=unmerge_decomposers), name="failing")
    path = with_decomposer(write_manifest, "failing")
    with pytest.raises(UnmergeError, match="the solver diverged"):
        run(path, manager)
    run_dir = path.parent / "runs" / "synthetic-test"
    status = read_status(run_dir)
    assert status["status"] == "failed" and status["stage"] == "decomposer"
    assert status["error"] == "decomposer plugin 'failing': raised ValueError: the solver diverged"
    notes: list[str] = []
    Runner(load_manifest(with_decomposer(write_manifest, "nnls")), progress=False, echo=notes.append,
           plots=False).run()
    assert notes[0] == (f"note: the previous run in {run_dir} failed during 'decomposer': decomposer plugin "
                        "'failing': raised ValueError: the solver diverged; finished work is reused")
    assert read_status(run_dir)["status"] == "complete"


# --------------------------------------------------------------------------------------------------
# Item 21: artifacts respect the umask (a store shared by a team)
# --------------------------------------------------------------------------------------------------


def test_artifacts_and_their_folders_follow_the_umask(write_manifest) -> None:
    from unmerge_core.io.store import UMASK

    result = run(write_manifest())
    files = [result.run_dir / "summary.csv", *(result.run_dir / "cache" / "adapters").rglob("*.safetensors")]
    folders = [p for p in (result.run_dir / "cache" / "adapters").iterdir() if p.is_dir()]
    assert files and folders
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~UMASK}
    assert {p.stat().st_mode & 0o777 for p in folders} == {0o777 & ~UMASK}


def test_the_tiny_base_a_trainer_builds_follows_the_umask_too(tmp_path) -> None:
    from unmerge_core.io.store import UMASK
    from unmerge_plugins.lib.tiny_model import TinyModelParams, build_tiny_model

    params = TinyModelParams(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                             pretrain_steps=0)
    directory = build_tiny_model(tmp_path / "tiny", params)
    assert directory.stat().st_mode & 0o777 == 0o777 & ~UMASK
    assert {p.stat().st_mode & 0o777 for p in directory.iterdir() if p.is_file()} == {0o666 & ~UMASK}
