"""``adapters``: use existing PEFT adapter directories instead of training."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from unmerge_core import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Capability,
    LoraAdapter,
    PluginParams,
    PluginSpec,
    Stage,
    TaskInfo,
    TrainJob,
    UnmergeError,
    resolve_model_ref,
)


class ExistingAdaptersParams(PluginParams):
    """Where the adapters are. In a manifest, a relative ``root`` or ``paths`` entry is read from the
    manifest's folder, like ``base`` and ``[[targets]] path`` (``~`` expanded); validation makes it
    absolute, so the plugin's configuration (and the run's cache keys) name the same adapters whatever
    the current directory. Outside a manifest (params built in code), relative paths are the caller's."""

    paths: dict[str, str] = Field(default_factory=dict,
                                  description="task name -> adapter directory (relative: to the manifest's folder) "
                                              "or Hub id owner/name[@revision]")
    root: str | None = Field(None, description="directory holding one sub-directory per task name "
                                               "(relative: to the manifest's folder)")
    _manifest_dir: Path | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _from_the_manifest_folder(cls, data: Any, info: ValidationInfo) -> Any:
        folder = _manifest_dir(info)
        if folder is None or not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("root"), str):
            data["root"] = str(folder / _expand(data["root"]))
        if isinstance(data.get("paths"), dict):
            data["paths"] = {task: _local_path(folder, value) if isinstance(value, str) else value
                             for task, value in data["paths"].items()}
        return data

    @model_validator(mode="after")
    def _remember_the_manifest_folder(self, info: ValidationInfo) -> ExistingAdaptersParams:
        self._manifest_dir = _manifest_dir(info)
        return self

    @property
    def manifest_dir(self) -> Path | None:
        """The folder of the manifest these params came from (``None`` outside a manifest)."""
        return self._manifest_dir


def _manifest_dir(info: ValidationInfo) -> Path | None:
    folder = (info.context or {}).get("manifest_dir")
    return Path(folder) if folder is not None else None


def _expand(value: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError:  # "~user" of no such user
        raise ValueError(f"{value!r}: cannot expand '~' (no such user or home directory)") from None


def _local_path(folder: Path, value: str) -> str:
    """``value`` from the manifest's folder when it is a local path there; a Hub id (or a path missing
    there, which could be one) is kept: :meth:`ExistingAdapters.locate` resolves it from the same folder."""
    path = _expand(value)
    if path.is_absolute():
        return value if not value.startswith("~") else str(path)
    candidate = folder / path
    return str(candidate) if candidate.exists() or value.startswith(".") else value


class ExistingAdapters:
    def __init__(self, params: ExistingAdaptersParams) -> None:
        self.params = params

    def locate(self, task: str) -> Path:
        params = self.params
        if task in params.paths:
            return resolve_model_ref(params.paths[task], f"trainer 'adapters': paths.{task}:",
                                     relative_to=params.manifest_dir)
        if params.root is None:
            raise UnmergeError(f"trainer 'adapters': no adapter for task '{task}'; add it to trainer.params.paths "
                               "or set trainer.params.root to a folder holding one sub-folder per task")
        root = Path(params.root).expanduser().absolute()
        if not root.is_dir():
            raise UnmergeError(f"trainer 'adapters': root: no such folder: {root}"
                               + (" (a relative root is read from the manifest's folder)"
                                  if params.manifest_dir is not None else ""))
        if not (root / task).is_dir():
            raise UnmergeError(f"trainer 'adapters': no adapter for task '{task}': not in trainer.params.paths "
                               f"and no folder {root / task}")
        return root / task

    def source_fingerprint(self, task: TaskInfo) -> list[Any]:
        """The adapter's files (path, size, modification time): replacing them remakes the run's copy."""
        source = self.locate(task.name).resolve()
        files = [source / ADAPTER_CONFIG, source / ADAPTER_WEIGHTS]
        return [str(source), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]]

    def train(self, job: TrainJob) -> None:
        source = self.locate(job.task.name)
        LoraAdapter(source, job.task.name)  # validates the directory with a clear message
        shutil.copyfile(source / ADAPTER_CONFIG, job.output_dir / ADAPTER_CONFIG)
        shutil.copyfile(source / ADAPTER_WEIGHTS, job.output_dir / ADAPTER_WEIGHTS)


SPEC = PluginSpec("adapters", Stage.TRAINER, "Use existing PEFT adapter directories (safetensors)",
                  "https://huggingface.co/docs/peft", ExistingAdaptersParams, ExistingAdapters,
                  provides=(Capability.BASE_MODEL,))
