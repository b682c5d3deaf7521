"""Errors that reach the user as one line, never as a traceback, and the readers of user files."""

from __future__ import annotations

import json
import re
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


@contextmanager
def plugin_errors(stage: str, label: str) -> Iterator[None]:
    """Turn anything escaping a plugin (an exception, ``sys.exit``) into a one-line :class:`PluginError`.

    A plugin's own :class:`UnmergeError` (a user mistake it detected) passes through unchanged;
    Ctrl-C stays Ctrl-C.
    """
    try:
        yield
    except UnmergeError:
        raise
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        raise PluginError(stage, label, f"called sys.exit({exc.code!r}); a plugin must return or raise") from None
    except MemoryError:
        raise PluginError(stage, label, "ran out of memory") from None
    except Exception as exc:  # noqa: BLE001
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PluginError(stage, label, f"raised {type(exc).__name__}: {message}".rstrip(": ")) from exc
