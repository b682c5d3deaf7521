"""Trainer settings a real model needs (issue 21, item 4), on the tiny model: weight dtype, autocast,
gradient checkpointing, gradient accumulation, ``max_steps``, a thread count, throughput in the training
log, and a training checkpoint every N steps from which a killed training resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from unmerge_core import TaskInfo, TrainJob, UnmergeError
from unmerge_core.manager import validate_params
from unmerge_plugins.lib import training
from unmerge_plugins.trainers import full_finetune, peft_lora

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "pretrain_steps": 0}
TASK = TaskInfo("reverse-words", "other", {"kind": "procedural", "generator": "reverse-words"})


def lora_params(**over: Any) -> peft_lora.PeftLoraParams:
    base = {"tiny": TINY, "rank": 4, "alpha": 8.0, "learning_rate": 1e-2, "epochs": 1, "batch_size": 4,
            "num_examples": 16, "max_length": 48, "device": "cpu"}
    return peft_lora.PeftLoraParams.model_validate({**base, **over})


def run(params: Any, workspace: Path, out: Path, trainer: Any = peft_lora.PeftLoraTrainer, seed: int = 5) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    trainer(params).train(TrainJob(task=TASK, output_dir=out, seed=seed, workspace=workspace))
    return json.loads((out / "training_log.json").read_text())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ws")  # the tiny base is built once here, shared by the tests


class Recorder:
    """Stands in for :func:`training.after_step`; calls ``then`` (if any) after recording."""

    def __init__(self, then: Any = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.then = then

    def __call__(self, model: Any, step: int) -> None:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.calls.append({
            "step": step, "threads": torch.get_num_threads(),
            "frozen": {p.dtype for p in frozen}, "trainable": {p.dtype for p in trainable},
            "checkpointing": bool(getattr(model, "is_activation_checkpointing", None)
                                  or getattr(model, "is_gradient_checkpointing", False)),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        })
        if self.then is not None:
            self.then(model, step)


def test_defaults_train_as_before(workspace, tmp_path, monkeypatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(training, "after_step", rec)
    log = run(lora_params(), workspace, tmp_path / "a")
    assert [c["step"] for c in rec.calls] == [1, 2, 3, 4]  # 16 examples / batch 4, one epoch
    assert all(c["frozen"] == {torch.float32} and c["trainable"] == {torch.float32} for c in rec.calls)
    assert not any(c["checkpointing"] for c in rec.calls)
    assert log["steps"] == 4 and log["tokens"] > 0 and log["seconds"] > 0
    assert log["tokens_per_second"] == pytest.approx(log["tokens"] / log["seconds"], rel=1e-6)
    assert log["dtype"] == "float32" and log["autocast"] == "off"


def test_bfloat16_weights_keep_float32_adapter(workspace, tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    rec = Recorder()
    monkeypatch.setattr(training, "after_step", rec)
    run(lora_params(dtype="bfloat16", max_steps=2), workspace, tmp_path / "a")
    assert rec.calls and all(c["frozen"] == {torch.bfloat16} for c in rec.calls)  # the base, during training
    assert all(c["trainable"] == {torch.float32} for c in rec.calls)  # LoRA weights and their Adam states
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_autocast_bf16_runs_the_forward_in_bfloat16(workspace, tmp_path, monkeypatch) -> None:
    if not training.cpu_supports_bf16():
        pytest.skip("this CPU has no bf16 support")
    seen: list[torch.dtype] = []

    def hook_once(model: Any, step: int) -> None:
        if step == 1:
            linear = next(m for n, m in model.named_modules() if n.endswith("mlp.down_proj"))
            linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))

    monkeypatch.setattr(training, "after_step", Recorder(hook_once))
    log = run(lora_params(autocast="bf16", max_steps=2), workspace, tmp_path / "a")
    assert seen and set(seen) == {torch.bfloat16}
    assert log["autocast"] == "bf16"
    seen.clear()
    monkeypatch.setattr(training, "after_step", Recorder(hook_once))
    run(lora_params(max_steps=2), workspace, tmp_path / "b")
    assert seen and set(seen) == {torch.float32}


def test_autocast_bf16_is_refused_on_a_cpu_without_bf16(workspace, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: False)
    with pytest.raises(UnmergeError) as err:
        run(lora_params(autocast="bf16"), workspace, tmp_path / "a")
    message = str(err.value)
    assert "\n" not in message and "bf16" in message and "autocast" in message


def test_gradient_checkpointing_is_enabled_on_the_model(workspace, tmp_path, monkeypatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(training, "after_step", rec)
    run(lora_params(gradient_checkpointing=True, max_steps=2), workspace, tmp_path / "a")
    assert rec.calls and all(c["checkpointing"] for c in rec.calls)


@pytest.mark.parametrize("trainer", [peft_lora.PeftLoraTrainer, full_finetune.FullFinetuneTrainer])
def test_accumulation_equals_one_big_batch(workspace, tmp_path, monkeypatch, trainer) -> None:
    params_cls = peft_lora.PeftLoraParams if trainer is peft_lora.PeftLoraTrainer else full_finetune.FullFinetuneParams
    common = {"tiny": TINY, "learning_rate": 1e-3, "epochs": 1, "num_examples": 16, "max_length": 48,
              "device": "cpu", "max_steps": 1}
    if params_cls is peft_lora.PeftLoraParams:
        common |= {"rank": 4, "alpha": 8.0}
    big, small = Recorder(), Recorder()
    monkeypatch.setattr(training, "after_step", big)
    run(params_cls.model_validate({**common, "batch_size": 8}), workspace, tmp_path / "big", trainer)
    monkeypatch.setattr(training, "after_step", small)
    log = run(params_cls.model_validate({**common, "batch_size": 2, "gradient_accumulation": 4}), workspace,
              tmp_path / "small", trainer)
    assert len(big.calls) == len(small.calls) == 1 and log["steps"] == 1
    g_big, g_small = big.calls[0]["grads"], small.calls[0]["grads"]
    assert g_big.keys() == g_small.keys() and g_big
    assert any(g.abs().max() > 0 for g in g_big.values())
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-4, atol=1e-7, msg=name)


def test_max_steps_counts_optimizer_steps_and_overrides_epochs(workspace, tmp_path, monkeypatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(training, "after_step", rec)
    log = run(lora_params(max_steps=6), workspace, tmp_path / "a")  # one epoch has 4 steps: goes on
    assert [c["step"] for c in rec.calls] == [1, 2, 3, 4, 5, 6] and log["steps"] == 6
    rec = Recorder()
    monkeypatch.setattr(training, "after_step", rec)
    log = run(lora_params(max_steps=3, gradient_accumulation=2, batch_size=2, epochs=5), workspace, tmp_path / "b")
    assert [c["step"] for c in rec.calls] == [1, 2, 3] and log["steps"] == 3  # 6 micro-batches


def test_threads_are_set_for_the_training_and_restored(workspace, tmp_path, monkeypatch) -> None:
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    rec = Recorder()
    monkeypatch.setattr(training, "after_step", rec)
    run(lora_params(threads=want, max_steps=2), workspace, tmp_path / "a")
    assert {c["threads"] for c in rec.calls} == {want}
    assert torch.get_num_threads() == before

    def boom(model: Any, step: int) -> None:
        raise RuntimeError("stop")

    monkeypatch.setattr(training, "after_step", boom)
    with pytest.raises(RuntimeError):
        run(lora_params(threads=want, max_steps=2), workspace, tmp_path / "b")
    assert torch.get_num_threads() == before  # restored on failure too


class Killed(Exception):
    pass


@pytest.mark.parametrize("trainer", [peft_lora.PeftLoraTrainer, full_finetune.FullFinetuneTrainer])
def test_a_killed_training_resumes_bit_identically(tmp_path, monkeypatch, trainer) -> None:
    """Checkpoint every 2 steps, killed after step 3: the rerun resumes at step 3 (loses one step) and
    saves the same adapter bytes as a training that was never interrupted; the checkpoint is gone after."""
    if trainer is peft_lora.PeftLoraTrainer:
        params = lora_params(num_examples=12, epochs=2, checkpoint_every=2, dropout=0.1)  # 3 steps an epoch
    else:
        params = full_finetune.FullFinetuneParams.model_validate(
            {"tiny": TINY, "epochs": 2, "batch_size": 4, "num_examples": 12, "max_length": 48, "device": "cpu",
             "checkpoint_every": 2})
    clean = Recorder()
    monkeypatch.setattr(training, "after_step", clean)
    run(params, tmp_path / "ws-clean", tmp_path / "clean", trainer)
    assert [c["step"] for c in clean.calls] == [1, 2, 3, 4, 5, 6]

    def kill(model: Any, step: int) -> None:
        if step == 3:
            raise Killed

    monkeypatch.setattr(training, "after_step", Recorder(kill))
    ws = tmp_path / "ws"
    with pytest.raises(Killed):
        run(params, ws, tmp_path / "killed", trainer)
    saved = list(ws.glob("checkpoints/*/*"))
    assert saved, "no checkpoint was written"
    resumed = Recorder()
    monkeypatch.setattr(training, "after_step", resumed)
    log = run(params, ws, tmp_path / "resumed", trainer)
    assert [c["step"] for c in resumed.calls] == [3, 4, 5, 6]
    assert log["resumed_from_step"] == 2
    for name in ("adapter_model.safetensors",):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert not any(p.is_file() for p in ws.glob("checkpoints/**/*")), "the checkpoint outlived the adapter"


def test_a_checkpoint_of_another_training_is_not_resumed(tmp_path, monkeypatch) -> None:
    def kill(model: Any, step: int) -> None:
        if step == 3:
            raise Killed

    monkeypatch.setattr(training, "after_step", Recorder(kill))
    with pytest.raises(Killed):
        run(lora_params(checkpoint_every=2), tmp_path / "ws", tmp_path / "killed")
    rec = Recorder()
    monkeypatch.setattr(training, "after_step", rec)
    # same task and seed, other data: the checkpoint's fingerprint does not match, it starts afresh
    log = run(lora_params(checkpoint_every=2, num_examples=20), tmp_path / "ws", tmp_path / "other")
    assert rec.calls[0]["step"] == 1 and log.get("resumed_from_step") is None


@pytest.mark.parametrize("params, words", [
    ({"gradient_accumulation": 0}, ["gradient_accumulation"]),
    ({"gradient_accumulation": True}, ["gradient_accumulation"]),
    ({"max_steps": 0}, ["max_steps"]),
    ({"threads": 0}, ["threads"]),
    ({"checkpoint_every": 0}, ["checkpoint_every"]),
    ({"dtype": "float64"}, ["dtype"]),
    ({"autocast": "yes"}, ["autocast"]),
    ({"dtype": "float16", "device": "cpu"}, ["float16", "cpu"]),
    ({"autocast": "fp16", "device": "cpu"}, ["fp16", "cpu"]),
])
def test_bad_settings_are_one_line(params, words) -> None:
    with pytest.raises(UnmergeError) as err:
        validate_params(peft_lora.SPEC, {"tiny": TINY, **params}, where="trainer.params")
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_float16_on_a_cpu_is_refused_when_auto_picks_the_cpu(workspace, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnmergeError) as err:
        run(lora_params(dtype="float16", device="auto"), workspace, tmp_path / "a")
    assert "\n" not in str(err.value) and "float16" in str(err.value)


def test_full_finetune_refuses_low_precision_weights() -> None:
    with pytest.raises(UnmergeError) as err:
        validate_params(full_finetune.SPEC, {"tiny": TINY, "dtype": "bfloat16"}, where="trainer.params")
    assert "\n" not in str(err.value) and "float32" in str(err.value)


def test_every_new_setting_has_a_description() -> None:
    fields = training.CausalLmTrainingParams.model_fields
    for name in ("dtype", "autocast", "gradient_checkpointing", "gradient_accumulation", "max_steps", "threads",
                 "checkpoint_every"):
        assert fields[name].description, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, autocast", [("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp16")])
def test_half_precision_on_cuda_trains_a_float32_adapter(workspace, tmp_path, dtype, autocast) -> None:
    """On a GPU: bf16 / fp16 base weights and autocast (fp16 with loss scaling); the adapter stays float32."""
    from safetensors.torch import load_file

    log = run(lora_params(device="cuda", dtype=dtype, autocast=autocast, max_steps=3), workspace, tmp_path / "a")
    assert log["steps"] == 3 and all(torch.isfinite(torch.tensor(v)) for v in log["epoch_mean_loss"])
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
