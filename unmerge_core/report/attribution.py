"""The attribution report: per target and decomposer, the attributed atoms with their coefficient and
confidence, the reconstruction error and the verdict; written as ``attribution.json``, ``.md`` and ``.csv``.

Used by ``unmerge attribute`` and by a manifest's ``[[targets]]``. Every number comes from the
decomposition and the metric plugins (:func:`attribution_from`); this module only presents them:

- *attributed atoms*: the one support rule, :meth:`unmerge_core.Decomposition.selected`;
- *confidence* per atom: the decomposer's own when its ``info`` carries one (``confidence``, else
  ``1 − p_values``, else ``layer_consistency``), otherwise the ``unique-share`` metric's
  ``unique_share[<atom>]``;
- *reconstruction error*: the ``reconstruction`` metric's ``recon_error``;
- *verdict*: the decomposer's ``out_of_dictionary`` when it gives one, otherwise the fallback rule
  ``recon_error > ood_threshold``; the report says which rule produced it.
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unmerge_core.config.targets import Truth
from unmerge_core.io.store import atomic_write_json, atomic_write_text, to_jsonable
from unmerge_core.pipeline.scoring import Scored
from unmerge_core.report.tables import (
    DEFAULT_OOD_THRESHOLD,
    DEFAULT_SUPPORT_THRESHOLD,
    VERDICTS,
    tight_table,
    verdict_of,
)
from unmerge_core.types import CLAIMS

REPORT_METRICS = ("reconstruction", "unique-share")
"""The metric plugins the report reads (reconstruction error, confidence): always run for it."""
CONFIDENCE_METRIC = "unique_share"
"""Per-atom columns ``unique_share[<atom>]`` of the ``unique-share`` metric: the confidence fallback."""


UNIQUE_SOURCE = "unique-share metric"
"""``confidence_source`` when the decomposer states no confidence of its own (``confidence`` is then the
unique share)."""
CONFIDENCE_HEADERS = {"decomposer: 1 − p-value": "1−p", "decomposer: share of layers": "layers",
                      "decomposer: confidence": "own conf"}
"""The table's column for each kind of confidence a decomposer states itself: one meaning per column."""


CAUSAL_COLUMN = "causal_verdict"
"""Per-atom columns ``causal_verdict[<atom>]`` of ``causal-ablation``: 1 confirmed, 0 inconclusive, −1 refuted."""
PERFORMED_COLUMN = "causal_performed"
"""Per-atom columns ``causal_performed[<atom>]``: 1 when the target performs the skill better than the base,
0 when not (a 0 verdict then reads not-performed)."""


@dataclass
class AtomScore:
    """One dictionary atom in one decomposition."""

    name: str
    coefficient: float
    selected: bool
    confidence: float | None = None
    skill: str = ""
    causal: str | None = None  # confirmed / refuted / inconclusive / not-performed, when verified
    claim: str | None = None   # exact / retrained / relative (unmerge_core.CLAIMS), when attributed
    unique_share: float | None = None  # the unique-share metric's value, for every decomposer

    def __post_init__(self) -> None:
        self.skill = self.skill or self.name


@dataclass
class SkillScore:
    """One skill: the sum of its atoms' coefficients, attributed when any of its atoms is."""

    name: str
    coefficient: float
    confidence: float | None
    atoms: list[str]
    causal: str | None = None
    claim: str | None = None   # the strongest level among its attributed atoms
    unique_share: float | None = None  # the largest among its attributed atoms


@dataclass
class Attribution:
    """A decomposer's answer for one target, with the verdict and confidences of the report."""

    decomposer: str
    atoms: list[AtomScore]
    recon_error: float
    verdict: str
    verdict_rule: str
    confidence_source: str | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    remainder_share: float | None = None
    notes: list[str] = field(default_factory=list)
    claims_given: bool = True   # the decomposer states claim levels (else every attributed atom reads "exact")

    @property
    def out_of_dictionary(self) -> bool:
        """Whether part of the target (or all of it) is not made of dictionary skills."""
        return self.verdict != "explained"

    @property
    def attributed(self) -> list[AtomScore]:
        """The selected atoms, largest coefficient first."""
        return sorted((a for a in self.atoms if a.selected), key=lambda a: -a.coefficient)

    @property
    def skills(self) -> list[SkillScore]:
        """The attributed skills, largest coefficient first (one atom per skill unless grouped)."""
        out: dict[str, SkillScore] = {}
        for a in self.atoms:
            if not any(b.selected for b in self.atoms if b.skill == a.skill):
                continue
            score = out.setdefault(a.skill, SkillScore(a.skill, 0.0, None, []))
            score.coefficient += a.coefficient
            score.atoms.append(a.name)
            if a.selected and a.claim is not None:
                score.claim = a.claim if score.claim is None else min(score.claim, a.claim, key=CLAIMS.index)
            if a.selected and a.confidence is not None:
                score.confidence = max(score.confidence or 0.0, a.confidence)
            if a.selected and a.unique_share is not None:
                score.unique_share = max(score.unique_share or 0.0, a.unique_share)
            if a.selected and a.causal is not None:
                order = ("confirmed", "inconclusive", "not-performed", "refuted")
                score.causal = a.causal if score.causal is None else min(score.causal, a.causal, key=order.index)
        return sorted(out.values(), key=lambda s: -s.coefficient)

    def as_dict(self) -> dict[str, Any]:
        return {
            "decomposer": self.decomposer,
            "attributed": [{"atom": a.name, "skill": a.skill, "claim": a.claim, "coefficient": a.coefficient,
                            "confidence": a.confidence, "unique_share": a.unique_share, "causal": a.causal}
                           for a in self.attributed],
            "skills": [{"skill": s.name, "claim": s.claim, "coefficient": s.coefficient, "confidence": s.confidence,
                        "unique_share": s.unique_share, "atoms": s.atoms, "causal": s.causal} for s in self.skills],
            "coefficients": {a.name: a.coefficient for a in self.atoms},
            "confidence": {a.name: a.confidence for a in self.atoms if a.confidence is not None},
            "confidence_source": self.confidence_source,
            "support": [a.name for a in self.attributed],
            "recon_error": self.recon_error,
            "remainder_share": self.remainder_share,
            "out_of_dictionary": self.out_of_dictionary,
            "verdict": self.verdict,
            "verdict_rule": self.verdict_rule,
            "notes": self.notes,
            "metrics": self.metrics,
            "info": to_jsonable(self.info),
        }


@dataclass
class TargetReport:
    """Everything reported about one target."""

    name: str
    path: Path
    kind: str
    group: str
    truth: Truth | None
    warnings: list[str] = field(default_factory=list)
    attributions: list[Attribution] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        truth = None if self.truth is None else {
            "tasks": list(self.truth.tasks), "weights": list(self.truth.weights), "source": self.truth.source}
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "group": self.group, "truth": truth,
                "warnings": self.warnings, "results": [a.as_dict() for a in self.attributions]}


def decomposer_confidence(info: Mapping[str, Any], atom_names: Sequence[str]) -> tuple[list[float | None], str] | None:
    """Per-atom confidence the decomposer reports in ``info``, when it reports one.

    Looked up in this order: ``confidence`` (list aligned with the atoms, or atom -> value),
    ``p_values`` (confidence ``1 − p``), ``layer_consistency`` (the per-layer mode's share of layers).
    """
    for key, transform, source in (("confidence", lambda v: v, "decomposer: confidence"),
                                   ("p_values", lambda v: 1.0 - v, "decomposer: 1 − p-value"),
                                   ("layer_consistency", lambda v: v, "decomposer: share of layers")):
        raw = info.get(key)
        if raw is None:
            continue
        if isinstance(raw, Mapping):
            values = [raw.get(a) for a in atom_names]
        elif isinstance(raw, (list, tuple, np.ndarray)) and len(raw) == len(atom_names):
            values = list(raw)
        else:
            continue
        out = [None if v is None or not math.isfinite(float(v)) else float(transform(float(v))) for v in values]
        return out, source
    return None


def attribution_from(scored: Scored, *, support_threshold: float = DEFAULT_SUPPORT_THRESHOLD,
                     ood_threshold: float = DEFAULT_OOD_THRESHOLD) -> Attribution:
    """The report's view of one scored decomposition (support, confidence, reconstruction error, verdict).

    The verdict is the decomposer's when it gives one (``info["verdict"]``, one of :data:`VERDICTS`,
    with ``info["remainder_share"]``; or its ``out_of_dictionary``), otherwise the fallback rule
    ``recon_error > ood_threshold``; ``not-explained`` when nothing is attributed, ``partly-explained``
    when something is but the target is not in the dictionary.
    """
    result, metrics = scored.decomposition, scored.metrics
    names = scored.problem.atom_names
    skills = scored.problem.skill_of_atom
    coef = np.asarray(result.coefficients, dtype=np.float64)
    support = result.selected(support_threshold)
    error = metrics.get("recon_error")
    if error is None:
        raise ValueError("the reconstruction metric's recon_error is missing")
    unique = [metrics.get(f"{CONFIDENCE_METRIC}[{n}]") for n in names]
    reported = decomposer_confidence(result.info, names)
    if reported is not None:
        confidence, source = reported
    else:
        confidence, source = list(unique), UNIQUE_SOURCE
    causal = [_causal_word(metrics.get(f"{CAUSAL_COLUMN}[{n}]"), metrics.get(f"{PERFORMED_COLUMN}[{n}]"))
              for n in names]
    remainder = result.info.get("remainder_share")
    verdict, rule = verdict_of(result, float(error), support_threshold=support_threshold,
                               ood_threshold=ood_threshold) or ("", "")
    if verdict == "not-explained" or not isinstance(remainder, (int, float)):
        remainder = float(error)  # reported with every verdict: the share of the target's energy not explained
    notes = [str(n) for n in result.info.get("notes", []) if isinstance(n, str)]
    claims = result.claim_levels(support_threshold)
    atoms = [AtomScore(n, float(c), bool(s), confidence[j], skills[j], causal[j], claims[j], unique[j])
             for j, (n, c, s) in enumerate(zip(names, coef, support))]
    shown = {k: v for k, v in metrics.items() if not k.startswith((CONFIDENCE_METRIC, CAUSAL_COLUMN))}
    return Attribution(scored.decomposer, atoms, float(error), verdict, rule, source, shown, dict(result.info),
                       None if remainder is None else float(remainder), notes, result.claims is not None)


def _causal_word(value: float | None, performed: float | None = None) -> str | None:
    """The causal check's verdict on one skill; ``performed`` = 0: the target does not perform the skill
    better than the base, so no removal can show anything (``causal-ablation``'s not-performed)."""
    if value is None:
        return None
    if value == 0 and performed is not None and performed == 0:
        return "not-performed"
    return "confirmed" if value > 0 else ("refuted" if value < 0 else "inconclusive")


TRUTH_FREE_METRICS = ("recon_error", "sparsity")
"""Metric columns defined without ground truth: a metrics cell of only these says nothing about truth."""
WIDTH = 100
"""Prose (sentences, warnings, legend) is wrapped at this many columns."""
CLAIM_WORDS = {"exact": "this exact adapter", "retrained": "another training of it",
               "relative": "or a close relative of it"}
"""How the one-sentence summary says each claim level (:data:`unmerge_core.CLAIMS`)."""
NULL_CONFIRMED = "causal_null_confirmed"
"""``causal-ablation``'s share of null controls (absent skills removed from the target) confirmed."""


def _metrics_cell(metrics: Mapping[str, float | None]) -> str:
    shown = [(k, v) for k, v in metrics.items() if k not in TRUTH_FREE_METRICS and not k.startswith("causal_")]
    return ", ".join(f"{k}={'n/a' if v is None else f'{v:.3g}'}" for k, v in shown) or "—"


def _truth_defined(reports: Sequence[TargetReport]) -> bool:
    """Whether any target with ground truth has a truth metric that is defined (not n/a)."""
    return any(v is not None for r in reports if r.truth is not None for a in r.attributions
               for k, v in a.metrics.items() if k not in TRUTH_FREE_METRICS)


def _wrap(text: str, first: str = "", rest: str = "  ") -> str:
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False)


def _and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def target_sentence(report: TargetReport) -> str | None:
    """One plain sentence on a target, from its first (the default) decomposer's result; ``None``
    when it has no result. Not wrapped."""
    if not report.attributions:
        return None
    a = report.attributions[0]
    who = report.name if len(report.attributions) == 1 else f"{report.name} (by {a.decomposer})"
    # a decomposer without claim levels says nothing about "this exact adapter": no claim words then
    skills = [(s.name, f"{s.coefficient:.2f}" + (f", {CLAIM_WORDS[s.claim]}"
                                                 if a.claims_given and s.claim in CLAIM_WORDS else ""))
              for s in a.skills]
    listed = _and([f"{name} ({what})" for name, what in skills]) if skills else ""
    if a.verdict == "not-explained":
        text = f"{who}: not made of any dictionary skill"
        if skills:
            text += f"; closest: {listed}"
    elif skills:
        text = f"{who}: made of {listed}"
    else:
        text = f"{who}: no dictionary skill attributed"
    if a.remainder_share is not None:
        share = 100 * a.remainder_share
        text += f"; {share:.0f} % of its change is not explained by the dictionary"
    text += f" ({a.verdict})."
    relatives = [s.name for s in a.skills if s.claim == "relative"]
    if relatives:
        text += (f" A close relative is no claim of the skill itself: {_and(relatives)} may not be in it "
                 "(another adapter much like it may be).")
    return text


def null_control_warnings(reports: Sequence[TargetReport]) -> list[str]:
    """One line per target × decomposer whose causal check confirmed a null control too. Not wrapped."""
    out = []
    for r in reports:
        for a in r.attributions:
            share = a.metrics.get(NULL_CONFIRMED)
            if share is not None and share > 0:
                out.append(f"warning: {r.name} ({a.decomposer}): a null control (a skill that is not in it, "
                           f"removed) was confirmed too ({100 * share:.0f} % of null controls): the confirmations of "
                           "this target are not specific.")
    return out


def confidence_headers(reports: Sequence[TargetReport]) -> list[tuple[str, str]]:
    """``(confidence_source, column header)`` for each kind of confidence the decomposers state
    themselves, in :data:`CONFIDENCE_HEADERS` order (the unique share has its own column)."""
    sources = {a.confidence_source for r in reports for a in r.attributions}
    return [(src, head) for src, head in CONFIDENCE_HEADERS.items() if src in sources]


def short_legend(reports: Sequence[TargetReport]) -> list[str]:
    """What the table's columns mean, one line each (not wrapped)."""
    lines = ["coef: the skill's weight in the target's change (1.00: its whole adapter, as trained); "
             "claim: exact (this adapter), retrained (another training of it), relative (or a close relative)."]
    for source, head in confidence_headers(reports):
        lines.append({"1−p": "1−p: the decomposer's confidence, 1 − the p-value of its test that the skill is "
                             "in the target (1.00: sure).",
                      "layers": "layers: the share of layers whose own decomposition attributes the skill.",
                      "own conf": "own conf: the confidence the decomposer states itself, from 0 to 1."}[head])
    lines += ["unique: the share of the target's change only this skill explains (low when other attributed "
              "skills look like it, even if it is a true constituent; not a confidence).",
              "verdict: explained, partly-explained (skills found, plus a remainder), not-explained (no skill); "
              "recon err: share of the change left unexplained."]
    return lines


def _rule_words(rule: str) -> str:
    """``by decomposer``, or the fallback rule as ``recon err > 0.5`` (under the line ``recon err 0.61``)."""
    if rule == "decomposer":
        return "by decomposer"
    return rule.replace("fallback: recon_error", "recon err") if rule else ""


def _skill_cells(a: Attribution, conf_heads: Sequence[tuple[str, str]], causal: bool) -> list[list[str]]:
    """One row of cells per attributed skill: name, claim, coef, own confidences, unique[, causal]."""
    rows = []
    for s in a.skills:
        name = s.name + (f" [{len(s.atoms)} atoms]" if len(s.atoms) > 1 else "")
        claim = (s.claim or "") if a.claims_given else "—"
        cells = [name, claim, f"{s.coefficient:.3f}"]
        for source, _ in conf_heads:
            own = s.confidence if a.confidence_source == source else None
            cells.append("" if own is None else f"{own:.2f}")
        cells.append("" if s.unique_share is None else f"{s.unique_share:.2f}")
        if causal:
            cells.append(s.causal or "")
        rows.append(cells)
    return rows or [["—", "", "", *([""] * len(conf_heads)), "", *([""] if causal else [])]]


def _verdict_lines(a: Attribution) -> list[str]:
    lines = [a.verdict or "—"]
    if a.remainder_share is not None:
        lines.append(f"{100 * a.remainder_share:.0f} % unexplained")
    lines += [f"recon err {a.recon_error:.3f}", _rule_words(a.verdict_rule)]
    return [line for line in lines if line]


def table_rows(reports: Sequence[TargetReport], tablefmt: str = "simple") -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the table: one row per attributed skill (the target, its group, the decomposer
    and the verdict's lines down the first rows of its block)."""
    several = len({a.decomposer for r in reports for a in r.attributions}) > 1
    conf_heads = confidence_headers(reports)
    causal = any(s.causal for r in reports for a in r.attributions for s in a.skills)
    headers = ["target", *(["decomposer"] if several else []), "skill", "claim", "coef",
               *[h for _, h in conf_heads], "unique", *(["causal"] if causal else []), "verdict"]
    rows: list[list[str]] = []
    for r in reports:
        for k, a in enumerate(r.attributions):
            left = [r.name, f"({r.group})"] if k == 0 else []
            mid = _skill_cells(a, conf_heads, causal)
            right = _verdict_lines(a)
            n = max(len(left), len(mid), len(right))
            if rows and tablefmt != "github":
                rows.append([""] * len(headers))  # a blank line between blocks on the terminal
            for i in range(n):
                row = [left[i] if i < len(left) else ""]
                if several:
                    row.append(a.decomposer if i == 0 else "")
                row += mid[i] if i < len(mid) else [""] * len(mid[0])
                row.append(right[i] if i < len(right) else "")
                rows.append(row)
    return headers, rows


def format_table(reports: Sequence[TargetReport], tablefmt: str = "simple") -> str:
    """The table, at most :data:`WIDTH` columns wide where the names allow: one row per attributed skill;
    the decomposer column only with several decomposers, a causal column only when verified, a
    confidence column per kind of confidence the decomposers state. Long target and skill names are
    wrapped (on the terminal) or cut in the middle (in Markdown, whose rows cannot wrap)."""
    headers, rows = table_rows(reports, tablefmt)
    names = [headers.index("target"), headers.index("skill")]
    for limit in (None, 28, 22, 16, 12):
        cut = rows if limit is None else [[_cut(c, limit) if j in names else c for j, c in enumerate(row)]
                                          for row in rows]
        text = "\n".join(line.rstrip() for line in tight_table(cut, headers, tablefmt).splitlines())
        if max(map(len, text.splitlines()), default=0) <= WIDTH:
            break
    return text


def _cut(name: str, limit: int) -> str:
    """``name`` cut in the middle to ``limit`` characters (both ends tell names apart)."""
    if len(name) <= limit:
        return name
    half = (limit - 1) // 2
    return f"{name[:half]}…{name[-(limit - 1 - half):]}"


def after_table(reports: Sequence[TargetReport]) -> list[str]:
    """The lines under the table (not wrapped): each result's metrics against the truth, when some are
    defined, and the decomposers' notes."""
    several = len({a.decomposer for r in reports for a in r.attributions}) > 1
    lines = []
    if _truth_defined(reports):
        for r in reports:
            for a in r.attributions:
                if r.truth is not None:
                    who = f"{r.name} ({a.decomposer})" if several else r.name
                    lines.append(f"{who} vs truth: {_metrics_cell(a.metrics)}")
    for r in reports:
        for a in r.attributions:
            who = f"{r.name} ({a.decomposer})" if several else r.name
            lines += [f"note on {who}: {n}" for n in a.notes]
    return lines


def format_reports(reports: Sequence[TargetReport], tablefmt: str = "simple") -> str:
    """What ``unmerge attribute`` prints (or, ``tablefmt="github"``, the body of ``attribution.md``):
    one sentence per target, a warning where a null control confirmed, the table (after a line naming
    the decomposer when there is only one), the metrics against the truth and the notes, and on the
    terminal a short legend. Every line but the table's is wrapped at :data:`WIDTH` columns."""
    md = tablefmt == "github"
    first, rest = ("- ", "  ") if md else ("", "  ")
    sentences = [s for s in (target_sentence(r) for r in reports) if s]
    blocks = ["\n".join(_wrap(s, first, rest) for s in sentences)] if sentences else []
    warnings = null_control_warnings(reports)
    if warnings:
        blocks.append("\n".join(_wrap(w, first, rest) for w in warnings))
    decomposers = list(dict.fromkeys(a.decomposer for r in reports for a in r.attributions))
    table = format_table(reports, tablefmt)
    if len(decomposers) == 1:
        table = f"Decomposer: {decomposers[0]}\n\n{table}" if md else f"decomposer: {decomposers[0]}\n{table}"
    blocks.append(table)
    below = after_table(reports)
    if below:
        blocks.append("\n".join(_wrap(line, first, rest) for line in below))
    if not md:
        blocks.append("\n".join(_wrap(line) for line in short_legend(reports)))
    return "\n\n".join(blocks)


def _legend(reports: Sequence[TargetReport]) -> str:
    lines = [*short_legend(reports),
             "unique is the unique-share metric: the share of the target's energy lost when the skill is left "
             "out and the other attributed skills are refitted (NNLS). The confidence columns are the "
             "decomposers' own; `confidence` and `confidence_source` in attribution.json and `conf[atom]` in "
             "attribution.csv hold the decomposer's own confidence, else the unique share.",
             "Verdicts: explained (the attributed skills account for the target), partly-explained (known skills "
             "found, plus a remainder the dictionary cannot explain: its share of the target's energy), "
             "not-explained (no known skill).",
             "Verdict rule `by decomposer`: the decomposer's own decision; `recon err > 0.5` (or `≤`): the "
             "fallback rule, recon_error = 1 − cos(target, reconstruction)² compared with the threshold."]
    return "\n".join(_wrap(line, "- ") for line in lines if line)


def write_report(run_dir: Path, reports: Sequence[TargetReport], atom_names: Sequence[str],
                 meta: Mapping[str, Any], warnings: Sequence[str]) -> None:
    """Write ``attribution.json``, ``attribution.md`` and ``attribution.csv`` into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "attribution.json", {**meta, "atom_names": list(atom_names),
                                                     "targets": [r.as_dict() for r in reports],
                                                     "warnings": list(warnings)})
    md = ["# UNMERGE attribution", "", _wrap(f"Dictionary: {', '.join(atom_names)}", rest=""), "",
          format_reports(reports, "github"), "", _legend(reports)]
    if warnings:
        md += ["", "Warnings:", "", *[f"- {w}" for w in warnings]]
    atomic_write_text(run_dir / "attribution.md", "\n".join(md) + "\n")
    atomic_write_text(run_dir / "attribution.csv", _csv(reports, atom_names))


def _csv(reports: Sequence[TargetReport], atom_names: Sequence[str]) -> str:
    fixed = ["target", "kind", "group", "decomposer", "attributed", "skills", "recon_error", "verdict",
             "remainder_share", "verdict_rule", "notes", "confidence_source", "true_tasks", "true_weights"]
    metric_names: list[str] = []
    for r in reports:
        for a in r.attributions:
            metric_names += [k for k in a.metrics if k not in metric_names and k not in fixed]
    fields = [*fixed, *metric_names,
              *[f"coef[{n}]" for n in atom_names], *[f"conf[{n}]" for n in atom_names],
              *[f"unique[{n}]" for n in atom_names]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in reports:
        for a in r.attributions:
            row: dict[str, Any] = {
                "target": r.name, "kind": r.kind, "group": r.group, "decomposer": a.decomposer,
                "attributed": ";".join(f"{x.name}={x.coefficient:.4g}" for x in a.attributed),
                "skills": ";".join(f"{x.name}={x.coefficient:.4g}" for x in a.skills),
                "recon_error": a.recon_error, "verdict": a.verdict, "verdict_rule": a.verdict_rule,
                "remainder_share": "" if a.remainder_share is None else a.remainder_share,
                "notes": " | ".join(a.notes),
                "confidence_source": a.confidence_source or "",
                "true_tasks": ";".join(r.truth.tasks) if r.truth else "",
                "true_weights": ";".join(f"{w:.4g}" for w in r.truth.weights) if r.truth else "",
            }
            row.update({k: "" if a.metrics.get(k) is None else a.metrics[k] for k in metric_names})
            row.update({f"coef[{x.name}]": x.coefficient for x in a.atoms})
            row.update({f"conf[{x.name}]": "" if x.confidence is None else x.confidence for x in a.atoms})
            row.update({f"unique[{x.name}]": "" if x.unique_share is None else x.unique_share for x in a.atoms})
            writer.writerow(row)
    return buf.getvalue()
