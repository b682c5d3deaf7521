"""Models and adapters by Hub id, on a Hugging Face cache built here (no network): resolution, revision
pinning, offline mode, a local path winning over an id, pickle-only repositories, one-line errors, and
the ids in ``unmerge attribute``, manifests and the ``adapters`` trainer."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL_REGISTRY, load_state, random_adapter, tiny_base
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from unmerge_core.cli import main
from unmerge_core.config.manifest import load_manifest
from unmerge_core.errors import UnmergeError
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.checkpoints import Checkpoint
from unmerge_core.io.hub import HubRef, parse_hub_ref, resolve_model_ref
from unmerge_core.pipeline.runner import Runner

MAIN, V1 = "1" * 40, "2" * 40
ATOMS = ("alpha", "beta", "gamma")
MERGE = {"alpha": 0.6, "gamma": 0.4}


def cached_repo(cache: Path, repo_id: str, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """An empty snapshot folder of ``repo_id`` at ``commit`` in a Hub cache, named by ``refs``."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def merged_model(base: Path, adapters: dict[str, Path], weights: dict[str, float], out: Path) -> Path:
    """``base + Σ wᵢ ΔWᵢ`` saved as a model directory (a linear merge, written out)."""
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(base)
    for name, w in weights.items():
        adapter = LoraAdapter(adapters[name], name)
        for module in adapter.module_names:
            state[f"{module}.weight"] = state[f"{module}.weight"] + w * adapter.delta(module)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    shutil.copy(base / "config.json", out / "config.json")
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding acme/base (main and tag v1: other weights), acme/<atom> adapters, acme/merged
    and acme/pickled (pytorch_model.bin only)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    base = tiny_base(cached_repo(cache, "acme/base", MAIN))
    tiny_base(cached_repo(cache, "acme/base", V1, refs=("v1",)), seed=5)
    adapters = {}
    for i, name in enumerate(ATOMS):
        adapters[name] = random_adapter(base, cached_repo(cache, f"acme/{name}", MAIN), seed=300 + i)
        config = json.loads((adapters[name] / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "acme/base"  # as on the Hub: an id, not a path
        (adapters[name] / "adapter_config.json").write_text(json.dumps(config))
    merged = merged_model(base, adapters, MERGE, cached_repo(cache, "acme/merged", MAIN))
    pickled = cached_repo(cache, "acme/pickled", MAIN)
    shutil.copy(base / "config.json", pickled / "config.json")
    torch.save(load_state(base), pickled / "pytorch_model.bin")
    return {"cache": cache, "base": base, "adapters": adapters, "merged": merged}


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_ids_resolve_to_the_cached_snapshot_with_revision_pinning(offline) -> None:
    assert resolve_model_ref("acme/base", "--base") == offline["base"]
    assert resolve_model_ref(f"acme/base@{MAIN}", "--base") == offline["base"]
    pinned = resolve_model_ref("acme/base@v1", "--base")
    assert pinned.name == V1
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(Checkpoint(pinned).tensor(name), Checkpoint(offline["base"]).tensor(name))


def test_a_local_path_wins_over_an_id(offline, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "base").mkdir(parents=True)
    assert resolve_model_ref("acme/base", "--base") == Path("acme/base")
    assert resolve_model_ref("./missing/dir", "--base") == Path("missing/dir")  # a path, not an id
    (tmp_path / "models" / "org" / "net").mkdir(parents=True)  # relative to a manifest's folder
    assert resolve_model_ref("org/net", "base", relative_to=tmp_path / "models") == tmp_path / "models" / "org" / "net"


@pytest.mark.parametrize("value,expected", [
    ("acme/nothing", "--base acme/nothing: no such local path, and its default branch is not in the Hugging Face "
                     "cache while HF_HUB_OFFLINE is set"),
    ("acme/base@v9", "--base acme/base@v9: no such local path, and revision 'v9' is not in the Hugging Face cache"),
    ("acme/pickled", "--base acme/pickled: the repository has no safetensors weights; pickle weights "
                     "(pytorch_model.bin) are refused: pass --allow-pickle"),
])
def test_unresolvable_ids_are_one_line(offline, value, expected) -> None:
    with pytest.raises(UnmergeError) as info:
        resolve_model_ref(value, "--base")
    assert expected in one_line(info)


def test_pickle_only_repository_with_allow_pickle(offline) -> None:
    folder = resolve_model_ref("acme/pickled", "--base", allow_pickle=True)
    name = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(Checkpoint(folder, allow_pickle=True).tensor(name), Checkpoint(offline["base"]).tensor(name))


@given(owner=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,12}", fullmatch=True),
       name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
       revision=st.none() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True))
def test_parse_round_trips_and_paths_are_never_ids(owner, name, revision) -> None:
    text = f"{owner}/{name}" + (f"@{revision}" if revision else "")
    ref = parse_hub_ref(text, Path("/nonexistent-root"))
    assert ref == HubRef(f"{owner}/{name}", revision) and str(ref) == text and ref.name == name
    for path in (f"/{text}", f"./{text}", f"~/{text}", f"{owner}/{name}/weights", name):
        assert parse_hub_ref(path, Path("/nonexistent-root")) is None


def test_attribute_by_hub_ids(offline, tmp_path, capsys) -> None:
    argv = ["attribute", "--base", "acme/base", "--output-dir", str(tmp_path / "out"), "--budget", "600"]
    for name in ATOMS:
        argv += ["--adapter", f"{name}=acme/{name}"]
    rc = main([*argv, "acme/merged"])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((tmp_path / "out" / "attribution.json").read_text())
    (target,) = report["targets"]
    assert target["name"] == "merged" and Path(target["path"]) == offline["merged"]
    assert set(target["results"][0]["support"]) == set(MERGE)
    rc = main([*argv[:-2], "--adapter", "alpha=acme/missing", "acme/merged"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --adapter alpha acme/missing: no such local path" in err and "Traceback" not in err


MANIFEST = """
name = "hub"
seed = 1
base = "{base}"
[tasks]
known = ["alpha", "beta", "gamma"]
[protocol]
groups = []
[trainer]
plugin = "adapters"
params = {{ paths = {{ alpha = "acme/alpha", beta = "acme/beta", gamma = "acme/gamma" }} }}
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = {{ budget = 600 }}
[[decomposers]]
plugin = "nnls"
[[targets]]
path = "{target}"
[output]
dir = "{out}"
"""


def test_manifest_base_targets_and_adapters_by_hub_id(offline, tmp_path) -> None:
    (tmp_path / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    path = tmp_path / "m.toml"
    path.write_text(MANIFEST.format(base="acme/base", target="acme/merged", out=tmp_path / "runs"))
    manifest = load_manifest(path)
    assert manifest.file.targets[0].display_name == "merged"
    result = Runner(manifest, progress=False, echo=lambda s: None).run()
    report = json.loads((result.run_dir / "attribution.json").read_text())
    got = report["targets"][0]["results"][0]["coefficients"]
    assert np.allclose([got[n] for n in ATOMS], [MERGE.get(n, 0.0) for n in ATOMS], atol=1e-3)
    path.write_text(MANIFEST.format(base="acme/base@v7", target="acme/merged@v1", out=tmp_path / "runs"))
    with pytest.raises(UnmergeError) as info:
        load_manifest(path)
    lines = str(info.value).splitlines()
    assert f"{path}: targets[0].path: acme/merged@v1: no such local path, and revision 'v1'" in lines[0]
    assert f"{path}: base: acme/base@v7: no such local path, and revision 'v7'" in lines[1]


def test_an_adapter_replaced_in_place_is_read_again(hub, tmp_path) -> None:
    # the adapters trainer's copies were keyed by its parameters only: a new adapter at the same path
    # was served from the stale copy
    (tmp_path / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    local = tmp_path / "adapters"
    for name in ATOMS:
        shutil.copytree(hub["adapters"][name], local / name)
    text = MANIFEST.format(base=hub["base"], target=hub["merged"], out=tmp_path / "runs")
    text = text.replace('paths = { alpha = "acme/alpha", beta = "acme/beta", gamma = "acme/gamma" }',
                        f'root = "{local}"')
    path = tmp_path / "m.toml"
    path.write_text(text)
    first = Runner(load_manifest(path), progress=False, echo=lambda s: None).run()
    copied = json.loads((first.run_dir / "adapters.json").read_text())["beta"]
    shutil.rmtree(local / "beta")
    random_adapter(hub["base"], local / "beta", seed=999)
    second = Runner(load_manifest(path), progress=False, echo=lambda s: None).run()
    again = json.loads((second.run_dir / "adapters.json").read_text())["beta"]
    assert again != copied
    name = LoraAdapter(local / "beta", "beta").module_names[0]
    assert torch.equal(LoraAdapter(Path(again), "beta").delta(name), LoraAdapter(local / "beta", "beta").delta(name))


def test_full_weight_merges_find_the_base_an_adapter_names_by_id(offline) -> None:
    from unmerge_core.pipeline.merging import base_model_path

    adapters = [LoraAdapter(offline["adapters"][n], n) for n in ATOMS]
    assert base_model_path(adapters, "slerp", "mergekit") == offline["base"].resolve()


def test_revisions_with_slashes_dotdot_and_moved_branches(offline, tmp_path) -> None:
    from unmerge_core.config.targets import ExternalTarget

    assert ExternalTarget(path="acme/merged@release/v1").display_name == "merged"  # not "v1"
    with pytest.raises(UnmergeError) as info:
        resolve_model_ref("acme/base@feature/../v1", "--base")
    assert "a revision may not contain '..'" in one_line(info)
    # a branch moved between two calls in one process: the second call sees the new commit
    cache = tmp_path / "cache"
    first = tiny_base(cached_repo(cache, "acme/moving", MAIN))
    second = tiny_base(cached_repo(cache, "acme/moving", V1, refs=()), seed=3)
    import os

    os.environ["HF_HUB_CACHE"] = str(cache)  # restored by the offline fixture's monkeypatch
    assert resolve_model_ref("acme/moving", "--base") == first
    (cache / "models--acme--moving" / "refs" / "main").write_text(V1)
    assert resolve_model_ref("acme/moving", "--base") == second


def test_a_poisoned_ref_is_refused_not_followed_outside_the_cache(offline, tmp_path, monkeypatch) -> None:
    """``refs/main`` holding a path instead of a commit hash must not lead outside the cache (issue 20,
    item 18): only 40 hexadecimal characters are a commit."""
    cache = tmp_path / "cache"
    outside = cached_repo(cache, "acme/poisoned", "../../../outside")  # made where the path points
    assert outside.resolve() == (tmp_path / "outside").resolve()
    save_file({"x.weight": torch.ones(2, 2)}, str(outside / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(UnmergeError) as info:
        resolve_model_ref("acme/poisoned", "--base")
    message = one_line(info)
    assert "--base acme/poisoned" in message and "not a commit hash" in message and "refs/main" in message
    assert "holds '../../../outside'" in message
    storage = cache / "models--acme--poisoned"
    (storage / MAIN).mkdir()  # a commit-named folder, but not a snapshot
    save_file({"x.weight": torch.ones(2, 2)}, str(storage / MAIN / "model.safetensors"))
    (storage / "refs" / "v1").write_text("../" + MAIN)
    with pytest.raises(UnmergeError, match="refs/v1 of acme/poisoned holds .*, not a commit hash"):
        resolve_model_ref("acme/poisoned@v1", "--base")


def test_a_snapshot_with_only_its_config_is_reported_as_not_cached(offline, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    snapshot = cached_repo(cache, "acme/configonly", MAIN)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for allow_pickle in (False, True):
        with pytest.raises(UnmergeError) as info:
            resolve_model_ref("acme/configonly", "--base", allow_pickle=allow_pickle)
        message = one_line(info)
        assert "weights are not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
        assert "--allow-pickle" not in message


@pytest.mark.parametrize("value", ["org/model\nx", "org/mo\tdel@main", "org/model\r", "./models/a\nb"])
def test_an_id_or_path_holding_a_line_break_is_one_line(tmp_path, capsys, value) -> None:
    """Hostile audit 20.22: a Hub id holding a newline split its error over two lines."""
    with pytest.raises(UnmergeError) as info:
        resolve_model_ref(value, "--base")
    message = str(info.value)
    assert message == (f"--base {value!r}: holds a line break or another control character; a model is a "
                       "local path or a Hub id owner/name[@revision]"), message
    assert main(["attribute", "--dictionary", str(tmp_path), value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a line break" in err, err
