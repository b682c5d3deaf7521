"""``adapters``: use existing PEFT adapter directories instead of training."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

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
    paths: dict[str, str] = Field(default_factory=dict,
                                  description="task name -> adapter directory or Hub id owner/name[@revision]")
    root: str | None = Field(None, description="directory holding one sub-directory per task name")


class ExistingAdapters:
    def __init__(self, params: ExistingAdaptersParams) -> None:
        self.params = params

    def locate(self, task: str) -> Path:
        if task in self.params.paths:
            return resolve_model_ref(self.params.paths[task], f"trainer 'adapters': paths.{task}:")
        if self.params.root is not None and (Path(self.params.root) / task).is_dir():
            return Path(self.params.root) / task
        raise UnmergeError(
            f"trainer 'adapters': no adapter for task '{task}'; add it to trainer.params.paths "
            f"or put it in <root>/{task}"
        )

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
