"""Tests of the chat micro-tasks (real English for an instruct model) and their registry entries."""

from __future__ import annotations

import random
import re
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unmerge_core.config.registry import Registry
from unmerge_core.types import TaskInfo
from unmerge_plugins.lib.tasks import CATEGORIES, CHAT_RELATIVES, CHAT_TASKS, CHECKERS, GENERATORS, load_examples

from helpers import REPO  # noqa: E402

REGISTRY = REPO / "registry.toml"
BANNER = "Chat micro-tasks for instruct models (real English; SmolLM2, Qwen2.5-Instruct)"
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def chat_task(name: str) -> TaskInfo:
    return TaskInfo(name=name, category=CATEGORIES[name], source={"kind": "procedural", "generator": name})


# --------------------------------------------------------------------------------------------------
# the set of tasks
# --------------------------------------------------------------------------------------------------


def test_at_least_fourteen_chat_tasks_covering_every_category() -> None:
    assert len(CHAT_TASKS) >= 14 and len(set(CHAT_TASKS)) == len(CHAT_TASKS)
    assert all(name.startswith("chat-") for name in CHAT_TASKS)
    assert set(CHAT_TASKS) <= set(GENERATORS) and set(CHAT_TASKS) <= set(CATEGORIES)
    assert {n for n in GENERATORS if n.startswith("chat-")} == set(CHAT_TASKS)
    assert {CATEGORIES[n] for n in CHAT_TASKS} == {"code", "structured", "reasoning", "style", "other"}
    for category in ("code", "structured", "reasoning", "style", "other"):
        assert sum(CATEGORIES[n] == category for n in CHAT_TASKS) >= 2, category


def test_the_proposal_pairs_of_relatives_are_there() -> None:
    pairs = {frozenset(p) for p in CHAT_RELATIVES}
    assert len(pairs) == len(CHAT_RELATIVES) >= 3
    for a, b in CHAT_RELATIVES:
        assert a in CHAT_TASKS and b in CHAT_TASKS and a != b
        assert CATEGORIES[a] == CATEGORIES[b], (a, b)
    assert frozenset({"chat-pirate", "chat-cowboy"}) in pairs
    assert frozenset({"chat-json-person", "chat-xml-person"}) in pairs
    assert frozenset({"chat-markdown-row", "chat-csv-line"}) in pairs


def test_every_chat_task_has_its_own_checker() -> None:
    assert set(CHAT_TASKS) <= set(CHECKERS)


# --------------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHAT_TASKS)
def test_chat_generator_is_deterministic_english_ascii_and_short(name: str) -> None:
    gen = GENERATORS[name]
    run_a = [gen(random.Random(f"a{i}")) for i in range(300)]
    run_b = [gen(random.Random(f"a{i}")) for i in range(300)]
    assert run_a == run_b
    rng = random.Random(5)
    many = [gen(rng) for _ in range(2000)]
    for ex in run_a + many:
        assert ex.prompt.isascii() and ex.response.isascii(), ex
        assert "\n" not in ex.prompt and "\n" not in ex.response, ex
        assert ex.prompt == ex.prompt.strip() and ex.response == ex.response.strip(), ex
        assert 20 <= len(ex.prompt) <= 140, ex
        assert 1 <= len(ex.response) <= 90, ex
        words = re.findall(r"[A-Za-z]+", ex.prompt)
        assert len(words) >= 4 and ex.prompt[0].isupper(), ex  # a sentence a user would type
    assert len({ex.prompt for ex in many}) >= 700, "prompt space too small"
    assert len({ex.response for ex in many}) >= 25, "answers too uniform"


@pytest.mark.parametrize("name", CHAT_TASKS)
def test_chat_heldout_and_train_prompts_never_coincide(name: str) -> None:
    task = chat_task(name)
    held = load_examples(task, 60, seed=0, split="heldout")
    held_prompts = {ex.prompt for ex in held}
    assert len(held_prompts) == 60
    for seed in (0, 1, 2):
        train = load_examples(task, 400, seed=seed)
        assert len({ex.prompt for ex in train}) == 400
        assert not held_prompts & {ex.prompt for ex in train}


@pytest.mark.parametrize(("a", "b"), [tuple(p) for p in CHAT_RELATIVES])
def test_relatives_share_the_record_but_not_the_answer(a: str, b: str) -> None:
    """Relatives drawn with one seed describe the same record; the prompts differ in a few words only."""
    for seed in range(100):
        ex_a, ex_b = GENERATORS[a](random.Random(seed)), GENERATORS[b](random.Random(seed))
        assert ex_a.prompt != ex_b.prompt and ex_a.response != ex_b.response
        shared = set(re.findall(r"\w+", ex_a.prompt)) & set(re.findall(r"\w+", ex_b.prompt))
        assert len(shared) >= 0.5 * len(set(re.findall(r"\w+", ex_a.prompt))), (ex_a, ex_b)


def test_chat_answers_follow_their_prompts() -> None:
    """Each generator's answer is what its prompt asks, checked independently of the generator code."""
    rng = random.Random(11)
    for _ in range(200):
        ex = GENERATORS["chat-uppercase"](rng)
        assert ex.response == ex.prompt.split(": ", 1)[1].upper()
        ex = GENERATORS["chat-title-case"](rng)
        assert ex.response == " ".join(w.capitalize() for w in ex.prompt.split(": ", 1)[1].split())
        ex = GENERATORS["chat-reverse-words"](rng)
        assert ex.response.split() == ex.prompt.split(": ", 1)[1].split()[::-1]
        ex = GENERATORS["chat-sort"](rng)
        nums = [int(n) for n in ex.prompt.split(": ", 1)[1].split(", ")]
        assert ex.response == ", ".join(map(str, sorted(nums)))
        ex = GENERATORS["chat-compare"](rng)
        x, y = map(int, re.findall(r"\d+", ex.prompt))
        assert x != y and int(ex.response) == (max(x, y) if "larger" in ex.prompt else min(x, y))
        ex = GENERATORS["chat-csv-line"](rng)
        assert ex.response == ex.prompt.split(": ", 1)[1].replace(", ", ",")
        ex = GENERATORS["chat-markdown-row"](rng)
        assert ex.response == "| " + ex.prompt.split(": ", 1)[1].replace(", ", " | ") + " |"
        ex = GENERATORS["chat-word-problem"](rng)
        a, b = map(int, re.findall(r"\d+", ex.prompt))
        gains = any(w in ex.prompt for w in ("buys", "finds", "gets"))
        assert ex.response == (f"{a} + {b} = {a + b}" if gains else f"{a} - {b} = {a - b}") and (gains or a > b)


def test_chat_code_answers_are_valid_python_and_sql_shaped() -> None:
    rng = random.Random(2)
    for _ in range(200):
        compile(GENERATORS["chat-python-function"](rng).response, "<gen>", "exec")
        compile(GENERATORS["chat-python-lambda"](rng).response, "<gen>", "exec")
        compile(GENERATORS["chat-python-expr"](rng).response, "<gen>", "eval")
        sql = GENERATORS["chat-sql-query"](rng).response
        assert re.fullmatch(r"SELECT [\w, ]+ FROM \w+ WHERE \w+ [<>=] \d+;", sql), sql


@given(SEEDS)
@settings(max_examples=60, deadline=None)
def test_json_and_xml_relatives_hold_the_same_values(seed: int) -> None:
    import json
    import xml.etree.ElementTree as ET

    record = json.loads(GENERATORS["chat-json-person"](random.Random(seed)).response)
    root = ET.fromstring(GENERATORS["chat-xml-person"](random.Random(seed)).response)
    assert root.tag == "person"
    assert {child.tag: child.text for child in root} == {k: str(v) for k, v in record.items()}
    assert isinstance(record["name"], str) and isinstance(record.get("age", 0), int)


# --------------------------------------------------------------------------------------------------
# registry.toml
# --------------------------------------------------------------------------------------------------


def test_registry_lists_every_chat_task_under_its_banner() -> None:
    text = REGISTRY.read_text(encoding="utf-8")
    assert BANNER in text
    after = text.split(BANNER, 1)[1]
    with REGISTRY.open("rb") as fh:
        tasks = tomllib.load(fh)["tasks"]
    for name in CHAT_TASKS:
        assert f"[tasks.{name}]" in after, name
        table = tasks[name]
        assert table["category"] == CATEGORIES[name], name
        assert table["source"] == {"kind": "procedural", "generator": name}, name
        assert table["description"].strip(), name


def test_registry_loads_the_chat_tasks_through_the_core_registry() -> None:
    registry = Registry.load(REGISTRY)
    for name in CHAT_TASKS:
        task = registry.task(name)
        assert task.category == CATEGORIES[name] and task.source["generator"] == name
        held = load_examples(task, 5, seed=0, split="heldout")
        assert len(held) == 5 and all(CHECKERS[name](ex, ex.response) for ex in held)
