"""``lib/generation``: greedy answers to held-out prompts (batched, left padded) and the skills' checkers.

One tiny Qwen2 model pre-trained for 100 steps (about 2 s on 2 cores, shared by the module).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unmerge_core.types import TaskInfo
from unmerge_plugins.lib.generation import (
    GenerationSet,
    eos_ids,
    exact_match,
    greedy_generate,
    resolve_checker,
)
from unmerge_plugins.lib.lm import HeldoutSet, encode_examples, load_causal_lm, prompt_ids
from unmerge_plugins.lib.tasks import Example, load_examples
from unmerge_plugins.lib.tiny_model import TinyModelParams, build_tiny_model

TASKS = ("parity", "count-letters", "uppercase")


def task_info(name: str, **source: object) -> TaskInfo:
    return TaskInfo(name, "other", {"kind": "procedural", "generator": name, **source})


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = build_tiny_model(tmp_path_factory.mktemp("gen") / "base", TinyModelParams(pretrain_steps=100))
        model, tok = load_causal_lm(path, torch.device("cpu"))
        yield model, tok
    finally:
        torch.set_num_threads(old)


def heldout(name: str, n: int = 12, seed: int = 3) -> list[Example]:
    return load_examples(task_info(name), n, seed, split="heldout")


def test_batched_left_padded_generation_equals_one_by_one(lm) -> None:
    model, tok = lm
    prompts = [prompt_ids(tok, ex.prompt) for t in TASKS for ex in heldout(t, 6)]
    assert len({len(p) for p in prompts}) > 2  # the batch really is padded
    eos = eos_ids(model, tok)
    batched = greedy_generate(model, prompts, 24, eos, tok.pad_token_id)
    alone = [greedy_generate(model, [p], 24, eos, tok.pad_token_id)[0] for p in prompts]
    assert batched == alone
    assert any(len(row) < 24 for row in batched)  # some rows stopped at EOS
    assert all(eos[0] not in row for row in batched)


def test_the_loop_gives_the_tokens_of_model_generate(lm) -> None:
    model, tok = lm
    eos = eos_ids(model, tok)
    for ex in heldout("count-letters", 4):
        ids = prompt_ids(tok, ex.prompt)
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=eos)[0, len(ids):].tolist()
        if eos[0] in out:
            out = out[: out.index(eos[0])]
        assert greedy_generate(model, [ids], 16, eos, tok.pad_token_id)[0] == out


def test_generation_exact_match_equals_teacher_forced_exact_match(lm) -> None:
    """Greedy decoding reproduces the response and stops iff every response token (EOS included) is the
    arg-max given the gold prefix: the two scores must agree prompt by prompt."""
    model, tok = lm
    examples = {t: heldout(t, 16) for t in TASKS}
    answers = GenerationSet(tok, examples, {t: exact_match for t in TASKS}, batch_size=5).accepted(model)
    forced = HeldoutSet({t: encode_examples(tok, exs, 64) for t, exs in examples.items()}, tok.pad_token_id).evaluate(
        model, torch.device("cpu"))
    hits = 0
    for t in TASKS:
        assert answers[t].tolist() == forced[t].correct.tolist(), t
        hits += int(answers[t].sum())
    assert hits > 0  # not trivially equal (the pre-trained base answers some of them)


def test_answers_do_not_depend_on_what_ran_before(lm) -> None:
    model, tok = lm
    examples = {t: heldout(t, 8) for t in TASKS}
    first = GenerationSet(tok, examples, {t: exact_match for t in TASKS}, batch_size=3)
    a = first.answers(model)
    GenerationSet(tok, {"x": heldout("reverse-words", 5, 9)}, {"x": exact_match}).answers(model)
    assert first.answers(model) == a and first.generated == 2 * sum(len(v) for v in examples.values())


def test_budget_is_the_longest_reference_plus_margin(lm) -> None:
    _, tok = lm
    exs = [Example("upper a", "A"), Example("upper abc def", "ABC DEF")]
    longest = max(len(tok(e.response, add_special_tokens=False)["input_ids"]) for e in exs)
    assert GenerationSet(tok, {"u": exs}, {"u": exact_match}, margin=3).budget == {"u": longest + 3}
    assert GenerationSet(tok, {"u": exs}, {"u": exact_match}, margin=3, max_new_tokens=2).budget == {"u": 2}
    with pytest.raises(ValueError, match="no checker for u"):
        GenerationSet(tok, {"u": exs}, {})


def test_checker_resolution() -> None:
    calls: list[str] = []

    def lookup(task: TaskInfo):
        calls.append(task.name)
        return (lambda ex, a: a == "yes") if task.name == "known" else None

    assert resolve_checker(task_info("other"), lookup) is None
    assert resolve_checker(task_info("other", fallback_checker="exact"), lookup) is exact_match
    named = resolve_checker(task_info("skill", checker_task={"name": "known", "category": "other", "source": {}}), lookup)
    assert named is not None and named(Example("p", "r"), "yes") and calls[-1] == "known"
    assert exact_match(Example("p", "HELLO"), " HELLO\n") and not exact_match(Example("p", "HELLO"), "HELLO!")
