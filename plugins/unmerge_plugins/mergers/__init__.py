"""Merger plugins: ``mergekit``."""

from __future__ import annotations

from unmerge_core import PluginSpec, Stage, hookimpl

from .mergekit_merger import MergekitMerger, MergekitParams


@hookimpl
def unmerge_mergers() -> list[PluginSpec]:
    return [
        PluginSpec("mergekit", Stage.MERGER,
                   "mergekit's linear / TIES / DARE / task arithmetic on ΔW, module by module",
                   "https://github.com/arcee-ai/mergekit", MergekitParams, MergekitMerger),
    ]
