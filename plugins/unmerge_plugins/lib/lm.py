"""Evaluate one causal LM on held-out task examples and edit its weights in place.

Used by the ``causal-ablation`` metric (:mod:`.causal`), kept apart so it can be tested and reused:

- :class:`HeldoutSet`: held-out examples of several tasks, tokenised once, scored in length-sorted
  batches. One forward pass gives, per example, the mean token loss over the response (what the
  ``peft-lora`` trainer minimises: prompt + ``"\\n"``, then response + EOS, loss on the response only)
  and teacher-forced exact match (every response token, EOS included, is the arg-max given the gold
  prefix — which is exactly when greedy decoding reproduces the response and stops).
- :class:`WeightEditor`: one loaded model whose adapted linear weights are set to ``base + ΔW`` of a
  target, then edited by ``− c·τ`` and restored, in place (no model copy per edit). The base values of
  the adapted modules are kept once on the CPU so that moving to the next target is exact.

Everything runs on ``device``: the same code scores the tiny quickstart model on a CPU and a 7B model
on a GPU (batches stream through the model; deltas are moved to the device one module at a time).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmerge_core import UnmergeError, model_source
from unmerge_plugins.lib.encoding import encode_examples, prompt_ids, uses_chat_template
from unmerge_plugins.lib.tasks import Example

__all__ = ["encode_examples", "prompt_ids", "uses_chat_template"]  # re-exported: their home is .encoding


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UnmergeError("causal-ablation: device 'cuda' asked for but no CUDA device is available")
    return torch.device(device)


def load_causal_lm(path: str | Path, device: torch.device) -> tuple[Any, Any]:
    """Load a base model (float32, eval mode) and its ``tokenizer.json`` tokenizer from a local path or hub id
    (a ``.gguf`` file, or a folder holding one, is read from its dequantized folder in the user cache)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if Path(path).exists():
        path = model_source(Path(path), what="causal-ablation: base model")
    local = Path(path).exists()  # a local path never reaches the network; a hub id (named by the user) may
    try:
        # As the peft-lora trainer does: AutoTokenizer would pick the architecture's tokenizer class
        # (Qwen2Tokenizer), whose pre-tokenizer splits the tiny model's text differently.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=local)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnmergeError(f"causal-ablation: cannot load base model {str(path)!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class TaskScores:
    """Per-example scores of one task: ``loss`` (mean response-token NLL) and ``correct`` (exact match)."""

    loss: np.ndarray
    correct: np.ndarray

    def values(self, score: str) -> np.ndarray:
        """Per-example *harm* values: the loss, or the error ``1 − exact_match``; higher is worse."""
        if score == "loss":
            return self.loss
        if score == "exact_match":
            return 1.0 - self.correct.astype(np.float64)
        raise ValueError(f"unknown score {score!r}")


class HeldoutSet:
    """Encoded held-out examples of several tasks, evaluated together in length-sorted batches.

    Args:
        encoded: Task name -> ``[(token ids, n_prompt_tokens), ...]`` from :func:`encode_examples`.
        pad_id: Padding token id.
        batch_size: Sequences per forward pass.

    The padded batches are built once; :meth:`evaluate` only runs the model on them.
    """

    def __init__(self, encoded: Mapping[str, list[tuple[list[int], int]]], pad_id: int, batch_size: int = 128) -> None:
        self.tasks = list(encoded)
        self._sizes = {task: len(encoded[task]) for task in self.tasks}
        items = [(task, j, ids, n) for task in self.tasks for j, (ids, n) in enumerate(encoded[task])]
        items.sort(key=lambda it: len(it[2]))
        self._batches: list[_Batch] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            width = max(len(ids) for _, _, ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # positions whose token is scored
            for row, (_, _, ids, n_prompt) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                first = max(1, min(n_prompt, len(ids) - 1))  # score at least one token (the last one if cut)
                scored[row, first: len(ids)] = True
            self._batches.append(_Batch(input_ids, attention, scored[:, 1:],
                                        [(task, j) for task, j, _, _ in chunk]))

    @property
    def n_sequences(self) -> int:
        return sum(len(b.owners) for b in self._batches)

    @torch.no_grad()
    def evaluate(self, model: Any, device: torch.device) -> dict[str, TaskScores]:
        """Score every example with ``model`` as it is now; returns task -> :class:`TaskScores`."""
        loss = {t: np.zeros(n) for t, n in self._sizes.items()}
        correct = {t: np.zeros(n, dtype=bool) for t, n in self._sizes.items()}
        for batch in self._batches:
            input_ids = batch.input_ids.to(device)
            mask = batch.scored.to(device)
            logits = model(input_ids=input_ids, attention_mask=batch.attention.to(device)).logits[:, :-1]
            rows = mask.nonzero(as_tuple=True)[0]
            picked = logits[mask].float()  # (scored tokens, vocab): the only positions that matter
            targets = input_ids[:, 1:][mask]
            nll = torch.nn.functional.cross_entropy(picked, targets, reduction="none")
            wrong = (picked.argmax(dim=-1) != targets).to(torch.float32)
            n_rows = input_ids.shape[0]
            total = torch.zeros(n_rows, device=device).index_add_(0, rows, nll)
            misses = torch.zeros(n_rows, device=device).index_add_(0, rows, wrong)
            count = mask.sum(dim=1).clamp(min=1)
            per_loss = (total / count).cpu().numpy()
            per_hit = (misses == 0).cpu().numpy()
            for row, (task, j) in enumerate(batch.owners):
                loss[task][j] = per_loss[row]
                correct[task][j] = per_hit[row]
        return {t: TaskScores(loss[t], correct[t]) for t in self.tasks}


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor
    attention: torch.Tensor
    scored: torch.Tensor  # aligned with the shifted targets input_ids[:, 1:]
    owners: list[tuple[str, int]]


class WeightEditor:
    """In-place edits of the adapted linear weights of one loaded model.

    Args:
        model: The loaded base model (its current weights are taken as the base).
        modules: Names of the linear modules that may be edited (``model.layers.0.self_attn.q_proj``).

    :meth:`set_module` / :meth:`set_delta` set ``W = W_base + ΔW`` exactly (from the CPU copy of the
    base); :meth:`edit` subtracts ``scale · D`` for the duration of a ``with`` block and then restores
    the weights it changed bit for bit from a copy (adding ``scale · D`` back would leave them a few ulps
    off, and every later score would depend on which edits ran before it in this process).
    """

    def __init__(self, model: Any, modules: Sequence[str]) -> None:
        self.model = model
        self.params: dict[str, torch.nn.Parameter] = {}
        self.base: dict[str, torch.Tensor] = {}
        for name in modules:
            self.add_module(name)

    def add_module(self, name: str) -> None:
        if name in self.params:
            return
        try:
            weight = self.model.get_submodule(name).weight
        except AttributeError:
            raise UnmergeError(f"causal-ablation: the base model has no linear module {name!r}") from None
        self.params[name] = weight
        self.base[name] = weight.detach().to("cpu", copy=True)

    @torch.no_grad()
    def set_module(self, name: str, delta: torch.Tensor | None = None) -> None:
        """``W = W_base + delta`` for one module (``W_base`` when ``delta`` is ``None``), exactly."""
        self.add_module(name)
        weight = self.params[name]
        value = self.base[name].to(weight.device, torch.float32)
        if delta is not None:
            value = value + delta.to(weight.device, torch.float32)
        weight.copy_(value.to(weight.dtype))

    def set_delta(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """``W = W_base + deltas[m]`` for every module in ``deltas``; every other editable module back to base."""
        for name in list(dict.fromkeys([*self.params, *deltas])):
            self.set_module(name, deltas.get(name))

    @contextmanager
    def edit(self, deltas: Mapping[str, torch.Tensor], scale: float) -> Iterator[None]:
        """Within the block, ``W ← W − scale · deltas[m]`` for each module; the exact ``W`` is back on exit.

        The edited modules' weights are copied to the CPU first (as large as the editor's own base copy
        of those modules) and copied back afterwards."""
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, delta in deltas.items():
                    if name not in self.params:
                        raise UnmergeError(f"causal-ablation: module {name!r} is not editable")
                    weight = self.params[name]
                    step = delta.to(weight.device, weight.dtype) * scale
                    saved.append((weight, weight.detach().to("cpu", copy=True)))
                    weight.sub_(step)
            yield
        finally:
            with torch.no_grad():
                for weight, original in reversed(saved):
                    weight.copy_(original.to(weight.device))
