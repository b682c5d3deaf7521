"""The identity of the code that makes an artifact, for cache keys.

A cached artifact (an adapter, a mask, a target, a decomposition, a metric value) must not outlive the
code that made it: a fixed bug in a built-in plugin, or a third-party plugin reinstalled with another
behaviour, must not be answered from the store. Every plugin's cache identity therefore holds

* its distribution's name and version (``unmerge 0.1.0``, ``unmerge-example-decomposer 0.1.1``);
* ``source``: a SHA-256 of the Python source of the module that defines the plugin's factory and of
  every module of the same top-level package it imports, directly or through others (the package
  ``__init__`` files on the way included): editing a helper the plugin uses changes it, editing an
  unrelated plugin of the same package does not;
* ``core``: a SHA-256 of every ``.py`` file of ``unmerge_core``, which builds every plugin's inputs —
  except for trainers, whose adapters the core only hands a job to (task, seed and folders are in the
  adapter's key already): retraining is the costly step, so a change in the core does not retrain.

The hashes are taken whatever the install kind (editable, local folder or wheel): a plugin edited in
place keeps its version but not its hash. Code whose source cannot be read (a plugin defined in an
interactive ``__main__``, a compiled module) gets an identity unique to the process: its artifacts
are never reused by another run, rather than reused wrongly. Imports made by name at run time
(``importlib.import_module``) and other packages' code are not followed: use ``unmerge run --redo``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import sys
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

SOURCE_SUFFIX = ".py"
PROCESS_NONCE = uuid.uuid4().hex[:16]
"""Part of the identity of code without readable source: unique to this process."""


def _digest(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode())
        h.update(b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(f"<unreadable {PROCESS_NONCE}>".encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None


@lru_cache(maxsize=None)
def package_source_digest(top_level: str) -> str:
    """SHA-256 (16 hex digits) of every ``.py`` file of the importable package or module ``top_level``
    (every portion of a namespace package; symbolic links to folders followed, once each).

    The files are hashed in sorted order of their path relative to their portion, names included, so
    a renamed or removed file changes the digest too. A name without readable source gives an
    identity unique to this process (see the module docstring).
    """
    spec = _spec(top_level)
    if spec is None:
        return f"no-source-{PROCESS_NONCE}"
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots:
        if spec.origin is None or not str(spec.origin).endswith(SOURCE_SUFFIX):
            return f"no-source-{PROCESS_NONCE}"
        return _digest([(Path(spec.origin).name, Path(spec.origin))])
    files: list[tuple[str, Path]] = []
    for index, root in enumerate(roots):
        files += [(f"{index}/{rel}", path) for rel, path in _python_files(root)]
    return _digest(sorted(files))


def _python_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the ``.py`` files under ``root``, following links to folders once."""
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for directory, folders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(f for f in folders if f != "__pycache__")
        for name in files:
            if name.endswith(SOURCE_SUFFIX):
                path = Path(directory) / name
                out.append((path.relative_to(root).as_posix(), path))
    return out


def _imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return set()
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                if node.level - 1 > len(parts):
                    continue
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base:
                names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return names


@lru_cache(maxsize=None)
def module_closure_digest(module: str) -> str:
    """SHA-256 (16 hex digits) of ``module``'s source and of every module of its top-level package it
    imports, transitively (with the ``__init__`` of every package on the way)."""
    top = module.partition(".")[0]
    stack, seen = [module], set()
    files: list[tuple[str, Path]] = []
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        spec = _spec(name)
        if spec is None:
            continue
        parts = name.split(".")
        stack += [".".join(parts[:i]) for i in range(1, len(parts))]  # packages run their __init__ first
        origin = spec.origin
        if origin is None or not str(origin).endswith(SOURCE_SUFFIX):
            if spec.submodule_search_locations:  # a namespace package: nothing of its own to run
                continue
            return f"no-source-{PROCESS_NONCE}"
        path = Path(origin)
        files.append((name, path))
        stack += [n for n in _imported_names(path, name, path.name == "__init__.py") if n.partition(".")[0] == top]
    if not files:
        return f"no-source-{PROCESS_NONCE}"
    return _digest(sorted(files))


def defining_module(obj: Any) -> str:
    """The module that defines ``obj`` (a function, class, instance or ``functools.partial``)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        module = type(obj).__module__
    return module


def top_level_package(obj: Any) -> str:
    """The top-level package that defines ``obj``."""
    return defining_module(obj).partition(".")[0]


def source_identity(obj: Any) -> str:
    """:func:`module_closure_digest` of the module defining ``obj`` (``__main__`` without a file, or
    code without source: unique to the process)."""
    module = defining_module(obj)
    main = sys.modules.get(module)
    if module == "__main__" and not getattr(main, "__file__", None):
        return f"no-source-{PROCESS_NONCE}"
    if module == "__main__":
        return _digest([("__main__", Path(main.__file__))])  # type: ignore[union-attr, arg-type]
    return module_closure_digest(module)


def code_identity(factory: Any, distribution: str, version: str, *, with_core: bool = True) -> dict[str, str]:
    """What identifies the code of a plugin whose factory is ``factory`` (see the module docstring);
    ``with_core = False`` for trainers."""
    out = {"distribution": distribution, "version": version, "module": defining_module(factory),
           "source": source_identity(factory)}
    if with_core:
        out["core"] = package_source_digest("unmerge_core")
    return out


def core_identity() -> dict[str, str]:
    """What identifies the host's own code, for artifacts the core makes without a plugin (a target
    read from a model's files)."""
    from unmerge_core import __version__

    return {"unmerge": __version__, "core": package_source_digest("unmerge_core")}
