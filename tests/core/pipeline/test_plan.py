"""``unmerge plan``: what a run will download, store and compute, before anything runs."""

from __future__ import annotations

import json
import os
import socket
import struct
import textwrap
from pathlib import Path

import pytest

from helpers import SYNTHETIC_MANIFEST
from unmerge_core.cli import main
from unmerge_core.config.manifest import load_manifest
from unmerge_core.pipeline.plan import plan_manifest
from unmerge_core.pipeline.runner import Runner

COMPARED = ("trainer", "masker", "merge-statistics", "merger", "decomposer", "metric")
VARIANT = """
[[variants]]
name = "reseed"
plugin = "synthetic"
tasks = ["alpha", "zeta"]
params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, rank = 6, seed = 3 }
[merger]"""


def run(path: Path) -> list[dict]:
    result = Runner(load_manifest(path), progress=False, plots=False, echo=lambda s: None).run()
    return json.loads((result.run_dir / "timings.json").read_text())


def stages(plan) -> dict[str, dict]:
    return {s["stage"]: s for s in plan.to_dict()["stages"]}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test here may reach the network: offline Hub, an empty cache, and no socket connects."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("unmerge plan tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("variant", [False, True], ids=["plain", "variant"])
def test_unit_counts_match_what_the_run_does(write_manifest, variant: bool) -> None:
    path = write_manifest(**({"[merger]": VARIANT} if variant else {}))
    if variant:
        path.write_text(path.read_text().replace("[protocol]\n", '[protocol]\nconstituents = ["reseed"]\n'))
    before = stages(plan_manifest(path))
    assert not load_manifest(path).run_dir.exists(), "the plan wrote into the run directory"
    first = {t["stage"]: t for t in run(path)}
    after = stages(plan_manifest(path))
    second = {t["stage"]: t for t in run(path)}
    assert before["trainer"]["units"] == (9 if variant else 7)
    for name in COMPARED:
        if name not in first:
            assert name not in before or before[name]["units"] == 0, name
            continue
        assert before[name]["units"] == first[name]["jobs"] == after[name]["units"], name
        # the masker's pass over ΔW makes some merge statistics with the mask: their stage then reuses them
        made_earlier = before[name].get("made_by_masker", 0)
        assert before[name]["cached"] == 0 and first[name]["reused"] == made_earlier, name
        assert after[name]["cached"] == second[name]["reused"] == second[name]["jobs"], name


def apparent_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def test_disk_estimates_are_within_a_factor_of_1_5_of_the_real_cache(write_manifest) -> None:
    path = write_manifest()
    plan = plan_manifest(path).to_dict()
    run(path)
    cache = load_manifest(path).store_dir / "cache"
    by_kind = {row["kind"]: row for row in plan["disk"] if row.get("kind")}
    checked = 0
    for kind in ("adapters", "masks", "targets", "merge-stats", "decompositions", "metric-values"):
        real = apparent_size(cache / kind)
        if not real:
            assert kind not in by_kind or not by_kind[kind]["bytes"], kind
            continue
        estimate = by_kind[kind]["bytes"]
        assert real / 1.5 <= estimate <= real * 1.5, (kind, estimate, real)
        checked += 1
    assert checked >= 5
    real_total = sum(apparent_size(cache / k) for k in by_kind)
    assert real_total / 1.5 <= plan["cache_bytes"] <= real_total * 1.5


def test_json_output_parses_and_holds_the_tables(write_manifest, capsys) -> None:
    assert main(["plan", str(write_manifest()), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"manifest", "downloads", "disk", "memory", "stages", "cache_bytes"} <= set(data)
    assert {s["stage"] for s in data["stages"]} >= {"trainer", "masker", "merger", "decomposer", "metric"}
    assert any(m["stage"] == "masker" and m["bytes"] == 24 * 32 * 4 * m["workers"] for m in data["memory"])


def test_cli_prints_one_screen(write_manifest, capsys) -> None:
    assert main(["plan", str(write_manifest())]) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").splitlines()
    assert 10 <= len(lines) <= 50, out
    assert max(len(line) for line in lines[2:]) <= 140, out  # the first two name the manifest and run directory
    for word in ("trainer", "adapters", "targets", "cache total", "decomposer", "cached"):
        assert word in out, word


REGISTRY_WITH_HF = """
[tasks.alpha]
category = "code"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.beta]
category = "style"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.gamma]
category = "other"
source = { kind = "hf", dataset = "someone/latin-pairs", split = "train", response_field = "en", template = "{la}", limit = 500 }
[tasks.delta]
category = "reasoning"
source = { kind = "procedural", generator = "reverse-words" }
"""

HUB_MANIFEST = """
name = "hub-plan"
base = "someone/base-model"
[tasks]
known = ["alpha", "beta"]
unknown = ["gamma", "delta"]
[protocol]
targets_per_group = 4
min_tasks = 2
max_tasks = 2
[trainer]
plugin = "peft-lora"
params = { base_model = "someone/base-model", rank = 8, batch_size = 4, max_length = 128 }
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = { budget = 1000 }
[[decomposers]]
plugin = "nnls"
[[targets]]
path = "someone/merged-model"
name = "merged"
[output]
dir = "{out}"
"""


def test_hub_models_and_hf_datasets_are_downloads_without_touching_the_network(workdir, write_manifest,
                                                                               capsys) -> None:
    (workdir / "registry.toml").write_text(textwrap.dedent(REGISTRY_WITH_HF))
    path = write_manifest(HUB_MANIFEST)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert main(["plan", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    downloads = {(d["kind"], d["source"]): d for d in data["downloads"]}
    assert downloads[("model", "someone/base-model")]["status"] == "download"
    assert downloads[("model", "someone/base-model")]["bytes"] is None
    assert downloads[("model", "someone/merged-model")]["status"] == "download"
    dataset = downloads[("dataset", "someone/latin-pairs")]
    assert dataset["limit"] == 500 and dataset["status"] == "download"
    assert not (workdir / "hf-cache").exists() or not any((workdir / "hf-cache").iterdir())
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "download: someone/base-model (size unknown offline)" in out
    assert "someone/latin-pairs" in out and "500" in out


def test_a_hub_model_in_the_local_cache_is_listed_with_its_size(workdir, write_manifest, capsys) -> None:
    (workdir / "registry.toml").write_text(textwrap.dedent(REGISTRY_WITH_HF))
    repo = workdir / "hf-cache" / "models--someone--base-model"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "intermediate_size": 128, "vocab_size": 100}
    (snapshot / "config.json").write_text(json.dumps(config))
    header = json.dumps({"w": {"dtype": "F32", "shape": [100, 64], "data_offsets": [0, 25600]}}).encode()
    (snapshot / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(25600))
    path = write_manifest(HUB_MANIFEST)
    assert main(["plan", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    base = next(d for d in data["downloads"] if d["source"] == "someone/base-model")
    assert base["status"] == "cached" and base["bytes"] >= 25600
    adapters = next(row for row in data["disk"] if row.get("kind") == "adapters")
    # rank 8 × (in + out) × 4 bytes × 2 layers of q (64, 64), k (32, 64), v (32, 64), o (64, 64)
    payload = 8 * 4 * 2 * ((64 + 64) + (32 + 64) + (32 + 64) + (64 + 64))
    assert payload <= adapters["bytes_each"] <= 1.5 * payload
    training = next(m for m in data["memory"] if m["stage"] == "trainer")
    assert training["bytes"] == sum(training["terms"].values()) > 6400 * 4
    assert {"weights", "adapter", "gradients_adam", "activations", "logits"} <= set(training["terms"])
    assert "B=4 S=128 h=64 L=2" in training["formula"] and "batch_size" in training["legend"]


def write_gguf(path: Path, tensors: dict[str, tuple[list[int], int]]) -> Path:
    """A minimal GGUF v3 file: a few metadata keys, tensor infos (dims, type) and zero data."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kv = [("general.architecture", 8, string("llama")), ("llama.embedding_length", 4, struct.pack("<I", 64)),
          ("llama.block_count", 4, struct.pack("<I", 2)), ("llama.attention.head_count", 4, struct.pack("<I", 4)),
          ("llama.attention.head_count_kv", 4, struct.pack("<I", 2)),
          ("llama.feed_forward_length", 4, struct.pack("<I", 128))]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, kind, value in kv:
        out += string(key) + struct.pack("<I", kind) + value
    for name, (dims, kind) in tensors.items():
        out += string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, 0)
    path.write_bytes(out + bytes(4096))
    return path


def test_a_gguf_base_is_a_local_file_with_its_float32_size(workdir, write_manifest, capsys) -> None:
    (workdir / "registry.toml").write_text(textwrap.dedent(REGISTRY_WITH_HF))
    write_gguf(workdir / "tiny.Q4_1.gguf", {"token_embd.weight": ([64, 100], 3), "blk.0.attn_q.weight": ([64, 64], 3)})
    path = write_manifest(HUB_MANIFEST.replace('base = "someone/base-model"\n', 'base = "tiny.Q4_1.gguf"\n'))
    assert main(["plan", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    base = next(d for d in data["downloads"] if d["source"].endswith("tiny.Q4_1.gguf"))
    assert base["status"] == "local" and base["bytes"] == (workdir / "tiny.Q4_1.gguf").stat().st_size
    assert base["parameters"] == 64 * 100 + 64 * 64
    assert base["float32_bytes"] == 4 * (64 * 100 + 64 * 64)


def test_a_user_mistake_is_one_line(tmp_path, write_manifest, capsys) -> None:
    assert main(["plan", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    broken = write_manifest(SYNTHETIC_MANIFEST.replace('plugin = "nnls"', 'plugin = "no-such-decomposer"'))
    assert main(["plan", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
