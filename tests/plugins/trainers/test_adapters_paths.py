"""The ``adapters`` trainer reads a relative ``root`` / ``paths`` from the manifest's folder, like every
other path of a manifest, so one manifest gives one answer whatever the current directory: the same
adapters, the same cache keys, and errors that name the manifest-relative folder."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from helpers import SMALL_REGISTRY, write_lora

from unmerge_core.config.manifest import load_manifest
from unmerge_core.errors import UnmergeError
from unmerge_core.manager import PluginManager
from unmerge_core.pipeline.runner import Runner

TASKS = ("alpha", "beta", "gamma")
MODULES = {"model.layers.0.q": (8, 16), "model.layers.0.k": (4, 16)}

MANIFEST = """
name = "rel"
seed = 1
[tasks]
known = ["alpha", "beta", "gamma"]
[protocol]
groups = []
[trainer]
plugin = "adapters"
{trainer_params}
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = {{ budget = 64 }}
[[decomposers]]
plugin = "nnls"
[[targets]]
path = "target"
kind = "adapter"
[output]
dir = "{out}"
"""

ROOT = 'params = { root = "dict" }'
PATHS = 'params = { paths = { alpha = "dict/alpha", beta = "./dict/beta", gamma = "dict/gamma" } }'


def _dictionary(folder: Path, seeds: dict[str, int]) -> None:
    for task, seed in seeds.items():
        write_lora(folder / task, MODULES, seed=seed)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """``man/`` (the manifest, its registry, its dictionary, a target = its alpha) and ``elsewhere/``,
    a working directory with a ``dict/`` of its own whose adapters are man's under other names."""
    man, elsewhere = tmp_path / "man", tmp_path / "elsewhere"
    man.mkdir()
    (man / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    _dictionary(man / "dict", {"alpha": 1, "beta": 2, "gamma": 3})
    _dictionary(elsewhere / "dict", {"alpha": 2, "beta": 1, "gamma": 3})
    shutil.copytree(man / "dict" / "alpha", man / "target")
    return {"tmp": tmp_path, "man": man, "elsewhere": elsewhere}


def _write(world: dict[str, Path], trainer_params: str, name: str = "m.toml", folder: Path | None = None) -> Path:
    folder = folder or world["man"]
    path = folder / name
    path.write_text(MANIFEST.format(trainer_params=trainer_params, out=world["tmp"] / "runs"))
    return path


@pytest.mark.parametrize("params", [ROOT, PATHS], ids=["root", "paths"])
def test_one_manifest_locates_the_same_adapters_from_any_directory(world, monkeypatch, params) -> None:
    _write(world, params)
    located, configs, keys = [], [], []
    for cwd, manifest_path in [(world["man"], "m.toml"), (world["elsewhere"], "../man/m.toml")]:
        monkeypatch.chdir(cwd)
        manifest = load_manifest(manifest_path)
        trainer = manifest.trainer.build()
        located.append({t: trainer.locate(t).resolve() for t in TASKS})
        configs.append(manifest.trainer.config())
        runner = Runner(manifest, progress=False, echo=lambda s: None)
        keys.append([runner.adapter_key(task) for task in manifest.all_tasks])
    assert located[0] == located[1] == {t: (world["man"] / "dict" / t).resolve() for t in TASKS}
    assert configs[0] == configs[1]
    assert keys[0] == keys[1]


def test_a_run_attributes_the_same_from_any_directory(world, monkeypatch) -> None:
    _write(world, ROOT)
    answers = []
    for cwd, manifest_path in [(world["man"], "m.toml"), (world["elsewhere"], "../man/m.toml")]:
        monkeypatch.chdir(cwd)
        result = Runner(load_manifest(manifest_path), progress=False, echo=lambda s: None).run()
        report = json.loads((result.run_dir / "attribution.json").read_text())
        answers.append(report["targets"][0]["results"][0]["coefficients"])
    for coefficients in answers:  # the target is man/dict/alpha: alpha, not elsewhere/dict/alpha (= beta)
        assert coefficients["alpha"] == pytest.approx(1.0, abs=1e-4)
        assert coefficients["beta"] == pytest.approx(0.0, abs=1e-4)


def test_a_missing_relative_root_names_the_manifest_relative_folder(world, monkeypatch) -> None:
    _write(world, 'params = { root = "nodict" }')
    shutil.copytree(world["elsewhere"] / "dict", world["elsewhere"] / "nodict")  # in the cwd only
    monkeypatch.chdir(world["elsewhere"])
    manifest = load_manifest("../man/m.toml")
    with pytest.raises(UnmergeError) as info:
        Runner(manifest, progress=False, echo=lambda s: None).run()
    message = str(info.value)
    assert "\n" not in message
    assert str(world["man"].resolve() / "nodict") in message
    assert str(world["elsewhere"]) not in message


def test_two_manifests_with_the_same_relative_root_keep_their_own_adapters(world, monkeypatch) -> None:
    other = world["tmp"] / "other"
    other.mkdir()
    (other / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    _dictionary(other / "dict", {"alpha": 5, "beta": 6, "gamma": 7})
    shutil.copytree(world["man"] / "target", other / "target")
    monkeypatch.chdir(world["tmp"])
    first = load_manifest(_write(world, ROOT))
    second = load_manifest(_write(world, ROOT, folder=other))
    # instance() is shared by plugin configuration within a process: the configurations must differ
    assert first.trainer.instance().locate("alpha").resolve() == (world["man"] / "dict" / "alpha").resolve()
    assert second.trainer.instance().locate("alpha").resolve() == (other / "dict" / "alpha").resolve()


def test_home_and_absolute_paths(world, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(world["elsewhere"]))
    monkeypatch.chdir(world["tmp"])
    trainer = load_manifest(_write(world, 'params = { root = "~/dict" }')).trainer.build()
    assert trainer.locate("alpha") == world["elsewhere"] / "dict" / "alpha"
    absolute = world["elsewhere"] / "dict"
    params = f'params = {{ root = "{absolute}", paths = {{ beta = "{world["man"] / "dict" / "beta"}" }} }}'
    trainer = load_manifest(_write(world, params)).trainer.build()
    assert trainer.locate("alpha") == absolute / "alpha"
    assert trainer.locate("beta") == world["man"] / "dict" / "beta"


def test_hub_ids_are_kept_and_params_outside_a_manifest_stay_relative_to_the_cwd(world, monkeypatch) -> None:
    monkeypatch.chdir(world["tmp"])
    manifest = load_manifest(_write(world, 'params = { root = "dict", paths = { alpha = "acme/alpha" } }'))
    assert manifest.trainer.config()["params"]["paths"] == {"alpha": "acme/alpha"}
    monkeypatch.chdir(world["elsewhere"])  # no manifest: a relative root is the caller's (its cwd)
    trainer = PluginManager().instantiate("trainer", "adapters", {"root": "dict"})
    assert trainer.locate("alpha").resolve() == (world["elsewhere"] / "dict" / "alpha").resolve()
