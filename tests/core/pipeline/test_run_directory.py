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
from unmerge_core.io.code import package_source_digest
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
    assert old["code"]["scaled-nnls"]["version"] == "0.1.0" and old["code"]["scaled-nnls"]["package"] == "scaled_plugin"
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
    assert package_source_digest("no_such_package_anywhere") == "no-source"


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
