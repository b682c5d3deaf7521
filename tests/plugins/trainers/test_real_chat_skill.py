"""On the real pretrained model (SmolLM2-135M-Instruct, `make real-model`): a chat skill trained with the
real-model experiment's trainer settings is learned — its checker accepts far more greedy answers to
held-out prompts after training than before. Run by `make test-real` (about 2 minutes on 2 cores), never by
`make test`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unmerge_core import TrainJob
from unmerge_core.config.manifest import load_manifest
from unmerge_core.config.registry import Registry

ROOT = Path(__file__).resolve().parents[3]
REAL = ROOT / ".real" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} is absent (make real-model fetches it)")]


def test_a_real_chat_skill_is_learned_and_judged_by_its_checker(tmp_path: Path) -> None:
    from peft import PeftModel

    from unmerge_plugins.lib.generation import GenerationSet, resolve_checker
    from unmerge_plugins.lib.lm import load_causal_lm
    from unmerge_plugins.lib.tasks.loaders import load_examples
    from unmerge_plugins.trainers.peft_lora import PeftLoraParams, PeftLoraTrainer

    manifest = load_manifest(ROOT / "experiments" / "smollm2.toml")
    task = Registry.load(ROOT / "registry.toml").task("chat-uppercase")
    checker = resolve_checker(task, fallback=False)
    assert checker is not None, "chat-uppercase has a registry checker"
    params = PeftLoraParams.model_validate({**manifest.file.trainer.params, "autocast": "off"},
                                           context={"manifest_dir": manifest.path.parent.resolve()})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    PeftLoraTrainer(params).train(TrainJob(task=task, output_dir=adapter, seed=0, workspace=tmp_path))
    log = json.loads((adapter / "training_log.json").read_text())
    assert log["steps"] == params.max_steps and log["tokens_per_second"] > 0

    cpu = torch.device("cpu")
    base_path = params.base_path(tmp_path)
    base, tokenizer = load_causal_lm(base_path, cpu)
    heldout = load_examples(task, 16, 7, split="heldout")
    generation = GenerationSet(tokenizer, {task.name: heldout}, {task.name: checker})
    before = float(generation.accepted(base)[task.name].mean())
    tuned = PeftModel.from_pretrained(load_causal_lm(base_path, cpu)[0], str(adapter)).merge_and_unload()
    after = float(generation.accepted(tuned)[task.name].mean())
    assert after >= before + 0.5, f"checker score {before:.2f} before training, {after:.2f} after"
