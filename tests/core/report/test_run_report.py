"""What ``unmerge run`` leaves for a person: per_target.csv says each target's attributed atoms and
verdict, summary.md opens with what its columns mean."""

from __future__ import annotations

import csv
import io

import numpy as np

from unmerge_core import Decomposition, MergeJob
from unmerge_core.report.files import write_results
from unmerge_core.report.tables import GLOSSARY, ResultTable, per_target_records

ATOMS = ("a0", "a1", "a2")


def table() -> ResultTable:
    t = ResultTable(atom_names=ATOMS)
    spec = MergeJob("t0", "linear", ("a0", "a1"), (0.5, 0.5), 0, "known")
    metrics = {"precision": 1.0, "recall": None, "recon_error": 0.9, "sparsity": 2.0}
    t.add("skill-fdr", spec, Decomposition(np.array([0.5, 0.4, 0.0]), np.zeros(0),
                                          info={"verdict": "partly-explained"}), metrics)
    t.add("nnls", spec, Decomposition(np.array([0.5, 0.0, 0.0005]), np.zeros(0)), metrics)  # fallback: 0.9 > 0.5
    t.add("omp", spec, Decomposition(np.zeros(3), np.zeros(0), support=np.array([False, False, True]),
                                     out_of_dictionary=False), {"recon_error": 0.0})
    return t


def test_per_target_rows_say_the_attributed_atoms_and_the_verdict(tmp_path) -> None:
    records = per_target_records(table())
    assert [(r["support"], r["verdict"]) for r in records] == [
        ("a0;a1", "partly-explained"), ("a0", "partly-explained"), ("a2", "explained")]
    write_results(tmp_path, table(), plots=False)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "per_target.csv").read_text())))
    assert rows[0]["support"] == "a0;a1" and rows[0]["verdict"] == "partly-explained"


def test_summary_md_opens_with_a_glossary_of_its_columns(tmp_path) -> None:
    write_results(tmp_path, table(), title="demo", plots=False)
    md = (tmp_path / "summary.md").read_text()
    head = md[:md.index("## Per decomposer")]
    assert head.startswith("# UNMERGE results: demo\n\n## Columns\n")
    for column in ("decomposer", "group", "method", "n", "precision", "recall", "recon_error", "sparsity"):
        assert f"- `{column}`: {GLOSSARY[column]}" in head
    assert "causal_confirmed" not in head  # only the columns the summary has
    assert all(len(line) <= 100 for line in head.splitlines())


def test_every_glossary_line_fits_100_columns() -> None:
    assert all(len(f"- `{c}`: {text}") <= 100 for c, text in GLOSSARY.items())
