"""Errors that reach the user as one line, never as a traceback."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


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


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing file or invalid TOML is a one-line :class:`UnmergeError`."""
    if not path.is_file():
        raise UnmergeError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UnmergeError(f"{path}: invalid TOML: {exc}") from None
