"""Masker plugins: ``topk``."""

from __future__ import annotations

from unmerge_core import PluginSpec, Stage, hookimpl

from .topk import TopKMasker, TopKParams


@hookimpl
def unmerge_maskers() -> list[PluginSpec]:
    return [
        PluginSpec("topk", Stage.MASKER, "Top-k coordinates per module of max/mean/l2 |ΔW| over the dictionary",
                   "https://arxiv.org/abs/2106.09685", TopKParams, TopKMasker),
    ]
