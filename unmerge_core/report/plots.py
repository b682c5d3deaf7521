"""PNG plots next to the tables (needs the optional ``plots`` extra: matplotlib).

- ``precision_recall.png``: precision and recall per decomposer, one panel per group × metric, bars
  per merge method. Undefined cells are left empty (never drawn as zero).
- ``coefficients_<decomposer>.png``: per target (rows), true merge weights and recovered coefficients
  over the dictionary atoms (columns), side by side; unknown-only targets show their (all-zero) truth.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

from unmerge_core.io.store import safe_filename
from unmerge_core.report.tables import ResultTable

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


ROW_FONT, ATOM_FONT = 5, 7  # points: target names (one per row) and atom names (one per column)
PNG_OPTIONS = {"compress_level": 3}  # zlib level 3 instead of 6: a third less time, files 15% larger
LONGEST_NAME = 48  # characters of a name drawn in a heatmap (the tables hold the whole name)


def _short(name: str) -> str:
    """A name cut in the middle to :data:`LONGEST_NAME` characters (both ends tell targets apart)."""
    if len(name) <= LONGEST_NAME:
        return name
    half = (LONGEST_NAME - 1) // 2
    return f"{name[:half]}…{name[-half:]}"


def _text_inches(chars: int, points: float) -> float:
    """An upper estimate of the width in inches of ``chars`` characters of DejaVu Sans at ``points``
    (its widest letters, W and M, are about 1 em; most are 0.5–0.65 em)."""
    return chars * points / 72


def write_plots(run_dir: Path, table: ResultTable) -> list[Path]:
    if not table.rows:
        return []
    paths = [precision_recall_plot(run_dir / "precision_recall.png", table)]
    for decomposer in dict.fromkeys(r.decomposer for r in table.rows):
        paths.append(coefficient_heatmap(run_dir / f"coefficients_{safe_filename(decomposer)}.png", table, decomposer))
    return paths


def precision_recall_plot(path: Path, table: ResultTable) -> Path:
    summary = table.summary()
    decomposers = list(dict.fromkeys(r["decomposer"] for r in summary))
    methods = list(dict.fromkeys(r["method"] for r in summary))
    groups = [g for g in ("known", "mixed") if any(r["group"] == g for r in summary)]
    metrics = ["precision", "recall"]
    if not groups:
        groups = ["unknown"]
        metrics = ["sparsity"]
    fig, axes = plt.subplots(len(groups), len(metrics), figsize=(5.5 * len(metrics), 3.2 * len(groups)),
                             squeeze=False, sharey=metrics != ["sparsity"])
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(decomposers))
    for gi, group in enumerate(groups):
        for mi, metric in enumerate(metrics):
            ax = axes[gi][mi]
            for k, method in enumerate(methods):
                values = []
                for d in decomposers:
                    cell = [r for r in summary if r["decomposer"] == d and r["group"] == group and r["method"] == method]
                    v = cell[0].get(metric) if cell else None
                    values.append(np.nan if v is None else v)
                ax.bar(x + (k - (len(methods) - 1) / 2) * width, values, width, label=method)
            ax.set_title(f"{metric} — {group} targets")
            ax.set_xticks(x, decomposers, rotation=30, ha="right", fontsize=8)
            if metric != "sparsity":
                ax.set_ylim(0, 1.05)
                ax.axhline(0.9, color="grey", lw=0.6, ls="--")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, pil_kwargs=PNG_OPTIONS)
    plt.close(fig)
    return path


def coefficient_heatmap(path: Path, table: ResultTable, decomposer: str) -> Path:
    rows = [r for r in table.rows if r.decomposer == decomposer]
    atoms = [_short(a) for a in table.atom_names]
    row_names = [_short(r.target_id) for r in rows]
    truth = np.array([[dict(zip(r.true_tasks, r.true_weights)).get(a, 0.0) for a in table.atom_names]
                      for r in rows]).reshape(len(rows), len(atoms))
    found = np.array([r.coefficients for r in rows], dtype=float).reshape(len(rows), len(atoms))
    vmax = float(max(np.abs(truth).max(initial=0), np.abs(found).max(initial=0), 1e-12))
    # margins in inches from the longest names (bbox_inches="tight" would lay every label out twice)
    panel_w, panel_h = max(1.5, 0.45 * len(atoms)), max(1.5, 0.16 * len(rows))
    atom_w = _text_inches(max(map(len, atoms), default=0), ATOM_FONT)  # drawn at 60°, down and to the left
    left = max(1.3, 0.3 + _text_inches(max(map(len, row_names), default=0), ROW_FONT), 0.3 + atom_w / 2)
    bottom = max(1.4, 0.3 + atom_w * math.sin(math.radians(60)))
    gap, right, top = 0.15, 1.0, 0.4
    width, height = left + 2 * panel_w + gap + right, bottom + panel_h + top
    fig = plt.figure(figsize=(width, height))
    axes = [fig.add_axes((left / width, bottom / height, panel_w / width, panel_h / height))]
    # not sharey: a shared axis would create and lay out every row's tick a second time
    axes.append(fig.add_axes(((left + panel_w + gap) / width, bottom / height, panel_w / width, panel_h / height)))
    # row and column names as plain figure texts: a tick per row costs several artists and a layout
    # pass each (half the figure's time at 72 targets), a text of an axes a clip path each
    label_y = (bottom - 0.05) / height
    for panel, (ax, data, title) in enumerate(((axes[0], truth, "true weights"),
                                               (axes[1], found, f"{decomposer} coefficients"))):
        if data.size:
            im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        else:  # no atoms (or no rows): an empty panel that says so (imshow warns on an empty image)
            ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        x0 = left + panel * (panel_w + gap)
        for j, atom in enumerate(atoms):
            fig.text((x0 + panel_w * (j + 0.5) / len(atoms)) / width, label_y, atom, rotation=60,
                     rotation_mode="anchor", ha="right", va="top", fontsize=ATOM_FONT)
        ax.set_title(title, fontsize=9)
    for i, name in enumerate(row_names):
        y = bottom + panel_h * (1 - (i + 0.5) / len(row_names))  # row 0 at the top, as imshow draws it
        fig.text((left - 0.05) / width, y / height, name, ha="right", va="center", fontsize=ROW_FONT)
    if truth.size:
        cax = fig.add_axes(((width - right + 0.2) / width, bottom / height, 0.15 / width, panel_h / height))
        fig.colorbar(im, cax=cax)
    fig.savefig(path, dpi=110, pil_kwargs=PNG_OPTIONS)
    plt.close(fig)
    return path
