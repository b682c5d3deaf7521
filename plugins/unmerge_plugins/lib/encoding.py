"""The one encoding of a task example for a causal LM: prompt ids (the chat template's user turn and
assistant header, or ``prompt + "\\n"``), then ``response + EOS``.

Kept apart from evaluation (:mod:`.lm`) on purpose: trainers import it, and an adapter's cache key
holds the source of every module its trainer imports — an edit to held-out scoring or generation
must not retrain every adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unmerge_plugins.lib.tasks import Example


def uses_chat_template(tokenizer: Any) -> bool:
    """Whether prompts are written with the tokenizer's chat template (an instruct model's tokenizer
    has one; the tiny models built here have none and read ``prompt + "\\n"``)."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids a model reads before it answers ``prompt``: the user turn and the assistant's
    header through the tokenizer's own chat template (``add_generation_prompt``), or ``prompt + "\\n"``
    for a tokenizer without one. Training, held-out scoring and generation all start from these ids."""
    if uses_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        return [int(i) for i in ids]
    return list(tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"])


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[tuple[list[int], int]]:
    """Token ids of :func:`prompt_ids` then ``response + EOS`` (cut at ``max_length``) and the number of
    prompt tokens — the one encoding of an example, used by the ``peft-lora`` trainer (which learns the
    response tokens only: for a chat model, the assistant's answer and its end-of-turn token) and by
    held-out evaluation (which scores them). ``n_prompt == len(ids)`` when the cut leaves no response token.
    """
    out = []
    for ex in examples:
        prompt = prompt_ids(tokenizer, ex.prompt)
        response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        out.append((ids, min(len(prompt), len(ids))))
    return out
