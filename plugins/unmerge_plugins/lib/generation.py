"""Greedy answers of a causal LM to held-out prompts, scored by each skill's checker.

Used by the ``causal-ablation`` metric under ``score = "checker"``: a skill's *checker score* is the
share of held-out prompts whose greedy answer its checker accepts (``lib/tasks/checkers.py``:
``checker_for(task)``; a skill without one can be given the exact-match checker).

- :func:`greedy_generate`: batched greedy decoding with left padding and a KV cache, a small loop
  of its own (no sampling, no logits processors): it stops a row at an end-of-sequence token and the
  batch when every row has stopped. On the tiny model it is several times faster than
  ``model.generate`` and gives the same tokens.
- :class:`GenerationSet`: the held-out prompts of several skills, tokenised once (through the chat
  template when the tokenizer has one, :func:`~unmerge_plugins.lib.lm.prompt_ids`) and cut into
  fixed batches, so that a prompt is always decoded in the same batch with the same padding: the
  answers of a model depend on its weights only, not on what ran before (a resumed run is
  byte-identical).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unmerge_core import TaskInfo
from unmerge_plugins.lib.lm import prompt_ids
from unmerge_plugins.lib.tasks import Example

Checker = Callable[[Example, str], bool]
"""A skill's checker: the example (prompt and reference response) and the model's greedy answer."""
CheckerLookup = Callable[[TaskInfo], "Checker | None"]


def exact_match(example: Example, answer: str) -> bool:
    """The fallback checker: the answer is the reference response (surrounding whitespace ignored)."""
    return answer.strip() == example.response.strip()


def registry_checker_for(task: TaskInfo) -> Checker | None:
    """``lib/tasks/checkers.checker_for`` (None when that module is not installed)."""
    try:
        from unmerge_plugins.lib.tasks.checkers import checker_for
    except ImportError:
        return None
    return checker_for(task)


CHECKER_TASK_KEY = "checker_task"
"""A task source key naming the registry task whose checker judges this skill's answers (a mapping
with ``name``, ``category``, ``source``), e.g. for ``--task-data SKILL=FILE.jsonl`` when SKILL is a
registry task."""
FALLBACK_KEY = "fallback_checker"
"""A task source key: ``"exact"`` gives a skill without a checker the exact-match checker."""


def resolve_checker(task: TaskInfo, lookup: CheckerLookup | None = None, fallback: bool = True) -> Checker | None:
    """The checker of one skill: the one of the registry task its source names (``checker_task``),
    else ``lookup(task)`` (the registry's checkers by default), else (with ``fallback``) exact match when
    its source says ``fallback_checker = "exact"``, else None."""
    lookup = lookup or registry_checker_for
    named = task.source.get(CHECKER_TASK_KEY)
    checker = None
    if isinstance(named, Mapping):
        checker = lookup(TaskInfo(str(named.get("name", task.name)), str(named.get("category", task.category)),
                                  dict(named.get("source", {})), str(named.get("description", ""))))
    if checker is None:
        checker = lookup(task)
    if checker is None and fallback and task.source.get(FALLBACK_KEY) == "exact":
        checker = exact_match
    return checker


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's generation-config EOS tokens."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    ids += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    return sorted({int(i) for i in ids if i is not None})


@torch.no_grad()
def greedy_generate(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Sequence[int],
                    pad_id: int, device: torch.device | str = "cpu") -> list[list[int]]:
    """Greedy continuations of ``prompts`` decoded together (left padding, KV cache).

    Returns, per prompt, the new tokens before the first EOS (EOS excluded), at most
    ``max_new_tokens`` of them (a row that reaches the limit without EOS keeps them all)."""
    n = len(prompts)
    if n == 0 or max_new_tokens <= 0:
        return [[] for _ in prompts]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if len(ids):
            input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            attention[row, width - len(ids):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(list(eos), dtype=torch.long, device=device)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(dim=-1)
    last = positions[:, -1:]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        done = done | torch.isin(nxt, stop)
        steps.append(torch.where(done, torch.full_like(nxt, -1), nxt))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones((n, 1), dtype=attention.dtype, device=device)], dim=1)
        last = last + 1
        feed = torch.where(done, torch.full_like(nxt, pad_id), nxt)[:, None]
        out = model(input_ids=feed, attention_mask=attention, position_ids=last, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(dim=-1)
    tokens = torch.stack(steps, dim=1).cpu().tolist()
    return [[t for t in row[: row.index(-1)]] if -1 in row else row for row in tokens]


@dataclass(frozen=True)
class _GenBatch:
    task: str
    rows: list[int]  # indices into the task's examples
    prompts: list[list[int]]


class GenerationSet:
    """Held-out prompts of several skills, decoded greedily and judged by each skill's checker.

    Args:
        tokenizer: The base model's tokenizer (its chat template is used when it has one).
        examples: Skill -> held-out examples (prompt and reference response).
        checkers: Skill -> checker; every skill of ``examples`` needs one.
        batch_size: Prompts decoded together.
        margin: New tokens allowed beyond the skill's longest reference response (EOS included).
        max_new_tokens: Cap on the new tokens of any skill.

    Batches hold one skill's prompts, sorted by length, and are fixed at construction.
    """

    def __init__(self, tokenizer: Any, examples: Mapping[str, Sequence[Example]], checkers: Mapping[str, Checker],
                 batch_size: int = 32, margin: int = 8, max_new_tokens: int = 512) -> None:
        missing = [t for t in examples if t not in checkers]
        if missing:
            raise ValueError(f"no checker for {', '.join(missing)}")
        self.tasks = list(examples)
        self.examples = {t: list(examples[t]) for t in self.tasks}
        self.checkers = dict(checkers)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.budget: dict[str, int] = {}
        self._batches: list[_GenBatch] = []
        for task in self.tasks:
            exs = self.examples[task]
            longest = max((len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) for ex in exs), default=0)
            self.budget[task] = min(longest + margin, max_new_tokens)
            encoded = [prompt_ids(tokenizer, ex.prompt) for ex in exs]
            order = sorted(range(len(exs)), key=lambda j: (len(encoded[j]), j))
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                self._batches.append(_GenBatch(task, rows, [encoded[j] for j in rows]))
        self.generated = 0  # prompts decoded so far (for timing)

    def answers(self, model: Any, device: torch.device | str = "cpu",
                tasks: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Each skill's greedy answers, in the order of its examples (only ``tasks`` when given)."""
        eos = eos_ids(model, self.tokenizer)
        wanted = self.tasks if tasks is None else [t for t in self.tasks if t in set(tasks)]
        out: dict[str, list[str]] = {t: [""] * len(self.examples[t]) for t in wanted}
        for batch in self._batches:
            if batch.task not in out:
                continue
            new = greedy_generate(model, batch.prompts, self.budget[batch.task], eos, self.pad_id, device)
            for j, ids in zip(batch.rows, new):
                out[batch.task][j] = self.tokenizer.decode(ids, skip_special_tokens=True)
            self.generated += len(batch.rows)
        return out

    def accepted(self, model: Any, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
        """Per skill, whether its checker accepts each greedy answer (a boolean array)."""
        return {t: judged[0] for t, judged in self.judged(model, device).items()}

    def judged(self, model: Any, device: torch.device | str = "cpu",
               tasks: Sequence[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per skill (only ``tasks`` when given): whether its checker accepts each greedy answer, and whether
        the answer is the reference response exactly (surrounding whitespace aside); boolean arrays."""
        answers = self.answers(model, device, tasks)
        return {t: (np.array([bool(self.checkers[t](ex, a)) for ex, a in zip(self.examples[t], got)], dtype=bool),
                    np.array([exact_match(ex, a) for ex, a in zip(self.examples[t], got)], dtype=bool))
                for t, got in answers.items()}


__all__ = ["Checker", "CheckerLookup", "GenerationSet", "eos_ids", "exact_match", "greedy_generate", "registry_checker_for",
           "resolve_checker"]
