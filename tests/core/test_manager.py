"""Plugin discovery: entry points, broken plugins, name clashes, the `unmerge plugins` listing."""

from __future__ import annotations

import json
import types

import pytest

from unmerge_core import NoParams, PluginSpec, Stage, hookimpl
from unmerge_core.cli import main
from unmerge_core.errors import UnmergeError
from unmerge_core.manager import PluginManager
from unmerge_core.types import STAGE_NAMES

BUILTIN = {
    "trainer": {"peft-lora", "adapters", "synthetic"},
    "merger": {"mergekit"},
    "masker": {"topk"},
    "decomposer": {"nnls", "paper-nnls", "lasso", "omp", "ridge", "dot-product"},
    "metric": {"support", "reconstruction", "semantic-alignment"},
}


def _decomposer_plugin(name: str) -> types.SimpleNamespace:
    class Impl:
        def __init__(self, params): ...

    @hookimpl
    def unmerge_decomposers():
        return [PluginSpec(name, Stage.DECOMPOSER, "test", "https://example.org", NoParams, Impl)]

    return types.SimpleNamespace(unmerge_decomposers=unmerge_decomposers)


def test_builtins_come_through_the_entry_point_group() -> None:
    # Only unmerge's own plugins are checked: a third-party plugin a user installed (e.g. README's
    # plugins/unmerge-example-decomposer) may be listed beside them, or even be broken.
    pm = PluginManager()
    assert not [b for b in pm.broken if b.distribution == "unmerge"]
    for stage, names in BUILTIN.items():
        assert names <= set(pm.names(stage))
        for name in names:
            p = pm.get(stage, name)
            assert p.distribution == "unmerge"
            assert p.spec.reference.startswith("https://")
    for p in pm.plugins():
        if p.distribution == "unmerge":
            assert p.spec.reference.startswith("https://")


def test_name_clash_names_both_distributions_and_disables_only_that_name() -> None:
    pm = PluginManager()
    pm.register(_decomposer_plugin("nnls"), name="clash", distribution="other-dist", version="1.0")
    listed = [p for p in pm.plugins("decomposer") if p.name == "nnls"]
    assert {p.distribution for p in listed} == {"unmerge", "other-dist"}  # both still listed
    assert len(pm.conflicts) == 1
    with pytest.raises(UnmergeError, match=r"decomposer plugin name 'nnls' is declared twice: by unmerge .* "
                                           r"and by other-dist 1.0"):
        pm.get("decomposer", "nnls")
    assert pm.get("decomposer", "lasso").distribution == "unmerge"  # every other plugin keeps working


def test_hook_that_raises_is_reported_and_skipped() -> None:
    pm = PluginManager()

    @hookimpl
    def unmerge_decomposers():
        raise RuntimeError("boom")

    pm.register(types.SimpleNamespace(unmerge_decomposers=unmerge_decomposers), name="bad", distribution="bad-dist")
    names = pm.names("decomposer")
    assert "nnls" in names
    assert any("boom" in b.error and b.distribution == "bad-dist" for b in pm.broken)


def test_wrong_stage_descriptor_is_rejected() -> None:
    pm = PluginManager(load_entry_points=False)

    @hookimpl
    def unmerge_metrics():
        return [PluginSpec("x", Stage.DECOMPOSER, "s", "https://e.org", NoParams, object)]

    pm.register(types.SimpleNamespace(unmerge_metrics=unmerge_metrics), name="wrong")
    assert pm.names("metric") == []
    assert "declares stage decomposer in the metric hook" in pm.broken[0].error


def test_unknown_hook_is_a_validation_error() -> None:
    pm = PluginManager(load_entry_points=False)

    @hookimpl
    def unmerge_decomposer():  # typo: no such hook
        return []

    pm.register(types.SimpleNamespace(unmerge_decomposer=unmerge_decomposer), name="typo")
    assert "typo" in pm.broken[0].error


def test_strict_mode_raises() -> None:
    pm = PluginManager(load_entry_points=False, strict=True)

    @hookimpl
    def unmerge_decomposers():
        raise RuntimeError("boom")

    pm.register(types.SimpleNamespace(unmerge_decomposers=unmerge_decomposers), name="bad")
    with pytest.raises(UnmergeError, match="boom"):
        pm.plugins()


def test_entry_point_that_fails_to_import_does_not_break_listing(monkeypatch, capsys) -> None:
    import importlib.metadata as md

    real = md.entry_points

    class BrokenEP:
        name = "broken-thing"
        dist = types.SimpleNamespace(name="broken-dist", version="0.0.1")

        def load(self):
            raise ImportError("No module named 'nowhere'")

    def fake(group=None, **kw):
        eps = list(real(group=group, **kw))
        return eps + [BrokenEP()] if group == "unmerge" else eps

    monkeypatch.setattr(md, "entry_points", fake)
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert "nnls" in captured.out
    assert "Error importing plugin 'broken-thing'" in captured.err and "broken-dist" in captured.err


def test_plugins_table_lists_every_builtin(capsys) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["name", "stage", "distribution", "summary"]
    for names in BUILTIN.values():
        for name in names:
            assert any(line.split()[0] == name for line in out.splitlines()[2:])
    assert "unmerge 0.1.0" in out


def test_plugins_json_has_the_documented_keys(capsys) -> None:
    assert main(["plugins", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {(r["stage"], r["name"]) for r in records} >= {(s, n) for s, ns in BUILTIN.items() for n in ns}
    for r in records:
        assert {"name", "stage", "distribution", "version", "summary"} <= set(r)
        assert r["stage"] in STAGE_NAMES


def test_plugins_stage_filter(capsys) -> None:
    assert main(["plugins", "--stage", "masker", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["stage"] for r in records} == {"masker"}


def test_instantiate_validates_params() -> None:
    pm = PluginManager()
    lasso = pm.instantiate("decomposer", "lasso", {"alpha_ratio": 0.1})
    assert lasso.params.alpha_ratio == 0.1
    with pytest.raises(UnmergeError, match="alpha_ratio"):
        pm.instantiate("decomposer", "lasso", {"alpha_ratio": -1})
