"""Element-wise merge methods evaluated on the masked coordinates only.

Once each task vector's own sparsification is known, mergekit's linear, task arithmetic, TIES and
DARE methods are element-wise: the merged value at a coordinate depends only on the constituents'
values at that coordinate. This module evaluates them on the mask's coordinates from

- the constituents' values there (``values``: one float64 array per constituent), and
- for TIES, one magnitude threshold per (task, module), computed once from the dense module
  (:func:`magnitude_statistics`) and reused by every target that contains the task.

Each function mirrors ``mergekit.merge_methods.generalized_task_arithmetic.GeneralizedTaskArithmeticMerge``
(and ``mergekit.merge_methods.linear``) step by step; see the docstrings for the two places where the
fast form differs on purpose (ties at the TIES threshold, the DARE draw).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unmerge_core import LowRankDelta, content_key
from unmerge_plugins.lib.selection import (
    KthLargestAbsStream,
    kth_largest_abs,
    kth_largest_abs_streamed,
    kth_largest_abs_torch,
    magnitude_keep_count,
)

STREAM_ABOVE = 1 << 20  # entries: larger modules are streamed in row blocks, smaller ones formed densely

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class MaskedSettings:
    """The resolved mergekit parameters of one method (what ``merge_group`` reads)."""

    method: str
    density: float = 1.0
    normalize: bool = False
    rescale: bool = False
    lambda_: float = 1.0
    sparsification: str | None = None  # None, "magnitude" (TIES) or "random" (DARE)
    consensus: bool = False  # TIES sign election


def magnitude_statistics(delta: LowRankDelta | torch.Tensor, density: float,
                         device: torch.device | None = None) -> dict[str, float]:
    """Statistics of one task's module that TIES needs: its magnitude threshold for ``density``.

    Returns ``{"numel", "keep", "threshold"}``: mergekit keeps the ``keep`` largest ``|ΔW|``
    (``keep = max(1, int(density · numel))``); ``threshold`` is the ``keep``-th largest ``|ΔW|``
    (0 when everything is kept). A :class:`LowRankDelta` is streamed block of rows by block of rows
    (large modules) or formed densely (small ones); a tensor is used as it is. With a ``device``
    (a GPU), the whole module is formed there and the threshold is ``torch.kthvalue`` there.
    """
    numel = int(delta.numel())
    keep = magnitude_keep_count(density, numel)
    if keep >= numel or numel == 0:
        threshold = 0.0
    elif isinstance(delta, LowRankDelta) and device is not None:
        threshold = kth_largest_abs_torch(delta.dense_on(device), keep)
    elif isinstance(delta, LowRankDelta):
        if numel <= STREAM_ABOVE:
            threshold = kth_largest_abs(delta.dense(), keep)
        else:
            threshold = kth_largest_abs_streamed(delta.row_blocks, numel, keep, delta.sample())
    else:
        threshold = kth_largest_abs(delta, keep)
    return {"numel": float(numel), "keep": float(keep), "threshold": threshold}


class MagnitudeStatisticsStream:
    """:func:`magnitude_statistics` of a :class:`LowRankDelta` fed block of rows by block of rows
    (the core's shared pass over ΔW); the same numbers, so the same exact threshold."""

    def __init__(self, delta: LowRankDelta, density: float) -> None:
        self.delta = delta
        self.numel = int(delta.numel())
        self.keep = magnitude_keep_count(density, self.numel)
        trivial = self.keep >= self.numel or self.numel == 0
        self._stream = None if trivial else KthLargestAbsStream(self.numel, self.keep, delta.sample())

    def add(self, block: np.ndarray) -> None:
        if self._stream is not None:
            self._stream.add(block)

    def finish(self) -> dict[str, float]:
        threshold = 0.0
        if self._stream is not None:  # row_blocks again only if the bracket missed (the exact fallback)
            again = LowRankDelta(self.delta.a, self.delta.b, self.delta.scale)
            threshold = self._stream.result(again.row_blocks)
        return {"numel": float(self.numel), "keep": float(self.keep), "threshold": threshold}


def counter_uniform(key: int, flat_indices: np.ndarray) -> np.ndarray:
    """Uniform draws in ``[0, 1)`` for the given coordinates: output ``i`` of SplitMix64 seeded ``key``.

    A counter-based generator: the draw at a coordinate depends only on ``(key, coordinate)``, never
    on which other coordinates are drawn, so the masked fast path draws exactly what a dense
    evaluation of the same rule would draw at those coordinates.
    """
    idx = np.asarray(flat_indices, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (idx + np.uint64(1)) * _GOLDEN + np.uint64(key % 2**64)
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def dare_key(seed: int, module: str, task: str) -> int:
    """The 64-bit SplitMix64 key of one (target seed, module, constituent task) DARE draw."""
    return int(content_key("dare", seed, module, task), 16)


def dare_keep(seed: int, module: str, task: str, flat_indices: np.ndarray, density: float) -> np.ndarray:
    """Boolean keep-mask of DARE's random drop at the given coordinates (kept with probability ``density``)."""
    if density >= 1:
        return np.ones(len(flat_indices), dtype=bool)
    return counter_uniform(dare_key(seed, module, task), flat_indices) < density


def merge_values(settings: MaskedSettings, weights: Sequence[float], values: Sequence[np.ndarray],
                 *, thresholds: Sequence[float] | None = None, seed: int = 0, module: str = "",
                 tasks: Sequence[str] = (), flat_indices: np.ndarray | None = None) -> np.ndarray:
    """The merged task vector at the masked coordinates (float64).

    Args:
        settings: The method and its resolved parameters.
        weights: One merge weight per constituent.
        values: One array per constituent: its ΔW at the masked coordinates.
        thresholds: Per constituent, the TIES magnitude threshold of this module (``|ΔW| ≥ t`` is
            kept). mergekit keeps exactly ``keep`` entries by sort order; where several entries tie
            with the threshold the fast form keeps them all (only exact float ties differ).
        seed, module, tasks, flat_indices: Identify the DARE draw of each constituent
            (:func:`dare_keep`). Kept entries are rescaled by ``1 / density``; mergekit rescales by
            ``‖Δ‖₁ / ‖kept Δ‖₁`` of the whole module, which equals ``1 / density`` up to the
            sampling error of the drop (about ``1/√numel`` relative).
    """
    v = np.stack([np.asarray(x, dtype=np.float64) for x in values]) if len(values) else np.zeros((0, 0))
    w = np.asarray(weights, dtype=np.float64)
    if settings.method == "linear":
        mixed = (w[:, None] * v).sum(axis=0)
        return mixed / w.sum() if settings.normalize else mixed
    if settings.sparsification == "magnitude":
        if thresholds is None:
            raise ValueError(f"{settings.method} needs one magnitude threshold per constituent")
        t = np.asarray(thresholds, dtype=np.float64)[:, None]
        v = np.where(np.abs(v) >= t, v, 0.0)
    elif settings.sparsification == "random":
        if flat_indices is None:
            raise ValueError(f"{settings.method} needs the flat indices of the masked coordinates")
        keep = np.stack([dare_keep(seed, module, task, flat_indices, settings.density) for task in tasks])
        v = np.where(keep, v, 0.0)
        if settings.rescale and settings.density < 1:
            v = v / settings.density
    weighted = w[:, None] * v
    if settings.consensus:
        majority = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
        agree = np.sign(weighted) == majority
        mixed = np.where(agree, weighted, 0.0).sum(axis=0)
        divisor = (w[:, None] * agree).sum(axis=0)
        divisor[divisor == 0] = 1.0
    else:
        mixed = weighted.sum(axis=0)
        divisor = np.full_like(mixed, w.sum())
        divisor[np.abs(divisor) < 1e-8] = 1.0
    if settings.normalize:
        mixed = mixed / divisor
    if settings.lambda_ != 1:
        mixed = mixed * settings.lambda_
    return mixed


def settings_from_parameters(method: str, parameters: Mapping[str, object]) -> MaskedSettings:
    """Resolve a mergekit ``parameters`` mapping (as the merger builds it) with mergekit's defaults."""
    defaults = {  # method -> (sparsification, consensus, default normalize, default rescale)
        "linear": (None, False, True, False),
        "task_arithmetic": (None, False, False, False),
        "ties": ("magnitude", True, True, False),
        "dare_linear": ("random", False, False, True),
        "dare_ties": ("random", True, False, True),
    }
    if method not in defaults:
        raise KeyError(method)
    sparsification, consensus, normalize, rescale = defaults[method]
    return MaskedSettings(
        method=method,
        density=float(parameters.get("density", 1.0)),  # type: ignore[arg-type]
        normalize=bool(parameters.get("normalize", normalize)),
        rescale=bool(parameters.get("rescale", rescale)),
        lambda_=float(parameters.get("lambda", 1.0)),  # type: ignore[arg-type]
        sparsification=sparsification,
        consensus=consensus,
    )


MASKED_METHODS: frozenset[str] = frozenset({"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"})
STATISTICS_METHODS: frozenset[str] = frozenset({"ties"})
