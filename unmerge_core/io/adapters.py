"""Read PEFT LoRA adapter directories one module at a time.

A LoRA adapter stores, per adapted linear module, ``lora_A`` (``r × in``) and ``lora_B``
(``out × r``). Its weight change is ``ΔW = B · A · scale`` with ``scale = α / r`` (or ``α / √r``
with rsLoRA). :class:`LoraAdapter` opens ``adapter_model.safetensors`` lazily, so forming the ΔW of
one module never loads the others: memory stays at one module whatever the model size.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator
from safetensors import safe_open

from unmerge_core.errors import UnmergeError, format_validation_error, read_json
from unmerge_core.io.checkpoints import TensorEntry, read_entry, safetensors_entries
from unmerge_core.io.lowrank import LowRankDelta

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class AdapterConfig(BaseModel):
    """The fields of PEFT's ``adapter_config.json`` that decide ΔW, validated (other fields are kept)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    peft_type: str = "LORA"
    r: StrictInt = Field(8, ge=1)
    lora_alpha: StrictInt | StrictFloat = 8  # PEFT's default when the key is missing (not r)
    rank_pattern: dict[str, StrictInt] = Field(default_factory=dict)
    alpha_pattern: dict[str, StrictInt | StrictFloat] = Field(default_factory=dict)
    use_rslora: StrictBool = False
    fan_in_fan_out: StrictBool = False
    use_dora: StrictBool = False
    base_model_name_or_path: str | None = None

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _valid_patterns(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        for key, item in value.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                raise ValueError(f"key {key!r} is not a valid regular expression ({exc})") from None
            if info.field_name == "rank_pattern" and item < 1:
                raise ValueError(f"rank of {key!r} is {item}; a LoRA rank is at least 1")
        return value

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha)

    def rank_of(self, module: str) -> tuple[int, str]:
        """The rank PEFT gives ``module`` and where it comes from (``r`` or a ``rank_pattern`` key)."""
        key = pattern_key(self.rank_pattern, module)
        return (self.rank_pattern[key], f"rank_pattern[{key!r}]") if key is not None else (self.r, "r")

    def alpha_of(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha


def pattern_key(pattern: dict[str, Any], module: str) -> str | None:
    """The first key of a PEFT ``rank_pattern`` / ``alpha_pattern`` that matches ``module`` (PEFT's rule:
    the key is a regular expression matched against the end of the module name, after a dot)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


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
        raw = read_json(config_path, "adapter config")
        if not isinstance(raw, dict):
            raise UnmergeError(f"{config_path}: must hold a JSON object (got a {type(raw).__name__})")
        try:
            self.settings = AdapterConfig.model_validate(raw)
        except ValidationError as exc:
            first = format_validation_error(exc, prefix=f"{config_path}:").splitlines()[0]
            raise UnmergeError(first) from None
        self.config: dict[str, Any] = raw
        if self.settings.peft_type.upper() != "LORA":
            raise UnmergeError(f"{config_path}: peft_type {self.settings.peft_type!r} is not LORA")
        if self.settings.use_dora:
            raise UnmergeError(f"{config_path}: DoRA adapters (use_dora = true) are not supported: their weight "
                               "change is not B·A·α/r")
        self.weights_path = weights_path
        self.fan_in_fan_out = self.settings.fan_in_fan_out
        self.modules = self._index()
        # the byte ranges of the factors, read from the header again if the file is replaced
        self._entries: dict[str, TensorEntry] = {}
        self._entries_identity: tuple[int, int, int, int] | None = None
        self._entries_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a lock does not cross processes
        state = self.__dict__.copy()
        state["_entries_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._entries_lock = threading.Lock()

    # -- structure ---------------------------------------------------------------------------------
    def _index(self) -> dict[str, LoraModule]:
        try:
            return self._read_index()
        except UnmergeError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on corrupt files
            raise UnmergeError(f"{self.weights_path}: not a readable safetensors file ({_first_line(exc)})") from None

    def _read_index(self) -> dict[str, LoraModule]:
        self.other_tensors: list[str] = []
        settings = self.settings
        pairs: dict[str, dict[str, str]] = {}
        where = self.weights_path
        with safe_open(self.weights_path, framework="pt") as fh:
            for key in fh.keys():
                match = _KEY_RE.match(key)
                if match:
                    pairs.setdefault(match["module"], {})[match["ab"]] = key
                else:  # a LoRA bias, embedding factors, modules_to_save copies: changes ΔW does not hold
                    self.other_tensors.append(key)
            modules: dict[str, LoraModule] = {}
            for module, ab in sorted(pairs.items(), key=lambda kv: _natural_key(kv[0])):
                if set(ab) != {"A", "B"}:
                    raise UnmergeError(f"{where}: module {module} has lora_{''.join(ab)} only")
                slice_a, slice_b = fh.get_slice(ab["A"]), fh.get_slice(ab["B"])
                shape_a, shape_b = slice_a.get_shape(), slice_b.get_shape()
                for key, sl, shape in ((ab["A"], slice_a, shape_a), (ab["B"], slice_b, shape_b)):
                    if len(shape) != 2 or min(shape) < 1:
                        raise UnmergeError(f"{where}: tensor {key} has shape {list(shape)}, expected a non-empty matrix")
                    if sl.get_dtype() not in FLOAT_DTYPES:
                        raise UnmergeError(f"{where}: tensor {key} is {sl.get_dtype()}, expected a float type "
                                           "(quantized adapters are not supported)")
                if shape_a[0] != shape_b[1]:
                    raise UnmergeError(f"{where}: module {module} has A {list(shape_a)} and B {list(shape_b)}, "
                                       "which do not chain (B·A)")
                rank, source = settings.rank_of(module)
                if rank != shape_a[0]:
                    raise UnmergeError(
                        f"{self.path / ADAPTER_CONFIG}: module {module}: {source} says rank {rank} but the tensors "
                        f"have rank {shape_a[0]} (lora_A {list(shape_a)}); PEFT refuses such an adapter")
                modules[module] = LoraModule(
                    module, ab["A"], ab["B"], int(rank), settings.alpha_of(module),
                    # fan_in_fan_out (GPT-2 Conv1D): the base weight is stored (in, out), ΔW = (B·A)ᵀ
                    (int(shape_a[1]), int(shape_b[0])) if self.fan_in_fan_out else (int(shape_b[0]), int(shape_a[1]))
                )
        if not modules:
            raise UnmergeError(f"{where}: no lora_A/lora_B tensors found")
        return modules

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m.name: m.shape for m in self.modules.values()}

    @property
    def base_model(self) -> str | None:
        return self.settings.base_model_name_or_path

    def scale(self, module: str) -> float:
        info = self.modules[module]
        if self.settings.use_rslora:
            return info.alpha / math.sqrt(info.rank)
        return info.alpha / info.rank

    # -- tensors -----------------------------------------------------------------------------------
    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, B)`` of one module as float32 tensors, oriented so that ``ΔW = B · A · scale``
        has the base weight's layout (for ``fan_in_fan_out`` adapters that is ``Aᵀ · Bᵀ``)."""
        info = self._module(module)
        try:
            a, b = self._read_factors(info)
        except Exception as exc:  # noqa: BLE001 - a file truncated or changed since it was indexed
            raise UnmergeError(f"{self.weights_path}: cannot read module {module} ({_first_line(exc)})") from None
        largest_a, largest_b = _largest_abs(a), _largest_abs(b)
        if not (math.isfinite(largest_a) and math.isfinite(largest_b)):
            raise UnmergeError(f"{self.weights_path}: module {module} holds NaN or inf")
        # |ΔW_ij| ≤ r · max|B| · max|A| · |scale|: above float32's range a product could overflow to
        # inf (or inf − inf = NaN) and every stage downstream would rank garbage
        bound = largest_a * largest_b * a.shape[0] * max(1.0, abs(self.scale(module)))
        if bound > FLOAT32_MAX:
            raise UnmergeError(f"{self.weights_path}: module {module}: its ΔW can overflow float32 (rank × max |B| × "
                               f"max |A| × scale = {bound:.3g} > {FLOAT32_MAX:.3g}): these are not a trained "
                               "adapter's factors")
        if self.fan_in_fan_out:
            return b.T.contiguous(), a.T.contiguous()
        return a, b

    def _read_factors(self, info: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` of one module as stored, float32, by two reads of their byte ranges.

        The header's byte ranges are parsed once per file version (opening the file with
        ``safe_open`` per module parsed it every time: most of the cost of a read), and no memory
        map is kept, so the pages read do not count in the process's memory.
        """
        with open(self.weights_path, "rb", buffering=0) as fh:
            stat = os.fstat(fh.fileno())
            # ctime too: a rewrite in place that restores the mtime (cp -p, rsync --inplace -t) changes it
            identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            with self._entries_lock:
                if identity != self._entries_identity:
                    self._entries, self._entries_identity = safetensors_entries(self.weights_path), identity
                entries = self._entries
            missing = [key for key in (info.key_a, info.key_b) if key not in entries]
            if missing:
                raise ValueError(f"the file changed since it was indexed: it has no tensor {missing[0]}")
            a, b = (read_entry(fh, entries[key]).to(torch.float32) for key in (info.key_a, info.key_b))
        delta_shape = (int(b.shape[0]), int(a.shape[1])) if a.dim() == b.dim() == 2 else None
        if self.fan_in_fan_out and delta_shape is not None:
            delta_shape = delta_shape[::-1]
        if delta_shape != info.shape or a.shape[0] != info.rank or b.shape[1] != info.rank:
            raise ValueError(f"the file changed since it was indexed: its factors are now {list(a.shape)} and "
                             f"{list(b.shape)}, not rank {info.rank} of a {list(info.shape)} module")
        return a, b

    def delta(self, module: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ``ΔW = B · A · scale`` of one module, float32, shape ``(out, in)``.

        ``out``: a float32 buffer of that shape to write into (reusing one buffer per shape avoids
        the page faults of a fresh 51 MB allocation per 7B module). One ``torch.mm``; the fast
        path's :class:`~unmerge_core.LowRankDelta` forms the same product in row blocks.
        """
        a, b = self.factors(module)
        scale = self.scale(module)
        if out is None:
            return (b @ a).mul_(scale)
        torch.mm(b, a, out=out)
        return out if scale == 1 else out.mul_(scale)

    def values_at(self, module: str, flat_indices: np.ndarray) -> np.ndarray:
        """ΔW of one module at the given flat indices, float64 numpy, without forming the dense matrix.

        Single-threaded numpy (a few thousand dot products of length ``rank``): cheaper than
        torch's small-op overhead, and accumulated in float64.
        """
        return self.lowrank(module).values_at(flat_indices)

    def energy(self, module: str) -> float:
        """``‖ΔW‖_F²`` of one module from its factors (``tr(BᵀB · AAᵀ) · scale²``, float64; no ΔW formed)."""
        a, b = (t.to(torch.float64) for t in self.factors(module))
        return float(((b.T @ b) * (a @ a.T)).sum()) * self.scale(module) ** 2

    def lowrank(self, module: str, **kwargs: Any) -> LowRankDelta:
        """The module's ΔW as a :class:`~unmerge_core.LowRankDelta` (formed on demand).

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


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _largest_abs(values: torch.Tensor) -> float:
    """``max |value|`` of a non-empty float32 CPU tensor; NaN when any entry is NaN (numpy's min and
    max propagate it), inf when any is infinite: finite exactly when every entry is.

    numpy on purpose: two single-threaded passes of a few microseconds, where ``torch.aminmax`` in a
    thread with several intra-op threads waits ~0.3 ms for them to wake between reads.
    """
    array = values.numpy()
    low, high = float(array.min()), float(array.max())
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
"""``config.json`` model types whose adaptable layers are all ``transformers`` ``Conv1D`` (weights
stored (in, out)): PEFT uses ``fan_in_fan_out = true`` on them whatever the adapter's config says."""

LINEAR_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
    "gemma3_text", "phi", "phi3", "gpt_neox", "gptj", "gpt_neo", "falcon", "opt", "bloom", "olmo", "olmo2",
    "starcoder2", "stablelm", "cohere", "granite", "deepseek_v2", "deepseek_v3", "bert", "roberta", "t5"})
"""Model types whose adaptable layers are all ``nn.Linear``: PEFT uses ``fan_in_fan_out = false`` there
(and warns when a config says otherwise). A type in neither set, or a composite model (an encoder-
decoder whose parts differ), decides nothing: only adapters that disagree with each other are refused."""


def check_orientation(adapters: Sequence[LoraAdapter], model_types: Sequence[str] = ()) -> None:
    """Refuse adapters whose ``fan_in_fan_out`` PEFT would override for this base, or that disagree.

    PEFT ignores the flag where it does not fit the layer, so ΔW of such an adapter is ``B·A`` where
    its config says ``(B·A)ᵀ`` (or the reverse): on a square module nothing else would catch it, and
    the attribution would compare transposed matrices. ``model_types``: every ``model_type`` in the
    base's ``config.json`` (nested ones of a composite model included; empty when unknown).
    """
    types = set(model_types)
    if types and (types <= CONV1D_MODEL_TYPES or types <= LINEAR_MODEL_TYPES):
        conv1d = types <= CONV1D_MODEL_TYPES
        for adapter in adapters:
            if adapter.fan_in_fan_out != conv1d:
                layers = "transformers Conv1D" if conv1d else "nn.Linear"
                raise UnmergeError(
                    f"{adapter.path / ADAPTER_CONFIG}: fan_in_fan_out = {str(adapter.fan_in_fan_out).lower()}, but "
                    f"the base model ({', '.join(sorted(types))}) has {layers} layers, where PEFT uses "
                    f"fan_in_fan_out = {str(conv1d).lower()} and ignores the config (ΔW would be transposed): "
                    f"set it to {str(conv1d).lower()}")
        return
    flagged = [a for a in adapters if a.fan_in_fan_out]
    plain = [a for a in adapters if not a.fan_in_fan_out]
    if flagged and plain:
        which = (f"the base model ({', '.join(sorted(types))}) does not tell which is right" if types
                 else "pass the base model (--base) or fix the adapter_config.json that is wrong")
        raise UnmergeError(f"adapters disagree on fan_in_fan_out ({flagged[0].name} sets it, {plain[0].name} does "
                           f"not): one's ΔW is the transpose of the other's layout; {which}")


def model_types(config: Any) -> list[str]:
    """Every ``model_type`` in a ``config.json`` object, nested sub-configs included (an encoder-decoder
    names its encoder's and decoder's)."""
    found: list[str] = []
    if isinstance(config, dict):
        if isinstance(config.get("model_type"), str):
            found.append(config["model_type"])
        for value in config.values():
            if isinstance(value, dict):
                found += model_types(value)
    return found


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
