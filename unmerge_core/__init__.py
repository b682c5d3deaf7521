"""UNMERGE core: the plugin contract (hook specs, typed values, Protocols) and the orchestration that
runs plugins (manifest, runner, attribute command, reports). It knows no algorithm.

Everything a plugin may use is importable from this package; plugins never import its submodules
(a test enforces it), so the layout behind these names can change without breaking them.
"""

from unmerge_core.config.targets import mergekit_coefficients
from unmerge_core.devices import DeviceName, DeviceParams, cuda_available, resolve_device
from unmerge_core.errors import PluginError, UnmergeError, format_validation_error, read_json, read_text
from unmerge_core.hookspecs import hookimpl
from unmerge_core.io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, common_modules
from unmerge_core.io.gguf import dequantized_checkpoint, default_cache_root, model_source
from unmerge_core.io.hub import resolve_model_ref
from unmerge_core.io.lowrank import BLOCK_ROWS, LowRankDelta
from unmerge_core.io.model_info import ModelInfo, describe_model
from unmerge_core.io.store import (
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    content_key,
    derive_seed,
    file_lock,
    safe_filename,
    share_tree,
    temp_prefix,
)
from unmerge_core.pipeline.delta_pass import shared_pass
from unmerge_core.pipeline.parallel import BufferPool, blas_threads, thread_map, torch_threads
from unmerge_core.types import (
    BaseWeightMerger,
    Capability,
    Decomposer,
    Decomposition,
    DecompositionProblem,
    DictionaryGram,
    FoldingMasker,
    FoldPlan,
    LowRankMerger,
    Mask,
    MaskedMerger,
    Masker,
    MergeJob,
    Merger,
    Metric,
    MetricValue,
    ModuleFold,
    NoParams,
    PluginParams,
    PluginSpec,
    RunContext,
    Stage,
    StatisticsStream,
    StreamingStatisticsMerger,
    StrictNumbers,
    TargetEvaluation,
    TaskInfo,
    Trainer,
    TrainJob,
    method_coefficients,
    method_task_range,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BLOCK_ROWS",
    "BaseWeightMerger",
    "BufferPool",
    "Capability",
    "Decomposer",
    "Decomposition",
    "DeviceName",
    "DeviceParams",
    "DictionaryGram",
    "FoldPlan",
    "FoldingMasker",
    "DecompositionProblem",
    "LoraAdapter",
    "ModelInfo",
    "LowRankDelta",
    "LowRankMerger",
    "Mask",
    "MaskedMerger",
    "Masker",
    "MergeJob",
    "ModuleFold",
    "Merger",
    "Metric",
    "MetricValue",
    "NoParams",
    "PluginError",
    "PluginParams",
    "PluginSpec",
    "RunContext",
    "Stage",
    "StatisticsStream",
    "StreamingStatisticsMerger",
    "StrictNumbers",
    "TargetEvaluation",
    "TaskInfo",
    "TrainJob",
    "Trainer",
    "UnmergeError",
    "__version__",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "blas_threads",
    "common_modules",
    "cuda_available",
    "content_key",
    "default_cache_root",
    "dequantized_checkpoint",
    "derive_seed",
    "describe_model",
    "mergekit_coefficients",
    "method_coefficients",
    "method_task_range",
    "model_source",
    "file_lock",
    "format_validation_error",
    "hookimpl",
    "read_json",
    "read_text",
    "resolve_model_ref",
    "resolve_device",
    "safe_filename",
    "share_tree",
    "shared_pass",
    "temp_prefix",
    "thread_map",
    "torch_threads",
]
