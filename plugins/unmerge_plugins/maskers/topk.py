"""``topk``: the seeds' mask — aggregate |ΔW| over the dictionary, keep the top-k per module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from unmerge_core.adapters import LoraAdapter, common_modules
from unmerge_core.types import Mask, PluginParams


class TopKParams(PluginParams):
    budget: int = Field(99_904, ge=1, description="total coordinates, split evenly over modules (892 × 112)")
    aggregate: Literal["max", "mean", "l2"] = "max"


class TopKMasker:
    def __init__(self, params: TopKParams) -> None:
        self.params = params

    def build_mask(self, adapters: Sequence[LoraAdapter]) -> Mask:
        modules = common_modules(list(adapters))
        if not modules:
            raise ValueError("the dictionary adapters share no module")
        per_module = max(1, self.params.budget // len(modules))
        indices: dict[str, np.ndarray] = {}
        shapes: dict[str, tuple[int, int]] = {}
        for module in modules:
            score = self.aggregate(adapters, module)
            k = min(per_module, score.numel())
            top = torch.topk(score.reshape(-1), k, sorted=False).indices
            indices[module] = np.sort(top.numpy().astype(np.int64))
            shapes[module] = tuple(score.shape)  # type: ignore[assignment]
        return Mask(indices, shapes)

    def aggregate(self, adapters: Sequence[LoraAdapter], module: str) -> torch.Tensor:
        """|ΔW| aggregated over adapters, formed one adapter at a time (one extra module in memory)."""
        how = self.params.aggregate
        acc: torch.Tensor | None = None
        for adapter in adapters:
            delta = adapter.delta(module).abs_()
            if how == "l2":
                delta.square_()
            if acc is None:
                acc = delta
            elif how == "max":
                torch.maximum(acc, delta, out=acc)
            else:
                acc.add_(delta)
        assert acc is not None
        if how == "mean":
            acc.div_(len(adapters))
        elif how == "l2":
            acc.sqrt_()
        return acc
