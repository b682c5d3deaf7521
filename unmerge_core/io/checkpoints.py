"""Read full-model checkpoints (``save_pretrained`` layout) one tensor at a time.

A :class:`Checkpoint` indexes the tensor names and shapes of a model directory from the safetensors
headers only: a single ``model.safetensors``, a sharded checkpoint with
``model.safetensors.index.json`` (its ``weight_map`` says which shard holds which tensor), or any other
``*.safetensors`` files in the directory. A folder holding both a ``model.safetensors`` and an index is
read from ``model.safetensors``, the file transformers' ``from_pretrained`` loads. :meth:`Checkpoint.tensor` opens the one file that holds a
tensor, copies that tensor out and closes the file again, so reading a model module by module keeps
one module in memory (and no memory-mapped shard stays resident) whatever the model size.

Pickle checkpoints (``pytorch_model.bin``) can run arbitrary code when loaded; they are refused unless
the caller passes ``allow_pickle=True``, and then read with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import safe_open

from unmerge_core.errors import UnmergeError, read_json

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_NUMPY_DTYPES = {"F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8"}  # safetensors is little-endian
"""How each float dtype's bytes are read by :meth:`Checkpoint.gather` (bf16 as its 16 bits, widened after)."""
_PAGE = 4096
_TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_FROM_SAFETENSORS = {name: dtype for dtype, name in _TORCH_DTYPES.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_NOT_MODEL_FILES = {"adapter_model.safetensors"}


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class Checkpoint:
    """The tensors of one full model, read lazily.

    Args:
        path: A model directory, or a single ``.safetensors`` (or, with ``allow_pickle``, ``.bin``) file.
        allow_pickle: Accept ``pytorch_model.bin`` checkpoints (read with ``weights_only=True``).
        name: Name used in messages (defaults to the directory or file name).

    Raises:
        UnmergeError: The path holds no readable weights, is a PEFT adapter, is a pickle checkpoint
            without ``allow_pickle``, or its index names a missing shard or tensor.
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self.allow_pickle = allow_pickle
        self._declared_map: dict[str, Path] = {}
        self.files = self._locate()
        self.format = "pickle" if self.files[0].suffix == ".bin" else "safetensors"
        self._pickle_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self.dtypes: dict[str, str] = {}
        self._layouts: dict[Path, dict[str, tuple[int, int]]] = {}
        self.bytes_read = 0  # bytes read by gather()
        self.weight_map, self.shapes = self._index()

    # -- structure ---------------------------------------------------------------------------------
    def _locate(self) -> list[Path]:
        p = self.path
        if p.is_file():
            if p.suffix == ".safetensors":
                return [p]
            if p.suffix == ".bin":
                self._check_pickle_allowed(p)
                return [p]
            raise UnmergeError(f"{p}: not a checkpoint file (expected .safetensors)")
        if not p.is_dir():
            raise UnmergeError(f"{p}: no such file or directory")
        # transformers' precedence (modeling_utils._get_resolved_checkpoint_files, 5.x): the single
        # file before the index, safetensors before pickle, so a folder holding both is read as
        # from_pretrained loads it
        if (p / SAFE_WEIGHTS).is_file():
            return [p / SAFE_WEIGHTS]
        if (p / SAFE_INDEX).is_file():
            return self._index_files(p / SAFE_INDEX)
        others = sorted(f for f in p.glob("*.safetensors") if f.name not in _NOT_MODEL_FILES)
        if others:
            return others
        if (p / PICKLE_INDEX).is_file() or (p / PICKLE_WEIGHTS).is_file():
            self._check_pickle_allowed(p / PICKLE_WEIGHTS)
            return [p / PICKLE_WEIGHTS] if (p / PICKLE_WEIGHTS).is_file() else self._index_files(p / PICKLE_INDEX)
        if (p / "adapter_config.json").is_file():
            raise UnmergeError(f"{p}: is a PEFT adapter, not a full model")
        raise UnmergeError(f"{p}: no model weights found (expected {SAFE_WEIGHTS}, {SAFE_INDEX} or *.safetensors)")

    def _check_pickle_allowed(self, file: Path) -> None:
        if not self.allow_pickle:
            raise UnmergeError(
                f"{self.path}: checkpoint is a pickle ({file.name}), which can run code when loaded; "
                "convert it to safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)"
            )

    def _index_files(self, index: Path) -> list[Path]:
        data = read_json(index, "checkpoint index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UnmergeError(f"{index}: not a valid index (no 'weight_map' object of tensor -> file)")
        self._declared_map = {k: index.parent / v for k, v in weight_map.items()}
        files = sorted(set(self._declared_map.values()), key=lambda f: _natural_key(f.name))
        for f in files:
            if not f.is_file():
                raise UnmergeError(f"{index}: shard {f.name} is missing")
        return files

    def _index(self) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
        weight_map: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for file in self.files:
            for key, shape, dtype in self._file_shapes(file):
                if key in weight_map:
                    raise UnmergeError(
                        f"{self.path}: tensor {key} is stored twice ({weight_map[key].name}, {file.name})")
                weight_map[key] = file
                shapes[key] = shape
                self.dtypes[key] = dtype
        for key, file in self._declared_map.items():
            if weight_map.get(key) != file:
                raise UnmergeError(f"{self.path}: the index puts {key} in {file.name}, which does not hold it")
        if not weight_map:
            raise UnmergeError(f"{self.path}: checkpoint holds no tensor")
        order = sorted(weight_map, key=_natural_key)
        return {k: weight_map[k] for k in order}, {k: shapes[k] for k in order}

    def _file_shapes(self, file: Path) -> Iterable[tuple[str, tuple[int, ...], str]]:
        if self.format == "pickle":
            return [(k, tuple(v.shape), _TORCH_DTYPES.get(v.dtype, str(v.dtype))) for k, v in self._load_pickle(file).items()]
        try:
            with safe_open(file, framework="pt") as fh:
                out = []
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    out.append((k, tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype())))
                return out
        except Exception as exc:  # noqa: BLE001 - a corrupt header is a user-facing problem
            raise UnmergeError(f"{file}: unreadable safetensors file ({_first_line(exc)})") from None

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if self._pickle_cache is not None and self._pickle_cache[0] == file:
            return self._pickle_cache[1]
        self._pickle_cache = None
        try:
            # mmap needs the zip format of torch.save; legacy (pre-1.6) pickles are read without it
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnmergeError(f"{file}: cannot be read with torch.load(weights_only=True): {first}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UnmergeError(f"{file}: is not a state dict of tensors")
        self._pickle_cache = (file, state)
        return state

    @property
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def config(self) -> dict[str, Any] | None:
        """``config.json`` next to the weights, when there is one."""
        return model_config(self.path)

    def module_key(self, module: str) -> str | None:
        """The tensor holding ``module``'s weight (``<module>.weight``, with or without a ``model.`` prefix)."""
        candidates = [f"{module}.weight"]
        if module.startswith("model."):
            candidates.append(f"{module[len('model.'):]}.weight")
        else:
            candidates.append(f"model.{module}.weight")
        for key in candidates:
            if key in self.weight_map:
                return key
        return None

    # -- tensors -----------------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        """One tensor in its stored dtype; the file is opened for this read only."""
        try:
            file = self.weight_map[key]
        except KeyError:
            raise UnmergeError(f"{self.path}: no tensor {key}") from None
        if self.format == "pickle":
            return self._load_pickle(file)[key].clone()
        try:
            with safe_open(file, framework="pt") as fh:
                return fh.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - truncated or changed since it was indexed
            raise UnmergeError(f"{file}: cannot read tensor {key} ({_first_line(exc)})") from None

    def gather(self, key: str, flat_indices: torch.Tensor) -> torch.Tensor:
        """``tensor(key).flatten()[flat_indices]`` as float64 (exact for bf16/fp16/fp32 values).

        A float tensor of a safetensors file is read page by page: only the 4 KB pages that hold the
        requested entries are read (``os.pread`` of each run of consecutive pages; for ~450 entries of
        a 4096 × 11008 bf16 tensor about 1.8 MB instead of 90 MB), nothing tensor-sized is allocated,
        and the dtype is converted after the gather. :attr:`bytes_read` counts the bytes read.
        """
        if self.format == "safetensors" and self.dtypes.get(key) in _NUMPY_DTYPES:
            return torch.from_numpy(self._paged_gather(key, flat_indices.numpy()))
        full = self.tensor(key)
        self.bytes_read += full.numel() * full.element_size()
        values = full.reshape(-1)[flat_indices].to(torch.float64)
        del full
        return values

    def _paged_gather(self, key: str, flat_indices: np.ndarray) -> np.ndarray:
        file = self.weight_map[key]
        layout = self._layouts.get(file)
        if layout is None:
            layout = self._layouts[file] = safetensors_layout(file)
        start, end = layout[key]
        numel = int(np.prod(self.shapes[key], dtype=np.int64))
        stored = np.dtype(_NUMPY_DTYPES[self.dtypes[key]])
        if end - start != numel * stored.itemsize:
            raise UnmergeError(f"{file}: tensor {key} has {end - start} bytes, its shape needs {numel * stored.itemsize}")
        idx = np.asarray(flat_indices, dtype=np.int64)
        if idx.size == 0:
            return np.zeros(0)
        if idx.min() < 0 or idx.max() >= numel:
            raise UnmergeError(f"{file}: tensor {key} has {numel} entries; index {int(idx.max())} is out of range")
        first = start + idx * stored.itemsize  # byte offset of each entry
        pages = np.unique(np.concatenate([first // _PAGE, (first + stored.itemsize - 1) // _PAGE]))
        runs = np.split(pages, np.flatnonzero(np.diff(pages) != 1) + 1)
        buffer = bytearray(len(pages) * _PAGE)
        at = 0
        try:
            with open(file, "rb") as fh:
                for run in runs:
                    length = len(run) * _PAGE
                    data = os.pread(fh.fileno(), length, int(run[0]) * _PAGE)
                    buffer[at:at + len(data)] = data
                    at += length
        except OSError as exc:
            raise UnmergeError(f"{file}: cannot read tensor {key} ({_first_line(exc)})") from None
        self.bytes_read += len(pages) * _PAGE
        # pages sit in the buffer in sorted order, consecutive ones adjacent: an entry that straddles
        # two pages is contiguous there too
        position = np.searchsorted(pages, first // _PAGE) * _PAGE + first % _PAGE
        raw_bytes = np.frombuffer(bytes(buffer), dtype=np.uint8)[position[:, None] + np.arange(stored.itemsize)]
        raw = raw_bytes.reshape(-1).view(stored)
        if self.dtypes[key] == "BF16":  # bfloat16 = the upper half of a float32
            raw = (raw.astype("<u4") << 16).view("<f4")
        return raw.astype(np.float64)


def model_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` object next to a model's weights (``path``: its folder or a weights file),
    or ``None`` when there is none or it is not a readable JSON object; no tensor is read."""
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: absolute byte range, stored dtype (``"F32"`` …) and shape."""

    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]


def safetensors_entries(file: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, from its header (8-byte little-endian header length,
    then a JSON header with ``data_offsets`` relative to the end of the header)."""
    try:
        with open(file, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length <= 0 or length > 100 * 2**20:
                raise ValueError(f"header length {length}")
            header = json.loads(fh.read(length))
            size = os.fstat(fh.fileno()).st_size
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as exc:
        raise UnmergeError(f"{file}: unreadable safetensors header ({_first_line(exc)})") from None
    base = 8 + length
    out: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and base + offsets[1] <= size):
            raise UnmergeError(f"{file}: tensor {key} has invalid data_offsets {offsets!r} (file is {size} bytes)")
        shape = info.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise UnmergeError(f"{file}: tensor {key} has an invalid shape {shape!r}")
        out[key] = TensorEntry(base + offsets[0], base + offsets[1], str(info.get("dtype")), tuple(shape))
    return out


def safetensors_layout(file: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's absolute byte range ``(start, end)`` in a safetensors file (see :func:`safetensors_entries`)."""
    return {key: (entry.start, entry.end) for key, entry in safetensors_entries(file).items()}


def read_entry(fh: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """One float tensor of an open safetensors file (unbuffered, binary), read into a buffer of its own
    (no memory map: the pages read are not kept mapped in the process), in its stored dtype."""
    torch_dtype = _FROM_SAFETENSORS.get(entry.dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype {entry.dtype} is not a float type")
    length = entry.end - entry.start
    numel = int(np.prod(entry.shape, dtype=np.int64))
    if length != numel * torch.empty(0, dtype=torch_dtype).element_size():
        raise ValueError(f"{length} bytes do not hold a {entry.dtype} tensor of shape {list(entry.shape)}")
    if not length:
        return torch.zeros(entry.shape, dtype=torch_dtype)
    buffer = bytearray(length)
    view, done = memoryview(buffer), 0
    fh.seek(entry.start)
    while done < length:  # one read per 2 GB at most (what a read system call returns at a time)
        got = fh.readinto(view[done:])
        if not got:
            raise ValueError("the file ends before the tensor")
        done += got
    return torch.frombuffer(buffer, dtype=torch_dtype).reshape(entry.shape)


def architecture(checkpoint: Checkpoint) -> str | None:
    """``model_type`` (and first ``architectures`` entry) from ``config.json``, when present."""
    cfg = checkpoint.config()
    if not cfg:
        return None
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if model_type is None and arch is None:
        return None
    return f"{model_type} ({arch})" if arch else str(model_type)


def check_compatible(base: Checkpoint, target: Checkpoint, modules: Mapping[str, tuple[int, int]]) -> list[str]:
    """Check that ``target`` can be compared with ``base`` on ``modules``; return warnings.

    Errors (raised as :class:`UnmergeError`): different ``model_type`` in ``config.json``; a tensor
    of both with different shapes (the first in natural order is named); a module weight needed by
    the dictionary missing from either, or of another shape than the dictionary's. Tensors present in
    only one of the two, outside the dictionary's modules, are reported as a warning.
    """
    arch_b, arch_t = architecture(base), architecture(target)
    cfg_b, cfg_t = base.config() or {}, target.config() or {}
    if cfg_b.get("model_type") and cfg_t.get("model_type") and cfg_b["model_type"] != cfg_t["model_type"]:
        raise UnmergeError(f"target {target.name}: architecture {arch_t} differs from the base's {arch_b}")
    for key, shape in base.shapes.items():
        other = target.shapes.get(key)
        if other is not None and other != shape:
            raise UnmergeError(
                f"target {target.name}: tensor {key} has shape {list(other)}, the base has {list(shape)} "
                "(different architecture or size?)"
            )
    warnings: list[str] = []
    for module, shape in modules.items():
        for ckpt, role in ((base, "base"), (target, f"target {target.name}")):
            key = ckpt.module_key(module)
            if key is None:
                raise UnmergeError(f"{role}: missing tensor {module}.weight (adapted by the dictionary)")
            if tuple(ckpt.shapes[key]) != tuple(shape):
                raise UnmergeError(
                    f"{role}: tensor {key} has shape {list(ckpt.shapes[key])}, the dictionary's adapters "
                    f"have {list(shape)} (adapters made for another model?)"
                )
            if ckpt.dtypes.get(key) not in FLOAT_DTYPES:
                raise UnmergeError(
                    f"{role}: tensor {key} is stored as {ckpt.dtypes.get(key)}, not a float type; quantized "
                    "checkpoints are not supported (dequantize it to the base's dtype first)")
        key_b, key_t = base.module_key(module), target.module_key(module)
        assert key_b is not None and key_t is not None
        if base.dtypes[key_b] != target.dtypes[key_t] and not any("rounding" in w for w in warnings):
            warnings.append(
                f"target {target.name} stores {key_t} as {target.dtypes[key_t]}, the base as {base.dtypes[key_b]}: "
                "ΔW includes the rounding of every weight to the coarser type (noise on every coordinate)")
    only_base = [k for k in base.shapes if k not in target.shapes]
    only_target = [k for k in target.shapes if k not in base.shapes]
    if only_base:
        warnings.append(f"target {target.name}: {len(only_base)} tensor(s) of the base are missing "
                        f"(first: {only_base[0]}); they are outside the dictionary's modules and ignored")
    if only_target:
        warnings.append(f"target {target.name}: {len(only_target)} tensor(s) are not in the base "
                        f"(first: {only_target[0]}); ignored")
    if not set(base.shapes) & set(target.shapes):
        raise UnmergeError(f"target {target.name}: shares no tensor name with the base (different architecture?)")
    return warnings


_EPSILON = {"F16": 2.0**-10, "BF16": 2.0**-7, "F32": 2.0**-23, "F64": 2.0**-52}
ROUNDING_ULPS = 4
"""A sampled entry counts as changed by :func:`changed_outside` when it moved by more than this many
units in the last place of the coarser of the two stored types."""

OUTSIDE_SAMPLE = (4, 8)
"""Where :func:`changed_outside` compares a tensor: 4 places spread over it, 8 consecutive entries
each (a page apiece; a fine-tune or a merge changes nearly every entry)."""


def changed_outside(base: Checkpoint, target: Checkpoint, modules: Iterable[str]) -> list[str]:
    """Float tensors of both checkpoints, other than the ``modules``' weights, whose values differ at
    the :data:`OUTSIDE_SAMPLE` entries (read page by page: about 1.3 MB per checkpoint of a 7B model).

    A sample: a dense change (fine-tuning, a merge) is seen; an edit of a few entries may not be.
    """
    places, run = OUTSIDE_SAMPLE
    skip = {key for key in (target.module_key(m) for m in modules) if key is not None}
    changed = []
    for key in target.keys:
        if key in skip or key not in base.shapes or base.shapes[key] != target.shapes[key]:
            continue
        if base.dtypes.get(key) not in FLOAT_DTYPES or target.dtypes.get(key) not in FLOAT_DTYPES:
            continue
        numel = int(np.prod(target.shapes[key], dtype=np.int64))
        if numel == 0:
            continue
        starts = np.linspace(0, max(numel - run, 0), places).astype(np.int64)
        idx = torch.from_numpy(np.unique(np.minimum((starts[:, None] + np.arange(run)).reshape(-1), numel - 1)))
        before, after = base.gather(key, idx).numpy(), target.gather(key, idx).numpy()
        # rounding is no change: a weighted average of equal tensors (a linear merge) or a copy in a
        # coarser type moves entries by an ulp or so of the coarser of the two types
        ulp = max(_EPSILON.get(base.dtypes[key], 2**-52), _EPSILON.get(target.dtypes[key], 2**-52))
        if np.any(np.abs(after - before) > ROUNDING_ULPS * ulp * np.maximum(np.abs(before), np.abs(after))):
            changed.append(key)
    return changed


def first_difference(base: Checkpoint, target: Checkpoint) -> str | None:
    """Name of the first tensor (natural order) whose values differ between the two, or ``None``.

    Streams one pair of tensors at a time.
    """
    for key in base.keys:
        if key not in target.shapes:
            continue
        a, b = base.tensor(key), target.tensor(key)
        same = torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.to(torch.float64), b.to(torch.float64))
        del a, b
        if not same:
            return key
    return None
