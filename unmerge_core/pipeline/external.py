"""A manifest's ``[[targets]]``: existing models or adapters decomposed beside the generated targets.

Targets without ``truth`` get the group ``external`` (metrics treat it as "no ground truth"); with
truth, ``known`` / ``mixed`` / ``unknown``. The method column holds the kind (``model`` or
``adapter``). Each target's masked ΔW is cached in the run's store, keyed by the files' sizes and
modification times, the base's, the mask and the core's code; the attribution report (``attribution.*``) is written
to the run directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unmerge_core.config.manifest import Manifest
from unmerge_core.config.targets import Truth, detect_kind, manifest_model, truth_group
from unmerge_core.io.checkpoints import Checkpoint
from unmerge_core.io.code import core_identity
from unmerge_core.io.gguf import model_source
from unmerge_core.io.masks import mask_digest
from unmerge_core.io.store import (
    ArtifactStore,
    atomic_save_tensors,
    atomic_write_json,
    content_key,
    derive_seed,
    load_tensors,
)
from unmerge_core.io.target_reader import TargetReader
from unmerge_core.pipeline.scoring import Scored, ScoreLoop, ScoreTarget
from unmerge_core.report.attribution import (
    DEFAULT_OOD_THRESHOLD,
    DEFAULT_SUPPORT_THRESHOLD,
    TargetReport,
    attribution_from,
    write_report,
)
from unmerge_core.types import Mask, MergeJob


def score_external_targets(manifest: Manifest, loop: ScoreLoop, mask: Mask, store: ArtifactStore, run_dir: Path,
                           warn: Callable[[str], None], redo: bool = False) -> list[Scored]:
    """Decompose and score a manifest's ``[[targets]]`` with the run's loop; write ``attribution.*``.

    ``redo`` reads each target's files again instead of its cached vector (``unmerge run --redo merger``).

    Returns the scored (target, decomposer) pairs, for the run's result table.
    """
    refs = list(manifest.file.targets)
    if not refs:
        return []
    # a GGUF base or target is read from its dequantized folder, converted once into the manifest's store
    base_path = (model_source(manifest_model(manifest.path, manifest.file.base, "base"), manifest.store_dir,
                              f"{manifest.path}: base:") if manifest.file.base else None)
    reader = TargetReader(mask, Checkpoint(base_path, name="base") if base_path is not None else None)
    digest = mask_digest(mask)
    targets: list[ScoreTarget] = []
    reports: list[TargetReport] = []
    for i, ref in enumerate(refs):
        path = model_source(manifest_model(manifest.path, ref.path, f"targets[{i}].path"), manifest.store_dir,
                            f"{manifest.path}: targets[{i}].path:")
        name = ref.display_name
        kind = detect_kind(path, ref.kind)
        key = content_key("external", kind, str(path.resolve()), _signature(path),
                          None if base_path is None or kind == "adapter" else _signature(base_path), digest,
                          core_identity())
        if redo:
            store.discard("external", key)
        vector, warnings = _cached_vector(store, key, reader, path, kind, name)
        for w in warnings:
            warn(w)
        truth = Truth.from_spec(ref.truth, "manifest") if ref.truth is not None else None
        group = truth_group(truth, loop.atom_names)
        spec = MergeJob(name, kind, truth.tasks if truth else (), truth.weights if truth else (),
                        derive_seed(manifest.seed, "target", name), group)
        targets.append(ScoreTarget(spec, vector, key))
        reports.append(TargetReport(name, path, kind, group, truth, list(warnings)))
    by_name = {r.name: r for r in reports}
    scored = loop.score(loop.decompose(targets, desc="decompose [[targets]]"), desc="metrics [[targets]]")
    for item in scored:
        by_name[item.spec.target_id].attributions.append(attribution_from(item))
    meta = {"base": None if base_path is None else str(base_path), "manifest": str(manifest.path),
            "mask": {"masker": manifest.masker.label, "modules": len(mask.indices), "coordinates": mask.size},
            "decomposers": [d.config() for d in manifest.decomposers],
            "options": {"support_threshold": DEFAULT_SUPPORT_THRESHOLD, "ood_threshold": DEFAULT_OOD_THRESHOLD}}
    write_report(run_dir, reports, loop.atom_names, meta, [])
    return scored


def _cached_vector(store: ArtifactStore, key: str, reader: TargetReader, path: Path, kind: str,
                   name: str) -> tuple[np.ndarray, list[str]]:
    def build(tmp: Path) -> None:
        vector, target_warnings = reader.vector(path, kind, name)
        atomic_save_tensors(tmp / "target.safetensors", {"vector": vector})
        atomic_write_json(tmp / "target.json", {"name": name, "path": str(path), "kind": kind,
                                                "warnings": target_warnings})

    directory = store.produce("external", key, build, {"target": name})
    meta = json.loads((directory / "target.json").read_text())
    return load_tensors(directory / "target.safetensors")["vector"].numpy(), list(meta["warnings"])


def _signature(path: Path) -> list[tuple[str, int, int]]:
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
