"""The first-party trainers' estimates for ``unmerge plan`` (their optional ``plan(task)``).

Shapes come from the base model's config, read without loading it (:func:`unmerge_core.describe_model`:
a local folder's ``config.json``, a GGUF header, the Hugging Face cache, the published config of the
models the project names), or from the tiny model's settings. Nothing here downloads or builds anything.
"""

from __future__ import annotations

from typing import Any

from unmerge_core import describe_model
from unmerge_plugins.lib.shapes import module_shapes_from_config

TOKENIZER_BYTES = 100_000
"""About what the tiny model's tokenizer files take (tokenizer.json, its config)."""


def causal_lm_plan(params: Any, *, rank: int | None = None) -> dict[str, Any]:
    """A causal-LM trainer's estimate: LoRA of ``rank`` on ``target_modules`` (``rank=None``: a full
    fine-tune of those modules, stored as full-rank factors)."""
    out: dict[str, Any] = {"reads_task_data": True}
    if params.tiny is not None:
        config: dict[str, Any] | None = params.tiny.model_dump()
        parameters: int | None = params.tiny.parameter_count()
        out["workspace_bytes"] = 4 * parameters + TOKENIZER_BYTES
    else:
        out["base_model"] = params.base_model
        info = describe_model(params.base_model)
        config, parameters = info.config, info.parameters
    try:
        modules = module_shapes_from_config(config, params.target_modules) if config else None
    except (KeyError, ValueError, TypeError):  # a config of another architecture: shapes unknown
        modules = None
    if modules is None:
        return out
    out["modules"] = {name: list(shape) for name, shape in modules.items()}
    if rank is not None:
        out["rank"] = rank
        trainable = sum(rank * (o + i) for o, i in modules.values())
    else:
        out["ranks"] = {name: min(o, i) for name, (o, i) in modules.items()}
        trainable = sum(o * i for o, i in modules.values())
    dtype = getattr(params, "dtype", "float32")
    autocast = getattr(params, "autocast", "off")
    out["training"] = {
        "parameters": parameters, "trainable": trainable, "lora": rank is not None, "dtype": dtype,
        "activation_dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(autocast, dtype),
        "batch_size": params.batch_size, "max_length": params.max_length, "hidden_size": config.get("hidden_size"),
        "num_layers": config.get("num_hidden_layers"), "vocab_size": config.get("vocab_size"),
        "device": params.device, "gradient_checkpointing": bool(getattr(params, "gradient_checkpointing", False)),
    }
    return out
