"""The decompose → score loop: what a metric plugin may return, and whose column it is."""

from __future__ import annotations

import json
import re
import types

import numpy as np
import pytest

from unmerge_core import NoParams, PluginSpec, Stage, hookimpl
from unmerge_core.errors import PluginError
from unmerge_core.manager import PluginManager
from unmerge_core.pipeline.scoring import ScoreLoop, ScoreTarget, metric_values
from unmerge_core.types import MergeJob


class _Returns:
    """A metric returning ``values`` for every evaluation."""

    values: dict = {}

    def __init__(self, params) -> None: ...

    def compute(self, evaluation):
        return dict(self.values)


def _loop(values: dict, *, first: str = "support", extra_label: str = "clobber") -> ScoreLoop:
    @hookimpl
    def unmerge_metrics():
        return [PluginSpec("returns", Stage.METRIC, "returns fixed values", "https://example.org", NoParams,
                           type("Returns", (_Returns,), {"values": values}))]

    pm = PluginManager()
    pm.register(types.SimpleNamespace(unmerge_metrics=unmerge_metrics), name="returns-plugin")
    metrics = [pm.resolve("metric", first), pm.resolve("metric", "returns", label=extra_label)]
    dictionary = np.eye(4)[:, :2]
    return ScoreLoop(("a", "b"), dictionary, {"m": slice(0, 4)}, [pm.resolve("decomposer", "nnls")],
                     [(r, r.build()) for r in metrics])


def _score(loop: ScoreLoop):
    target = ScoreTarget(MergeJob("known-linear-00", "linear", ("a", "b"), (0.5, 0.5), 0, "known"),
                         np.array([0.5, 0.5, 0.0, 0.0]))
    return loop.score(loop.decompose([target]))


def test_a_metric_cannot_overwrite_another_metrics_column() -> None:
    """Found by a hostile audit: a metric returning {"precision": 0.0} replaced support's precision everywhere."""
    with pytest.raises(PluginError) as info:
        _score(_loop({"precision": 0.0, "mine": 1.0}))
    message = str(info.value)
    assert message == ("metric plugin 'clobber': returned column 'precision', which metric 'support' returns too; "
                       "a column belongs to one metric: rename it (e.g. 'clobber.precision')"), message
    assert info.value.stage == "metric" and info.value.plugin == "clobber"


@pytest.mark.parametrize("column", ["decomposer", "target_id", "group", "method", "true_tasks", "true_weights",
                                    "n", "coef[a]"])
def test_a_metric_cannot_take_a_column_of_the_results_table(column) -> None:
    expected = rf"^metric plugin 'clobber': returned column '{re.escape(column)}' \(one of the results table's own"
    with pytest.raises(PluginError, match=expected):
        _score(_loop({column: 0.0}))


def test_distinct_columns_of_two_metrics_are_kept() -> None:
    scored = _score(_loop({"mine": 0.25}))
    assert scored[0].metrics["mine"] == 0.25 and scored[0].metrics["precision"] == 1.0


def test_an_integer_too_large_for_a_float_is_refused_naming_the_metric() -> None:
    """Found by a hostile audit: a metric returning 10**400 ended in an internal OverflowError."""
    evaluation = types.SimpleNamespace(target_id="known-linear-00")
    metric = _Returns(None)
    metric.values = {"huge": 10**400}
    with pytest.raises(PluginError) as info:
        metric_values(metric, "huge-metric", evaluation)
    assert str(info.value) == ("metric plugin 'huge-metric': column 'huge' is an integer too large for a float "
                               "(target known-linear-00)")
    metric.values = {"big": 10**300}
    assert metric_values(metric, "huge-metric", evaluation) == {"big": 1e300}


# --------------------------------------------------------------------------------------------------
# Details a metric writes beside its values survive a rerun that reuses the values
# --------------------------------------------------------------------------------------------------


class _WritesDetails:
    """A metric that writes a file of its own into the run directory, as ``causal-ablation`` writes
    ``causal/``, and keeps it with its cached values through the two optional methods."""

    computed = 0

    def __init__(self, params) -> None:
        self._kept: dict = {}

    @staticmethod
    def _path(evaluation):
        return evaluation.context.run_dir / "details" / evaluation.decomposer / f"{evaluation.target_id}.json"

    def compute(self, evaluation):
        type(self).computed += 1
        details = {"target": evaluation.target_id, "coefficients": list(evaluation.decomposition.coefficients)}
        self._write(evaluation, details)
        self._kept[(evaluation.decomposer, evaluation.target_id)] = details
        return {"wrote": 1.0}

    def _write(self, evaluation, details) -> None:
        path = self._path(evaluation)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(details, sort_keys=True))

    def metric_details(self, evaluation):
        return self._kept.pop((evaluation.decomposer, evaluation.target_id), None)

    def restore_details(self, evaluation, details) -> None:
        self._write(evaluation, details)


def _details_manager() -> PluginManager:
    @hookimpl
    def unmerge_metrics():
        return [PluginSpec("writes-details", Stage.METRIC, "writes a file per evaluation", "https://example.org",
                           NoParams, _WritesDetails)]

    pm = PluginManager()
    pm.register(types.SimpleNamespace(unmerge_metrics=unmerge_metrics), name="details-plugin")
    return pm


def _details_files(run_dir) -> dict[str, bytes]:
    root = run_dir / "details"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json"))} if root.is_dir() else {}


def test_a_rerun_that_reuses_the_metric_values_writes_the_metrics_details_again(write_manifest) -> None:
    """Found on the quickstart: the second `unmerge run` reused every metric value, the first claim of the
    run directory had removed the previous run's causal/ folder, and nothing wrote it again."""
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.pipeline.runner import Runner

    path = write_manifest(**{"[output]": '[[metrics]]\nplugin = "writes-details"\n[output]'})

    def run():
        return Runner(load_manifest(path, _details_manager()), progress=False, echo=lambda s: None,
                      plots=False).run()

    first = run()
    files = _details_files(first.run_dir)
    computed = _WritesDetails.computed
    assert len(files) == len(first.table.rows) > 0
    second = run()
    assert {t.stage: t.reused for t in second.timings}["metric"] == len(second.table.rows)
    assert _WritesDetails.computed == computed  # the values came from the cache ...
    assert _details_files(second.run_dir) == files  # ... and the details came back with them


def test_cached_values_without_kept_details_are_computed_again(write_manifest) -> None:
    """A metric-values file written before details were kept: the metric runs again and writes them."""
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.pipeline.runner import Runner

    path = write_manifest(**{"[output]": '[[metrics]]\nplugin = "writes-details"\n[output]'})

    def run():
        return Runner(load_manifest(path, _details_manager()), progress=False, echo=lambda s: None,
                      plots=False).run()

    first = run()
    files = _details_files(first.run_dir)
    for cached in (first.run_dir / "cache" / "metric-values").glob("*.json"):
        data = json.loads(cached.read_text())
        if data["metric"] == "writes-details":
            assert data["details"] is not None
            del data["details"]
            cached.write_text(json.dumps(data))
    computed = _WritesDetails.computed
    again = run()
    assert _WritesDetails.computed == computed + len(again.table.rows)
    assert _details_files(again.run_dir) == files
