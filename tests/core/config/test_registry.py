"""registry.toml's [plugins] list stays in sync with the plugins the code declares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unmerge_core.cli import main
from unmerge_core.errors import UnmergeError
from unmerge_core.manager import PluginManager
from unmerge_core.config.registry import Registry

from helpers import REPO  # noqa: E402


def test_every_first_party_plugin_is_listed_and_nothing_else() -> None:
    registry = Registry.load(REPO / "registry.toml")
    listed = {(e.stage, name) for name, e in registry.data.plugins.items() if e.distribution == "unmerge"}
    declared = {(p.stage, p.name) for p in PluginManager().plugins() if p.distribution == "unmerge"}
    assert listed == declared, f"missing from registry: {declared - listed}; stale: {listed - declared}"


def test_example_plugin_is_listed_with_its_distribution() -> None:
    entry = Registry.load(REPO / "registry.toml").data.plugins["bic-nnls"]
    assert entry.distribution == "unmerge-example-decomposer" and entry.stage == "decomposer"


def test_available_shows_not_installed(capsys) -> None:
    assert main(["plugins", "--available", "--json", "--registry", str(REPO / "registry.toml")]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["nnls"]["installed"] is True
    # the example distribution is only installed inside tests/test_third_party_plugin.py
    assert records["bic-nnls"]["installed"] is False
    assert records["bic-nnls"]["distribution"] == "unmerge-example-decomposer"


def test_the_registry_ships_with_the_package_and_is_the_repositorys() -> None:
    """Issue 20, item 20: outside the repository no registry.toml was found at all."""
    from unmerge_core.config.registry import packaged_registry

    shipped = packaged_registry()
    assert shipped is not None and shipped.read_bytes() == (REPO / "registry.toml").read_bytes()
    assert "reverse-words" in Registry.load(shipped).task_names


def test_pyproject_ships_the_registry_as_package_data() -> None:
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "registry.toml" in config["tool"]["setuptools"]["package-data"]["unmerge_core"]
    assert (REPO / "unmerge_core" / "registry.toml").resolve() == (REPO / "registry.toml").resolve()


def _verify_request(**kw):
    from unmerge_core.pipeline.attribute import AttributeRequest

    return AttributeRequest(targets=[], output_dir=Path("out"), verify=True, **kw)


def test_verify_outside_the_repository_uses_the_shipped_registry_and_says_so(tmp_path, monkeypatch) -> None:
    from unmerge_core.config.registry import packaged_registry
    from unmerge_core.pipeline.attribute import verification_tasks

    monkeypatch.chdir(tmp_path)  # no registry.toml here or above
    said: list[str] = []
    noted: list[str] = []
    tasks = verification_tasks(_verify_request(), ["reverse-words", "mystery"], said.append, noted.append)
    assert tasks["reverse-words"].source["generator"] == "reverse-words"
    assert noted == [f"--verify: task data from {packaged_registry()} (the registry shipped with unmerge)"]
    assert len(said) == 1 and "'mystery'" in said[0] and str(packaged_registry()) in said[0]


def test_verify_with_no_registry_at_all_says_so_once(tmp_path, monkeypatch) -> None:
    import unmerge_core.pipeline.attribute as attribute

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(attribute, "packaged_registry", lambda: None)
    said: list[str] = []
    with pytest.raises(UnmergeError, match="no skill of the dictionary has task data"):
        attribute.verification_tasks(_verify_request(), [f"s{i}" for i in range(8)], said.append)
    assert len(said) == 1 and "no registry.toml found" in said[0] and "no registry task of that name" not in said[0]


def test_available_outside_the_repository_reads_the_shipped_registry(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["plugins", "--available", "--json"]) == 0
    assert "bic-nnls" in {r["name"] for r in json.loads(capsys.readouterr().out)}
