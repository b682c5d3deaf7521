"""``synthetic``: random low-rank adapters of any model shape, with structure shared between tasks.

Each module's ΔW is a sum of three low-rank parts: a component common to every task, one common to
the tasks of the same registry category, and the task's own. Their shares of the variance are
``shared`` and ``category_shared``. Real adapters of one base model correlate (they share a common
direction); this reproduces that without base weights or training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator

from unmerge_core import (
    PluginParams,
    PluginSpec,
    Stage,
    StrictNumbers,
    TrainJob,
    UnmergeError,
    content_key,
    format_validation_error,
    read_json,
    thread_map,
)
from unmerge_plugins.lib.shapes import SUPPORTED_MODULES, module_shapes_from_config
from unmerge_plugins.lib.tiny_model import TinyModelParams

MAX_MODULE_ENTRIES = 2**30
"""Largest module (out × in) accepted: the masker forms one dense float32 module per thread (4 GiB here)."""
MAX_ADAPTER_BYTES = 8 * 2**30
"""Largest adapter (LoRA factors, float32) written per task."""


class ShapeConfig(StrictNumbers):
    """The shape fields of a transformers decoder config (``config.json`` or inline)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    hidden_size: int = Field(ge=1, le=1_000_000)
    num_attention_heads: int = Field(ge=1, le=100_000)
    num_hidden_layers: int = Field(ge=1, le=10_000)
    num_key_value_heads: int | None = Field(None, ge=1, le=100_000)
    head_dim: int | None = Field(None, ge=1, le=1_000_000)
    intermediate_size: int | None = Field(None, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _head_size(self) -> ShapeConfig:
        if self.head_dim is None and self.num_attention_heads > self.hidden_size:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is more than hidden_size "
                             f"({self.hidden_size}): each head would have {self.hidden_size} // "
                             f"{self.num_attention_heads} = 0 dimensions; set fewer heads or head_dim")
        return self


class _FileShapeConfig(ShapeConfig):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class SyntheticParams(PluginParams):
    """Give the shapes by a config (file or tiny model) or explicitly."""

    config: str | ShapeConfig | None = Field(
        None, description="path to a transformers config.json, or its shape fields inline (hidden_size, "
                          "num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers, intermediate_size)")
    tiny: TinyModelParams | None = Field(None, description="shapes of the tiny local model")
    module_shapes: dict[str, tuple[int, int]] | None = Field(None, description="module name -> (out, in)")
    layers: int | None = Field(None, ge=1, le=10_000, description="use only the first N layers of the config")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    rank: int = Field(32, ge=3, le=4096)
    alpha: float = Field(32.0, gt=0, le=1e6)
    shared: float = Field(0.3, ge=0, lt=1, description="variance share of the component common to all tasks")
    category_shared: float = Field(0.2, ge=0, lt=1, description="variance share common within a category")
    scale: float = Field(1e-3, gt=0, le=10, description="standard deviation of ΔW entries")
    seed: int = Field(0, ge=0, description="seed of the shared components")
    base_model_name: str = "synthetic"

    @model_validator(mode="after")
    def _check(self) -> SyntheticParams:
        given = [x is not None for x in (self.config, self.tiny, self.module_shapes)]
        if sum(given) != 1:
            raise ValueError("set exactly one of 'config', 'tiny' and 'module_shapes'")
        if self.shared + self.category_shared >= 1:
            raise ValueError("shared + category_shared must be below 1")
        unknown = [m for m in self.target_modules if m not in SUPPORTED_MODULES]
        if unknown and self.module_shapes is None:
            raise ValueError(f"target_modules: unsupported {unknown}; choose from {sorted(SUPPORTED_MODULES)}")
        shapes = self.shapes()
        if not shapes:
            raise ValueError("no module to adapt")
        for name, (n_out, n_in) in shapes.items():
            if n_out < 1 or n_in < 1:
                raise ValueError(f"module {name} has shape ({n_out}, {n_in}); both sizes must be at least 1")
            if n_out * n_in > MAX_MODULE_ENTRIES:
                raise ValueError(f"module {name} has {n_out} × {n_in} entries, above the {MAX_MODULE_ENTRIES:,} "
                                 "a dense module may have here")
        size = 4 * self.rank * sum(o + i for o, i in shapes.values())
        if size > MAX_ADAPTER_BYTES:
            raise ValueError(f"each adapter would be {size / 2**30:.1f} GiB of LoRA factors ({len(shapes)} modules, "
                             f"rank {self.rank}), above the {MAX_ADAPTER_BYTES // 2**30} GiB allowed")
        return self

    def shapes(self) -> dict[str, tuple[int, int]]:
        if self.module_shapes is not None:
            return {k: (int(v[0]), int(v[1])) for k, v in self.module_shapes.items()}
        if self.tiny is not None:
            cfg = self.tiny.model_dump()
        elif isinstance(self.config, ShapeConfig):
            cfg = self.config.model_dump(exclude_none=True)
        else:
            assert self.config is not None
            cfg = _read_shape_config(Path(self.config)).model_dump(exclude_none=True)
        return module_shapes_from_config(cfg, self.target_modules, self.layers)


def _read_shape_config(path: Path) -> ShapeConfig:
    try:
        raw = read_json(path, "model config")
    except UnmergeError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    try:
        return _FileShapeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, prefix=f"{path}:").splitlines()[0]) from None


class SyntheticTrainer:
    def __init__(self, params: SyntheticParams) -> None:
        self.params = params

    def plan(self, task: object) -> dict[str, object]:
        """Estimates for ``unmerge plan``: the adapter's shapes; no model, no data."""
        shapes = self.params.shapes()
        factors = 4 * self.params.rank * sum(o + i for o, i in shapes.values())
        return {"reads_task_data": False, "rank": self.params.rank,
                "modules": {name: list(shape) for name, shape in shapes.items()},
                "training": {"bytes": 2 * factors, "device": "RAM",
                             "formula": "no model: the adapter's factors, 2 × rank·(in+out)·4 B per module"}}

    def train(self, job: TrainJob) -> None:
        from safetensors.torch import save_file

        p = self.params
        shapes = p.shapes()
        r = p.rank
        r_common, r_cat = r // 3, r // 3
        r_own = r - r_common - r_cat
        parts = [("common", r_common, p.shared, "common"),
                 ("category", r_cat, p.category_shared, f"category:{job.task.category}"),
                 ("own", r_own, 1 - p.shared - p.category_shared, f"task:{job.task.name}:{job.seed}")]
        lora_scale = p.alpha / r

        def factors(module: str) -> tuple[torch.Tensor, torch.Tensor]:
            n_out, n_in = shapes[module]
            a_blocks, b_blocks = [], []
            for _, rank, share, label in parts:
                gen = np.random.default_rng(int(content_key(p.seed, label, module), 16) % 2**63)
                # entries of B·A have variance rank · σ_a² σ_b²; choose σ so the part's variance is share · scale²
                sigma = np.float32(math.sqrt(math.sqrt(max(share, 0.0)) * p.scale / math.sqrt(rank) / lora_scale))
                a = gen.standard_normal((rank, n_in), dtype=np.float32)
                a *= sigma
                b = gen.standard_normal((n_out, rank), dtype=np.float32)
                b *= sigma
                a_blocks.append(a)
                b_blocks.append(b)
            return torch.from_numpy(np.concatenate(a_blocks, axis=0)), torch.from_numpy(np.concatenate(b_blocks, axis=1))

        # each module has its own generators, so modules can be drawn on several threads (numpy's
        # generators release the GIL) with the same result as one after another
        modules = list(shapes)
        tensors: dict[str, torch.Tensor] = {}
        for module, (a, b) in zip(modules, thread_map(factors, modules)):
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
        save_file(tensors, str(job.output_dir / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": p.alpha,
            "target_modules": sorted(p.target_modules), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "base_model_name_or_path": p.base_model_name,
        }
        (job.output_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


SPEC = PluginSpec("synthetic", Stage.TRAINER, "Random low-rank adapters with shared structure, any shape",
                  "https://arxiv.org/abs/2106.09685", SyntheticParams, SyntheticTrainer)
