"""Run-directory artifacts: content keys, atomic writes, safe names, and reuse of finished work.

Every artifact lives under ``<run_dir>/cache/<kind>/<key>`` where ``key`` hashes the configuration
that produced it and the keys of its inputs. An artifact is built in a temporary directory and moved
into place with one ``rename`` once it is complete (its ``DONE`` file included), so a crash leaves
either the whole artifact or nothing, and a rerun reuses what exists.

Several processes may share one store (two ``unmerge run`` of one manifest, or the workers of a
distributed executor): a lock file per key makes a second builder wait for the first and then reuse
its artifact, and where locks are not shared (another machine on network storage) the rename
protocol still accepts a finished twin instead of failing or removing it.

Temporary files and directories are named ``.unmerge-tmp.<host>.<pid>.<...>``;
:func:`clean_stale_temporaries` removes those whose process is gone (a killed run), never those of a
live one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

try:  # POSIX advisory locks; without them the rename protocol alone keeps concurrent runs correct
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_MARK = ".unmerge-tmp"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed derived from a base seed and labels (stable across runs and platforms)."""
    return int(content_key(seed, *parts), 16) % (2**31 - 1)


# --------------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def is_safe_name(name: str) -> bool:
    """A run or target name usable as one path component: letters, digits, ``.``, ``_``, ``-``, not
    starting with a dot (so never ``.`` or ``..``), at most 100 characters."""
    return bool(_SAFE_NAME.fullmatch(name))


def safe_filename(label: str) -> str:
    """A file-name component for any label, injective in practice.

    A label that is already a safe name is returned unchanged; otherwise unsafe characters become
    ``_`` and a short hash of the original label is appended, so ``a/b`` and ``a_b`` never map to the
    same file, and ``..`` or ``/`` can never leave the directory.
    """
    if is_safe_name(label):
        return label
    cleaned = _UNSAFE_CHARS.sub("_", label).strip("._-")[:80] or "label"
    return f"{cleaned}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"


def check_output_dir(path: Path) -> str | None:
    """Why ``path`` cannot be used as an output directory (created if missing), or ``None``.

    Besides existence and permissions: a folder name longer than the file system allows (NAME_MAX,
    ENAMETOOLONG), a path longer than PATH_MAX, and a file system where nothing can be created
    whatever the permission bits say (``/proc``, ``/sys``): a file is created there and removed.
    """
    text = str(path)
    if "\x00" in text:
        return "contains a NUL byte"
    if not text.strip():
        return "is empty"
    absolute = os.path.abspath(path)
    current = absolute  # os.path.exists, not Path.exists: a name over NAME_MAX raises in the latter
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return "has no existing parent directory"
        current = parent
    if not os.path.isdir(current):
        return f"{current} is a file, not a directory" if current != absolute else "is a file, not a directory"
    try:
        name_max, path_max = os.pathconf(current, "PC_NAME_MAX"), os.pathconf(current, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    for part in Path(os.path.relpath(absolute, current)).parts:  # the folders still to be made
        if len(os.fsencode(part)) > name_max:
            shown = part if len(part) <= 24 else part[:20] + "…"
            return (f"the folder name {shown!r} is {len(os.fsencode(part))} bytes long; a file name may have at most "
                    f"{name_max} bytes here")
    if len(os.fsencode(absolute)) >= path_max:
        return f"is too long ({len(os.fsencode(absolute))} bytes; a path may have at most {path_max - 1} here)"
    if not os.access(current, os.W_OK | os.X_OK):
        return f"cannot write in {current} (permission denied)"
    try:
        tmpfile = getattr(os, "O_TMPFILE", 0)
        if not tmpfile:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE")
        os.close(os.open(current, tmpfile | os.O_WRONLY, 0o600))  # an unnamed file: nothing left behind
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return f"cannot create a file in {current} ({exc.strerror or exc})"
        try:  # a file system without unnamed files (or /proc): a named folder, cleaned up if we die
            os.rmdir(tempfile.mkdtemp(dir=current, prefix=temp_prefix("probe.")))
        except OSError as exc2:
            return f"cannot create a folder in {current} ({exc2.strerror or exc2}; a virtual or read-only file system?)"
    return None


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def to_jsonable(value: Any, where: str = "value") -> Any:
    """Plain JSON types from nested mappings, sequences, numpy values and paths.

    NaN and infinities become ``None`` (JSON has no such numbers); sets become sorted lists. Anything
    else raises ``TypeError`` naming the path of the offending item (``where`` is its root name).
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not a JSON key")
            out[str(k)] = to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v, f"{where}[]") for v in value), key=repr)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return to_jsonable(value.item(), where)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{where}: a {type(value).__name__} is not JSON-serialisable")


def dumps_json(data: Any) -> str:
    """Standard JSON (no NaN), indented, for files people and programs read."""
    return json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n"


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""The process's umask, read once at import (reading it means setting it, which is not thread safe)."""


def _share_like_open(path: str | Path, directory: bool = False) -> None:
    """Give a file or directory made by ``mkstemp`` / ``mkdtemp`` (always 0600 / 0700) the mode ``open``
    / ``mkdir`` would have given it under the umask, so a store shared by a team stays readable."""
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)


def share_tree(root: Path) -> None:
    """Give every file and directory under ``root`` (``root`` included; symbolic links untouched) the
    mode ``open`` / ``mkdir`` give under the umask: for what a library wrote (safetensors writes 0600)
    or a ``mkdtemp`` folder (0700), in a store a team shares."""
    _share_like_open(root, directory=True)
    for directory, folders, files in os.walk(root):
        for name in folders:
            if not os.path.islink(os.path.join(directory, name)):
                _share_like_open(os.path.join(directory, name), directory=True)
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                _share_like_open(os.path.join(directory, name))


def temp_prefix(tag: str = "") -> str:
    """Prefix of a temporary name owned by this process (see :func:`clean_stale_temporaries`)."""
    return f"{TEMP_MARK}.{_HOST}.{os.getpid()}.{tag}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name + "."))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        _share_like_open(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, dumps_json(data))


def atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor | np.ndarray],
                        metadata: Mapping[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    as_torch = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
                for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name + "."))
    os.close(fd)
    try:
        save_file(as_torch, tmp, metadata=dict(metadata) if metadata else None)
        _share_like_open(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --------------------------------------------------------------------------------------------------
# Locks and stale temporaries
# --------------------------------------------------------------------------------------------------


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing) for the block; released if the process dies."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies: a team store can share its locks
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(root: Path, max_depth: int = 3) -> int:
    """Remove temporaries under ``root`` left by dead processes of this host; return how many.

    Only names made by :func:`temp_prefix` are considered, and only those whose process no longer
    runs on this host: a concurrent run's work in progress is never touched.
    """
    removed = 0
    if not root.is_dir():
        return 0
    stack = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(TEMP_MARK + "."):
                parts = entry.name.split(".")
                # ['', 'unmerge-tmp', host, pid, ...]
                if len(parts) > 3 and parts[2] == _HOST and parts[3].isdigit() and not _pid_alive(int(parts[3])):
                    path = Path(entry.path)
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed += 1
            elif entry.is_dir(follow_symlinks=False) and depth < max_depth:
                stack.append((Path(entry.path), depth + 1))
    return removed


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


class ArtifactStore:
    """Directory-per-artifact cache inside a run directory, safe for concurrent producers."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, key: str) -> Path:
        return self.root / "cache" / kind / key

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "DONE").is_file()

    def produce(self, kind: str, key: str, build: Callable[[Path], Any], meta: Mapping[str, Any] | None = None) -> Path:
        """Return the artifact directory, calling ``build(tmp_dir)`` only if it is not there yet.

        A concurrent producer of the same key waits on the key's lock and then reuses the finished
        artifact; a twin finished elsewhere (no shared lock) wins the rename and this one is discarded.
        """
        final = self.path(kind, key)
        if self.exists(kind, key):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / "cache" / ".locks" / f"{kind}.{key}"):
            if self.exists(kind, key):
                return final
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_prefix(key + ".")))
            _share_like_open(tmp, directory=True)
            try:
                build(tmp)
                share_tree(tmp)  # what a plugin wrote with its own library (safetensors writes 0600)
                atomic_write_json(tmp / "DONE", {"key": key, **(meta or {})})
                _install(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return final

    def discard(self, kind: str, key: str) -> bool:
        """Remove a finished artifact (``unmerge run --redo``), under its key's lock so no producer of
        the same key is between its check and its rename; return whether there was one."""
        final = self.path(kind, key)
        if not final.exists():
            return False
        with file_lock(self.root / "cache" / ".locks" / f"{kind}.{key}"):
            return remove_tree(final)


def remove_tree(path: Path) -> bool:
    """Remove a file or directory atomically as far as readers can tell: renamed aside first (a reader
    sees it whole or not at all), then deleted. Return whether anything was there."""
    if not os.path.lexists(path):
        return False
    aside = path.parent / (temp_prefix("removed.") + path.name)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
    return True


def _install(tmp: Path, final: Path) -> None:
    """Rename a finished artifact into place; keep a finished twin if one is already there."""
    try:
        os.rename(tmp, final)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if (final / "DONE").is_file():
        return  # another producer finished the same artifact first: its content is the same
    # a leftover without DONE (from an older version): move it aside atomically, then install ours
    aside = final.parent / (temp_prefix("stale.") + final.name)
    os.rename(final, aside)
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(tmp, final)
