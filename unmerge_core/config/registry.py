"""The micro-task catalogue (``registry.toml``).

Each ``[tasks.<name>]`` table gives a category and a ``source`` table. The core only checks the shape;
what a source means (a procedural generator, a Hugging Face dataset, a local JSONL file) is for the
trainer plugins that read the data. ``[plugins.<name>]`` tables list first-party plugins that
``unmerge plugins --available`` shows.

The repository's ``registry.toml`` is also shipped inside the package (``unmerge_core/registry.toml``,
package data): :func:`packaged_registry` finds it wherever unmerge is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from unmerge_core.errors import UnmergeError, read_toml
from unmerge_core.manager import format_validation_error
from unmerge_core.types import TaskInfo

Category = Literal["code", "structured", "reasoning", "style", "other"]


class SourceEntry(BaseModel):
    """Where a task's examples come from; ``kind`` selects the loader, other keys are its options."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["procedural", "hf", "jsonl"]


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: Category
    description: str = ""
    source: SourceEntry


class AvailablePlugin(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal["trainer", "merger", "masker", "decomposer", "metric"]
    distribution: str
    summary: str = ""


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: dict[str, TaskEntry]
    plugins: dict[str, AvailablePlugin] = {}


class Registry:
    """Loaded registry with task lookup."""

    def __init__(self, path: Path, data: RegistryFile) -> None:
        self.path = path
        self.data = data

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        path = Path(path)
        raw = read_toml(path, "registry file")
        try:
            data = RegistryFile.model_validate(raw)
        except ValidationError as exc:
            raise UnmergeError(format_validation_error(exc, prefix=f"{path}:")) from None
        return cls(path, data)

    @property
    def task_names(self) -> list[str]:
        return list(self.data.tasks)

    def task(self, name: str) -> TaskInfo:
        entry = self.data.tasks[name]
        source: dict[str, Any] = entry.source.model_dump()
        if source.get("kind") == "jsonl" and "path" in source:
            # Relative JSONL paths are relative to the registry file.
            p = Path(source["path"])
            source["path"] = str(p if p.is_absolute() else (self.path.parent / p).resolve())
        return TaskInfo(name=name, category=entry.category, source=source, description=entry.description)


def packaged_registry() -> Path | None:
    """The ``registry.toml`` shipped with the package (the repository's, as package data), or ``None``
    when the installation lacks it."""
    from importlib.resources import files

    try:
        shipped = files("unmerge_core") / "registry.toml"
        return Path(str(shipped)) if shipped.is_file() else None
    except (OSError, TypeError, ModuleNotFoundError):
        return None


def nearest_registry(start: Path) -> Path | None:
    """``registry.toml`` in ``start`` or the nearest folder above it, or ``None``."""
    start = start.resolve()
    for parent in [start, *start.parents]:
        if (parent / "registry.toml").is_file():
            return parent / "registry.toml"
    return None
