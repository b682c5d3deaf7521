"""One run directory, one manifest at a time, holding only that run's results.

A run directory (``<output.dir>/<name>``) is claimed for the whole run:

* Runs of the **same manifest** (the same file with the same text) may share it: they compute the
  same artifacts, and the store's per-key locks make them build each one once.
* A run of a **different manifest** that has the same ``name`` (and output folder) is refused while the
  directory is held, in one line saying which manifest holds it; otherwise the two would write each
  other's ``summary.*`` under one ``manifest.toml``.
* The first run to claim a directory that no run holds removes the previous run's results (every
  top-level entry but ``run.json``, the locks and the store), so what is left describes this run
  alone: a decomposer or ``[[targets]]`` entry removed from the manifest leaves no stale file.

The claim uses two advisory locks (``fcntl.flock``, released by the kernel when a process dies, even by
``kill -9``): a short *gate* lock serialises claims, and a *held* lock is kept shared by every run of
the directory until it ends. Without ``fcntl`` (Windows) directories are not claimed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from unmerge_core.errors import UnmergeError
from unmerge_core.io.store import TEMP_MARK, atomic_write_json, remove_tree

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

GATE_LOCK = ".unmerge-run.gate"
HELD_LOCK = ".unmerge-run.lock"
OWNER_FILE = ".unmerge-run.owner"
STATUS_FILE = "run.json"
KEPT = frozenset({GATE_LOCK, HELD_LOCK, OWNER_FILE, STATUS_FILE})

REDO_STAGES: tuple[str, ...] = ("trainer", "masker", "merger", "decomposer", "metric")
"""The stages whose cached work ``unmerge run --redo STAGE`` recomputes: that stage and every later one
(their inputs may have changed); ``all`` is the first. The report is never cached."""


def redo_stages(stage: str | None) -> frozenset[str]:
    """The stages ``--redo stage`` recomputes (none for ``None``)."""
    if stage is None:
        return frozenset()
    if stage == "all":
        return frozenset(REDO_STAGES)
    if stage not in REDO_STAGES:
        raise UnmergeError(f"--redo {stage}: unknown stage; choose one of: all, {', '.join(REDO_STAGES)}")
    return frozenset(REDO_STAGES[REDO_STAGES.index(stage):])


def manifest_identity(path: Path, text: str) -> str:
    """What makes two runs "the same manifest": its resolved path and its text."""
    return hashlib.sha256(f"{path.resolve()}\0{text}".encode()).hexdigest()[:16]


class RunDirectory:
    """A claim on one run directory (see the module docstring).

    Args:
        path: The run directory (created by the caller).
        identity: :func:`manifest_identity` of the manifest being run.
        manifest: The manifest's path, named in the refusal a different manifest gets.
        keep: Paths inside ``path`` that are never removed (the store, when it lives there).
    """

    def __init__(self, path: Path, identity: str, manifest: Path, keep: tuple[Path, ...] = ()) -> None:
        self.path = path
        self.identity = identity
        self.manifest = manifest
        self.keep = tuple(Path(os.path.abspath(k)) for k in keep)
        self._held: int | None = None
        self.first = True  # no other run held the directory when this one claimed it

    def claim(self) -> None:
        """Hold the directory for this run; raise :class:`UnmergeError` when another manifest holds it.

        The first run to hold it removes the previous run's results (:meth:`clear_results`)."""
        if fcntl is None:  # pragma: no cover
            self.clear_results()
            return
        gate = self._open(GATE_LOCK)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)
            held = self._open(HELD_LOCK)
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.first = True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(held)
                    raise
                self.first = False
                owner = self._owner()
                if owner.get("identity") != self.identity:
                    os.close(held)
                    raise UnmergeError(
                        f"run directory {self.path} is in use by a run of another manifest with the same name "
                        f"({owner.get('manifest', 'unknown manifest')}, process {owner.get('pid', '?')}): wait "
                        "for it to finish, or give this manifest another name or [output] dir") from None
                fcntl.flock(held, fcntl.LOCK_SH)  # the holders are runs of this manifest: join them
            else:
                atomic_write_json(self.path / OWNER_FILE, {"identity": self.identity, "manifest": str(self.manifest),
                                                           "pid": os.getpid()})
                self.clear_results()
                fcntl.flock(held, fcntl.LOCK_SH)  # under the gate: no other claim sees the switch
            self._held = held
        finally:
            os.close(gate)

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def clear_results(self) -> list[str]:
        """Remove what an earlier run left at the top of the directory (not the store, the locks or
        ``run.json``, and nothing at all in a directory that holds no ``run.json``: one UNMERGE did
        not make). Return the names removed."""
        if not (self.path / STATUS_FILE).is_file():
            return []
        removed = []
        for entry in sorted(self.path.iterdir()):
            if entry.name in KEPT or entry.name.startswith(TEMP_MARK + ".") or self._kept(entry):
                continue
            if remove_tree(entry):
                removed.append(entry.name)
        return removed

    def _kept(self, entry: Path) -> bool:
        here = Path(os.path.abspath(entry))
        return any(k == here or k.is_relative_to(here) for k in self.keep)

    def _open(self, name: str) -> int:
        return os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o666)

    def _owner(self) -> dict[str, Any]:
        try:
            data = json.loads((self.path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
