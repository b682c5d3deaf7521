"""GGUF files wherever a model folder is accepted: ``unmerge attribute`` targets and ``--base``, a
manifest's ``base`` and ``[[targets]] path`` (converted into the manifest's store), the trainers'
``base_model`` and the causal metric's base (the user cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import random_adapter, tiny_gguf_tensors, to_gguf_layout, write_tiny_gguf
from unmerge_core import dequantized_checkpoint
from unmerge_core.cli import main
from unmerge_core.config.manifest import load_manifest
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.pipeline.runner import Runner

ATOMS = ("alpha", "beta", "gamma")
MIX = {"alpha": 0.8, "beta": 0.5}
GGUF_NAMES = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base GGUF (F32), three random adapters on its dequantized folder (v/o projections), and a target
    GGUF (Q8_0) of base + 0.8·alpha + 0.5·beta."""
    root = tmp_path_factory.mktemp("gguf-sources")
    tensors = tiny_gguf_tensors(seed=0)
    base_gguf = write_tiny_gguf(root / "base.gguf", "F32", tensors)
    base_dir = dequantized_checkpoint(base_gguf, root / "prep")
    for i, name in enumerate(ATOMS):
        random_adapter(base_dir, root / "dict" / name, seed=10 + i, targets=["v_proj", "o_proj"])
    merged = {k: v.copy() for k, v in tensors.items()}
    for name, weight in MIX.items():
        adapter = LoraAdapter(root / "dict" / name, name)
        for module in adapter.module_names:  # model.layers.<i>.self_attn.v_proj
            parts = module.split(".")
            key = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:])]}.weight"
            merged[key] += weight * to_gguf_layout(key, adapter.delta(module).numpy())
    target = root / "target-folder"
    target.mkdir()
    write_tiny_gguf(target / "merged.Q8_0.gguf", "Q8_0", merged)
    return {"root": root, "base": base_gguf, "dict": root / "dict", "target": target}


def test_attribute_reads_gguf_base_and_target(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "user-cache"))
    rc = main(["attribute", "--base", str(world["base"]), "--dictionary", str(world["dict"]),
               f"merged={world['target']}", "--decomposer", "nnls", "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((tmp_path / "out" / "attribution.json").read_text())
    result = report["targets"][0]["results"][0]
    for name, weight in MIX.items():
        assert result["coefficients"][name] == pytest.approx(weight, abs=0.03)
    assert abs(result["coefficients"]["gamma"]) < 0.03
    warning = next(line for line in captured.err.splitlines() if "GGUF" in line)
    assert warning.startswith("warning: target merged was dequantized from the GGUF file merged.Q8_0.gguf (Q8_0 ×")
    assert "block scale/√12" in warning and "% of the RMS of ΔW there" in warning
    ratio = float(warning.split("% of the RMS")[0].rsplit(" ", 1)[1])
    assert 0 < ratio < 50  # Q8_0 rounding is a few percent of this ΔW
    converted = sorted((tmp_path / "user-cache" / "cache" / "gguf").glob("[!.]*"))
    assert len(converted) == 2  # the base and the target, once each


def test_attribute_gguf_errors_are_one_line(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "user-cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    rc = main(["attribute", "--base", str(bad), "--dictionary", str(world["dict"]), str(world["target"]),
               "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("warning:", "note:"))]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0] == f"error: --base {bad}: not a GGUF file (it does not start with the bytes 'GGUF')"


MANIFEST = """
name = "gguf"
seed = 3
base = "{base}"
[tasks]
known = ["alpha", "beta", "gamma"]
[protocol]
groups = []
methods = ["linear"]
targets_per_group = 1
[trainer]
plugin = "adapters"
[trainer.params.paths]
alpha = "{dict}/alpha"
beta = "{dict}/beta"
gamma = "{dict}/gamma"
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
[[decomposers]]
plugin = "nnls"
[[targets]]
path = "{target}"
name = "merged"
truth = {{ tasks = ["alpha", "beta"], weights = [0.8, 0.5] }}
[output]
dir = "{{out}}"
"""


def test_manifest_base_and_target_gguf_convert_into_the_store(world, write_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "user-cache"))
    path = write_manifest(MANIFEST.format(base=world["base"], dict=world["dict"], target=world["target"]))
    assert main(["validate", str(path)]) == 0
    manifest = load_manifest(path)
    messages: list[str] = []
    result = Runner(manifest, progress=False, echo=messages.append).run()
    row = next(r for r in result.table.rows if r.target_id == "merged")
    assert row.coefficients == pytest.approx([0.8, 0.5, 0.0], abs=0.03)
    store = manifest.store_dir / "cache" / "gguf"
    assert len(sorted(store.glob("[!.]*"))) == 2 and not (tmp_path / "user-cache").exists()
    report = json.loads((result.run_dir / "attribution.json").read_text())
    assert any("dequantized from the GGUF file merged.Q8_0.gguf" in w for w in report["targets"][0]["warnings"])


def test_manifest_with_a_bad_gguf_base_fails_validation_in_one_line(world, write_manifest, tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(world["base"].read_bytes()[:5000])
    path = write_manifest(MANIFEST.format(base=bad, dict=world["dict"], target=world["target"]))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and str(bad) in err and "Traceback" not in err


def test_trainer_base_model_and_causal_metric_accept_gguf(world, tmp_path, monkeypatch):
    import torch

    from unmerge_plugins.lib.lm import load_causal_lm
    from unmerge_plugins.lib.training import CausalLmTrainingParams

    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "user-cache"))
    params = CausalLmTrainingParams(base_model=str(world["base"]))
    folder = Path(params.base_path(tmp_path / "workspace"))
    assert folder.parent == tmp_path / "user-cache" / "cache" / "gguf" and (folder / "model.safetensors").is_file()
    model, tokenizer = load_causal_lm(world["base"], torch.device("cpu"))
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(),
                                  tiny_gguf_tensors(seed=0)["token_embd.weight"])
