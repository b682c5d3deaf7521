"""The decompose → score loop: what a metric plugin may return, and whose column it is."""

from __future__ import annotations

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
