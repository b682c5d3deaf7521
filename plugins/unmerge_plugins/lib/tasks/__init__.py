"""Micro-task data: procedural generators and loaders for the registry's task sources.

Public API::

    Example(prompt, response)                       # one pair
    GENERATORS[name](random.Random(seed)) -> Example  # procedural generators by registry name
    CATEGORIES[name] -> "code" | "structured" | "reasoning" | "style" | "other"
    load_examples(task, n, seed, split="train")     # split: "train" or "heldout", never overlapping
    corpus_for_tokenizer(n_per_task=50, seed=0)     # texts from every generator, for a tokenizer
    CHAT_TASKS, CHAT_RELATIVES                      # the chat-* tasks for an instruct model, their relatives
    CHECKERS[name](example, answer) -> bool         # deterministic answer checkers by generator name
    checker_for(task) -> Checker | None             # a procedural task's checker (None for jsonl / hf)
    skill_score(task, examples, answers) -> float   # share of answers the task's checker accepts

See :mod:`.loaders` for the source kinds (``procedural``, ``jsonl``, ``hf``) and their keys.
"""

from __future__ import annotations

from unmerge_plugins.lib.tasks.checkers import CHECKERS, Checker, checker_for, skill_score
from unmerge_plugins.lib.tasks.generators import CATEGORIES, CHAT_RELATIVES, CHAT_TASKS, GENERATORS, Example, Generator
from unmerge_plugins.lib.tasks.loaders import SOURCE_KINDS, SPLITS, corpus_for_tokenizer, get_generator, load_examples

__all__ = [
    "CATEGORIES",
    "CHAT_RELATIVES",
    "CHAT_TASKS",
    "CHECKERS",
    "GENERATORS",
    "SOURCE_KINDS",
    "SPLITS",
    "Checker",
    "Example",
    "Generator",
    "checker_for",
    "corpus_for_tokenizer",
    "get_generator",
    "load_examples",
    "skill_score",
]
