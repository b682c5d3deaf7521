"""What ``unmerge run`` prints: the per-group table (the per-method one is in summary.md), fitting in
100 columns (issue 24, item 4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from unmerge_core import Decomposition, MergeJob
from unmerge_core.cli import SCREEN_WIDTH, main, screen_table
from unmerge_core.report.tables import ResultTable

METHODS = ("linear", "ties", "dare_linear", "task_arithmetic")
GROUPS = ("known", "mixed", "unknown")
DECOMPOSERS = ("paper-nnls", "nnls-select", "skill-fdr")


def quickstart_like_table() -> ResultTable:
    t = ResultTable(atom_names=("a", "b", "c"))
    metrics = {"precision": 0.8, "recall": 1.0, "f1": 0.9, "perfect_match": 0.5, "rank_auc": 0.9, "sparsity": 3.0,
               "recon_error": 0.19, "coef_mae": 0.03, "ood_flag": 0.0, "explained": 1.0, "partly_explained": 0.0,
               "not_explained": 0.0, "causal_confirmed": 0.81, "causal_null_confirmed": 0.0}
    for d in DECOMPOSERS:
        for g in GROUPS:
            for m in METHODS:
                for i in range(2):
                    spec = MergeJob(f"{g}-{m}-{i:02d}", m, ("a", "b"), (0.5, 0.5), i, g)
                    t.add(d, spec, Decomposition(np.array([0.5, 0.5, 0.0]), np.zeros(0)), dict(metrics))
    return t


@dataclass
class FakeRunner:
    manifest: object
    progress: object = None
    plots: bool = True
    redo: object = None
    timings: list = field(default_factory=list)

    def run(self):
        return SimpleNamespace(run_dir=Path("runs/fake"), table=quickstart_like_table(), timings=[], warnings=[])


def test_unmerge_run_prints_the_per_group_table_within_100_columns(monkeypatch, capsys) -> None:
    import unmerge_core.config.manifest as manifest_module
    import unmerge_core.pipeline.runner as runner_module

    fake = SimpleNamespace(name="fake", run_dir=Path("runs/fake"), file=SimpleNamespace(output=SimpleNamespace(dir="runs")))
    monkeypatch.setattr(manifest_module, "load_manifest", lambda path: fake)
    monkeypatch.setattr(runner_module, "Runner", lambda manifest, **kw: FakeRunner(manifest, **kw))
    assert main(["run", "m.toml", "--no-progress"]) == 0
    out = capsys.readouterr().out
    table = out[:out.index("\n(means")].splitlines()
    assert len(table) == 3 + len(DECOMPOSERS) * len(GROUPS)  # two header lines, the rule, a row per group
    assert not any(m in out for m in METHODS) and "method" not in table[0]
    assert all(len(line) <= SCREEN_WIDTH for line in out.splitlines() if "results written" not in line)
    assert "summary.md" in out  # where the per-method table is


def test_the_screen_table_keeps_the_important_columns_and_drops_from_the_right() -> None:
    records = quickstart_like_table().summary(("decomposer", "group"))
    text = screen_table(records)
    assert max(map(len, text.splitlines())) <= SCREEN_WIDTH
    header = " ".join(text.splitlines()[:2])
    for word in ("precision", "recall", "perfect", "sparsity", "recon", "explained", "causal"):
        assert word in header
    narrow = screen_table(records, width=60)
    assert max(map(len, narrow.splitlines())) <= 60 and "precision" in narrow and "causal" not in narrow
