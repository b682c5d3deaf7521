"""UNMERGE core: hook specifications, plugin manager, manifest, runner. It knows no algorithm."""

from .adapters import LoraAdapter
from .errors import PluginError, UnmergeError
from .hookspecs import hookimpl
from .types import (
    Decomposition,
    DecompositionProblem,
    Mask,
    MergeJob,
    NoParams,
    PluginParams,
    PluginSpec,
    Stage,
    TargetEvaluation,
    TaskInfo,
    TrainJob,
)

__version__ = "0.1.0"

__all__ = [
    "Decomposition",
    "DecompositionProblem",
    "LoraAdapter",
    "Mask",
    "MergeJob",
    "NoParams",
    "PluginError",
    "PluginParams",
    "PluginSpec",
    "Stage",
    "TargetEvaluation",
    "TaskInfo",
    "TrainJob",
    "UnmergeError",
    "hookimpl",
    "__version__",
]
