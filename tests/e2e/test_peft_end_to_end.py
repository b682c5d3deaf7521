"""The real route on the tiny model: local tokenizer + model, PEFT training, mergekit, decomposition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.config.manifest import load_manifest
from unmerge_core.pipeline.runner import Runner

from helpers import REPO  # noqa: E402

MANIFEST = """
name = "peft-e2e"
seed = 3
registry = "{registry}"
[tasks]
known = ["python-function", "json-format", "pirate-style", "reverse-words"]
unknown = ["sql-select", "uppercase"]
[protocol]
methods = ["linear", "task_arithmetic", "ties"]
targets_per_group = 3
min_tasks = 2
max_tasks = 3
[trainer]
plugin = "peft-lora"
[trainer.params]
rank = 4
alpha = 8
learning_rate = 1e-2
epochs = 2
batch_size = 16
num_examples = 64
max_length = 48
tiny = {{ hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, intermediate_size = 64, pretrain_steps = 40 }}
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = {{ budget = 2048 }}
[[decomposers]]
plugin = "nnls"
[output]
dir = "{out}"
"""


def test_peft_lora_quickstart_route(tmp_path) -> None:
    path = tmp_path / "peft.toml"
    path.write_text(MANIFEST.format(registry=REPO / "registry.toml", out=tmp_path / "runs"))
    result = Runner(load_manifest(path), progress=False).run()
    adapters = json.loads((result.run_dir / "adapters.json").read_text())
    assert len(adapters) == 6
    first = LoraAdapter(adapters["python-function"])
    assert Path(first.base_model).is_absolute() and (Path(first.base_model) / "config.json").is_file()
    assert len(first.module_names) == 8  # 2 layers × q/k/v/o
    # the run names what the store names by hash: --dictionary runs/NAME/dictionary --base runs/NAME/base
    linked = {p.name: p.resolve() for p in (result.run_dir / "dictionary").iterdir()}
    assert linked and all(linked[t] == Path(adapters[t]).resolve() for t in linked)
    assert (result.run_dir / "base").resolve() == Path(first.base_model).resolve()
    log = json.loads((Path(adapters["python-function"]) / "training_log.json").read_text())
    assert log["epoch_mean_loss"][-1] < log["epoch_mean_loss"][0]  # training moved the loss
    for row in result.table.rows:
        if row.group == "known" and row.method in ("linear", "task_arithmetic"):
            assert row.metrics["precision"] == 1.0 and row.metrics["recall"] == 1.0, row.target_id


def test_tiny_tokenizer_and_model_reload(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from unmerge_plugins.lib.tiny_model import TinyModelParams, build_tiny_model

    params = TinyModelParams(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=32, pretrain_steps=0)
    d = build_tiny_model(tmp_path / "tiny", params)
    tok = PreTrainedTokenizerFast.from_pretrained(d)
    text = "def add(a, b): return a + b"
    assert tok.decode(tok(text)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.hidden_size == 16 and (d / "model.safetensors").is_file()
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    build_tiny_model(d, params)  # same params: reused, not rebuilt
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime


def test_peft_params_need_one_base() -> None:
    from unmerge_plugins.trainers.peft_lora import PeftLoraParams

    with pytest.raises(ValueError, match="exactly one"):
        PeftLoraParams()
    assert PeftLoraParams(base_model="Qwen/Qwen2.5-7B-Instruct").rank == 32
