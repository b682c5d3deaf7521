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

