"""Run-directory artifacts: content keys, atomic writes, and reuse of finished work.

Every artifact lives under ``<run_dir>/cache/<kind>/<key>`` where ``key`` hashes the configuration
that produced it and the keys of its inputs. A directory is moved into place with one ``rename`` once
it is complete, so a crash leaves either the whole artifact or nothing; a rerun reuses what exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    as_torch = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
                for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(as_torch, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from nested mappings, sequences, numpy values and paths."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.floating, np.integer, np.bool_, Path)):
        return _json_default(value)
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class ArtifactStore:
    """Directory-per-artifact cache inside a run directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, key: str) -> Path:
        return self.root / "cache" / kind / key

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "DONE").is_file()

    def produce(self, kind: str, key: str, build: Callable[[Path], Any], meta: Mapping[str, Any] | None = None) -> Path:
        """Return the artifact directory, calling ``build(tmp_dir)`` only if it is not cached yet."""
        final = self.path(kind, key)
        if self.exists(kind, key):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
        try:
            build(tmp)
            atomic_write_json(tmp / "DONE", {"key": key, **(meta or {})})
            if final.exists():  # an incomplete leftover without DONE
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final
