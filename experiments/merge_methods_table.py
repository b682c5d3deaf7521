"""The attribution-per-merge-method table of the README, from the run of ``make merge-methods``.

Reads ``runs/merge-methods/per_target.json`` and prints, per merge method × decomposer: mean precision
and recall on the known and mixed groups, the perfect-match rate over known + mixed, the share of
known-only and unknown-only targets flagged out of the dictionary (``not-explained`` for
``skill-fdr``, ``out_of_dictionary`` for ``nnls-select``, ``–`` for a decomposer without a verdict) and
the mean reconstruction error of known-only targets (how far the merge moved the target out of the
span of its constituents). Usage:

    .venv/bin/python experiments/merge_methods_table.py [runs/merge-methods]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from realistic.summarize import flagged, mean  # experiments/ is on sys.path when run as a script


def main(run_dir: Path) -> None:
    rows = json.loads((run_dir / "per_target.json").read_text())["rows"]
    decomposers = list(dict.fromkeys(r["decomposer"] for r in rows))
    print("| method | decomposer | known P / R | mixed P / R | perfect match | flagged: known / unknown | "
          "recon. error (known) |")
    print("|---|---|---|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in rows):
        for decomposer in decomposers:
            mine = [r for r in rows if r["method"] == method and r["decomposer"] == decomposer]
            cell = {g: [r for r in mine if r["group"] == g] for g in ("known", "mixed", "unknown")}

            def pr(group: str) -> str:
                return (f"{mean([r['metrics'].get('precision') for r in cell[group]])} / "
                        f"{mean([r['metrics'].get('recall') for r in cell[group]])}")

            perfect = mean([r["metrics"].get("perfect_match") for r in cell["known"] + cell["mixed"]])
            flags = " / ".join(mean([flagged(r) for r in cell[g]]) for g in ("known", "unknown"))
            recon = mean([r["metrics"].get("recon_error") for r in cell["known"]])
            label = f"`{method}`" if decomposer == decomposers[0] else ""
            print(f"| {label} | `{decomposer}` | {pr('known')} | {pr('mixed')} | {perfect} | {flags} | {recon} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/merge-methods"))
