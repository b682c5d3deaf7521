"""One run directory, one manifest at a time, holding only that run's results.

A run directory (``<output.dir>/<name>``) is claimed for the whole run:

* Runs of the **same manifest** (the same file with the same text) may share it: they compute the
  same artifacts, and the store's per-key locks make them build each one once.
* A run of a **different manifest** that has the same ``name`` (and output folder) is refused while the
  directory is held, in one line saying which manifest holds it; otherwise the two would write each
  other's ``summary.*`` under one ``manifest.toml``.
* The first run to claim a directory that no run holds removes the previous run's results (the
  top-level entries its runs wrote, recorded in :data:`OWNER_FILE` — never the store, ``run.json``,
  the locks, or what the folder held before UNMERGE first used it), so what is left describes this run
  alone: a decomposer or ``[[targets]]`` entry removed from the manifest leaves no stale file. A folder
  whose ``run.json`` UNMERGE did not write is refused, and a run directory inside a store's ``cache/``
  too.
* Only the last of several concurrent runs of one manifest to finish writes ``complete``.

The claim uses two advisory locks (``fcntl.flock``, released by the kernel when a process dies, even by
``kill -9``): a short *gate* lock serialises claims, and a *held* lock is kept shared by every run of
the directory until it ends. Without ``fcntl`` (Windows) directories are not claimed.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
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


LEGACY_RESULTS = ("summary.csv", "summary.json", "summary.md", "per_target.csv", "per_target.json", "targets.json",
                  "task_vectors.safetensors", "adapters.json", "timings.json", "manifest.toml", "attribution.json",
                  "attribution.md", "attribution.csv", "precision_recall.png", "coefficients_*.png", "causal")
"""What a run of an UNMERGE version without :data:`OWNER_FILE` wrote at the top of its directory."""


class RunDirectory:
    """A claim on one run directory (see the module docstring).

    Its :data:`OWNER_FILE` records which manifest holds it, the entries that were in the folder before
    UNMERGE first used it (``foreign``: never removed) and those its runs wrote (``made``: what the next
    run removes).

    Args:
        path: The run directory (created by the caller).
        identity: :func:`manifest_identity` of the manifest being run.
        manifest: The manifest's path, named in the refusal a different manifest gets.
        keep: Paths inside ``path`` that are never removed (the store, when it lives there).
    """

    def __init__(self, path: Path, identity: str, manifest: Path, keep: tuple[Path, ...] = ()) -> None:
        self.path = path
        self.identity = identity
        self.manifest = Path(os.path.abspath(manifest))
        self.keep = tuple(Path(os.path.realpath(k)) for k in keep)
        self._held: int | None = None
        self._foreign: frozenset[str] = frozenset()
        self.first = True  # no other run held the directory when this one claimed it
        self.claimed = False  # a stage run on its own (Runner.train() …) claims nothing and records nothing

    def claim(self) -> None:
        """Hold the directory for this run; raise :class:`UnmergeError` when another manifest holds it,
        or when it holds a ``run.json`` UNMERGE did not write.

        The first run to hold it removes the previous run's results (:meth:`clear_results`)."""
        self.claimed = True
        if fcntl is None:  # pragma: no cover
            self._start()
            return
        with self._gate():
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
                self._foreign = frozenset(owner.get("foreign") or ())
                fcntl.flock(held, fcntl.LOCK_SH)  # the holders are runs of this manifest: join them
            else:
                try:
                    self._start()
                except BaseException:
                    os.close(held)
                    raise
                fcntl.flock(held, fcntl.LOCK_SH)  # under the gate: no other claim sees the switch
            self._held = held

    def _start(self) -> None:
        """First claim: refuse a folder that is not UNMERGE's, clear the previous run's results, own it."""
        owner = self._owner()
        status = self.path / STATUS_FILE
        if not owner and status.is_file() and not _unmerge_status(status):
            raise UnmergeError(f"run directory {self.path} holds a run.json that UNMERGE did not write: give this "
                               "manifest another name or [output] dir (nothing there was changed)")
        if owner:
            foreign, made = set(owner.get("foreign") or ()), set(owner.get("made") or ())
        elif status.is_file():  # a run of a version that kept no owner file: its result names are known
            made = {e.name for e in self._entries() if any(fnmatch.fnmatch(e.name, p) for p in LEGACY_RESULTS)}
            foreign = {e.name for e in self._entries()} - made
        else:  # a folder UNMERGE has not used: whatever is there is someone else's
            foreign, made = {e.name for e in self._entries()}, set()
        self._foreign = frozenset(foreign)
        self.clear_results(made)
        self._write_owner(made=[])

    def record_outputs(self) -> None:
        """Remember what the runs of this claim wrote at the top of the directory (removed by the next
        first claim); called whenever the run's status is written, so a killed run is covered too. A
        directory never claimed (a stage called on its own, outside ``Runner.run``) records nothing."""
        if not self.claimed:
            return
        if fcntl is None:  # pragma: no cover
            self._write_owner(made=self._made_now())
            return
        with self._gate():
            owner = self._owner()
            if owner.get("identity") == self.identity:
                self._write_owner(made=sorted(set(owner.get("made") or ()) | set(self._made_now())))

    def is_last(self) -> bool:
        """Whether no other run of this manifest holds the directory now (only the last one to finish
        may call it complete)."""
        if fcntl is None or self._held is None:  # pragma: no cover
            return True
        with self._gate():
            try:
                fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            fcntl.flock(self._held, fcntl.LOCK_SH)
            return True

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def clear_results(self, names: set[str]) -> list[str]:
        """Remove the top-level entries ``names`` (an earlier run's results), never the store, the locks,
        ``run.json`` or what was in the folder before UNMERGE used it. Return the names removed."""
        removed = []
        for entry in self._entries():
            if entry.name in names and entry.name not in self._foreign and remove_tree(entry):
                removed.append(entry.name)
        return removed

    def _entries(self) -> list[Path]:
        """Top-level entries that may be results: not the locks, ``run.json``, temporaries or the store."""
        return [e for e in sorted(self.path.iterdir())
                if e.name not in KEPT and not e.name.startswith(TEMP_MARK + ".") and not self._kept(e)]

    def _made_now(self) -> list[str]:
        return sorted(e.name for e in self._entries() if e.name not in self._foreign)

    def _kept(self, entry: Path) -> bool:
        here = Path(os.path.realpath(entry))
        return any(k == here or k.is_relative_to(here) for k in self.keep)

    @contextmanager
    def _gate(self) -> Iterator[None]:
        gate = self._open(GATE_LOCK)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)
            yield
        finally:
            os.close(gate)

    def _write_owner(self, made: list[str]) -> None:
        atomic_write_json(self.path / OWNER_FILE, {"identity": self.identity, "manifest": str(self.manifest),
                                                   "pid": os.getpid(), "foreign": sorted(self._foreign),
                                                   "made": sorted(made)})

    def _open(self, name: str) -> int:
        return os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o666)

    def _owner(self) -> dict[str, Any]:
        try:
            data = json.loads((self.path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _unmerge_status(path: Path) -> bool:
    """Whether ``path`` is a ``run.json`` an UNMERGE run wrote (it names its status and version)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "status" in data and "unmerge" in data


def check_not_in_store(run_dir: Path, store_cache: Path) -> None:
    """Refuse a run directory that is the store's ``cache/`` or inside it (its results would mix with the
    artifacts, and clearing them would remove a store other manifests share)."""
    here, cache = Path(os.path.realpath(run_dir)), Path(os.path.realpath(store_cache))
    if here == cache or here.is_relative_to(cache):
        raise UnmergeError(f"run directory {run_dir} lies inside the artifact store's cache {store_cache}: give this "
                           "manifest another name or [output] dir")
