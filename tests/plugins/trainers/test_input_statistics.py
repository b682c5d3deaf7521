"""The statistics an activation-scaled merge scales by: hooks against a direct computation, and the
trainers' examples (the ones the adapter is trained on) as the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unmerge_core import InputStatistics, InputStatisticsJob, TaskInfo, UnmergeError, record_input_statistics
from unmerge_core.io.activations import check_input_statistics, load_input_statistics, save_input_statistics
from unmerge_plugins.lib.tiny_model import TinyModelParams, build_tiny_model

TINY = TinyModelParams(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=32, pretrain_steps=0)
TASK = TaskInfo("sort-numbers", "reasoning", {"kind": "procedural", "generator": "sort-numbers"})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", TINY)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32), path


def _direct(model: object, input_ids: torch.Tensor, attention: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of layer 1's q_proj and o_proj, computed without hooks, at the kept tokens."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True, use_cache=False)
        layer = model.model.layers[1]
        q_in = layer.input_layernorm(out.hidden_states[1])  # what q/k/v read: the normed residual stream
    return {"model.layers.1.self_attn.q_proj": q_in[attention.bool()]}


def test_hooks_sum_the_inputs_a_direct_computation_gives(tiny_model: tuple[object, Path]) -> None:
    model, _ = tiny_model
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (3, 7))
    attention = torch.ones_like(ids)
    attention[0, 5:] = 0  # padding: left out
    attention[2, 2:] = 0
    stats = record_input_statistics(model, [(ids, attention)], ["model.layers.1.self_attn.q_proj"])
    rows = _direct(model, ids, attention)["model.layers.1.self_attn.q_proj"].to(torch.float64)
    entry = stats["model.layers.1.self_attn.q_proj"]
    assert entry.count == int(attention.sum()) == rows.shape[0]
    torch.testing.assert_close(entry.total, rows.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entry.squares, (rows * rows).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entry.second_moment(), (rows * rows).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entry.variance(), rows.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


def test_batches_add_up(tiny_model: tuple[object, Path]) -> None:
    model, _ = tiny_model
    torch.manual_seed(1)
    a, b = torch.randint(0, 300, (2, 6)), torch.randint(0, 300, (3, 4))
    module = ["model.layers.0.self_attn.o_proj"]
    both = record_input_statistics(model, [(a, torch.ones_like(a)), (b, torch.ones_like(b))], module)[module[0]]
    one = record_input_statistics(model, [(a, torch.ones_like(a))], module)[module[0]]
    two = record_input_statistics(model, [(b, torch.ones_like(b))], module)[module[0]]
    assert both.count == one.count + two.count
    torch.testing.assert_close(both.squares, one.squares + two.squares)


def test_a_module_the_model_lacks_is_refused_by_name(tiny_model: tuple[object, Path]) -> None:
    model, _ = tiny_model
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(UnmergeError, match="no module 'model.layers.9.self_attn.q_proj'"):
        record_input_statistics(model, [(ids, torch.ones_like(ids))], ["model.layers.9.self_attn.q_proj"])


def test_saved_statistics_read_back_and_bad_ones_are_refused(tmp_path: Path) -> None:
    stats = {"m.a": InputStatistics(5, torch.arange(3.0, dtype=torch.float64), torch.ones(3, dtype=torch.float64))}
    save_input_statistics(tmp_path, stats, {"task": "t"})
    back = load_input_statistics(tmp_path)
    assert back["m.a"].count == 5 and torch.equal(back["m.a"].total, stats["m.a"].total)
    check_input_statistics(back, ["m.a"], {"m.a": 3}, "trainer 'x'")
    with pytest.raises(UnmergeError, match="no input statistics for module 'm.b'"):
        check_input_statistics(back, ["m.a", "m.b"], {"m.a": 3, "m.b": 3}, "trainer 'x'")
    with pytest.raises(UnmergeError, match=r"total has shape \(3,\), expected \(4,\)"):
        check_input_statistics(back, ["m.a"], {"m.a": 4}, "trainer 'x'")
    bad = {"m.a": InputStatistics(5, torch.tensor([float("nan"), 0, 0]), torch.ones(3))}
    with pytest.raises(UnmergeError, match="not finite"):
        check_input_statistics(bad, ["m.a"], {"m.a": 3}, "trainer 'x'")


def test_peft_lora_records_its_training_examples(tmp_path: Path, tiny_model: tuple[object, Path]) -> None:
    from unmerge_plugins.lib.training import collate, load_base, training_examples
    from unmerge_plugins.trainers.peft_lora import PeftLoraParams, PeftLoraTrainer

    _, path = tiny_model
    params = PeftLoraParams(base_model=str(path), batch_size=4, num_examples=40, max_length=48)
    trainer = PeftLoraTrainer(params)
    modules = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    job = InputStatisticsJob(TASK, seed=7, workspace=tmp_path, modules=modules, max_batches=2)
    stats = trainer.input_statistics(job)
    assert set(stats) == set(modules)
    # the same tokens as the first two training batches of the same seed
    model, tokenizer = load_base(str(path), "test")
    examples = training_examples(tokenizer, TASK, params, job.seed + params.seed, "test")[:8]
    tokens = sum(len(ids) for ids, _ in examples)
    assert stats[modules[0]].count == tokens
    ids, _, attention = collate(examples, tokenizer.pad_token_id)
    direct = record_input_statistics(model, [(ids, attention)], modules)
    for module in modules:
        torch.testing.assert_close(stats[module].squares, direct[module].squares, rtol=1e-5, atol=1e-6)
