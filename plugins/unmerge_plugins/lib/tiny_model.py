"""A tiny Qwen2-architecture causal LM and a byte-level BPE tokenizer, both built locally.

Nothing is downloaded: the tokenizer is trained with ``tokenizers`` on text from the procedural
task generators, the model is initialised from a seed and briefly pre-trained (all weights) on a
shuffled mixture of every procedural task, and both are saved with ``save_pretrained``
(safetensors), so every later step loads them like any checkpoint. The pre-training plays the role
of a real base model's general knowledge: a LoRA adapter then specialises it on one task, which a
randomly initialised model cannot learn through low-rank attention updates alone (loss stays near
uniform).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import Field, model_validator

from unmerge_core import PluginParams, atomic_write_json, file_lock, share_tree, temp_prefix

MARKER = "unmerge-tiny.json"
MAX_TINY_PARAMETERS = 500_000_000
"""Largest "tiny" model built locally (2 GB of float32 weights, trained on a CPU)."""


class TinyModelParams(PluginParams):
    """Shape of the locally built model (defaults: 2 layers, hidden 64 — seconds on a CPU)."""

    hidden_size: int = Field(64, ge=8, le=8192)
    num_hidden_layers: int = Field(2, ge=1, le=128)
    num_attention_heads: int = Field(4, ge=1, le=256)
    num_key_value_heads: int = Field(2, ge=1, le=256)
    intermediate_size: int = Field(128, ge=8, le=65536)
    vocab_size: int = Field(384, ge=260, le=65536, description="byte-level BPE vocabulary size")
    max_position_embeddings: int = Field(256, ge=16, le=32768)
    seed: int = Field(0, ge=0)
    pretrain_steps: int = Field(300, ge=0, le=1_000_000,
                                description="full-model steps on a mixture of every procedural task")
    pretrain_learning_rate: float = Field(3e-3, gt=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> TinyModelParams:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        n = self.parameter_count()
        if n > MAX_TINY_PARAMETERS:
            raise ValueError(f"this 'tiny' model would have {n / 1e6:,.0f}M parameters ({4 * n / 2**30:.1f} GiB of "
                             f"float32 weights), above the {MAX_TINY_PARAMETERS // 10**6}M built locally; use "
                             "base_model for a real model")
        return self

    def parameter_count(self) -> int:
        """Parameters of the Qwen2 model these settings build (tied embeddings)."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        attention = h * h * 2 + h * kv * 2 + h + 2 * kv  # q, o; k, v; q/k/v biases
        return self.vocab_size * h + self.num_hidden_layers * (attention + 3 * h * i + 2 * h) + h


def build_tiny_model(directory: Path, params: TinyModelParams) -> Path:
    """Build (once) the tiny model and tokenizer into ``directory``; return it.

    Built in a temporary sibling directory and renamed into place when complete, under a lock, so a
    kill leaves no half-built model and two concurrent runs build it once.
    """
    directory = Path(directory)
    if _built(directory, params):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(directory.parent / f".{directory.name}.lock"):
        if _built(directory, params):
            return directory
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=temp_prefix(directory.name + ".")))
        try:
            _build(tmp, params)
            atomic_write_json(tmp / MARKER, params.model_dump())
            share_tree(tmp)  # mkdtemp and safetensors make 0700 / 0600: a shared store follows the umask
            if directory.exists():  # an older build with other settings, or a leftover: set aside, then replace
                aside = directory.parent / (temp_prefix("old.") + directory.name)
                os.rename(directory, aside)
                shutil.rmtree(aside, ignore_errors=True)
            os.rename(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _built(directory: Path, params: TinyModelParams) -> bool:
    marker = directory / MARKER
    try:
        return marker.is_file() and json.loads(marker.read_text()) == params.model_dump()
    except (OSError, ValueError):
        return False  # an unreadable marker: rebuild


def _build(directory: Path, params: TinyModelParams) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from unmerge_plugins.lib.tasks import corpus_for_tokenizer

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_for_tokenizer(n_per_task=60, seed=params.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(directory)

    torch.manual_seed(params.seed)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=params.hidden_size,
        num_hidden_layers=params.num_hidden_layers,
        num_attention_heads=params.num_attention_heads,
        num_key_value_heads=params.num_key_value_heads,
        intermediate_size=params.intermediate_size,
        max_position_embeddings=params.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    if params.pretrain_steps:
        pretrain(model, fast, params)
    model.save_pretrained(directory, safe_serialization=True)


def pretrain(model, tokenizer, params: TinyModelParams) -> None:  # type: ignore[no-untyped-def]
    """A few hundred full-model steps on the mixture of all procedural tasks (deterministic)."""
    import random

    import torch

    from unmerge_plugins.lib.tasks import corpus_for_tokenizer

    texts = corpus_for_tokenizer(n_per_task=max(50, params.pretrain_steps), seed=params.seed + 1)
    rng = random.Random(params.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.pretrain_learning_rate)
    model.train()
    for _ in range(params.pretrain_steps):
        batch = rng.sample(texts, 32)
        enc = tokenizer([t + tokenizer.eos_token for t in batch], return_tensors="pt", padding=True,
                        truncation=True, max_length=params.max_position_embeddings)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
