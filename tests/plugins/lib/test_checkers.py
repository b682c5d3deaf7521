"""Tests of the deterministic answer checkers (plugins/unmerge_plugins/lib/tasks/checkers.py)."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unmerge_core.types import TaskInfo
from unmerge_plugins.lib.tasks import (
    CATEGORIES,
    CHAT_RELATIVES,
    CHAT_TASKS,
    CHECKERS,
    GENERATORS,
    Checker,
    Example,
    checker_for,
    skill_score,
)

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def example(name: str, seed: int) -> Example:
    return GENERATORS[name](random.Random(seed))


def procedural(name: str) -> TaskInfo:
    return TaskInfo(name=name, category=CATEGORIES[name], source={"kind": "procedural", "generator": name})


def mutate(text: str, rng: random.Random) -> str:
    """One word or number of ``text`` changed: a number moves by 1..9, a word gains a letter."""
    tokens = list(re.finditer(r"[A-Za-z]+|\d+", text))
    m = rng.choice(tokens)
    token = m.group()
    new = str(int(token) + rng.randint(1, 9)) if token.isdigit() else token + rng.choice("qzx")
    return text[: m.start()] + new + text[m.end():]


# --------------------------------------------------------------------------------------------------
# properties over every generator
# --------------------------------------------------------------------------------------------------


def test_every_generator_has_a_checker() -> None:
    assert set(CHECKERS) == set(GENERATORS)
    assert all(callable(c) for c in CHECKERS.values())


@pytest.mark.parametrize("name", sorted(GENERATORS))
@given(seed=SEEDS)
@settings(max_examples=40, deadline=None)
def test_the_reference_answer_is_accepted(name: str, seed: int) -> None:
    ex = example(name, seed)
    check = CHECKERS[name]
    assert check(ex, ex.response)
    assert check(ex, f"  {ex.response}\n"), "surrounding whitespace is not part of an answer"


@pytest.mark.parametrize("name", CHAT_TASKS)
@given(seed=SEEDS, which=st.randoms(use_true_random=False))
@settings(max_examples=40, deadline=None)
def test_a_changed_word_or_number_is_refused(name: str, seed: int, which: random.Random) -> None:
    ex = example(name, seed)
    assert not CHECKERS[name](ex, mutate(ex.response, which))


@pytest.mark.parametrize("name", CHAT_TASKS)
@given(seed=SEEDS, cut=st.integers(min_value=2, max_value=200))
@settings(max_examples=40, deadline=None)
def test_a_truncated_answer_is_refused(name: str, seed: int, cut: int) -> None:
    ex = example(name, seed)
    truncated = ex.response[: max(0, len(ex.response) - cut)]
    assert not CHECKERS[name](ex, truncated)


@pytest.mark.parametrize("name", CHAT_TASKS)
@given(seed=SEEDS, other=SEEDS)
@settings(max_examples=30, deadline=None)
def test_another_prompts_answer_is_refused(name: str, seed: int, other: int) -> None:
    ex, wrong = example(name, seed), example(name, other)
    if wrong.response.strip() != ex.response.strip():
        accepted = CHECKERS[name](ex, wrong.response)
        # only validators may accept another spelling of the same answer (numbers, JSON key order...)
        assert not accepted or CHECKERS[name](wrong, ex.response)


@pytest.mark.parametrize("name", CHAT_TASKS)
@given(seed=SEEDS, answer=st.text(max_size=80))
@settings(max_examples=60, deadline=None)
def test_a_checker_never_raises(name: str, seed: int, answer: str) -> None:
    assert CHECKERS[name](example(name, seed), answer) in (True, False)


@pytest.mark.parametrize(("a", "b"), [tuple(p) for p in CHAT_RELATIVES])
@given(seed=SEEDS)
@settings(max_examples=40, deadline=None)
def test_relatives_answers_are_not_accepted_by_each_others_checker(a: str, b: str, seed: int) -> None:
    ex_a, ex_b = example(a, seed), example(b, seed)
    assert not CHECKERS[a](ex_a, ex_b.response)
    assert not CHECKERS[b](ex_b, ex_a.response)


# --------------------------------------------------------------------------------------------------
# the validators, by hand
# --------------------------------------------------------------------------------------------------

JSON_EX = Example("Give me a JSON object with the keys name and age for: Bob, 7", '{"name": "Bob", "age": 7}')


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ('{"name": "Bob", "age": 7}', True),
        ('{"age":7,"name":"Bob"}', True),
        ('{\n  "name": "Bob",\n  "age": 7\n}', True),
        ('{"name": "Bob", "age": "7"}', False),  # a string is not the number
        ('{"name": "Bob", "age": 7.0}', False),
        ('{"name": "Bob", "age": true}', False),
        ('{"name": "bob", "age": 7}', False),
        ('{"name": "Bob"}', False),
        ('{"name": "Bob", "age": 7, "city": "Paris"}', False),
        ('{"Name": "Bob", "age": 7}', False),
        ('["Bob", 7]', False),
        ('```json\n{"name": "Bob", "age": 7}\n```', False),  # the object itself, nothing around it
        ('{"name": "Bob", "age": 7} Done!', False),
        ("", False),
    ],
)
def test_json_checker(answer: str, ok: bool) -> None:
    assert CHECKERS["chat-json-person"](JSON_EX, answer) is ok


XML_EX = Example("...", "<person><name>Bob</name><age>7</age></person>")


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ("<person><name>Bob</name><age>7</age></person>", True),
        ("<person>\n  <name>Bob</name>\n  <age>7</age>\n</person>", True),
        ("<person><age>7</age><name>Bob</name></person>", True),
        ("<person><name> Bob </name><age>7</age></person>", True),
        ("<people><name>Bob</name><age>7</age></people>", False),
        ("<person><name>Bob</name><age>8</age></person>", False),
        ("<person><name>Bob</name></person>", False),
        ("<person><name>Bob</name><age>7</age><city>Rome</city></person>", False),
        ("<person><name>Bob</name><name>Bob</name><age>7</age></person>", False),
        ("<person><name>Bob</name><age><n>7</n></age></person>", False),
        ('<person id="1"><name>Bob</name><age>7</age></person>', False),
        ("<person><name>Bob</name><age>7</age>", False),
        ('<!DOCTYPE p [<!ENTITY a "Bob">]><person><name>&a;</name><age>7</age></person>', False),
        ("", False),
    ],
)
def test_xml_checker(answer: str, ok: bool) -> None:
    assert CHECKERS["chat-xml-person"](XML_EX, answer) is ok


SQL_EX = Example("...", "SELECT name, email FROM customers WHERE age > 30;")


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ("SELECT name, email FROM customers WHERE age > 30;", True),
        ("SELECT name, email FROM customers WHERE age > 30", True),
        ("select name, email from customers where age > 30;", True),
        ("SELECT name,email\nFROM customers\nWHERE age>30 ;", True),
        ("SELECT email, name FROM customers WHERE age > 30;", False),
        ("SELECT name, email FROM customer WHERE age > 30;", False),
        ("SELECT name, email FROM customers WHERE age >= 30;", False),
        ("SELECT name, email FROM customers WHERE age > 31;", False),
        ("SELECT name FROM customers WHERE age > 30;", False),
        ("SELECT Name, email FROM customers WHERE age > 30;", False),  # identifiers keep their case
        ("SELECT name, email FROM customers WHERE age > 30;;", False),
        ("SELECT name, email FROM customers WHERE age > 30; DROP TABLE customers;", False),
    ],
)
def test_sql_checker(answer: str, ok: bool) -> None:
    assert CHECKERS["chat-sql-query"](SQL_EX, answer) is ok


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ("def total(a, b): return a + b", True),
        ("def total(a,b):return a+b", True),
        ("def total(a, b):\n    return a + b", True),
        ("def total(a, b): return (a + b)", True),
        ("def total(a, b): return b + a", False),
        ("def total(x, y): return x + y", False),
        ("def sum_ab(a, b): return a + b", False),
        ("total = lambda a, b: a + b", False),
        ("def total(a, b): return a +", False),
        ("```python\ndef total(a, b): return a + b\n```", False),
    ],
)
def test_python_function_checker(answer: str, ok: bool) -> None:
    ex = Example("...", "def total(a, b): return a + b")
    assert CHECKERS["chat-python-function"](ex, answer) is ok


def test_python_expression_checker() -> None:
    ex = Example("...", "scores[:3]")
    check = CHECKERS["chat-python-expr"]
    assert check(ex, "scores[:3]") and check(ex, "scores[ : 3]") and check(ex, "(scores[:3])")
    assert not check(ex, "scores[:4]") and not check(ex, "scores[0:3]") and not check(ex, "scores[:3] + []")
    assert not check(ex, "x = scores[:3]") and not check(ex, "import os") and not check(ex, "scores[:")


@pytest.mark.parametrize(
    ("name", "reference", "answer", "ok"),
    [
        ("chat-word-problem", "12 + 5 = 17", "12 + 5 = 17", True),
        ("chat-word-problem", "12 + 5 = 17", "12+5=17", True),
        ("chat-word-problem", "12 + 5 = 17", "Emma has 12 + 5 = 17 apples now.", True),
        ("chat-word-problem", "12 + 5 = 17", "17", False),  # the task asks for the equation
        ("chat-word-problem", "12 + 5 = 17", "12 + 5 = 18", False),
        ("chat-word-problem", "12 + 5 = 17", "12 - 5 = 17", False),
        ("chat-word-problem", "12 + 5 = 17", "5 + 12 = 17", False),
        ("chat-word-problem", "12 + 5 = 17", "12 + 5 = 17 + 0", False),
        ("chat-word-problem", "12 + 5 = 17", "12 + 5 = seventeen", False),
        ("chat-compare", "17", "17", True),
        ("chat-compare", "17", "The answer is 17.", True),
        ("chat-compare", "17", "17.5", False),
        ("chat-compare", "17", "-17", False),
        ("chat-compare", "17", "1 7", False),
        ("chat-compare", "17", "170", False),
        ("chat-compare", "17", "12 + 5 = 17", False),  # the first number is the answer
        ("chat-compare", "17", "seventeen", False),
        ("chat-compare", "82", "82", True),
        ("chat-compare", "82", "82 is larger.", True),
        ("chat-compare", "82", "47", False),
        ("chat-sort", "3, 7, 19, 42", "3, 7, 19, 42", True),
        ("chat-sort", "3, 7, 19, 42", "3 7 19 42", True),
        ("chat-sort", "3, 7, 19, 42", "[3, 7, 19, 42]", True),
        ("chat-sort", "3, 7, 19, 42", "3, 7, 42, 19", False),
        ("chat-sort", "3, 7, 19, 42", "3, 7, 19", False),
        ("chat-sort", "3, 7, 19, 42", "3, 7, 19, 42, 42", False),
        ("chat-markdown-row", "| apple | 3 | red |", "|apple|3|red|", True),
        ("chat-markdown-row", "| apple | 3 | red |", "| apple | 3 | red", False),
        ("chat-markdown-row", "| apple | 3 | red |", "apple | 3 | red", False),
        ("chat-markdown-row", "| apple | 3 | red |", "| apple | red | 3 |", False),
        ("chat-markdown-row", "| apple | 3 | red |", "| apple | 3 | red |\n| --- | --- | --- |", False),
        ("chat-csv-line", "apple,3,red", "apple,3,red", True),
        ("chat-csv-line", "apple,3,red", "apple, 3, red", False),
        ("chat-csv-line", "apple,3,red", "apple,3", False),
        ("chat-csv-line", "apple,3,red", "apple,3,red\nbanana,4,green", False),
        ("chat-pirate", "Arr, the cat be near the door, matey!", "Arr, the cat be near the door, matey!", True),
        ("chat-pirate", "Arr, the cat be near the door, matey!", "Arr, the cat be near the door matey!", False),
        ("chat-pirate", "Arr, the cat be near the door, matey!", "arr, the cat be near the door, matey!", False),
        ("chat-uppercase", "RED FOX", "RED FOX", True),
        ("chat-uppercase", "RED FOX", "Red Fox", False),
        ("chat-title-case", "Red Fox", "RED FOX", False),
    ],
)
def test_validators_by_hand(name: str, reference: str, answer: str, ok: bool) -> None:
    assert CHECKERS[name](Example("...", reference), answer) is ok


# --------------------------------------------------------------------------------------------------
# checker_for and skill_score
# --------------------------------------------------------------------------------------------------


def test_checker_for_procedural_tasks_is_their_generators_checker() -> None:
    for name in GENERATORS:
        task = TaskInfo(name=f"my-{name}", category="other", source={"kind": "procedural", "generator": name})
        assert checker_for(task) is CHECKERS[name]


def test_checker_for_other_tasks_is_none() -> None:
    assert checker_for(TaskInfo("x", "other", {"kind": "jsonl", "path": "/tmp/x.jsonl"})) is None
    assert checker_for(TaskInfo("x", "other", {"kind": "hf", "dataset": "a/b"})) is None
    assert checker_for(TaskInfo("x", "other", {"kind": "procedural", "generator": "nope"})) is None
    assert checker_for(TaskInfo("x", "other", {})) is None


def test_skill_score_is_the_share_accepted() -> None:
    task = procedural("chat-compare")
    examples = [Example("a", "17"), Example("b", "3"), Example("c", "40"), Example("d", "8")]
    assert skill_score(task, examples, ["17", "It is 3.", "41", ""]) == 0.5
    assert skill_score(task, examples, [e.response for e in examples]) == 1.0
    assert skill_score(task, examples, ["x"] * 4) == 0.0
    assert skill_score(task, [], []) == 0.0


def test_skill_score_without_a_checker_is_exact_match() -> None:
    task = TaskInfo("mine", "other", {"kind": "jsonl", "path": "/tmp/x.jsonl"})
    examples = [Example("a", "yes"), Example("b", "no")]
    assert skill_score(task, examples, [" yes\n", "No"]) == 0.5


def test_skill_score_needs_one_answer_per_example() -> None:
    with pytest.raises(ValueError, match="2 examples but 1 answers"):
        skill_score(procedural("chat-uppercase"), [Example("a", "A"), Example("b", "B")], ["A"])


def test_checker_type_is_a_callable_alias() -> None:
    check: Checker = CHECKERS["chat-uppercase"]
    assert check(Example("...", "RED FOX"), "RED FOX")
