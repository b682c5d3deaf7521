"""Models described without loading them: ``config.json``, safetensors headers, a GGUF file's header,
the local Hugging Face cache. Never reaches the network (a Hub id that is not cached is a download of
unknown size). Used by ``unmerge plan`` and by plugins' ``plan`` estimates.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unmerge_core.errors import UnmergeError
from unmerge_core.io.hub import COMMIT_HASH, hub_cache_dir, parse_hub_ref

__all__ = ["KNOWN_CONFIGS", "ModelInfo", "describe_model", "human", "read_gguf_header", "safetensors_parameters"]

# The published config.json of the Hub models the project names (shape fields only), used when such a
# model is neither local nor cached: a plan offline still knows their shapes (never their download size).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-7B-Instruct": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                                 "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064,
                                 "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                                 "parameters": 7_615_616_512},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                                            "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152,
                                            "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                                            "parameters": 134_515_008},
}


# --------------------------------------------------------------------------------------------------
# Models, described without reading their weights
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What can be said about a model or adapter reference without loading it.

    ``status``: ``local`` (a file or folder here), ``cached`` (a Hub id in the local Hugging Face cache),
    ``download`` (a Hub id a run would fetch), ``missing`` (a local path that does not exist) or
    ``unreadable``.
    """

    source: str
    status: str
    path: str | None = None
    bytes: int | None = None
    parameters: int | None = None
    config: dict[str, Any] | None = None
    float32_bytes: int | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("config")
        return out


def _files_size(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def safetensors_parameters(path: Path) -> int:
    """Elements in a safetensors file, from its header only."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnmergeError(f"{path}: not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 2**20:
            raise UnmergeError(f"{path}: not a safetensors file (a header of {length} bytes)")
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            raise UnmergeError(f"{path}: not a safetensors file (its header is not JSON)") from None
    return sum(math.prod(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))


GGUF_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int]]]:
    """A GGUF file's metadata (arrays as their length) and tensor infos ``(name, dims, ggml type)``,
    read from its header only (nothing is dequantized). Raises a one-line :class:`UnmergeError`."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        def take(n: int) -> bytes:
            data = fh.read(n)
            if len(data) < n:
                raise UnmergeError(f"{path}: truncated GGUF header")
            return data

        def number(fmt: str) -> Any:
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def string() -> str:
            n = number("<Q")
            if n > size:
                raise UnmergeError(f"{path}: corrupt GGUF header (a string of {n} bytes)")
            return take(n).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind in GGUF_SCALARS:
                return number(GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item, count = number("<I"), number("<Q")
                if item in GGUF_VALUE_SIZES:
                    fh.seek(GGUF_VALUE_SIZES[item] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        value(item)
                return count
            raise UnmergeError(f"{path}: corrupt GGUF header (value type {kind})")

        if take(4) != b"GGUF":
            raise UnmergeError(f"{path}: not a GGUF file (no GGUF magic)")
        version = number("<I")
        if version not in (2, 3):
            raise UnmergeError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = number("<Q"), number("<Q")
        if n_tensors > 10**7 or n_kv > 10**7:
            raise UnmergeError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            metadata[key] = value(number("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            dims = [number("<Q") for _ in range(number("<I"))]
            kind = number("<I")
            number("<Q")  # offset
            tensors.append((name, dims, kind))
    return metadata, tensors


def _gguf_config(metadata: Mapping[str, Any], tensors: Sequence[tuple[str, list[int], int]]) -> dict[str, Any] | None:
    arch = metadata.get("general.architecture")
    get = (lambda k: metadata.get(f"{arch}.{k}")) if isinstance(arch, str) else (lambda k: None)
    if get("embedding_length") is None or get("block_count") is None:
        return None
    config = {"hidden_size": get("embedding_length"), "num_hidden_layers": get("block_count"),
              "num_attention_heads": get("attention.head_count"), "num_key_value_heads": get("attention.head_count_kv"),
              "intermediate_size": get("feed_forward_length"), "architecture": arch}
    embedding = next((dims for name, dims, _ in tensors if name == "token_embd.weight"), None)
    vocab = metadata.get("tokenizer.ggml.tokens") or (embedding[1] if embedding and len(embedding) > 1 else None)
    if vocab:
        config["vocab_size"] = vocab
    config["tie_word_embeddings"] = not any(name == "output.weight" for name, _, _ in tensors)
    return {k: v for k, v in config.items() if v is not None}


def _describe_gguf(source: str, path: Path) -> ModelInfo:
    size = path.stat().st_size
    try:
        metadata, tensors = read_gguf_header(path)
    except (UnmergeError, OSError) as exc:
        return ModelInfo(source, "unreadable", str(path), size, note=str(exc).splitlines()[0])
    parameters = sum(math.prod(dims) for _, dims, _ in tensors)
    return ModelInfo(source, "local", str(path), size, parameters, _gguf_config(metadata, tensors), 4 * parameters,
                     note=f"GGUF, dequantized once to float32 ≈ {human(4 * parameters)} in the store")


def _describe_folder(source: str, path: Path, status: str, size: int | None = None) -> ModelInfo:
    config = None
    for name in ("config.json", "adapter_config.json"):
        if (path / name).is_file():
            try:
                config = json.loads((path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                config = None
            break
    weights = sorted(path.glob("*.safetensors"))
    parameters = None
    note = ""
    try:
        parameters = sum(safetensors_parameters(w) for w in weights) if weights else None
    except (UnmergeError, OSError) as exc:
        note = str(exc).splitlines()[0]
    if size is None:
        size = _files_size([f for f in path.rglob("*")])
    return ModelInfo(source, status, str(path), size, parameters, config if isinstance(config, dict) else None,
                     None if parameters is None else 4 * parameters, note)


def _cached_snapshot(repo_id: str, revision: str | None) -> tuple[Path, Path] | None:
    """(repository folder, snapshot folder) of a Hub model in the local cache, or ``None``; local only."""
    cache = hub_cache_dir()
    if cache is None:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    if revision is not None and COMMIT_HASH.fullmatch(revision):
        commit = revision
    else:
        ref = repo / "refs" / (revision or "main")
        try:
            commit = ref.read_text().strip()
        except OSError:
            return None
        if not COMMIT_HASH.fullmatch(commit):
            return None
    snapshot = repo / "snapshots" / commit
    return (repo, snapshot) if snapshot.is_dir() else None


def describe_model(value: str, relative_to: Path | None = None) -> ModelInfo:
    """Describe a model reference (local folder or file, ``.gguf`` file, Hub id) without loading weights
    or reaching the network: its status, size on disk, parameter count and config where known."""
    ref = parse_hub_ref(value, relative_to)
    if ref is None:
        path = Path(value).expanduser()
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        if not path.exists():
            return ModelInfo(value, "missing", str(path), note="no such file or folder")
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1 and not any(path.glob("*.safetensors")):
                return _describe_gguf(value, ggufs[0])
            return _describe_folder(value, path, "local")
        if path.suffix == ".gguf":
            return _describe_gguf(value, path)
        try:
            parameters = safetensors_parameters(path) if path.suffix == ".safetensors" else None
        except UnmergeError as exc:
            return ModelInfo(value, "unreadable", str(path), path.stat().st_size, note=str(exc))
        return ModelInfo(value, "local", str(path), path.stat().st_size, parameters,
                         float32_bytes=None if parameters is None else 4 * parameters)
    found = _cached_snapshot(ref.repo_id, ref.revision)
    known = KNOWN_CONFIGS.get(ref.repo_id)
    if found is not None:
        repo, snapshot = found
        blobs = [f for f in (repo / "blobs").glob("*")] if (repo / "blobs").is_dir() else []
        info = _describe_folder(str(ref), snapshot, "cached", _files_size(blobs) or _files_size(list(snapshot.rglob("*"))))
        if any(snapshot.glob("*.safetensors")):
            return info
        info.status = "download"
        info.note = "only its config is cached: the weights would be downloaded"
        return info
    if known is not None:
        config = {k: v for k, v in known.items() if k != "parameters"}
        return ModelInfo(str(ref), "download", None, None, known["parameters"], config, 4 * known["parameters"],
                         note="shapes from its published config.json")
    return ModelInfo(str(ref), "download")


def human(n: int | float | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
