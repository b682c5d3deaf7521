"""What the trainers read (issue 21, item 4): the loss is on the assistant's tokens only when the
tokenizer has a chat template, and a Hugging Face dataset is read lazily, ``limit`` records and no more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unmerge_core import TaskInfo
from unmerge_plugins.lib.lm import encode_examples, prompt_ids
from unmerge_plugins.lib.tasks import Example, load_examples
from unmerge_plugins.lib.tiny_model import TinyModelParams, build_tiny_model
from unmerge_plugins.lib.training import collate

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    base = build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", TinyModelParams(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        pretrain_steps=0))
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"  # an instruct model ends its turn with the template's end-of-turn token
    tok.chat_template = CHATML
    return tok


def test_loss_is_on_the_assistant_tokens_only(chat_tokenizer) -> None:
    tok = chat_tokenizer
    examples = [Example("Reverse: a b c", "c b a"), Example("Say hi in pirate", "Ahoy, matey!")]
    encoded = encode_examples(tok, examples, max_length=256)
    input_ids, labels, attention = collate(encoded, tok.pad_token_id)
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    for row, ex in enumerate(examples):
        ids = input_ids[row][attention[row].bool()].tolist()
        rendered = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False,
                                           add_generation_prompt=True)
        n_prompt = len(prompt_ids(tok, ex.prompt))
        # the prompt is the whole template up to the assistant header: system, user, assistant header
        assert tok.decode(ids[:n_prompt]) == rendered
        assert ids[:n_prompt].count(start) == 3 and ids[:n_prompt].count(end) == 2
        row_labels = labels[row].tolist()
        assert all(label == -100 for label in row_labels[:n_prompt])  # no loss on any template token
        learned = [label for label in row_labels if label != -100]
        assert tok.decode(learned) == ex.response + "<|im_end|>"  # the answer and its end of turn
        assert learned == ids[n_prompt:]
        assert all(label == -100 for label in row_labels[len(ids):])  # nor on padding


def test_a_tokenizer_without_template_keeps_prompt_and_newline(chat_tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|pad|>")
    (ids, n_prompt), = encode_examples(tok, [Example("Reverse: a b", "b a")], max_length=64)
    assert tok.decode(ids[:n_prompt]) == "Reverse: a b\n"


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets, read lazily
# --------------------------------------------------------------------------------------------------


def _dataset_folder(root: Path, rows: int, fmt: str) -> Path:
    folder = root / f"data-{fmt}"
    folder.mkdir()
    records = [{"question": f"what is {i} plus one?", "answer": str(i + 1)} for i in range(rows)]
    if fmt == "json":
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), folder / "train.parquet")
    return folder


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_hf_dataset_larger_than_limit_reads_limit_records_streaming(tmp_path, monkeypatch, fmt) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = _dataset_folder(tmp_path, 5000, fmt)
    calls: list[dict] = []
    pulled = {"n": 0}
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs)
        data = real(*args, **kwargs)

        def counted():
            for record in data:
                pulled["n"] += 1
                yield record
        return counted()

    monkeypatch.setattr(datasets, "load_dataset", spy)
    task = TaskInfo("local-hf", "reasoning", {"kind": "hf", "dataset": str(folder), "split": "train",
                                              "prompt_field": "question", "response_field": "answer", "limit": 40})
    train = load_examples(task, 100, seed=0)
    held = load_examples(task, 100, seed=0, split="heldout")
    assert calls and all(c.get("streaming") is True for c in calls)
    assert len(train) + len(held) == 40 and len(held) == 4
    assert pulled["n"] <= 2 * 40  # two loads (train, held-out), `limit` records each: never the 5,000 rows
    assert {ex.prompt for ex in train + held} == {f"what is {i} plus one?" for i in range(40)}
    assert not (tmp_path / "hf-cache").exists() or not list((tmp_path / "hf-cache").rglob("*.arrow"))


def test_hf_limit_must_be_a_positive_integer(monkeypatch) -> None:
    import datasets

    from unmerge_core import UnmergeError

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"q": "x", "a": "y"}])
    for bad in (0, -3, "ten", True, 2.5):
        task = TaskInfo("t", "other", {"kind": "hf", "dataset": "org/d", "prompt_field": "q", "response_field": "a",
                                       "limit": bad})
        with pytest.raises(UnmergeError, match="limit") as err:
            load_examples(task, 5, seed=0)
        assert "\n" not in str(err.value)
