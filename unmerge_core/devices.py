"""Where the heavy tensor work of a plugin runs: ``device = "auto" | "cpu" | "cuda"``.

Plugins whose work is dense tensor algebra (the masker's ΔW formation and top-k, the merge
statistics, the factored SVD merges) take a ``device`` parameter by subclassing
:class:`DeviceParams` and call :func:`resolve_device` when they work:

- ``"cpu"``: the CPU code path (streamed in cache-sized row blocks);
- ``"cuda"``: the current CUDA device; refused when the manifest is validated if this machine has
  no CUDA (one line naming the plugin's ``device`` field);
- ``"auto"`` (default): CUDA when torch sees one, else the CPU.

Results on CUDA equal the CPU's to float32 rounding (the two BLAS libraries sum a rank-r product
in different orders): top-k sets and k-th values agree except where entries lie within that rounding
of the k-th value. ``"auto"`` and ``"cpu"`` therefore share cache keys (the parameter is left out of
the plugin's configuration); an explicit ``"cuda"`` keeps its own.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_serializer

from unmerge_core.types import PluginParams

DeviceName = Literal["auto", "cpu", "cuda"]


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (a CPU build of torch never does)."""
    return bool(torch.cuda.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` setting (``"auto"``: CUDA when present, else the CPU)."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not cuda_available():
            raise ValueError(no_cuda_message())
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    raise ValueError(f"device {name!r} is not one of auto, cpu, cuda")


def no_cuda_message() -> str:
    build = torch.__version__
    return (f"device 'cuda' was asked for, but torch {build} sees no CUDA device on this machine; "
            "use 'auto' (CUDA when present) or 'cpu'")


class DeviceParams(PluginParams):
    """Parameters of a plugin that can run its tensor work on a GPU (see the module docstring)."""

    device: DeviceName = Field("auto", description="where ΔW is formed and selected: auto (CUDA when present), "
                                                   "cpu or cuda")

    @field_validator("device")
    @classmethod
    def _device_present(cls, value: str) -> str:
        if value == "cuda" and not cuda_available():
            raise ValueError(no_cuda_message())
        return value

    @model_serializer(mode="wrap")
    def _dump_device(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("device") in ("auto", "cpu"):  # an execution choice: same cache keys as before the option
            data.pop("device")
        return data

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)
