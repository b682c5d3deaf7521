"""Errors that reach the user as one line, never as a traceback, and the readers of user files."""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class UnmergeError(Exception):
    """A mistake in the user's input (manifest, registry, paths, plugin choice).

    The CLI prints ``error: <message>`` and exits with status 2; no traceback is shown.
    Messages name the file, the field path and what is allowed, so one line is enough.
    """


class PluginError(UnmergeError):
    """A plugin misbehaved at run time (raised, returned the wrong shape, returned NaN).

    The message always names the plugin and the stage it was running in.
    """

    def __init__(self, stage: str, plugin: str, message: str) -> None:
        super().__init__(f"{stage} plugin '{plugin}': {message}")
        self.stage = stage
        self.plugin = plugin
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: raised in a worker, re-raised by the driver
        return (type(self), (self.stage, self.plugin, self.message))


def format_validation_error(exc: ValidationError, *, prefix: str = "", plugin: Any = None) -> str:
    """One line per pydantic error: ``<prefix>.<field path>: <message> (got <short value>)``.

    Errors of a union's branches are folded: a branch the value is not even the type of is dropped
    when another branch got further, the branch names are removed from the path, and when no branch
    fits at all one line lists what was expected.
    """
    lines = []
    for loc, err in _fold_unions(exc.errors()):
        loc_text = _location(loc)
        sep = " " if prefix.endswith(":") else "."
        path = sep.join(p for p in (prefix, loc_text) if p)
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            allowed = ""
            if plugin is not None and len(loc) == 1:
                fields = ", ".join(f.alias or name for name, f in plugin.params.model_fields.items())
                allowed = f"; {plugin.stage.value} plugin '{plugin.name}' accepts: {fields or '(no parameters)'}"
            msg = f"unknown field{allowed}"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {short_repr(err['input'])})"
        lines.append(f"{path or '(top level)'}: {_one_line(msg)}")
    return "\n".join(dict.fromkeys(lines))


def _one_line(text: str) -> str:
    """A message with its line breaks and other control characters escaped: a user's value quoted in
    it (a duplicated task name with a newline, say) can never split one error over two lines."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _location(loc: tuple[Any, ...]) -> str:
    """``a.b[0].c``, quoting keys that are not plain names (so a key can never break the line)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):  # not match: "$" allows a final newline
            out += f".{part}" if out else part
        else:
            out += f"[{short_repr(part, 30)}]"
    return out


_BRANCH_TAG = re.compile(r"^(str|int|float|bool|bytes|none|list\[.*\]|dict\[.*\]|tuple\[.*\]|set\[.*\]|"
                         r"function-\w+\[.*\]|constrained-\w+|literal\[.*\]|[A-Z]\w*)$")
_TYPE_ERRORS = {"string_type", "int_type", "int_parsing", "float_type", "float_parsing", "bool_type", "bool_parsing",
                "model_type", "dict_type", "list_type", "tuple_type", "model_attributes_type", "literal_error",
                "is_instance_of", "none_required", "bytes_type", "int_from_float"}


def _fold_unions(errors: list[Any]) -> list[tuple[tuple[Any, ...], Any]]:
    """``(location without union branch names, error)`` pairs, keeping the informative branches."""
    out: list[tuple[tuple[Any, ...], Any]] = []
    groups: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
    for err in errors:
        loc = tuple(err["loc"])
        tags = [i for i, part in enumerate(loc) if isinstance(part, str) and _BRANCH_TAG.match(part)]
        if not tags:
            out.append((loc, err))
            continue
        i = tags[0]
        groups.setdefault(loc[:i], []).append((i, err))
    for prefix, members in groups.items():
        branches = {err["loc"][i] for i, err in members}
        if len(branches) < 2:  # a field or model named like a type, not a union: keep as it is
            out.extend((tuple(err["loc"]), err) for _, err in members)
            continue
        deeper = [(i, err) for i, err in members
                  if not (len(err["loc"]) == i + 1 and err["type"] in _TYPE_ERRORS)]
        if deeper:
            for i, err in deeper:
                out.append((prefix + tuple(err["loc"][i + 1:]), err))
        else:
            first = members[0][1]
            expected = " or ".join(sorted(str(b) for b in branches))
            out.append((prefix, {**first, "type": "union", "msg": f"expected {expected}"}))
    return out


def choose_one_of(value: Any, options: Any, limit: int = 16) -> str:
    """``"did you mean 'x'? choose one of: a, b, … (N in all)"``: the end of an "unknown name" error."""
    import difflib

    names = [str(o) for o in options]
    if not names:
        return "none is available"
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    shown = ", ".join(names[:limit])
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return f"{hint}choose one of: {shown}{more}"


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a user's value in a one-line error)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_DISK_FULL_TEXT = {"no space left on device": "no space left on device", "os error 28": "no space left on device",
                   "storagefull": "no space left on device", "disk quota exceeded": "disk quota exceeded"}
_WRITERS = {"atomic_write_bytes": "data", "atomic_save_tensors": "as_torch"}
"""The store's writers (unmerge_core.io.store) and the local holding what each writes: every artifact and
report goes through one of them."""


def disk_full_line(exc: BaseException) -> str | None:
    """The one line for an error that is a full disk or an exceeded quota (ENOSPC, EDQUOT, or a library's
    error saying so, such as safetensors' "No space left on device (os error 28)"), else ``None``.

    It names the file being written and how many bytes it needed, when the write went through one of the
    store's writers (read from the traceback: the writers stay plain functions), or the ``OSError``'s file
    name, and says how much space is free there.
    """
    what = None
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and what is None:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL_ERRNOS:
            what = _DISK_FULL_ERRNOS[cause.errno]
        else:
            text = str(cause).lower()
            what = next((v for k, v in _DISK_FULL_TEXT.items() if k in text), None)
        if what is None:
            cause = cause.__cause__ or cause.__context__
    if what is None or cause is None:
        return None
    path, size = _failed_write(exc)
    if path is None and isinstance(cause, OSError) and cause.filename:
        path = Path(os.fsdecode(cause.filename))
    where = f" writing {path}" if path is not None else ""
    details = []
    if size is not None:
        details.append(f"it needed {_bytes(size)}")
    if path is not None and (free := _free_bytes(path)) is not None:
        details.append(f"{_bytes(free)} free there")
    detail = f" ({', '.join(details)})" if details else ""
    return (f"{what}{where}{detail}: free some space (or point output.dir / output.store / --output-dir "
            "elsewhere) and run again; finished artifacts are kept and reused")


def _failed_write(exc: BaseException) -> tuple[Path | None, int | None]:
    """The file and byte count of the innermost store writer on ``exc``'s traceback, if any."""
    tb = exc.__traceback__
    found: tuple[Path | None, int | None] = (None, None)
    while tb is not None:
        frame = tb.tb_frame
        local = _WRITERS.get(frame.f_code.co_name)
        if local is not None and frame.f_globals.get("__name__") == "unmerge_core.io.store":
            path, data = frame.f_locals.get("path"), frame.f_locals.get(local)
            size = None
            if isinstance(data, (bytes, bytearray, memoryview)):
                size = len(data)
            elif isinstance(data, dict):
                size = sum(int(t.numel()) * int(t.element_size()) for t in data.values()
                           if hasattr(t, "numel") and hasattr(t, "element_size"))
            found = (Path(path) if isinstance(path, (str, Path)) else None, size)
        tb = tb.tb_next
    return found


def _free_bytes(path: Path) -> int | None:
    import shutil

    current = Path(os.path.abspath(path))
    while not os.path.exists(current) and current.parent != current:
        current = current.parent
    try:
        return shutil.disk_usage(current).free
    except OSError:
        return None


def _bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} bytes"  # pragma: no cover



_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
         (b"\xfe\xff", "UTF-16"))


def read_text(path: Path, what: str) -> str:
    """A user's text file as ``str``: UTF-8, with or without a byte-order mark.

    A missing file, a directory, a file in another encoding (UTF-16 and UTF-32 are named) or a
    binary file is a one-line :class:`UnmergeError` naming the file.
    """
    if not path.exists():
        raise UnmergeError(f"{what} not found: {path}")
    if not path.is_file():
        raise UnmergeError(f"{what} {path}: is a directory, not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnmergeError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            raise UnmergeError(f"{path}: the file is {encoding}-encoded; save it as UTF-8")
    if b"\x00" in data:
        raise UnmergeError(f"{path}: not a text file (it holds NUL bytes); {what}s are UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UnmergeError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                           f"save the {what} as UTF-8") from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing, unreadable, non-UTF-8 or invalid file is a one-line :class:`UnmergeError`."""
    text = read_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UnmergeError(f"{path}: invalid TOML: {exc}") from None


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file written by a user or a third party; every failure is one line naming the file."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UnmergeError(f"{path}: invalid JSON: {exc}") from None


class _PluginExit(BaseException):
    """``os._exit(code)`` called by plugin code (raised instead, see :func:`plugin_errors`)."""

    def __init__(self, code: Any) -> None:
        super().__init__(code)
        self.code = code


_real_exit = os._exit
_guard_lock = threading.Lock()
_guard_users = 0
_in_plugin = threading.local()


def _guarded_exit(code: Any) -> None:
    """``os._exit`` while a plugin call runs: in the plugin's own thread and process it raises
    :class:`_PluginExit` (a ``BaseException``: a plugin's ``except Exception`` does not swallow it);
    anywhere else (a child the plugin forked, another thread) it exits as ``os._exit`` does."""
    if getattr(_in_plugin, "pid", None) == os.getpid() and getattr(_in_plugin, "depth", 0) > 0:
        raise _PluginExit(code)
    _real_exit(code)


@contextmanager
def _os_exit_guard() -> Iterator[None]:
    global _guard_users
    with _guard_lock:
        if _guard_users == 0:
            os._exit = _guarded_exit
        _guard_users += 1
    outer = (getattr(_in_plugin, "pid", None), getattr(_in_plugin, "depth", 0))
    _in_plugin.pid, _in_plugin.depth = os.getpid(), (outer[1] if outer[0] == os.getpid() else 0) + 1
    try:
        yield
    finally:
        _in_plugin.pid, _in_plugin.depth = outer
        with _guard_lock:
            _guard_users -= 1
            if _guard_users == 0:
                os._exit = _real_exit


@contextmanager
def plugin_errors(stage: str, label: str) -> Iterator[None]:
    """Turn anything escaping a plugin (an exception, ``sys.exit``, ``os._exit``) into a one-line
    :class:`PluginError`.

    A plugin's own :class:`UnmergeError` (a user mistake it detected) passes through unchanged;
    Ctrl-C stays Ctrl-C. ``os._exit`` would end the process at once with its status (0: "success"),
    nothing written and the run left "running"; in a Ray worker, Ray would rerun the unit as if the
    machine had failed. Within the block, called from the plugin's thread and process, it raises instead
    (a child process the plugin forks still exits with it).
    """
    try:
        with _os_exit_guard():
            yield
    except UnmergeError:
        raise
    except KeyboardInterrupt:
        raise
    except _PluginExit as exc:
        raise PluginError(stage, label, f"called os._exit({exc.code!r}); a plugin must return or raise") from None
    except SystemExit as exc:
        raise PluginError(stage, label, f"called sys.exit({exc.code!r}); a plugin must return or raise") from None
    except MemoryError:
        raise PluginError(stage, label, "ran out of memory") from None
    except Exception as exc:  # noqa: BLE001
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PluginError(stage, label, f"raised {type(exc).__name__}: {message}".rstrip(": ")) from exc
