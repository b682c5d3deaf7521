"""GGUF files (llama.cpp's format) as a model source, dequantized once into a plain checkpoint folder.

Wherever a base or target model folder is accepted (a manifest's ``base`` and ``[[targets]] path``,
``unmerge attribute``'s targets and ``--base``, a trainer's ``base_model``, the causal metric's base),
a ``.gguf`` file is accepted too, and so is a folder holding exactly one ``.gguf`` file and no
``*.safetensors``. The file is

- checked from its header first (cheap, no tensor is dequantized): a file that is not GGUF, a file cut
  short, an architecture transformers cannot read from GGUF, or a tensor type the ``gguf`` package
  cannot dequantize is one line naming the file;
- dequantized once with transformers + ``gguf`` (``from_pretrained(..., gguf_file=NAME)`` in float32,
  offline) and saved as a ``save_pretrained`` folder: ``model.safetensors`` (float32), ``config.json``
  (without its ``quantization_config``) and the tokenizer with its chat template, plus
  ``unmerge-gguf.json`` (the source file, its sha256, its tensor types and an estimate of each
  weight's rounding error, used by the quantization-noise warning of a GGUF target);
- keyed by the file's content (sha256 of its bytes, streamed; the hash itself is remembered by the
  file's device, inode, size and modification time, so an unchanged file is not read again), so a
  renamed or copied file reuses the folder and an edited one gets a new one; built in a temporary
  folder and renamed into place (:meth:`~unmerge_core.io.store.ArtifactStore.produce`), so a killed
  conversion leaves nothing half-written and two processes converting one file convert it once.

Where the folder lives: ``<cache_root>/cache/gguf/<key>``. ``unmerge run`` passes the manifest's store
(``output.store``, else the run directory), so a run's converted models live with its other
artifacts; ``unmerge attribute`` and plugins that get only a path (the trainers' ``base_model``, the
causal metric) use the user cache :func:`default_cache_root` (``$UNMERGE_CACHE``, else
``$XDG_CACHE_HOME/unmerge``, else ``~/.cache/unmerge``). A file converted for both is converted once
in each place (seconds for a 135M model; about 4 bytes per parameter of disk each).

A Hub id is never a GGUF here: a GGUF repository on the Hub must be downloaded first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unmerge_core.errors import UnmergeError
from unmerge_core.io.store import ArtifactStore, atomic_write_json, content_key
from unmerge_core.types import Mask

GGUF_MAGIC = b"GGUF"
NOISE_FILE = "unmerge-gguf.json"
"""What a converted folder records about its source (read by :func:`quantization_warning`)."""
FORMAT = 1
"""Version of the converted folder's layout: part of its key, so a change here converts again."""
_LEGACY_QUANTS = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
"""Types whose blocks start with their float16 scale ``d``: a weight's rounding step is ``d``."""
_GROUP = {"Q2_K": 16, "Q3_K": 16, "Q6_K": 16}
"""Sub-block size of the k-quants with 16-weight scales (the others have 32)."""
_FLOAT_MANTISSA = {"F16": 10, "BF16": 7}


def default_cache_root() -> Path:
    """The user cache for converted models: ``$UNMERGE_CACHE``, else ``$XDG_CACHE_HOME/unmerge``, else
    ``~/.cache/unmerge`` (folders under ``<root>/cache/gguf/``)."""
    if root := os.environ.get("UNMERGE_CACHE"):
        return Path(root).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "unmerge"
    return Path.home() / ".cache" / "unmerge"


def find_gguf(path: str | Path, what: str = "model") -> Path | None:
    """The GGUF file ``path`` stands for, or ``None`` when it is not one.

    ``path`` is a ``.gguf`` file, or a folder holding exactly one ``.gguf`` and no ``*.safetensors``
    (a folder holding both is read as the checkpoint folder it also is).

    Raises:
        UnmergeError: the folder holds several ``.gguf`` files and no safetensors.
    """
    p = Path(path)
    try:
        if p.is_file():
            return p if p.suffix.lower() == ".gguf" else None
        if not p.is_dir():
            return None
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".gguf")
        if not files or any(p.glob("*.safetensors")):
            return None
    except OSError:
        return None
    if len(files) > 1:
        shown = ", ".join(f.name for f in files[:3]) + (", …" if len(files) > 3 else "")
        raise UnmergeError(f"{what} {p}: the folder holds {len(files)} .gguf files ({shown}); name the one to read "
                           "(a model split over several GGUF files is not supported: merge it with llama.cpp's "
                           "gguf-split first)")
    return files[0]


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says (read without dequantizing anything)."""

    path: Path
    architecture: str
    name: str | None
    tensor_types: Mapping[str, int]
    """Tensor type name (``Q4_1``, ``F32``, …) -> number of tensors of that type."""

    @property
    def quantization(self) -> str:
        """The tensor types, most frequent first (``Q4_1 ×210, F32 ×61, Q8_0 ×1``)."""
        ordered = sorted(self.tensor_types.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{t} ×{n}" for t, n in ordered)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _reader(file: Path, what: str) -> Any:
    import gguf

    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise UnmergeError(f"{what} {file}: cannot be read ({exc.strerror or exc})") from None
    if head != GGUF_MAGIC:
        raise UnmergeError(f"{what} {file}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(str(file), "r")
    except Exception as exc:  # noqa: BLE001 - whatever a damaged header raises (ValueError, IndexError, struct)
        raise UnmergeError(f"{what} {file}: a truncated or damaged GGUF file ({_first_line(exc)})") from None
    size = file.stat().st_size
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise UnmergeError(f"{what} {file}: a truncated GGUF file (tensor {tensor.name} ends after byte {size}, "
                               "the end of the file): download it again")
    return reader


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # noqa: BLE001
        return None


def inspect_gguf(path: str | Path, what: str = "model") -> GgufInfo:
    """Check a GGUF file from its header: one line when transformers could not dequantize it.

    Raises:
        UnmergeError: not a GGUF file; truncated or damaged; an architecture transformers' GGUF loader
            does not support; a tensor type the ``gguf`` package cannot dequantize.
    """
    return _inspect(Path(path), what)[0]


def _inspect(file: Path, what: str) -> tuple[GgufInfo, Any]:
    from gguf.quants import dequantize

    reader = _reader(file, what)
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise UnmergeError(f"{what} {file}: the GGUF file names no architecture (general.architecture)")
    name = _field(reader, "general.name")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata groups, not models
    # transformers reads llama.cpp's "qwen2moe" and friends under their own names (load_gguf_checkpoint)
    aliases = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
    if architecture not in supported and aliases.get(architecture) not in supported:
        shown = ", ".join(sorted(supported))
        raise UnmergeError(f"{what} {file}: GGUF architecture {architecture!r} is not one transformers can read from "
                           f"GGUF (it reads {shown})")
    types: dict[str, int] = {}
    checked: set[int] = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        types[kind.name] = types.get(kind.name, 0) + 1
        if int(kind) in checked:
            continue
        try:  # the first row only: whether the type can be dequantized at all
            rows = tensor.data.reshape(-1, tensor.data.shape[-1]) if tensor.data.ndim > 1 else tensor.data
            dequantize(np.ascontiguousarray(rows[:1] if tensor.data.ndim > 1 else rows), kind)
        except NotImplementedError:
            raise UnmergeError(f"{what} {file}: tensor {tensor.name} is of GGUF type {kind.name}, which the gguf package "
                               "cannot dequantize (convert the model with another quantization, e.g. Q8_0, Q4_K_M or "
                               "F16)") from None
        except Exception as exc:  # noqa: BLE001
            raise UnmergeError(f"{what} {file}: tensor {tensor.name} ({kind.name}) cannot be read: "
                               f"{_first_line(exc)}") from None
        checked.add(int(kind))
    return GgufInfo(file, architecture, name if isinstance(name, str) else None, types), reader


def file_sha256(file: Path, cache_root: Path) -> str:
    """The sha256 of ``file``'s bytes, streamed; remembered under ``cache_root`` by the file's device,
    inode, size and modification time (nanoseconds), so an unchanged file is hashed once."""
    st = file.stat()
    memo = cache_root / "cache" / "gguf" / ".sha256" / (
        content_key("sha256", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) + ".json")
    try:
        data = json.loads(memo.read_text())
        if isinstance(data, dict) and isinstance(data.get("sha256"), str) and len(data["sha256"]) == 64:
            return data["sha256"]
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        atomic_write_json(memo, {"sha256": value, "file": str(file), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    except OSError:
        pass  # a read-only cache: hash again next time
    return value


def dequantized_checkpoint(path: str | Path, cache_root: str | Path | None = None, what: str = "model") -> Path:
    """The plain checkpoint folder of a GGUF model, dequantized once into ``<cache_root>/cache/gguf/<key>``.

    Args:
        path: A ``.gguf`` file, or a folder holding exactly one (see :func:`find_gguf`).
        cache_root: The store root: the manifest's store for ``unmerge run``, ``None`` for the user
            cache (:func:`default_cache_root`).
        what: How the caller names the value in errors (``"--base"``, ``"targets[0].path"``, …).

    Raises:
        UnmergeError: one line, for a file that is not GGUF, truncated, of an unsupported architecture
            or tensor type, or that transformers fails to load.
    """
    file = find_gguf(path, what)
    if file is None:
        raise UnmergeError(f"{what} {path}: not a .gguf file nor a folder holding one")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    store = ArtifactStore(root)
    digest = file_sha256(file, root)
    from importlib.metadata import version

    key = f"{digest[:16]}-{content_key('gguf', digest, FORMAT, version('transformers'))[:8]}"
    if store.exists("gguf", key):  # no header read, no import of the loader: a cached model costs a stat
        return store.path("gguf", key)
    info, reader = _inspect(file, what)
    return store.produce("gguf", key, lambda tmp: _convert(file, info, reader, digest, tmp, what),
                         {"source": str(file), "sha256": digest})


def model_source(path: str | Path, cache_root: str | Path | None = None, what: str = "model") -> Path:
    """``path`` itself, or the dequantized checkpoint folder when it is a GGUF file (or a folder holding
    one): what every reader of a model folder calls on a user's path first."""
    return dequantized_checkpoint(path, cache_root, what) if find_gguf(path, what) is not None else Path(path)


def _convert(file: Path, info: GgufInfo, reader: Any, digest: str, out: Path, what: str) -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    bars, bar = hf_logging.is_progress_bar_enabled(), gguf_loader.tqdm
    hf_logging.disable_progress_bar()  # no progress bars: the conversion's output stays one-line messages
    gguf_loader.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        _convert_quietly(file, info, reader, digest, out, what)
    finally:
        gguf_loader.tqdm = bar
        if bars:
            hf_logging.enable_progress_bar()


def _convert_quietly(file: Path, info: GgufInfo, reader: Any, digest: str, out: Path, what: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        raise UnmergeError(f"{what} {file}: transformers cannot load this GGUF file ({info.architecture}, "
                           f"{info.quantization}): {_first_line(exc)}") from None
    # save_pretrained refuses a model "quantized with gguf": the same weights in a fresh model of the
    # same class, built on the meta device (no random initialisation), without quantization_config
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(model.config).from_dict(settings)
    with torch.device("meta"):
        plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise UnmergeError(f"{what} {file}: the dequantized weights do not fit {type(model).__name__} "
                           f"(missing {list(missing)[:2]}, unexpected {list(unexpected)[:2]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    for buffer_name, buffer in list(plain.named_buffers()):  # not in the state dict (rotary frequencies)
        if buffer.is_meta:
            module_name, _, attr = buffer_name.rpartition(".")
            plain.get_submodule(module_name).register_buffer(attr, model.get_buffer(buffer_name), persistent=False)
    left = [n for n, p in plain.named_parameters() if p.is_meta]
    if left:
        raise UnmergeError(f"{what} {file}: the GGUF file has no weights for {left[0]} ({len(left)} tensor(s))")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    noise = weight_noise(reader, info.architecture, plain.state_dict())
    atomic_write_json(out / NOISE_FILE, {"source": str(file), "sha256": digest, "architecture": info.architecture,
                                         "name": info.name, "tensor_types": dict(info.tensor_types), "modules": noise})


def _rounding_variance(tensor: Any) -> tuple[float, str] | None:
    """The mean squared rounding error per weight of one GGUF tensor, and how it was estimated.

    - ``Q4_0``/``Q4_1``/``Q5_0``/``Q5_1``/``Q8_0``: each block of 32 weights is rounded to a grid of step
      ``d`` (its float16 scale, the block's first two bytes); an error uniform on ``[-d/2, d/2]`` has
      variance ``d²/12``: the mean of ``d²/12`` over the blocks (exact for round-to-nearest);
    - ``F16``/``BF16``: half the spacing of the float grid at each value (assumes a float32 source);
    - other types (k-quants, i-quants): the grid step from each sub-block's range of dequantized
      values, ``(max − min) / (2^bits − 1)`` with ``bits`` the type's bits per weight rounded down
      (approximate);
    - ``F32``/``F64``: no rounding (``0``).
    """
    import gguf
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind in ("F32", "F64"):
        return 0.0, "exact"
    raw = np.asarray(tensor.data)
    if kind in _LEGACY_QUANTS:
        block = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
        scales = raw.reshape(-1, block)[:, :2].copy().view(np.float16).astype(np.float64).ravel()
        return float(np.mean(scales**2) / 12.0), "block scale/√12"
    values = dequantize(raw, tensor.tensor_type).astype(np.float64)
    if kind in _FLOAT_MANTISSA:
        magnitude = np.abs(values[values != 0])
        if not magnitude.size:
            return 0.0, "float grid"
        ulp = np.exp2(np.floor(np.log2(magnitude)) - _FLOAT_MANTISSA[kind])
        return float(np.sum(ulp**2 / 12.0) / values.size), "float spacing/√12"
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    bits = max(1, int(type_size * 8 // block_size))
    group = _GROUP.get(kind, 32)
    flat = values.ravel()
    flat = flat[: flat.size - flat.size % group].reshape(-1, group)
    if not flat.size:
        return None
    step = (flat.max(axis=1) - flat.min(axis=1)) / (2**bits - 1)
    return float(np.mean(step**2) / 12.0), f"range/(2^{bits}−1)/√12 per {group} weights"


def weight_noise(reader: Any, architecture: str, state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Module name (``model.layers.0.self_attn.q_proj``) -> ``{"type", "variance", "method"}`` for every
    2-D weight of the GGUF file (see :func:`_rounding_variance`), named as transformers names them
    (gguf-py's tensor name map, as transformers' loader uses it)."""
    import gguf

    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture), None)
    layers = [int(k.split(".")[2]) for k in state if k.startswith("model.layers.") and k.split(".")[2].isdigit()]
    if arch is None:
        return {}
    name_map = gguf.get_tensor_name_map(arch, max(layers, default=-1) + 1)
    to_hf = {}
    for key in state:
        if key.endswith(".weight") and (stem := name_map.get_name(key[: -len(".weight")])) is not None:
            to_hf.setdefault(stem + ".weight", key[: -len(".weight")])
    out: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        module = to_hf.get(tensor.name)
        if module is None or len(tensor.shape) != 2:
            continue
        estimate = _rounding_variance(tensor)
        if estimate is not None:
            out[module] = {"type": tensor.tensor_type.name, "variance": estimate[0], "method": estimate[1]}
    return out


def _noise_record(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(folder) / NOISE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("modules"), dict) else None


def quantization_warning(target: Path, base: Path | None, vector: np.ndarray, mask: Mask, name: str) -> str | None:
    """The warning for a full-model target dequantized from GGUF (``None`` for any other target).

    ΔW = target − base then holds every weight's rounding error. Its size is estimated per module from
    the GGUF's block scales (:func:`_rounding_variance`: ``scale/√12`` per weight for the q-types, the
    error of rounding to a grid of step ``scale``), averaged over the mask's coordinates (weighted by
    how many each module has; rounding errors are taken as independent of which coordinates the mask
    chose), plus the base's own when the base is a GGUF too (independent errors add in variance), and
    compared with the RMS of ΔW on the same coordinates.
    """
    record = _noise_record(target)
    if record is None:
        return None
    base_record = _noise_record(base) if base is not None else None
    modules = record["modules"]
    total = count = 0.0
    methods: set[str] = set()
    for module, idx in mask.indices.items():
        entry = modules.get(module)
        if not isinstance(entry, dict):
            continue
        variance = float(entry.get("variance", 0.0))
        methods.add(str(entry.get("method")))
        if base_record is not None and isinstance(base_record["modules"].get(module), dict):
            variance += float(base_record["modules"][module].get("variance", 0.0))
        total += variance * len(idx)
        count += len(idx)
    types = ", ".join(f"{t} ×{n}" for t, n in sorted(record.get("tensor_types", {}).items(), key=lambda kv: -kv[1]))
    source = Path(str(record.get("source", target))).name
    if not count:
        return (f"target {name} was dequantized from the GGUF file {source} ({types}): ΔW = target − base holds its "
                "quantization error in every weight, and no estimate of it is available for the dictionary's modules")
    noise = math.sqrt(total / count)
    signal = float(np.sqrt(np.mean(np.square(vector, dtype=np.float64)))) if vector.size else 0.0
    ratio = noise / signal if signal > 0 else math.inf
    both = " and the base's (also GGUF)" if base_record is not None else ""
    how = "; ".join(sorted(methods))
    verdict = ("it exceeds the change being attributed: coefficients and the not-explained share are unreliable"
               if ratio >= 1 else "coefficients and the not-explained share are blurred by that much")
    return (f"target {name} was dequantized from the GGUF file {source} ({types}): ΔW = target − base holds the "
            f"rounding error of every weight{both}, estimated RMS {noise:.3g} per weight on the mask's {int(count)} "
            f"coordinates ({how}, uniform rounding), {ratio:.0%} of the RMS of ΔW there ({signal:.3g}); {verdict}")
