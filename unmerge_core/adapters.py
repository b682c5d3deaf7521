"""Read PEFT LoRA adapter directories one module at a time.

A LoRA adapter stores, per adapted linear module, ``lora_A`` (``r × in``) and ``lora_B``
(``out × r``). Its weight change is ``ΔW = B · A · scale`` with ``scale = α / r`` (or ``α / √r``
with rsLoRA). :class:`LoraAdapter` opens ``adapter_model.safetensors`` lazily, so forming the ΔW of
one module never loads the others: memory stays at one module whatever the model size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .errors import UnmergeError
from .lowrank import LowRankDelta

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """Where the two factors of one adapted module live in the safetensors file."""

    name: str
    key_a: str
    key_b: str
    rank: int
    alpha: float
    shape: tuple[int, int]


class LoraAdapter:
    """A PEFT LoRA adapter directory, read lazily.

    Args:
        path: Directory containing ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: Name used in messages and results (defaults to the directory name).

    Module names are those of the base model's parameters without ``.weight``, e.g.
    ``model.layers.0.self_attn.q_proj``.
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        config_path = self.path / ADAPTER_CONFIG
        weights_path = self.path / ADAPTER_WEIGHTS
        if not config_path.is_file():
            raise UnmergeError(f"{self.path}: not a PEFT adapter directory (missing {ADAPTER_CONFIG})")
        if not weights_path.is_file():
            if (self.path / "adapter_model.bin").is_file():
                raise UnmergeError(
                    f"{self.path}: adapter stored as pickle (adapter_model.bin); convert it to safetensors"
                )
            raise UnmergeError(f"{self.path}: missing {ADAPTER_WEIGHTS}")
        self.config = json.loads(config_path.read_text())
        if self.config.get("peft_type", "LORA").upper() != "LORA":
            raise UnmergeError(f"{self.path}: peft_type {self.config.get('peft_type')!r} is not LORA")
        self.weights_path = weights_path
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.modules = self._index()

    # -- structure ---------------------------------------------------------------------------------
    def _index(self) -> dict[str, LoraModule]:
        rank_default = int(self.config.get("r", 8))
        alpha_default = float(self.config.get("lora_alpha", rank_default))
        rank_pattern: dict[str, int] = self.config.get("rank_pattern") or {}
        alpha_pattern: dict[str, float] = self.config.get("alpha_pattern") or {}
        pairs: dict[str, dict[str, str]] = {}
        with safe_open(self.weights_path, framework="pt") as fh:
            keys = list(fh.keys())
            for key in keys:
                match = _KEY_RE.match(key)
                if match:
                    pairs.setdefault(match["module"], {})[match["ab"]] = key
            modules: dict[str, LoraModule] = {}
            for module, ab in sorted(pairs.items(), key=lambda kv: _natural_key(kv[0])):
                if set(ab) != {"A", "B"}:
                    raise UnmergeError(f"{self.path}: module {module} has lora_{''.join(ab)} only")
                shape_a = fh.get_slice(ab["A"]).get_shape()
                shape_b = fh.get_slice(ab["B"]).get_shape()
                rank = _pattern_value(module, rank_pattern, rank_default)
                alpha = float(_pattern_value(module, alpha_pattern, alpha_default))
                if shape_a[0] != shape_b[1]:
                    raise UnmergeError(f"{self.path}: module {module} has A {shape_a} and B {shape_b}")
                modules[module] = LoraModule(
                    module, ab["A"], ab["B"], int(rank), alpha,
                    # fan_in_fan_out (GPT-2 Conv1D): the base weight is stored (in, out), ΔW = (B·A)ᵀ
                    (int(shape_a[1]), int(shape_b[0])) if self.fan_in_fan_out else (int(shape_b[0]), int(shape_a[1]))
                )
        if not modules:
            raise UnmergeError(f"{self.path}: no lora_A/lora_B tensors found in {ADAPTER_WEIGHTS}")
        return modules

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m.name: m.shape for m in self.modules.values()}

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def scale(self, module: str) -> float:
        info = self.modules[module]
        if self.config.get("use_rslora"):
            return info.alpha / math.sqrt(info.rank)
        return info.alpha / info.rank

    # -- tensors -----------------------------------------------------------------------------------
    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, B)`` of one module as float32 tensors, oriented so that ``ΔW = B · A · scale``
        has the base weight's layout (for ``fan_in_fan_out`` adapters that is ``Aᵀ · Bᵀ``)."""
        info = self._module(module)
        with safe_open(self.weights_path, framework="pt") as fh:
            a = fh.get_tensor(info.key_a).to(torch.float32)
            b = fh.get_tensor(info.key_b).to(torch.float32)
        if self.fan_in_fan_out:
            return b.T.contiguous(), a.T.contiguous()
        return a, b

    def delta(self, module: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ``ΔW = B · A · scale`` of one module, float32, shape ``(out, in)``.

        ``out``: a float32 buffer of that shape to write into (reusing one buffer per shape avoids
        the page faults of a fresh 51 MB allocation per 7B module). One ``torch.mm``; the fast
        path's :class:`~unmerge_core.lowrank.LowRankDelta` forms the same product in row blocks.
        """
        a, b = self.factors(module)
        scale = self.scale(module)
        if out is None:
            return (b @ a).mul_(scale)
        torch.mm(b, a, out=out)
        return out if scale == 1 else out.mul_(scale)

    def delta_at(self, module: str, flat_indices: torch.Tensor) -> torch.Tensor:
        """ΔW of one module at the given flat indices only, without forming the dense matrix."""
        a, b = self.factors(module)
        cols = a.shape[1]
        rows_idx = torch.div(flat_indices, cols, rounding_mode="floor")
        cols_idx = flat_indices % cols
        values = (b[rows_idx] * a[:, cols_idx].T).sum(dim=1)
        return values.mul_(self.scale(module))

    def values_at(self, module: str, flat_indices: np.ndarray) -> np.ndarray:
        """ΔW of one module at the given flat indices, float64 numpy, without forming the dense matrix.

        Single-threaded numpy (a few thousand dot products of length ``rank``): cheaper than
        torch's small-op overhead, and accumulated in float64.
        """
        return self.lowrank(module).values_at(flat_indices)

    def lowrank(self, module: str, **kwargs: Any) -> LowRankDelta:
        """The module's ΔW as a :class:`~unmerge_core.lowrank.LowRankDelta` (formed on demand).

        ``kwargs`` go to :class:`LowRankDelta` (``gather``, ``dense_buffer``, ``block_buffer``).
        """
        a, b = self.factors(module)
        return LowRankDelta(a, b, self.scale(module), **kwargs)

    def iter_deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        for module in self.modules:
            yield module, self.delta(module)

    def _module(self, module: str) -> LoraModule:
        try:
            return self.modules[module]
        except KeyError:
            raise UnmergeError(f"{self.path}: adapter has no module {module}") from None


def _pattern_value(module: str, pattern: dict[str, float] | dict[str, int], default: float) -> float:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.search(key, module):
            return value
    return default


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def common_modules(adapters: list[LoraAdapter]) -> list[str]:
    """Modules adapted by every adapter, in the first adapter's order, with matching shapes."""
    if not adapters:
        return []
    first = adapters[0]
    names = [m for m in first.module_names if all(m in a.modules for a in adapters[1:])]
    for module in names:
        shapes = {a.name: a.modules[module].shape for a in adapters}
        if len(set(shapes.values())) > 1:
            raise UnmergeError(f"adapters disagree on the shape of {module}: {shapes}")
    return names


def dropped_modules(adapters: list[LoraAdapter]) -> dict[str, list[str]]:
    """Modules adapted by some but not all adapters -> names of the adapters that adapt them.

    These are what :func:`common_modules` leaves out; callers warn about them.
    """
    common = set(common_modules(adapters))
    dropped: dict[str, list[str]] = {}
    for adapter in adapters:
        for module in adapter.module_names:
            if module not in common:
                dropped.setdefault(module, []).append(adapter.name)
    return {m: dropped[m] for m in sorted(dropped, key=_natural_key)}
