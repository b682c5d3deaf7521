"""The masked ΔW of a target the toolkit did not make, read one module at a time.

- a full model directory (``kind = "model"``): ΔW = target − base, both read with
  :class:`~unmerge_core.io.checkpoints.Checkpoint` at the mask's coordinates only;
- a PEFT LoRA adapter directory (``kind = "adapter"``): ΔW = B·A·α/r, read with
  :func:`~unmerge_core.io.masks.masked_vector` — the very numbers a dictionary atom gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from unmerge_core.errors import UnmergeError
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.checkpoints import FLOAT_DTYPES, Checkpoint, changed_outside, check_compatible, first_difference
from unmerge_core.io.gguf import quantization_warning
from unmerge_core.io.masks import masked_vector
from unmerge_core.types import Mask


class TargetReader:
    """Forms the masked ΔW of existing targets, one module at a time.

    Args:
        mask: The dictionary's mask (module -> flat indices and shapes).
        base: The base checkpoint; needed for full-model targets only. Its masked values are read
            once and reused for every target.
    """

    def __init__(self, mask: Mask, base: Checkpoint | None = None) -> None:
        self.mask = mask
        self.base = base
        self._base_values: dict[str, np.ndarray] | None = None

    def vector(self, path: Path, kind: str, name: str, *, allow_pickle: bool = False) -> tuple[np.ndarray, list[str]]:
        """``(masked ΔW, warnings)`` of a ``model`` or ``adapter`` target."""
        if kind == "adapter":
            return self.adapter_vector(LoraAdapter(path, name))
        if self.base is None:
            raise UnmergeError(
                f"target {name}: a full-model target needs the base model (--base, or base = in the manifest)")
        return self.model_vector(Checkpoint(path, allow_pickle=allow_pickle, name=name))

    def _base_masked(self) -> dict[str, np.ndarray]:
        assert self.base is not None
        if self._base_values is None:
            values = {}
            for module, idx in self.mask.indices.items():
                key = self.base.module_key(module)
                if key is None:
                    raise UnmergeError(f"base: missing tensor {module}.weight (adapted by the dictionary)")
                values[module] = self.base.gather(key, torch.from_numpy(np.asarray(idx))).numpy()
                if not np.isfinite(values[module]).all():
                    raise UnmergeError(f"base {self.base.path}: tensor {key} holds NaN or inf")
            self._base_values = values
        return self._base_values

    def model_vector(self, target: Checkpoint) -> tuple[np.ndarray, list[str]]:
        assert self.base is not None
        warnings = check_compatible(self.base, target, self.mask.shapes)
        changed = changed_outside(self.base, target, self.mask.modules)
        if changed:
            warnings.append(f"target {target.name}: {len(changed)} tensor(s) outside the dictionary's modules differ "
                            f"from the base (first: {changed[0]}): those changes are not attributed, the answer "
                            "covers the dictionary's modules only")
        base_values = self._base_masked()
        parts = []
        for module, idx in self.mask.indices.items():
            key = target.module_key(module)
            assert key is not None
            values = target.gather(key, torch.from_numpy(np.asarray(idx))).numpy()
            if not np.isfinite(values).all():
                raise UnmergeError(f"target {target.name}: tensor {key} holds NaN or inf")
            parts.append(values - base_values[module])
        vector = np.concatenate(parts) if parts else np.zeros(0)
        if np.any(vector) and (noise := quantization_warning(target.path, self.base.path, vector, self.mask,
                                                             target.name)):
            warnings.append(noise)  # a target dequantized from GGUF: ΔW holds its rounding error
        if not np.any(vector):
            differs = first_difference(self.base, target)
            if differs is None:
                raise UnmergeError(f"target {target.name} is identical to the base (ΔW = 0): nothing to attribute")
            raise UnmergeError(
                f"target {target.name}: ΔW = 0 on every module the dictionary adapts; it differs from the base "
                f"only elsewhere (first: {differs})"
            )
        return vector, warnings

    def adapter_vector(self, adapter: LoraAdapter) -> tuple[np.ndarray, list[str]]:
        covered = [m for m in self.mask.indices if m in adapter.modules]
        if not covered:
            raise UnmergeError(
                f"target {adapter.name}: the adapter adapts none of the dictionary's modules "
                f"(it has {adapter.module_names[0]}, ...; the dictionary {self.mask.modules[0]}, ...)"
            )
        for module in covered:
            if adapter.modules[module].shape != tuple(self.mask.shapes[module]):
                raise UnmergeError(
                    f"target {adapter.name}: module {module} has shape {list(adapter.modules[module].shape)}, "
                    f"the dictionary's adapters have {list(self.mask.shapes[module])}"
                )
        vector = masked_vector(adapter, self.mask)  # the same numbers as the dictionary's atoms
        warnings = []
        missing = [m for m in self.mask.indices if m not in adapter.modules]
        if missing:
            warnings.append(f"target {adapter.name}: the adapter lacks {len(missing)} of the dictionary's "
                            f"{len(self.mask.indices)} modules (first: {missing[0]}); ΔW = 0 there")
        warnings += outside_warnings(adapter, self.mask)
        if not np.isfinite(vector).all():
            raise UnmergeError(f"target {adapter.name}: the adapter holds NaN or inf")
        if not np.any(vector):
            raise UnmergeError(
                f"target {adapter.name} is identical to the base (ΔW = B·A·α/r = 0): nothing to attribute")
        return vector, warnings


def outside_warnings(adapter: LoraAdapter, mask: Mask) -> list[str]:
    """What an adapter target changes that the attribution cannot see: modules the dictionary does
    not adapt (with their share of the adapter's ‖ΔW‖²) and tensors that are not LoRA factors."""
    warnings = []
    outside = [m for m in adapter.module_names if m not in mask.indices]
    if outside:
        energy = {m: adapter.energy(m) for m in adapter.module_names}
        total = sum(energy.values())
        share = sum(energy[m] for m in outside) / total if total > 0 else 0.0
        warnings.append(f"target {adapter.name}: {len(outside)} adapted module(s) are not in the dictionary (first: "
                        f"{outside[0]}), holding {share:.1%} of the adapter's ΔW energy: that change is not attributed")
    if adapter.other_tensors:
        warnings.append(f"target {adapter.name}: the adapter holds {len(adapter.other_tensors)} tensor(s) that are not "
                        f"LoRA factors (first: {adapter.other_tensors[0]}; a LoRA bias, embedding factors or "
                        "modules_to_save): their change is not attributed")
    return warnings


def target_deltas(path: Path, kind: str, base: Checkpoint | None, *, allow_pickle: bool = False,
                  name: str = "target") -> Iterator[tuple[str, torch.Tensor]]:
    """An existing target's full ΔW, ``(module, float32 tensor)`` one module at a time.

    An adapter: ``B·A·α/r`` of every module it adapts. A full model: ``target − base`` of every
    ``<module>.weight`` the two share (same shape, float types) where they differ — so a merge that
    also changed modules outside the dictionary's is reproduced whole.
    """
    if kind == "adapter":
        adapter = LoraAdapter(path, name)
        for module in adapter.module_names:
            yield module, adapter.delta(module)
        return
    if base is None:
        raise UnmergeError(f"target {name}: a full-model target needs the base model (--base)")
    target = Checkpoint(path, allow_pickle=allow_pickle, name=name)
    for key in target.keys:
        if not key.endswith(".weight") or base.shapes.get(key) != target.shapes[key]:
            continue
        if base.dtypes.get(key) not in FLOAT_DTYPES or target.dtypes.get(key) not in FLOAT_DTYPES:
            continue
        after, before = target.tensor(key).to(torch.float32), base.tensor(key).to(torch.float32)
        if not torch.equal(after, before):
            yield key[: -len(".weight")], after - before
