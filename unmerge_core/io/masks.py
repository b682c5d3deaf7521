"""Masks on disk, and task vectors on a mask.

A mask is saved as ``mask.safetensors`` (one int64 tensor of flat indices per module) and
``mask.json`` (module order and shapes). :func:`masked_vector` is the one way an adapter's values at
the mask are read, whether the adapter is a dictionary atom, an unknown task or a target.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmerge_core.errors import PluginError, UnmergeError, short_repr
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.store import atomic_save_tensors, atomic_write_json, load_tensors
from unmerge_core.types import Mask


def check_mask(mask: Any, adapters: Sequence[LoraAdapter], label: str) -> Mask:
    """The mask a masker plugin returned, checked against the adapters it was built from, as a clean
    :class:`Mask` (int64 indices, ``(int, int)`` shapes).

    Per module: the indices are a 1-D integer array, strictly ascending (no repeats), inside the
    module's shape; the shape is two positive integers and equals the shape of every adapter that
    adapts the module; at least one adapter adapts it. Anything else is a one-line
    :class:`PluginError` naming the plugin and the module (``unmerge run`` and ``unmerge attribute``).
    """

    def refuse(message: str) -> PluginError:
        return PluginError("masker", label, message)

    if not isinstance(mask, Mask) or not isinstance(mask.indices, Mapping) or not isinstance(mask.shapes, Mapping):
        raise refuse("returned an empty mask or not a Mask")
    indices: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for module, raw in mask.indices.items():
        where = f"mask module {short_repr(module)}"
        if not isinstance(module, str):
            raise refuse(f"{where}: a module name must be a string")
        try:
            idx = np.asarray(raw)
        except (TypeError, ValueError) as exc:
            raise refuse(f"{where}: indices are not an array ({exc})") from None
        if idx.ndim != 1:
            raise refuse(f"{where}: indices have shape {idx.shape}, expected a 1-D array of flat indices")
        if idx.size and not (np.issubdtype(idx.dtype, np.integer) and idx.dtype != np.bool_):
            raise refuse(f"{where}: indices are {idx.dtype}, expected integers (flat int64 indices)")
        shape = mask.shapes.get(module)
        if shape is None:
            raise refuse(f"{where}: has no entry in the mask's shapes")
        if not (isinstance(shape, Sequence) and len(shape) == 2
                and all(isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) and n > 0
                        for n in shape)):
            raise refuse(f"{where}: shape {short_repr(tuple(shape) if isinstance(shape, Sequence) else shape)} "
                         "is not two positive integers (out_features, in_features)")
        shape = (int(shape[0]), int(shape[1]))
        owners = [a for a in adapters if module in a.modules]
        if not owners:
            raise refuse(f"{where}: no dictionary adapter adapts it")
        for adapter in owners:
            if adapter.modules[module].shape != shape:
                raise refuse(f"{where}: shape {shape} contradicts the adapters' {adapter.modules[module].shape} "
                             f"(adapter {adapter.name})")
        if idx.size:
            if int(idx.min()) < 0:
                raise refuse(f"{where}: index {int(idx.min())} is negative")
            if int(idx.max()) >= shape[0] * shape[1]:
                raise refuse(f"{where}: index {int(idx.max())} is out of range for its shape {shape} "
                             f"({shape[0] * shape[1]} coordinates, indices 0 to {shape[0] * shape[1] - 1})")
            steps = np.diff(idx.astype(np.int64))
            if (steps == 0).any():
                raise refuse(f"{where}: index {int(idx[1:][steps == 0][0])} is listed twice; each coordinate "
                             "once, in ascending order")
            if (steps < 0).any():
                raise refuse(f"{where}: indices are not in ascending order (sort them)")
        indices[module] = idx.astype(np.int64)
        shapes[module] = shape
    out = Mask(indices, shapes)
    if out.size == 0:
        raise refuse("returned an empty mask or not a Mask")
    return out


def save_mask(directory: Path, mask: Mask) -> None:
    atomic_save_tensors(directory / "mask.safetensors",
                        {m: torch.from_numpy(np.asarray(idx, dtype=np.int64)) for m, idx in mask.indices.items()})
    atomic_write_json(directory / "mask.json",
                      {"modules": list(mask.indices), "shapes": {m: list(s) for m, s in mask.shapes.items()},
                       "size": mask.size})


def load_mask(directory: Path) -> Mask:
    meta = json.loads((directory / "mask.json").read_text())
    tensors = load_tensors(directory / "mask.safetensors")
    indices = {m: tensors[m].numpy() for m in meta["modules"]}
    shapes = {m: (int(s[0]), int(s[1])) for m, s in meta["shapes"].items()}
    return Mask(indices, shapes)


def mask_digest(mask: Mask) -> str:
    """A content key of the mask's modules and indices."""
    h = hashlib.sha256()
    for module, idx in mask.indices.items():
        h.update(module.encode())
        h.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def masked_vector(adapter: LoraAdapter, mask: Mask) -> np.ndarray:
    """The adapter's ΔW on the mask coordinates (float64), formed from the LoRA factors, never densely.

    Zeros where the adapter does not adapt a mask module. A module whose shape is not the mask's (a
    variant trained on another model, used as a constituent), NaN or inf is a one-line error naming
    the adapter.
    """
    parts = []
    for module, idx in mask.indices.items():
        if module in adapter.modules:
            shape, expected = adapter.modules[module].shape, tuple(mask.shapes.get(module, ()))
            if expected and shape != expected:
                raise UnmergeError(f"adapter {adapter.name} ({adapter.path}): module {short_repr(module)} has shape "
                                   f"{shape}, but the mask (made from the dictionary adapters) has {expected}: "
                                   "every adapter of a run must give a module the dictionary's shape")
            parts.append(adapter.values_at(module, np.asarray(idx)))
        else:
            parts.append(np.zeros(len(idx)))
    vector = np.concatenate(parts) if parts else np.zeros(0)
    if not np.isfinite(vector).all():
        raise UnmergeError(f"adapter {adapter.name} ({adapter.path}): its ΔW holds NaN or inf")
    return vector
