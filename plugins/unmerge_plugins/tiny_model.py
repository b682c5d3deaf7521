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
from pathlib import Path

from pydantic import Field

from unmerge_core.types import PluginParams

MARKER = "unmerge-tiny.json"


class TinyModelParams(PluginParams):
    """Shape of the locally built model (defaults: 2 layers, hidden 64 — seconds on a CPU)."""

    hidden_size: int = Field(64, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    vocab_size: int = Field(384, ge=260, description="byte-level BPE vocabulary size")
    max_position_embeddings: int = Field(256, ge=16)
    seed: int = 0
    pretrain_steps: int = Field(300, ge=0, description="full-model steps on a mixture of every procedural task")
    pretrain_learning_rate: float = Field(3e-3, gt=0)


def build_tiny_model(directory: Path, params: TinyModelParams) -> Path:
    """Build (once) the tiny model and tokenizer into ``directory``; return it."""
    directory = Path(directory)
    marker = directory / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params.model_dump():
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from .tasks import corpus_for_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
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
    marker.write_text(json.dumps(params.model_dump()))
    return directory


def pretrain(model, tokenizer, params: TinyModelParams) -> None:  # type: ignore[no-untyped-def]
    """A few hundred full-model steps on the mixture of all procedural tasks (deterministic)."""
    import random

    import torch

    from .tasks import corpus_for_tokenizer

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
