"""The files a run leaves behind: ``summary.{csv,md,json}``, ``per_target.{csv,json}`` and the plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unmerge_core.io.store import atomic_write_text, dumps_json
from unmerge_core.report.tables import UNDEFINED, ResultTable, _csv, format_table, glossary, per_target_records


def write_results(run_dir: Path, table: ResultTable, title: str | None = None,
                  warnings: Sequence[str] = (), plots: bool = True) -> None:
    """Write summary.{csv,md,json}, per_target.{csv,json} and the plots into ``run_dir``.

    ``plots = False`` (``unmerge run --no-plots``) writes no PNG and removes those an earlier run left,
    so no plot in the directory describes other results.

    Every file's content is rendered before the first one is written, so a failure writes nothing;
    each file is then written atomically. (The run's ``run.json`` says ``complete`` only after all.)
    """
    summary = table.summary()
    title = f"# UNMERGE results: {title}\n\n" if title else "# UNMERGE results\n\n"
    by_group = table.summary(("decomposer", "group"))
    columns = list(summary[0]) if summary else []
    words = glossary(columns)
    if words:
        title += "## Columns\n\n" + "\n".join(words) + "\n\nEach metric is a mean over the row's targets.\n\n"
    md = (title + "## Per decomposer × group × merge method\n\n" + format_table(summary, "github")
          + "\n\n## Per decomposer × group (all methods)\n\n" + format_table(by_group, "github") + "\n\n"
          + f"`{UNDEFINED}`: the metric is undefined for every target of the cell (for example recall of "
            "unknown-only targets); means are over the targets where it is defined.\n")
    if warnings:
        md += "\n## Warnings\n\n" + "".join(f"- {w}\n" for w in warnings)
    files = {
        "summary.csv": _csv(summary),
        "summary.json": dumps_json(summary),
        "summary.md": md,
        "per_target.csv": _csv(per_target_records(table)),
        "per_target.json": dumps_json({"atom_names": list(table.atom_names),
                                       "rows": [row.as_dict() for row in table.rows]}),
    }
    for name, text in files.items():
        atomic_write_text(run_dir / name, text)
    if not plots:
        for stale in [run_dir / "precision_recall.png", *run_dir.glob("coefficients_*.png")]:
            stale.unlink(missing_ok=True)
    elif plots_available():
        from unmerge_core.report.plots import write_plots  # matplotlib is the optional ``plots`` extra

        write_plots(run_dir, table)


def plots_available() -> bool:
    """Whether matplotlib (the ``plots`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None

