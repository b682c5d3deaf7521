"""Deterministic answer checkers: does a model's (greedy) answer do what a micro-task asks?

A :data:`Checker` takes the :class:`Example` (its prompt and reference response) and the model's answer
and says yes or no; it never raises, whatever the answer holds. :data:`CHECKERS` has one per
procedural generator: exact match (surrounding whitespace aside) for most, a validator where several
answers are right:

=========================  ==========================================================================
``chat-json-person``       parses as a JSON object with exactly the reference's keys and values, of
                           the same JSON types (``"7"`` is not ``7``); key order and spacing are free
``chat-xml-person``        parses with :mod:`xml.etree.ElementTree`; the same root tag and the same
                           children (tag and stripped text), in any order; no attributes, no nesting,
                           no DOCTYPE or entities
``chat-sql-query``         the same tokens once keywords are upper-cased, whitespace is ignored and
                           one trailing semicolon is optional (identifiers keep their case)
``chat-python-*``          parses to the same Python syntax tree (``ast``): spacing, line breaks and
                           redundant parentheses are free; nothing is executed
``chat-word-problem``      an equation with the reference's numbers and operators in order
                           (``12 + 5 = 17``; spacing and words around it are free)
``chat-compare``           the first number in the answer equals the reference number
``chat-sort``              the numbers in the answer are the reference's, in the same order
``chat-markdown-row``      one line ``| ... |`` whose stripped cells are the reference's
``chat-csv-line``          one CSV line (:mod:`csv`) whose cells are exactly the reference's
everything else            exact match (style rewrites included: the reference is the style)
=========================  ==========================================================================

A task's skill score (:func:`skill_score`) is the share of answers its checker accepts; the causal
metric scores greedy answers on held-out prompts with it.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import Any

from unmerge_core import TaskInfo
from unmerge_plugins.lib.tasks.generators import GENERATORS, Example

Checker = Callable[[Example, str], bool]
"""``checker(example, answer) -> bool``: whether ``answer`` is right for ``example.prompt``."""

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?", re.ASCII)
_SQL_TOKEN = re.compile(r"\w+|<=|>=|<>|!=|\S")
_SQL_KEYWORDS = frozenset(
    "SELECT FROM WHERE AND OR NOT ORDER BY GROUP HAVING LIMIT OFFSET AS ASC DESC DISTINCT IN IS NULL LIKE "
    "BETWEEN JOIN INNER LEFT RIGHT OUTER ON".split()
)


def check_exact(example: Example, answer: str) -> bool:
    """The answer is the reference, surrounding whitespace aside."""
    return answer.strip() == example.response.strip()


# ------------------------------------------------------------------------------------------------
# structured text
# ------------------------------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _same_json(a: Any, b: Any) -> bool:
    """Equal JSON values of equal JSON types (``7``, ``7.0``, ``"7"`` and ``true`` all differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return bool(a == b)


def check_json_object(example: Example, answer: str) -> bool:
    """A JSON object (and nothing else) with exactly the reference's keys, values and value types."""
    try:
        expected = json.loads(example.response)
        got = json.loads(answer.strip(), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError):
        return False
    return isinstance(got, dict) and _same_json(got, expected)


def _flat_element(root: ET.Element) -> tuple[str, list[tuple[str, str]]] | None:
    """``(tag, sorted [(child tag, stripped text)])`` of a one-level element; ``None`` for anything else."""
    if root.attrib or (root.text or "").strip():
        return None
    children: list[tuple[str, str]] = []
    for child in root:
        if child.attrib or len(child) or (child.tail or "").strip():
            return None
        children.append((str(child.tag), (child.text or "").strip()))
    return str(root.tag), sorted(children)


def check_xml_element(example: Example, answer: str) -> bool:
    """One XML element with the reference's tag and children (tag and text), in any order."""
    text = answer.strip()
    if "<!" in text:  # no DOCTYPE, entity declarations or comments: nothing to expand
        return False
    try:
        got, expected = _flat_element(ET.fromstring(text)), _flat_element(ET.fromstring(example.response))
    except (ET.ParseError, ValueError, RecursionError):
        return False
    return got is not None and got == expected


def check_markdown_row(example: Example, answer: str) -> bool:
    """One Markdown table row ``| a | b |`` whose cells, stripped, are the reference's."""

    def cells(text: str) -> list[str] | None:
        text = text.strip()
        if "\n" in text or "\r" in text or len(text) < 2 or not (text.startswith("|") and text.endswith("|")):
            return None
        return [c.strip() for c in text[1:-1].split("|")]

    got = cells(answer)
    return got is not None and got == cells(example.response)


def check_csv_line(example: Example, answer: str) -> bool:
    """One CSV line whose cells (as :mod:`csv` reads them, quotes allowed) are exactly the reference's."""

    def row(text: str) -> list[str] | None:
        text = text.strip()
        if "\n" in text or "\r" in text:
            return None
        try:
            rows = list(csv.reader([text]))
        except csv.Error:
            return None
        return rows[0] if len(rows) == 1 else None

    got = row(answer)
    return got is not None and got == row(example.response)


# ------------------------------------------------------------------------------------------------
# code
# ------------------------------------------------------------------------------------------------


def _sql_tokens(text: str) -> list[str]:
    tokens = [t.upper() if t.upper() in _SQL_KEYWORDS else t for t in _SQL_TOKEN.findall(text)]
    if tokens and tokens[-1] == ";":
        tokens.pop()
    return tokens


def check_sql(example: Example, answer: str) -> bool:
    """The reference query up to whitespace, keyword case and one trailing semicolon."""
    return _sql_tokens(answer) == _sql_tokens(example.response)


def _python_tree(text: str, mode: str) -> str | None:
    try:
        return ast.dump(ast.parse(text.strip(), mode=mode))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def check_python_statement(example: Example, answer: str) -> bool:
    """Python code with the reference's syntax tree (a ``def`` or an assignment); never executed."""
    got = _python_tree(answer, "exec")
    return got is not None and got == _python_tree(example.response, "exec")


def check_python_expression(example: Example, answer: str) -> bool:
    """One Python expression with the reference's syntax tree; never evaluated."""
    got = _python_tree(answer, "eval")
    return got is not None and got == _python_tree(example.response, "eval")


# ------------------------------------------------------------------------------------------------
# numbers
# ------------------------------------------------------------------------------------------------


def _numbers(text: str) -> list[float]:
    return [float(n) for n in _NUMBER.findall(text)]


def check_first_number(example: Example, answer: str) -> bool:
    """The first number in the answer (``"It is 17."``) equals the reference number."""
    got, expected = _numbers(answer), _numbers(example.response)
    return bool(got) and bool(expected) and math.isclose(got[0], expected[0], rel_tol=0.0, abs_tol=1e-9)


def check_equation(example: Example, answer: str) -> bool:
    """An equation (``12 + 5 = 17``) with the reference's numbers and ``+`` / ``-`` operators, in order."""
    expected = re.findall(r"\d+|[-+=]", example.response, re.ASCII)
    return "=" in expected and re.findall(r"\d+|[-+=]", answer, re.ASCII) == expected


def check_number_list(example: Example, answer: str) -> bool:
    """The numbers in the answer are the reference's, in order (any separators or brackets)."""
    expected = _numbers(example.response)
    return bool(expected) and _numbers(answer) == expected


# ------------------------------------------------------------------------------------------------
# by task
# ------------------------------------------------------------------------------------------------

CHECKERS: dict[str, Checker] = {
    **{name: check_exact for name in GENERATORS},
    "chat-sql-query": check_sql,
    "chat-python-function": check_python_statement,
    "chat-python-lambda": check_python_statement,
    "chat-python-expr": check_python_expression,
    "chat-json-person": check_json_object,
    "chat-xml-person": check_xml_element,
    "chat-markdown-row": check_markdown_row,
    "chat-csv-line": check_csv_line,
    "chat-word-problem": check_equation,
    "chat-compare": check_first_number,
    "chat-sort": check_number_list,
}
"""One checker per procedural generator name (every generator has one)."""


def checker_for(task: TaskInfo) -> Checker | None:
    """The checker of a procedural task (by its generator); ``None`` for jsonl / hf tasks or an unknown
    generator (score those by exact match: :func:`skill_score` does)."""
    source = task.source or {}
    if source.get("kind") != "procedural":
        return None
    name = source.get("generator")
    return CHECKERS.get(name) if isinstance(name, str) else None


def skill_score(task: TaskInfo, examples: Sequence[Example], answers: Sequence[str]) -> float:
    """The share of ``answers`` (one per example, in order) that the task's checker accepts.

    Tasks without a checker (:func:`checker_for` is ``None``) are scored by exact match, surrounding
    whitespace aside. No examples score 0.0.
    """
    if len(examples) != len(answers):
        raise ValueError(f"task {task.name}: {len(examples)} examples but {len(answers)} answers")
    if not examples:
        return 0.0
    check = checker_for(task) or check_exact
    return sum(bool(check(ex, answer)) for ex, answer in zip(examples, answers)) / len(examples)
