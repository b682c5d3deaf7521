"""The attribution-outside-the-laboratory table of the README, from the runs of ``make scenarios``.

Reads ``runs/realistic-*/per_target.json`` and prints, per scenario × decomposer × group: mean precision,
recall and rank AUC, the verdict rates (not-explained = flagged out of the dictionary) and, per
scenario × decomposer, the empirical false-discovery rate (claimed skills that are not constituents,
over all claimed skills; a claim is every attributed atom except claim "relative") and the recall of full
fine-tune constituents; then the budget sweep: per decomposer, the share of targets whose claimed
skills and verdict are the same at every budget. Usage:

    .venv/bin/python experiments/realistic/summarize.py [runs]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCENARIOS = ("realistic-retrained", "realistic-hparams", "realistic-full-finetune", "realistic-relatives",
             "realistic-retrained-g2", "realistic-retrained-g3", "realistic-related-dictionary")
BUDGETS = (2048, 4096, 8192, 16384)
"""The budget sweep's runs, ``realistic-budget-<budget>`` (the retrained targets on four mask sizes)."""


def mean(values: list[float | None]) -> str:
    defined = [v for v in values if v is not None]
    return f"{sum(defined) / len(defined):.2f}" if defined else "–"


def flagged(row: dict) -> float | None:
    """1 when the decomposer says the target is not made of dictionary skills (not-explained / OOD)."""
    verdict = row["info"].get("verdict")
    if verdict is not None:
        return float(verdict == "not-explained")
    return None if row["out_of_dictionary"] is None else float(row["out_of_dictionary"])


def main(root: Path) -> None:
    print("| scenario | decomposer | known P / R | mixed P / R | rank AUC (known, mixed) | flagged: known / unknown | "
          "empirical FDR | full-FT recall |")
    print("|---|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        path = root / scenario / "per_target.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        rows, skills = data["rows"], [a.split("@")[0] for a in data["atom_names"]]
        for decomposer in dict.fromkeys(r["decomposer"] for r in rows):
            mine = [r for r in rows if r["decomposer"] == decomposer]
            cell = {g: [r for r in mine if r["group"] == g] for g in ("known", "mixed", "unknown")}

            def pr(group: str) -> str:
                if not cell[group]:
                    return "–"
                return (f"{mean([r['metrics'].get('precision') for r in cell[group]])} / "
                        f"{mean([r['metrics'].get('recall') for r in cell[group]])}")

            auc = ", ".join(mean([r["metrics"].get("rank_auc") for r in cell[g]]) for g in ("known", "mixed") if cell[g])
            flags = " / ".join(mean([flagged(r) for r in cell[g]]) if cell[g] else "–" for g in ("known", "unknown"))
            false = attributed = 0
            for r in mine:
                chosen = _chosen(r, skills)
                attributed += len(chosen)
                false += len(chosen - set(r["true_tasks"]))
            fdr = f"{false / attributed:.3f}" if attributed else "–"
            ft = mean([r["metrics"].get("recall_full-ft") for r in mine])
            print(f"| {scenario.removeprefix('realistic-')} | `{decomposer}` | {pr('known')} | {pr('mixed')} | {auc} | "
                  f"{flags} | {fdr} | {ft} |")


def budget_stability(root: Path) -> None:
    """Targets whose claimed skills and verdict do not change across the budget sweep's mask sizes."""
    runs = {}
    for budget in BUDGETS:
        path = root / f"realistic-budget-{budget}" / "per_target.json"
        if path.is_file():
            runs[budget] = json.loads(path.read_text())
    if len(runs) < 2:
        return
    print(f"\n| decomposer | same claims and verdict at budgets {', '.join(f'{b:,}' for b in runs)} | "
          "same claims | same verdict |")
    print("|---|---|---|---|")
    first = next(iter(runs.values()))
    skills = [a.split("@")[0] for a in first["atom_names"]]
    for decomposer in dict.fromkeys(r["decomposer"] for r in first["rows"]):
        answers: dict[str, list[tuple[frozenset[str], str | None]]] = {}
        for data in runs.values():
            for r in data["rows"]:
                if r["decomposer"] == decomposer:
                    answers.setdefault(r["target_id"], []).append(
                        (frozenset(_chosen(r, skills)), r["info"].get("verdict")))
        full = [a for a in answers.values() if len(a) == len(runs)]
        both = sum(len(set(a)) == 1 for a in full)
        claims = sum(len({c for c, _ in a}) == 1 for a in full)
        verdicts = sum(len({v for _, v in a}) == 1 for a in full)
        print(f"| `{decomposer}` | {both}/{len(full)} | {claims}/{len(full)} | {verdicts}/{len(full)} |")


def _chosen(row: dict, skills: list[str]) -> set[str]:
    """The skills the row claims: every attributed atom except those with claim "relative" (the skill or a
    close relative of it, not a claim of the skill)."""
    claims = row.get("claims")
    if claims is None:
        support = row["support"]
        if support is None:
            support = [abs(c) > 1e-3 for c in row["coefficients"]]
        claims = ["exact" if on else None for on in support]
    return {s for s, c in zip(skills, claims) if c is not None and c != "relative"}


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs")
    main(root)
    budget_stability(root)
