"""Per-target results and their aggregation.

Aggregation averages only defined values: a metric that is ``None`` for a target (precision with no
predicted atom, recall of an unknown-only target) does not count as zero; the summary reports the
mean over the targets where it is defined, and ``n`` counts the targets of the cell. Per-atom metric
columns (``name[atom]``, e.g. ``unique_share[pirate-style]``) are kept per target and never averaged.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tabulate import tabulate

from unmerge_core.types import Decomposition, MergeJob

UNDEFINED = "n/a"
VERDICTS = ("explained", "partly-explained", "not-explained")
"""explained: the attributed skills account for the target; partly-explained: known skills found plus a
remainder the dictionary cannot explain; not-explained: no known skill."""
DEFAULT_SUPPORT_THRESHOLD = 1e-3
DEFAULT_OOD_THRESHOLD = 0.5


def verdict_of(result: Decomposition, recon_error: float | None, *,
               support_threshold: float = DEFAULT_SUPPORT_THRESHOLD,
               ood_threshold: float = DEFAULT_OOD_THRESHOLD) -> tuple[str, str] | None:
    """``(verdict, rule)`` of a decomposition: the decomposer's ``info["verdict"]`` (one of :data:`VERDICTS`),
    else from its ``out_of_dictionary``, else the fallback rule ``recon_error > ood_threshold``;
    ``None`` without any of them. ``not-explained`` when nothing is attributed, ``partly-explained``
    when something is but the target is not in the dictionary."""
    if result.info.get("verdict") in VERDICTS:
        return str(result.info["verdict"]), "decomposer"
    any_selected = bool(result.selected(support_threshold).any())
    if result.out_of_dictionary is not None:
        ood, rule = bool(result.out_of_dictionary), "decomposer"
    elif recon_error is not None:
        ood = recon_error > ood_threshold
        rule = f"fallback: recon_error {'>' if ood else '≤'} {ood_threshold:g}"
    else:
        return None
    return ("explained" if not ood else ("partly-explained" if any_selected else "not-explained")), rule


def is_per_atom(column: str) -> bool:
    """Whether a metric column holds one atom's value (``name[atom]``)."""
    return column.endswith("]") and "[" in column
PREFERRED_ORDER = ("precision", "recall", "f1", "perfect_match", "rank_auc", "sparsity", "recon_error", "coef_mae",
                   "ood_flag", "explained", "partly_explained", "not_explained", "alignment_recon", "alignment_atoms", "category_match")


@dataclass
class ResultRow:
    """One (target, decomposer) result: the target's specification, the decomposition, the metrics.

    The decomposition is the compact one a run keeps (coefficients, support, verdict, info): its
    ``reconstruction`` is empty when it was exactly ``D @ c`` (recompute it from the dictionary).
    """

    decomposer: str
    target: MergeJob
    decomposition: Decomposition
    metrics: dict[str, float | None]

    @property
    def target_id(self) -> str:
        return self.target.target_id

    @property
    def group(self) -> str:
        return self.target.group

    @property
    def method(self) -> str:
        return self.target.method

    @property
    def true_tasks(self) -> tuple[str, ...]:
        return self.target.tasks

    @property
    def true_weights(self) -> tuple[float, ...]:
        return self.target.true_weights

    @property
    def coefficients(self) -> list[float]:
        return [float(c) for c in self.decomposition.coefficients]

    def as_dict(self) -> dict[str, Any]:
        """The ``per_target.json`` record."""
        d = self.decomposition
        return {"decomposer": self.decomposer, "target_id": self.target_id, "group": self.group,
                "method": self.method, "true_tasks": list(self.true_tasks), "true_weights": list(self.true_weights),
                "coefficients": self.coefficients,
                "support": None if d.support is None else [bool(x) for x in d.support],
                "claims": d.claim_levels(),
                "out_of_dictionary": d.out_of_dictionary, "metrics": self.metrics, "info": d.info}


@dataclass
class ResultTable:
    atom_names: tuple[str, ...]
    rows: list[ResultRow] = field(default_factory=list)

    def add(self, decomposer: str, spec: MergeJob, result: Decomposition, metrics: dict[str, float | None]) -> None:
        self.rows.append(ResultRow(decomposer, spec, result, metrics))

    @property
    def metric_names(self) -> list[str]:
        """Every metric column, scalar columns in the preferred order first, per-atom columns last."""
        names: dict[str, None] = {}  # insertion-ordered set: one pass over the rows
        for row in self.rows:
            names.update(dict.fromkeys(row.metrics))
        ordered = [m for m in PREFERRED_ORDER if m in names]
        return ordered + [m for m in names if m not in ordered]

    @property
    def summary_metric_names(self) -> list[str]:
        """The columns a summary averages: every scalar column (per-atom ``name[atom]`` ones excluded)."""
        return [m for m in self.metric_names if not is_per_atom(m)]

    def summary(self, keys: Sequence[str] = ("decomposer", "group", "method")) -> list[dict[str, Any]]:
        """Mean of each metric over the targets where it is defined, per combination of ``keys``."""
        cells: dict[tuple[Any, ...], list[ResultRow]] = defaultdict(list)
        for row in self.rows:
            cells[tuple(getattr(row, k) for k in keys)].append(row)
        out = []
        columns = self.summary_metric_names  # once: it scans every row
        for cell_key, rows in cells.items():
            record: dict[str, Any] = dict(zip(keys, cell_key))
            record["n"] = len(rows)
            for metric in columns:
                values = [r.metrics.get(metric) for r in rows]
                defined = [v for v in values if v is not None and not math.isnan(v)]
                record[metric] = float(np.mean(defined)) if defined else None
            out.append(record)
        return out


GLOSSARY = {
    "decomposer": "the decomposition method",
    "group": "known (all constituents in the dictionary), mixed, unknown (none in it) or external",
    "method": "the merge method that made the targets",
    "n": "how many targets the row averages",
    "precision": "share of the attributed skills that are constituents",
    "recall": "share of the constituents in the dictionary that are attributed",
    "f1": "harmonic mean of precision and recall",
    "perfect_match": "share of targets whose attributed skills are exactly their constituents",
    "rank_auc": "chance a constituent scores above an absent skill (0.5: chance, 1: perfect)",
    "sparsity": "number of skills attributed",
    "recon_error": "share of the target's change the attributed skills leave unexplained (1 − cos²)",
    "coef_mae": "mean absolute error of the skills' coefficients against the merge weights",
    "ood_flag": "share of targets the decomposer flags as partly or wholly outside the dictionary",
    "explained": "share of targets whose verdict is explained (the skills account for it)",
    "partly_explained": "share of targets with known skills plus a remainder the dictionary leaves",
    "not_explained": "share of targets in which no dictionary skill is found",
    "layer_consistency": "share of layers that agree with the attributed skills",
    "unique_share_min": "smallest share of the target's energy lost by leaving one attributed skill out",
    "alignment_recon": "semantic alignment of the reconstruction with the target",
    "alignment_atoms": "semantic alignment of the attributed atoms with the constituents",
    "category_match": "share of attributed atoms whose category is a constituent's",
    "causal_confirmed": "share of attributed skills whose removal from the target hurt their task",
    "causal_refuted": "share of attributed skills whose removal did not hurt their task",
    "causal_inconclusive": "share of attributed skills whose removal gave no clear answer",
    "causal_not_performed": "share of attributed skills the target does not do better than the base",
    "causal_n_attributed": "attributed skills checked causally (denominator of the four shares)",
    "causal_confirmed_performed": "share of the skills the target performs that were confirmed",
    "causal_n_performed": "attributed skills the target performs (denominator of the share above)",
    "causal_effect": "mean effect on its task of removing an attributed skill",
    "causal_control": "mean effect of removing a random direction instead (a control)",
    "causal_null_confirmed": "share of null controls confirmed (absent skills removed): should be 0",
    "causal_null_effect": "mean effect of removing an absent skill (a null control)",
    "causal_fn_cost": "mean loss of a constituent's task that the decomposition missed",
}
"""One line per known summary column, for the glossary that opens ``summary.md``."""


def glossary(columns: Sequence[str]) -> list[str]:
    """``- `column`: meaning`` for each known column of ``columns``, in their order."""
    out = [f"- `{c}`: {GLOSSARY[c]}" for c in columns if c in GLOSSARY]
    if any(c.startswith("recall_") for c in columns):
        out.append("- `recall_<source>`: recall over the constituents made from one training variant")
    return out


def format_table(records: list[dict[str, Any]], tablefmt: str = "simple") -> str:
    if not records:
        return "(no results)"
    headers = list(records[0])
    body = [[_fmt(r.get(h)) for h in headers] for r in records]
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def tight_table(rows: Sequence[Sequence[str]], headers: Sequence[str], tablefmt: str = "simple") -> str:
    """``tabulate`` with columns as wide as their widest cell or header word (tabulate pads each header
    by two more otherwise): what the screen tables use to fit 100 columns."""
    import tabulate as tabulate_module

    saved, tabulate_module.MIN_PADDING = tabulate_module.MIN_PADDING, 0
    try:
        return tabulate(rows, headers=list(headers), tablefmt=tablefmt, disable_numparse=True)
    finally:
        tabulate_module.MIN_PADDING = saved


def _fmt(value: Any) -> str:
    if value is None:
        return UNDEFINED
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _csv(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def per_target_records(table: ResultTable) -> list[dict[str, Any]]:
    records = []
    columns = table.metric_names  # once, not per row: it scans every row (quadratic at 4,608 rows)
    for row in table.rows:
        rec: dict[str, Any] = {
            "decomposer": row.decomposer, "target_id": row.target_id, "group": row.group, "method": row.method,
            "true_tasks": ";".join(row.true_tasks),
            "true_weights": ";".join(f"{w:.4g}" for w in row.true_weights),
        }
        rec.update({m: row.metrics.get(m) for m in columns})
        d = row.decomposition
        chosen = d.selected()
        rec.setdefault("support", ";".join(a for a, on in zip(table.atom_names, chosen) if on))
        verdict = verdict_of(d, row.metrics.get("recon_error"))
        rec.setdefault("verdict", "" if verdict is None else verdict[0])
        rec.update({f"coef[{a}]": c for a, c in zip(table.atom_names, row.coefficients)})
        records.append(rec)
    return records
