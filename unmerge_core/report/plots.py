"""PNG plots next to the tables (needs the optional ``plots`` extra: matplotlib).

- ``precision_recall.png``: per decomposer, precision and recall on the known-only and mixed targets
  (a bar: the mean over every merge method; a dot: one merge method), and an out-of-dictionary panel:
  what each decomposer calls the unknown-only targets (whose right answer is *not explained*).
  Undefined cells are left empty (never drawn as zero).
- ``coefficients_<decomposer>.png``: per target (rows), the true merge weights and the recovered
  coefficients over the dictionary atoms (columns), side by side, on a sequential colour scale; the
  attributed atoms are marked (a dot where right, a red cross where the atom is no constituent), a
  missed constituent is circled; each panel ends in an out-of-dictionary strip: the share of the
  target's weight from skills outside the dictionary, and the verdict.

Each figure carries a caption saying what to look at. Both are built as matplotlib figures first
(:func:`precision_recall_figure`, :func:`coefficient_figure`), then saved.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

from unmerge_core.io.store import safe_filename
from unmerge_core.report.tables import VERDICTS, ResultRow, ResultTable, verdict_of

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, ListedColormap, PowerNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

ROW_FONT, ATOM_FONT, TEXT_FONT = 8, 8, 9  # points: target names, atom names, titles and captions
PNG_OPTIONS = {"compress_level": 3}  # zlib level 3 instead of 6: a third less time, files 15% larger
LONGEST_NAME = 48  # characters of a name drawn in a heatmap (the tables hold the whole name)
COEF_CMAP = "Blues"  # sequential: 0 is white, the largest coefficient darkest
NEGATIVE_COLOUR = "#b2abd2"  # a coefficient below 0 (the colour bar's "under" end): purple, apart from the oranges
VERDICT_COLOURS = {"explained": "#ffffff", "partly-explained": "#fdbe85", "not-explained": "#d94801"}
"""The verdict strip: orange as much as the decomposer says the target is outside the dictionary."""
OUTSIDE_CMAP = LinearSegmentedColormap.from_list("outside", ["#ffffff", VERDICT_COLOURS["not-explained"]])
"""The share of a target's weight from skills outside the dictionary: white 0, the not-explained orange 1."""
MISSING_COLOUR = "#d9d9d9"  # no truth, no verdict
FALSE_POSITIVE = "#d7191c"
MISSED = "#e66101"
GROUP_ORDER = ("known", "mixed", "unknown")
STRIP_LABEL = {"truth": "outside dictionary", "found": "verdict"}


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


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, pil_kwargs=PNG_OPTIONS)
    plt.close(fig)
    return path


def row_verdict(row: ResultRow) -> str | None:
    """The report's verdict of one row (the decomposer's, else the fallback rule on ``recon_error``)."""
    found = verdict_of(row.decomposition, row.metrics.get("recon_error"))
    return None if found is None else found[0]


# --------------------------------------------------------------------------------------------------
# precision_recall.png
# --------------------------------------------------------------------------------------------------


def precision_recall_plot(path: Path, table: ResultTable) -> Path:
    return _save(precision_recall_figure(table), path)


def precision_recall_figure(table: ResultTable) -> Figure:
    """Precision and recall per decomposer on the known-only and mixed targets, and what each
    decomposer calls the unknown-only targets (the out-of-dictionary panel)."""
    by_method = table.summary()
    by_group = table.summary(("decomposer", "group"))
    decomposers = list(dict.fromkeys(r.decomposer for r in table.rows))
    methods = list(dict.fromkeys(r["method"] for r in by_method))
    groups = [g for g in ("known", "mixed") if any(r.group == g for r in table.rows)]
    unknown = [r for r in table.rows if r.group == "unknown"]
    panels = [(g, m) for g in groups for m in ("precision", "recall")]
    n_panels = len(panels) + (1 if unknown else 0)
    if not n_panels:  # targets of none of the three groups (external models): their verdicts
        unknown, n_panels = list(table.rows), 1
    label_w = _text_inches(max(map(len, decomposers), default=4), TEXT_FONT) * 0.65 + 0.3
    panel_w, panel_h, pitch = 2.1, max(1.6, 0.32 * len(decomposers) + 0.6), 2.35
    caption_h, legend_h, top = 0.8, 0.15 * (len(methods) + 2) + 0.35, 0.95
    width = max(label_w + n_panels * pitch + 0.2, 7.0)
    height = top + panel_h + legend_h + caption_h
    fig = plt.figure(figsize=(width, height))
    fig.suptitle("Which decomposer finds the right skills, and says when a target is outside the dictionary",
                 fontsize=TEXT_FONT + 1, y=1 - 0.1 / height, va="top")
    bottom = (caption_h + legend_h) / height
    pitch_w = pitch / width
    y = np.arange(len(decomposers))
    bottom = (caption_h + legend_h + 0.35) / height
    markers = "os^Dvp<>h*"
    for k, (group, metric) in enumerate(panels):
        x0 = label_w / width + k * pitch_w
        ax = fig.add_axes((x0, bottom, panel_w / width, panel_h / height))
        means = [_cell(by_group, d, group, metric) for d in decomposers]
        ax.barh(y, [np.nan if v is None else v for v in means], color="#6baed6", height=0.7,
                label="mean over merge methods")
        for i, v in enumerate(means):
            ax.text(0.02, i, "n/a" if v is None else f"{v:.2f}", va="center", ha="left", fontsize=8,
                    color="black")
        for j, method in enumerate(methods):
            values = [_cell(by_method, d, group, metric, method) for d in decomposers]
            ax.plot([np.nan if v is None else v for v in values], y, ls="none", marker=markers[j % len(markers)],
                    ms=4, mfc="none", mec="#08306b", mew=0.8, label=f"merge method: {method}")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(len(decomposers) - 0.5, -0.5)
        ax.set_title(f"{metric}, {group} targets\n(higher is better)", fontsize=TEXT_FONT)
        ax.tick_params(labelsize=8)
        ax.set_yticks(y, decomposers if k == 0 else [""] * len(decomposers), fontsize=TEXT_FONT)
        ax.grid(axis="x", color="#dddddd", lw=0.5)
        ax.set_axisbelow(True)
    if unknown:
        k = len(panels)
        x0 = label_w / width + k * pitch_w
        ax = fig.add_axes((x0, bottom, panel_w / width, panel_h / height))
        ax.set_gid("out-of-dictionary")
        shares = ood_shares(unknown, decomposers)
        left = np.zeros(len(decomposers))
        for verdict in ("not-explained", "partly-explained", "explained", None):
            values = np.array([shares[d].get(verdict, 0.0) for d in decomposers])
            if verdict is None and not values.any():
                continue
            label = {None: "no verdict", "partly-explained": "partly explained (skills claimed)",
                     "explained": "explained (skills claimed)", "not-explained": "not explained (right)"}[verdict]
            colour = MISSING_COLOUR if verdict is None else VERDICT_COLOURS[verdict]
            ax.barh(y, values, left=left, height=0.7, color=colour, edgecolor="#7f2704", lw=0.5, label=label)
            left += values
        for i, d in enumerate(decomposers):
            v = shares[d].get("not-explained", 0.0)
            ax.text(0.02, i, f"{v:.2f}", va="center", ha="left", fontsize=8,
                    color="white" if v > 0.15 else "black")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(len(decomposers) - 0.5, -0.5)
        title = "unknown-only" if any(r.group == "unknown" for r in unknown) else "these"
        ax.set_title(f"out of dictionary: {title} targets\ncalled not explained (higher is better)",
                     fontsize=TEXT_FONT)
        ax.tick_params(labelsize=8)
        ax.set_yticks(y, decomposers if k == 0 else [""] * len(decomposers), fontsize=TEXT_FONT)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(-0.05, -0.14), ncol=1, frameon=False,
                  handlelength=1.2)
    if panels:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.axes[0].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(-0.05, -0.14),
                           ncol=1 if len(panels) < 3 else 2, frameon=False, handlelength=1.2)
    caption = ("What to look at: a good decomposer has long bars in every panel. Known-only targets are made "
               "of dictionary skills only, mixed ones also of skills outside it; precision: share of the "
               "attributed skills that are constituents; recall: share of the constituents attributed. "
               "Unknown-only targets hold no dictionary skill: the right verdict is 'not explained', and a "
               "decomposer that attributes skills to them there (light orange) claims skills that are not there.")
    fig.text(0.01, 0.12 / height, _wrapped(caption, width, TEXT_FONT - 1), fontsize=TEXT_FONT - 1, ha="left",
             va="bottom", gid="caption")
    return fig


def _cell(records: list[dict], decomposer: str, group: str, metric: str, method: str | None = None) -> float | None:
    for r in records:
        if r["decomposer"] == decomposer and r["group"] == group and (method is None or r["method"] == method):
            v = r.get(metric)
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    return None


def ood_shares(rows: list[ResultRow], decomposers: list[str]) -> dict[str, dict[str | None, float]]:
    """Per decomposer, the share of ``rows`` given each verdict (``None``: no verdict)."""
    out: dict[str, dict[str | None, float]] = {}
    for d in decomposers:
        mine = [row_verdict(r) for r in rows if r.decomposer == d]
        out[d] = {v: mine.count(v) / len(mine) for v in (*VERDICTS, None)} if mine else {}
    return out


def _wrapped(text: str, width_in: float, points: float) -> str:
    import textwrap

    chars = max(30, int(width_in * 72 / (points * 0.55)))  # DejaVu Sans averages ~0.55 em a letter
    return textwrap.fill(text, chars)


# --------------------------------------------------------------------------------------------------
# coefficients_<decomposer>.png
# --------------------------------------------------------------------------------------------------


def coefficient_heatmap(path: Path, table: ResultTable, decomposer: str) -> Path:
    return _save(coefficient_figure(table, decomposer), path)


def _group_rank(row: ResultRow) -> int:
    return GROUP_ORDER.index(row.group) if row.group in GROUP_ORDER else len(GROUP_ORDER)


def coefficient_figure(table: ResultTable, decomposer: str) -> Figure:
    """True weights and recovered coefficients per target × atom, the attributed atoms marked, and an
    out-of-dictionary strip per panel."""
    rows = sorted((r for r in table.rows if r.decomposer == decomposer), key=_group_rank)  # stable
    names = table.atom_names
    atoms = [_short(a) for a in names]
    row_names = [_short(r.target_id) for r in rows]
    n_rows, n_atoms = len(rows), len(atoms)
    truth = np.array([[dict(zip(r.true_tasks, r.true_weights)).get(a, 0.0) for a in names]
                      for r in rows], dtype=float).reshape(n_rows, n_atoms)
    found = np.array([r.coefficients for r in rows], dtype=float).reshape(n_rows, n_atoms)
    selected = np.array([r.decomposition.selected() for r in rows], dtype=bool).reshape(n_rows, n_atoms)
    true_in = truth != 0
    outside = np.array([_outside_share(r, names) for r in rows], dtype=float)
    verdicts = [row_verdict(r) for r in rows]
    vmax = float(max(truth.max(initial=0), found.max(initial=0), 1e-12))
    # margins in inches from the longest names (bbox_inches="tight" would lay every label out twice)
    cell_w, cell_h, strip_w = 0.36, 0.17, 0.36
    panel_w, panel_h = max(1.5, cell_w * n_atoms), max(1.5, cell_h * n_rows)
    atom_w = _text_inches(max(map(len, [*atoms, STRIP_LABEL["truth"]]), default=0), ATOM_FONT)
    left = max(1.3, 0.3 + _text_inches(max(map(len, row_names), default=0), ROW_FONT), 0.3 + atom_w / 2)
    label_h = 0.3 + atom_w * math.sin(math.radians(60))
    caption_h, legend_h = 0.85, 0.35
    bottom = label_h + legend_h + caption_h
    gap, right, top = 0.55, 1.2, 0.75
    width = max(left + 2 * (panel_w + 0.05 + strip_w) + gap + right, 7.5)
    height = bottom + panel_h + top
    fig = plt.figure(figsize=(width, height))
    fig.suptitle(f"{decomposer}: true merge weights (left) and recovered coefficients (right) per target",
                 fontsize=TEXT_FONT + 1, y=1 - 0.1 / height, va="top")
    cmap = matplotlib.colormaps[COEF_CMAP].with_extremes(under=NEGATIVE_COLOUR, bad=MISSING_COLOUR)
    norm = PowerNorm(0.5, vmin=0.0, vmax=vmax)  # small coefficients visibly above white
    label_y = (label_h - 0.05 + legend_h + caption_h) / height
    im = None
    for panel, (data, title, key) in enumerate(((truth, "true weights", "truth"),
                                                (found, f"{decomposer} coefficients", "found"))):
        x0 = left + panel * (panel_w + 0.05 + strip_w + gap)
        ax = fig.add_axes((x0 / width, bottom / height, panel_w / width, panel_h / height))
        ax.set_gid(f"{key}-panel")
        strip = fig.add_axes(((x0 + panel_w + 0.05) / width, bottom / height, strip_w / width, panel_h / height))
        strip.set_gid(f"{key}-strip")
        if data.size:
            im = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
            if key == "found":
                _mark_atoms(ax, selected, true_in, rows)
                ax.set_xlim(-0.5, n_atoms - 0.5)
                ax.set_ylim(n_rows - 0.5, -0.5)
        else:  # no atoms (or no rows): an empty panel that says so (imshow warns on an empty image)
            ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        if n_rows and key == "truth":
            strip.imshow(outside.reshape(-1, 1), aspect="auto", cmap=OUTSIDE_CMAP, vmin=0, vmax=1,
                         interpolation="nearest")
        elif n_rows:
            colours = ListedColormap([VERDICT_COLOURS[v] for v in VERDICTS] + [MISSING_COLOUR])
            codes = np.array([VERDICTS.index(v) if v in VERDICTS else len(VERDICTS) for v in verdicts])
            strip.imshow(codes.reshape(-1, 1), aspect="auto", cmap=colours, vmin=-0.5, vmax=len(VERDICTS) + 0.5,
                         interpolation="nearest")
        for a in (ax, strip):
            a.set_xticks([])
            a.set_yticks([])
            _group_lines(a, rows)
        for j, atom in enumerate(atoms):
            fig.text((x0 + panel_w * (j + 0.5) / n_atoms) / width, label_y, atom, rotation=60,
                     rotation_mode="anchor", ha="right", va="top", fontsize=ATOM_FONT)
        fig.text((x0 + panel_w + 0.05 + strip_w / 2) / width, label_y, STRIP_LABEL[key], rotation=60,
                 rotation_mode="anchor", ha="right", va="top", fontsize=ATOM_FONT, color="#a63603")
        ax.set_title(title, fontsize=TEXT_FONT)
    for i, name in enumerate(row_names):
        y = bottom + panel_h * (1 - (i + 0.5) / len(row_names))  # row 0 at the top, as imshow draws it
        fig.text((left - 0.05) / width, y / height, name, ha="right", va="center", fontsize=ROW_FONT)
    if im is not None:
        cax = fig.add_axes(((width - right + 0.25) / width, bottom / height, 0.15 / width, panel_h / height))
        bar = fig.colorbar(im, cax=cax, extend="min" if found.min(initial=0) < 0 else "neither")
        bar.ax.tick_params(labelsize=8)
        bar.set_label("coefficient / weight", fontsize=8)
    handles = [
        plt.Line2D([], [], ls="none", marker="o", ms=5, mfc="black", mec="white", label="attributed, a constituent"),
        plt.Line2D([], [], ls="none", marker="X", ms=6, mfc=FALSE_POSITIVE, mec="white",
                   label="attributed, not a constituent (false positive)"),
        plt.Line2D([], [], ls="none", marker="o", ms=7, mfc="none", mec=MISSED, mew=1.5,
                   label="constituent missed"),
        Patch(facecolor=NEGATIVE_COLOUR, label="negative coefficient"),
        *[Patch(facecolor=c, edgecolor="#7f2704", lw=0.5, label=f"verdict: {v}") for v, c in VERDICT_COLOURS.items()],
    ]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.01, (caption_h + 0.02) / height),
               ncol=4, fontsize=8, frameon=False)
    caption = ("What to look at: the right panel should repeat the left one. Rows are targets (known-only, "
               "then mixed, then unknown-only), columns dictionary skills; darker is a larger coefficient. "
               "Every red cross is a skill claimed that the target does not hold; every orange circle a "
               "constituent missed. 'outside dictionary': share of the target's merge weight from skills "
               "the dictionary does not hold (unknown-only targets are fully orange); their 'verdict' "
               "should be dark orange, not explained.")
    fig.text(0.01, 0.1 / height, _wrapped(caption, width, TEXT_FONT - 1), fontsize=TEXT_FONT - 1,
             ha="left", va="bottom", gid="caption")
    return fig


def _outside_share(row: ResultRow, atom_names: tuple[str, ...]) -> float:
    """Share of a target's (absolute) merge weight from skills outside the dictionary; NaN without truth."""
    weights = np.abs(np.asarray(row.true_weights, dtype=float))
    if not row.true_tasks or not weights.sum():
        return float("nan")
    inside = set(atom_names)
    return float(sum(w for t, w in zip(row.true_tasks, weights) if t not in inside) / weights.sum())


def _mark_atoms(ax, selected: np.ndarray, true_in: np.ndarray, rows: list[ResultRow]) -> None:
    """Attributed atoms as dots (right) or red crosses (false positives); missed constituents circled.
    Without truth (external targets) every attributed atom is a dot."""
    has_truth = np.array([bool(r.true_tasks) for r in rows])[:, None]
    right = selected & (true_in | ~has_truth)
    wrong = selected & ~true_in & has_truth
    missed = ~selected & true_in
    for mask, style, gid in ((right, dict(marker="o", s=14, c="black", edgecolors="white", linewidths=0.6), "attributed"),
                             (wrong, dict(marker="X", s=30, c=FALSE_POSITIVE, edgecolors="white", linewidths=0.6),
                              "false-positive"),
                             (missed, dict(marker="o", s=40, facecolors="none", edgecolors=MISSED, linewidths=1.4),
                              "missed")):
        i, j = np.nonzero(mask)
        if i.size:
            ax.scatter(j, i, gid=gid, **style)


def _group_lines(ax, rows: list[ResultRow]) -> None:
    """A line between the groups of rows (known, mixed, unknown)."""
    for i in range(1, len(rows)):
        if rows[i].group != rows[i - 1].group:
            ax.axhline(i - 0.5, color="black", lw=1.0)
