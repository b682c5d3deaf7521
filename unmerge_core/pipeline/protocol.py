"""Target specifications: which tasks, which weights, which merge method, for every target.

Deterministic from the manifest's seed. Each group gets ``targets_per_group`` targets, split evenly
over the merge methods; each target draws between ``min_tasks`` and ``max_tasks`` constituents (narrowed
to what its method takes, e.g. exactly 2 for slerp):
``known`` from the dictionary tasks, ``unknown`` from the others, ``mixed`` at least one of each.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from unmerge_core.config.manifest import Manifest
from unmerge_core.errors import plugin_errors
from unmerge_core.io.store import derive_seed
from unmerge_core.types import MergeJob, method_coefficients


def generate_targets(manifest: Manifest) -> list[MergeJob]:
    proto = manifest.protocol
    known = [t.name for t in manifest.known]
    unknown = [t.name for t in manifest.unknown]
    rng = np.random.default_rng(manifest.seed)
    per_method = proto.targets_per_group // len(proto.methods)
    specs: list[MergeJob] = []
    for group in proto.groups:
        for method in proto.methods:
            lo, hi = manifest.task_range(method)
            for i in range(per_method):
                tasks = _draw_tasks(rng, group, known, unknown, lo, hi)
                weights = _draw_weights(rng, len(tasks), proto.weights)
                target_id = f"{group}-{method}-{i:02d}"
                spec = MergeJob(
                    target_id=target_id,
                    group=group,
                    method=method,
                    tasks=tuple(tasks),
                    weights=tuple(weights),
                    seed=derive_seed(manifest.seed, "target", target_id),
                    sources=_sources(manifest, tasks),
                )
                specs.append(_with_coefficients(manifest, spec))
    return specs


def _with_coefficients(manifest: Manifest, spec: MergeJob) -> MergeJob:
    """``spec`` with its ground truth where its merger scales the weights (``lambda``, ``alpha``...)."""
    plugin = manifest.merger_for(spec.method)
    with plugin_errors("merger", plugin.label):
        coefficients = method_coefficients(plugin.instance(), spec)
    return spec if coefficients == spec.weights else replace(spec, coefficients=coefficients)


def _draw_tasks(
    rng: np.random.Generator, group: str, known: list[str], unknown: list[str], lo: int, hi: int
) -> list[str]:
    if group == "known":
        n = int(rng.integers(lo, min(hi, len(known)) + 1))
        return [known[i] for i in sorted(rng.choice(len(known), n, replace=False))]
    if group == "unknown":
        n = int(rng.integers(lo, min(hi, len(unknown)) + 1))
        return [unknown[i] for i in sorted(rng.choice(len(unknown), n, replace=False))]
    lo = max(lo, 2)
    n = int(rng.integers(lo, min(hi, len(known) + len(unknown)) + 1))
    n_unknown = int(rng.integers(max(1, n - len(known)), min(n - 1, len(unknown)) + 1))
    n_known = n - n_unknown
    chosen_known = [known[i] for i in sorted(rng.choice(len(known), n_known, replace=False))]
    chosen_unknown = [unknown[i] for i in sorted(rng.choice(len(unknown), n_unknown, replace=False))]
    return chosen_known + chosen_unknown


def _draw_weights(rng: np.random.Generator, n: int, scheme: str) -> list[float]:
    if scheme == "dirichlet":
        return [float(w) for w in rng.dirichlet(np.ones(n))]
    return [1.0 / n] * n


def _sources(manifest: Manifest, tasks: list[str]) -> tuple[str, ...]:
    """Which training each constituent uses (``protocol.constituents``); empty when all are the dictionary's."""
    sources = tuple(manifest.source_of(t) for t in tasks)
    return sources if any(sources) else ()
