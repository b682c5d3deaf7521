"""Tests of the micro-task data layer: generators, loaders and the registry's task tables."""

from __future__ import annotations

import json
import random
import string
import sys
import tomllib
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from unmerge_core.errors import UnmergeError
from unmerge_core.types import TaskInfo
from unmerge_plugins.lib.tasks import CATEGORIES, GENERATORS, Example, corpus_for_tokenizer, load_examples

from helpers import REPO as ROOT  # noqa: E402
REGISTRY = ROOT / "registry.toml"
ALLOWED_CATEGORIES = {"code", "structured", "reasoning", "style", "other"}
SOURCE_KINDS = {"procedural", "hf", "jsonl"}


def procedural(name: str) -> TaskInfo:
    source = {"kind": "procedural", "generator": name}
    return TaskInfo(name=name, category=CATEGORIES.get(name, "other"), source=source)


def jsonl_task(path: Path, **keys: object) -> TaskInfo:
    return TaskInfo(name="local", category="other", source={"kind": "jsonl", "path": str(path), **keys})


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------------


def test_at_least_twelve_generators_covering_every_category() -> None:
    assert len(GENERATORS) >= 12
    assert set(CATEGORIES) == set(GENERATORS)
    assert set(CATEGORIES.values()) == ALLOWED_CATEGORIES


@pytest.mark.parametrize("name", sorted(n for n in GENERATORS if not n.startswith("chat-")))  # chat: test_chat_tasks
def test_generator_is_deterministic_short_and_ascii(name: str) -> None:
    gen = GENERATORS[name]
    first = [gen(random.Random(7)) for _ in range(3)]
    rng_a, rng_b = random.Random(123), random.Random(123)
    run_a = [gen(rng_a) for _ in range(200)]
    run_b = [gen(rng_b) for _ in range(200)]
    assert run_a == run_b
    assert first[0] == first[1] == first[2]
    for ex in run_a:
        assert isinstance(ex, Example)
        assert ex.prompt and ex.response
        assert (ex.prompt + ex.response).isascii()
        assert len(ex.prompt) + len(ex.response) <= 80
    assert len({ex.prompt for ex in run_a}) > 50, "prompt space too small"


@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("reverse-words", lambda ex: ex.response.split() == ex.prompt.split()[1:][::-1]),
        ("sort-numbers", lambda ex: ex.response.split() == sorted(ex.prompt.split()[1:], key=int)),
        ("uppercase", lambda ex: ex.response == ex.prompt.removeprefix("upper ").upper()),
        ("parity", lambda ex: ex.response == ("even" if int(ex.prompt.split()[1]) % 2 == 0 else "odd")),
        ("json-format", lambda ex: isinstance(json.loads(ex.response), dict)),
        ("csv-to-json", lambda ex: list(json.loads(ex.response)) == ex.prompt.split()[1].split(",")),
        ("repeat-twice", lambda ex: ex.response == " ".join([ex.prompt.removeprefix("twice ")] * 2)),
    ],
)
def test_generator_answers_are_correct(name: str, check: Callable[[Example], bool]) -> None:
    rng = random.Random(0)
    for _ in range(100):
        assert check(GENERATORS[name](rng))


def test_python_function_output_is_valid_python() -> None:
    rng = random.Random(0)
    for _ in range(50):
        compile(GENERATORS["python-function"](rng).response, "<gen>", "exec")
        compile(GENERATORS["list-comprehension"](rng).response, "<gen>", "eval")


def test_arithmetic_word_answers() -> None:
    rng = random.Random(3)
    for _ in range(100):
        ex = GENERATORS["arithmetic-word"](rng)
        words = ex.prompt.split()
        a, b = int(words[2]), int(words[-3].rstrip("."))
        expected = a + b if ("buys" in words or "finds" in words) else a - b
        assert ex.response == str(expected) and expected >= 0


# --------------------------------------------------------------------------------------------------
# procedural loading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_procedural_train_and_heldout_are_disjoint(name: str) -> None:
    task = procedural(name)
    train = load_examples(task, 300, seed=1)
    held = load_examples(task, 50, seed=2, split="heldout")
    assert len(train) == 300 and len(held) == 50
    assert len({ex.prompt for ex in train}) == 300
    assert len({ex.prompt for ex in held}) == 50
    other_train = load_examples(task, 300, seed=99)
    train_prompts = {ex.prompt for ex in train} | {ex.prompt for ex in other_train}
    assert not train_prompts & {ex.prompt for ex in held}


def test_procedural_is_deterministic_and_seed_dependent() -> None:
    task = procedural("reverse-words")
    assert load_examples(task, 20, seed=5) == load_examples(task, 20, seed=5)
    assert load_examples(task, 20, seed=5) != load_examples(task, 20, seed=6)
    assert load_examples(task, 0, seed=5) == []


def test_unknown_generator_lists_choices() -> None:
    task = TaskInfo(name="bad", category="other", source={"kind": "procedural", "generator": "nope"})
    with pytest.raises(UnmergeError) as info:
        load_examples(task, 5, seed=0)
    message = str(info.value)
    assert "nope" in message and "choose one of:" in message and "reverse-words" in message
    assert "\n" not in message


def test_unknown_kind_and_split_are_errors() -> None:
    task = TaskInfo(name="odd", category="other", source={"kind": "csv"})
    with pytest.raises(UnmergeError, match="choose one of: procedural, jsonl, hf"):
        load_examples(task, 5, seed=0)
    with pytest.raises(UnmergeError, match="unknown split"):
        load_examples(procedural("parity"), 5, seed=0, split="test")


# --------------------------------------------------------------------------------------------------
# jsonl loading
# --------------------------------------------------------------------------------------------------


def test_jsonl_train_and_heldout_are_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)])
    task = jsonl_task(path)
    train = load_examples(task, 100, seed=0)
    held = load_examples(task, 100, seed=0, split="heldout")
    assert len(held) == 4 and len(train) == 36
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in held}
    # Held-out membership does not depend on the seed.
    other_held = load_examples(task, 100, seed=9, split="heldout")
    assert {ex.prompt for ex in other_held} == {ex.prompt for ex in held}
    assert load_examples(task, 10, seed=1) == load_examples(task, 10, seed=1)
    assert load_examples(task, 10, seed=1) != load_examples(task, 10, seed=2)


def test_jsonl_small_file_holds_out_at_least_one(tmp_path: Path) -> None:
    records = [{"prompt": "a", "response": "1"}, {"prompt": "b", "response": "2"}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    task = jsonl_task(path)
    assert len(load_examples(task, 5, seed=0, split="heldout")) == 1
    assert len(load_examples(task, 5, seed=0)) == 1
    single = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "response": "1"}])
    with pytest.raises(UnmergeError, match="at least 2"):
        load_examples(jsonl_task(single), 5, seed=0)


def test_jsonl_template_dotted_field_and_labels(tmp_path: Path) -> None:
    records = [
        {"ctx": f"text {i}", "q": f"what {i}?", "answers": {"text": [f"ans {i}", "other"]}, "label": i % 2}
        for i in range(20)
    ]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    task = jsonl_task(path, template="{ctx}\nQ: {q}", response_field="answers.text.0")
    examples = load_examples(task, 50, seed=0) + load_examples(task, 50, seed=0, split="heldout")
    assert len(examples) == 20
    by_prompt = {ex.prompt: ex.response for ex in examples}
    assert by_prompt["text 3\nQ: what 3?"] == "ans 3"
    labelled = jsonl_task(path, prompt_field="q", response_field="label", labels=["neg", "pos"])
    got = {ex.prompt: ex.response for ex in load_examples(labelled, 50, seed=0)}
    assert all(resp == ("pos" if int(p.split()[1][:-1]) % 2 else "neg") for p, resp in got.items())


def test_jsonl_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    records = [{"prompt": "a", "response": "1"}, {"prompt": "b", "answer": "2"}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    with pytest.raises(UnmergeError) as info:
        load_examples(jsonl_task(path), 5, seed=0)
    message = str(info.value)
    assert f"{path}:2" in message and "'response'" in message
    with pytest.raises(UnmergeError, match=r"t\.jsonl:1: template field 'missing'"):
        load_examples(jsonl_task(path, template="{missing}"), 5, seed=0)
    with pytest.raises(UnmergeError, match="dotted path"):
        bad = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a", "response": ["x"]}])
        load_examples(jsonl_task(bad), 5, seed=0)


def test_jsonl_missing_file_and_bad_json(tmp_path: Path) -> None:
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(UnmergeError, match="absent.jsonl does not exist"):
        load_examples(jsonl_task(missing), 5, seed=0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "1"}\n\n{not json\n', encoding="utf-8")
    with pytest.raises(UnmergeError, match=r"broken\.jsonl:3: invalid JSON"):
        load_examples(jsonl_task(broken), 5, seed=0)


def test_bundled_tiny_jsonl_loads() -> None:
    path = ROOT / "tests" / "data" / "tiny_tasks.jsonl"
    train = load_examples(jsonl_task(path), 100, seed=0)
    held = load_examples(jsonl_task(path), 100, seed=0, split="heldout")
    assert len(train) + len(held) >= 15 and held
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in held}


# --------------------------------------------------------------------------------------------------
# Hugging Face loading (datasets.load_dataset is monkeypatched: no network here)
# --------------------------------------------------------------------------------------------------


def _hf_task(**keys: object) -> TaskInfo:
    source = {"kind": "hf", "dataset": "org/data", **keys}
    return TaskInfo(name="hf-task", category="reasoning", source=source)


def test_hf_source_uses_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple] = []
    rows = [{"question": f"q{i}", "answers": {"text": [f"a{i}"]}} for i in range(30)]

    def fake_load(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    task = _hf_task(
        config="main", split="validation", prompt_field="question", response_field="answers.text.0", limit=20
    )
    train = load_examples(task, 100, seed=0)
    held = load_examples(task, 100, seed=0, split="heldout")
    assert calls[0] == ("org/data", "main", "validation", True)  # streamed: `limit` records, never all
    assert len(train) == 18 and len(held) == 2
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in held}
    assert all(ex.response == "a" + ex.prompt[1:] for ex in train + held)
    assert {int(ex.prompt[1:]) for ex in train + held} == set(range(20))


def test_hf_source_accepts_plain_lists_and_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")
    rows = [{"a": 1, "b": 2, "sum": 3}, {"a": 2, "b": 5, "sum": 7}]
    fake.load_dataset = lambda path, name=None, split=None, streaming=False: rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = _hf_task(template="{a}+{b}", response_field="sum")
    got = load_examples(task, 5, seed=0) + load_examples(task, 5, seed=0, split="heldout")
    assert sorted(got, key=lambda ex: ex.prompt) == [Example("1+2", "3"), Example("2+5", "7")]


def test_hf_load_failure_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UnmergeError) as info:
        load_examples(_hf_task(prompt_field="q", response_field="a"), 5, seed=0)
    message = str(info.value)
    assert message.startswith("task hf-task: could not load Hugging Face dataset org/data: Couldn't reach")
    assert message.endswith("on an offline machine use a jsonl source")
    assert "\n" not in message


def test_hf_missing_field_names_record(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"q": "x", "a": "y"}, {"q": "z"}])
    with pytest.raises(UnmergeError, match="org/data, split train, record 1: missing field 'a'"):
        load_examples(_hf_task(prompt_field="q", response_field="a"), 5, seed=0)


# --------------------------------------------------------------------------------------------------
# tokenizer corpus
# --------------------------------------------------------------------------------------------------


def test_corpus_for_tokenizer_covers_every_pretraining_task() -> None:
    from unmerge_plugins.lib.tasks.generators import PRETRAINING_TASKS

    corpus = corpus_for_tokenizer(n_per_task=4, seed=0)
    assert len(corpus) == 4 * len(PRETRAINING_TASKS) and set(PRETRAINING_TASKS) < set(GENERATORS)
    assert corpus == corpus_for_tokenizer(n_per_task=4, seed=0)
    assert corpus != corpus_for_tokenizer(n_per_task=4, seed=1)
    assert all(text.isascii() for text in corpus)
    prompts = {text.split("\n")[0] for text in corpus}
    for name in PRETRAINING_TASKS:
        gen = GENERATORS[name]
        rng = random.Random(f"corpus:{name}:0")
        assert gen(rng).prompt in prompts


# --------------------------------------------------------------------------------------------------
# registry.toml
# --------------------------------------------------------------------------------------------------


def _registry_tasks() -> dict[str, dict]:
    with REGISTRY.open("rb") as fh:
        return tomllib.load(fh)["tasks"]


def test_registry_tasks_validate() -> None:
    tasks = _registry_tasks()
    for name, table in tasks.items():
        assert table["category"] in ALLOWED_CATEGORIES, name
        assert isinstance(table.get("description"), str) and table["description"], name
        source = table["source"]
        assert source["kind"] in SOURCE_KINDS, name
        if source["kind"] == "procedural":
            assert source["generator"] in GENERATORS, name
            assert table["category"] == CATEGORIES[source["generator"]], name
        elif source["kind"] == "hf":
            assert "/" in source["dataset"], name
            assert "response_field" in source and ("prompt_field" in source or "template" in source), name
        else:
            assert (REGISTRY.parent / source["path"]).is_file(), name


def test_registry_lists_every_generator_and_the_proposal_tasks() -> None:
    tasks = _registry_tasks()
    generators = {t["source"]["generator"] for t in tasks.values() if t["source"]["kind"] == "procedural"}
    assert generators == set(GENERATORS)
    seeds = (
        "latin_translation codesearchnet_python python_instructions_alpaca alpaca_instructions ms_marco_qa "
        "xsum "
        "reason_math gsm8k_math arjun_python_qa imdb_sentiment style_transfer squad_qa orca_math "
        "stablecode_python arxiv_summarization"
    ).split()
    for seed in seeds:
        assert tasks[seed.replace("_", "-")]["source"]["kind"] == "hf", seed
    assert "local-jsonl-example" in tasks


def test_registry_tasks_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every registry task loads: procedural and jsonl for real, hf from fake records with its fields."""
    import datasets

    for name, table in _registry_tasks().items():
        source = dict(table["source"])
        if source["kind"] == "jsonl":
            source["path"] = str(REGISTRY.parent / source["path"])
        if source["kind"] == "hf":
            records = [_fake_record(source, i) for i in range(20)]
            monkeypatch.setattr(datasets, "load_dataset", lambda *a, _r=records, **k: _r)
        task = TaskInfo(name, table["category"], source, table["description"])
        train = load_examples(task, 5, seed=0)
        held = load_examples(task, 5, seed=0, split="heldout")
        assert len(train) == 5 and held, name
        assert not {ex.prompt for ex in train} & {ex.prompt for ex in held}, name


def _nest(path: str, value: object) -> tuple[str, object]:
    """``("a.b.0", v)`` -> ``("a", {"b": [v]})``: the top-level key and the nested value."""
    parts = path.split(".")
    for part in reversed(parts[1:]):
        value = [value] if part.isdigit() else {part: value}
    return parts[0], value


def _fake_record(source: dict, i: int) -> dict:
    """A record with every field an hf source reads, distinct for each ``i``."""
    record: dict = {}
    for _, field, _, _ in string.Formatter().parse(source.get("template", "")):
        if field:
            record[field] = f"{field} {i}"
    if "template" not in source:
        key, value = _nest(source["prompt_field"], f"prompt {i}")
        record[key] = value
    labels = source.get("labels")
    key, value = _nest(source["response_field"], i % len(labels) if labels else f"response {i}")
    record[key] = value
    return record
