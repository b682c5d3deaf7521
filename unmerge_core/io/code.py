"""The identity of the code that makes an artifact, for cache keys.

A cached artifact (an adapter, a mask, a target, a decomposition, a metric value) must not outlive the
code that made it: a fixed bug in a built-in plugin, or a third-party plugin reinstalled with another
behaviour, must not be answered from the store. Every plugin's cache identity therefore holds

* its distribution's name and version (``unmerge 0.1.0``, ``unmerge-example-decomposer 0.1.1``), and
* a SHA-256 of the Python source of the top-level package that defines the plugin's factory (its
  helpers in the same package included), and of ``unmerge_core`` itself, which drives every plugin.

The source hash is taken whatever the install kind (editable, local folder or wheel): a plugin edited
in place keeps its version but not its hash. Only ``.py`` files count (compiled caches, data and
documentation do not); the hash of a package is computed once per process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

SOURCE_SUFFIX = ".py"


@lru_cache(maxsize=None)
def package_source_digest(top_level: str) -> str:
    """SHA-256 (16 hex digits) of every ``.py`` file of the importable package or module ``top_level``.

    The files are hashed in sorted order of their path relative to the package, names included, so a
    renamed or removed file changes the digest too. A name without source on disk (a built-in or
    frozen module, a namespace without files) gives ``"no-source"``.
    """
    for path in _source_roots(top_level):
        if path.is_file():
            return _digest([(path.name, path)])
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob(f"*{SOURCE_SUFFIX}")
                       if "__pycache__" not in p.parts)
        return _digest(files)
    return "no-source"


def _source_roots(top_level: str) -> list[Path]:
    module = sys.modules.get(top_level)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(top_level)
        except (ImportError, ValueError):
            return []
        if spec is None:
            return []
        if spec.submodule_search_locations:
            return [Path(p) for p in spec.submodule_search_locations]
        origin = spec.origin
    if origin is None or not str(origin).endswith(SOURCE_SUFFIX):
        return []
    path = Path(origin)
    return [path.parent if path.name == "__init__.py" else path]


def _digest(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode())
        h.update(b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"<unreadable>")
        h.update(b"\0")
    return h.hexdigest()[:16]


def top_level_package(obj: Any) -> str:
    """The top-level package that defines ``obj`` (a function, class or instance)."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return str(module).partition(".")[0]


def code_identity(factory: Any, distribution: str, version: str) -> dict[str, str]:
    """What identifies the code of a plugin whose factory is ``factory`` (see the module docstring)."""
    package = top_level_package(factory)
    return {"distribution": distribution, "version": version, "package": package,
            "source": package_source_digest(package), "core": package_source_digest("unmerge_core")}


def core_identity() -> dict[str, str]:
    """What identifies the host's own code, for artifacts the core makes without a plugin (a target
    read from a model's files)."""
    from unmerge_core import __version__

    return {"unmerge": __version__, "core": package_source_digest("unmerge_core")}
