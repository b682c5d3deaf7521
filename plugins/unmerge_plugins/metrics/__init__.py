"""Metric plugins: ``support``, ``reconstruction``, ``semantic-alignment``."""

from __future__ import annotations

from unmerge_core import NoParams, PluginSpec, Stage, hookimpl

from .attribution import AlignmentMetrics, ReconstructionMetric, SupportMetrics, SupportParams

PROPOSAL = "https://arxiv.org/abs/2212.04089"


@hookimpl
def unmerge_metrics() -> list[PluginSpec]:
    return [
        PluginSpec("support", Stage.METRIC,
                   "Component precision/recall/F1, perfect match, sparsity, coefficient error, OOD flag",
                   PROPOSAL, SupportParams, SupportMetrics),
        PluginSpec("reconstruction", Stage.METRIC, "Reconstruction error 1 − max(0, cos)²",
                   PROPOSAL, NoParams, ReconstructionMetric),
        PluginSpec("semantic-alignment", Stage.METRIC,
                   "Cosine of out-of-dictionary constituents with the reconstruction and selected atoms",
                   PROPOSAL, SupportParams, AlignmentMetrics),
    ]
