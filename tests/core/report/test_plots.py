"""Heatmaps: names of any length are drawn inside the figure (the margins grow with them)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from unmerge_core import Decomposition, MergeJob  # noqa: E402
from unmerge_core.report.plots import LONGEST_NAME, _short, coefficient_heatmap  # noqa: E402
from unmerge_core.report.tables import ResultTable  # noqa: E402


def heatmap_table(target_ids: list[str], atoms: tuple[str, ...]) -> ResultTable:
    t = ResultTable(atom_names=atoms)
    for i, target_id in enumerate(target_ids):
        spec = MergeJob(target_id, "linear", atoms[:2], (0.5, 0.5), i, "known")
        t.add("nnls", spec, Decomposition(np.linspace(0, 1, len(atoms)), np.zeros(0)), {"recall": 1.0})
    return t


def ink_at_edges(png) -> tuple[bool, bool]:
    """Whether anything but the white background touches the left edge or the bottom edge."""
    image = imread(png)[..., :3]
    return bool((image[:, :2] < 0.95).any()), bool((image[-2:, :] < 0.95).any())


@pytest.mark.parametrize("length", [12, 40, 200])
def test_long_names_are_not_clipped(tmp_path, length) -> None:
    ids = ["W" * length, "m" * (length // 2), "short"]
    atoms = ("M" * length, "a1", "a2")
    png = coefficient_heatmap(tmp_path / "h.png", heatmap_table(ids, atoms), "nnls")
    left, bottom = ink_at_edges(png)
    assert not left and not bottom


def test_names_are_cut_in_the_middle() -> None:
    name = "mixed-ties-" + "x" * 100 + "-07"
    short = _short(name)
    assert len(short) <= LONGEST_NAME and short.startswith("mixed-ties-") and short.endswith("-07")
    assert _short("mixed-ties-07") == "mixed-ties-07"


def test_a_dictionary_without_atoms_draws_without_warnings(tmp_path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = coefficient_heatmap(tmp_path / "h.png", heatmap_table(["t0", "t1"], ()), "nnls")
    assert imread(png).shape[0] > 0


# --------------------------------------------------------------------------------------------------
# What the figures show (issue 24, item 5): tested on the figure objects, not on pixels
# --------------------------------------------------------------------------------------------------

from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from unmerge_core.report.plots import coefficient_figure, precision_recall_figure  # noqa: E402

ATOMS = ("json", "pirate", "sort")


def finding_table() -> ResultTable:
    """Two decomposers on a known, a mixed and an unknown-only target: ``loose`` attributes a skill
    that is not there to each and calls nothing 'not explained'; ``strict`` is right everywhere."""
    t = ResultTable(atom_names=ATOMS)
    targets = [MergeJob("known-linear-00", "linear", ("json", "pirate"), (0.5, 0.5), 0, "known"),
               MergeJob("mixed-linear-00", "linear", ("json", "sql"), (0.5, 0.5), 0, "mixed"),
               MergeJob("unknown-linear-00", "linear", ("sql", "upper"), (0.5, 0.5), 0, "unknown")]
    truth = {"known": [0.5, 0.5, 0.0], "mixed": [0.5, 0.0, 0.0], "unknown": [0.0, 0.0, 0.0]}
    for spec in targets:
        right = np.array(truth[spec.group])
        loose = right + np.array([0.0, 0.0, 0.02])  # a small spurious coefficient on "sort"
        t.add("loose", spec, Decomposition(loose, np.zeros(0), None, False),
              {"precision": 2 / 3, "recall": 1.0, "recon_error": 0.9 if spec.group == "unknown" else 0.1})
        verdict = {"known": "explained", "mixed": "partly-explained", "unknown": "not-explained"}[spec.group]
        t.add("strict", spec, Decomposition(right, np.zeros(0), right > 0, None, {"verdict": verdict}),
              {"precision": 1.0, "recall": 1.0, "recon_error": 0.9 if spec.group == "unknown" else 0.1})
    return t


def all_texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_text().strip()]


def test_the_precision_recall_figure_has_an_out_of_dictionary_panel_and_no_unexplained_line() -> None:
    fig = precision_recall_figure(finding_table())
    ood = [ax for ax in fig.axes if ax.get_gid() == "out-of-dictionary"]
    assert len(ood) == 1 and "unknown-only" in ood[0].get_title()
    # per decomposer, the share of unknown-only targets called not explained: loose 0, strict 1
    bars = ood[0].containers[0]
    assert bars.get_label().startswith("not explained")
    widths = {round(p.get_y() + p.get_height() / 2): p.get_width() for p in bars.patches}
    assert widths == {0: 0.0, 1: 1.0}
    dashed = [line for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() in ("--", "dashed")]
    assert not dashed
    assert any(t.get_gid() == "caption" and t.get_text().startswith("What to look at") for t in all_texts(fig))
    assert min(t.get_fontsize() for t in all_texts(fig)) >= 8


def test_the_heatmap_marks_attributed_atoms_and_false_positives_on_a_sequential_scale() -> None:
    fig = coefficient_figure(finding_table(), "loose")
    found = next(ax for ax in fig.axes if ax.get_gid() == "found-panel")
    image = found.get_images()[0]
    assert image.get_cmap().name.startswith("Blues") and image.norm.vmin == 0  # no negative half
    marks = {c.get_gid(): c.get_offsets() for c in found.collections}
    # the spurious 0.02 on "sort" (column 2) is a false positive in every row
    assert sorted(map(tuple, np.asarray(marks["false-positive"]).tolist())) == [(2.0, 0.0), (2.0, 1.0), (2.0, 2.0)]
    assert len(marks["attributed"]) == 3  # json and pirate in the known target, json in the mixed one
    assert min(t.get_fontsize() for t in all_texts(fig)) >= 8
    assert any(t.get_gid() == "caption" and t.get_text().startswith("What to look at") for t in all_texts(fig))


def test_unknown_only_rows_are_not_blank_an_out_of_dictionary_strip_shows_them() -> None:
    fig = coefficient_figure(finding_table(), "strict")
    truth_strip = next(ax for ax in fig.axes if ax.get_gid() == "truth-strip")
    outside = truth_strip.get_images()[0].get_array().ravel().tolist()
    assert outside == [0.0, 0.5, 1.0]  # known, mixed, unknown-only: the weight outside the dictionary
    verdict_strip = next(ax for ax in fig.axes if ax.get_gid() == "found-strip")
    assert verdict_strip.get_images()[0].get_array().ravel().tolist() == [0, 1, 2]  # explained … not-explained
    found = next(ax for ax in fig.axes if ax.get_gid() == "found-panel")
    assert "false-positive" not in {c.get_gid() for c in found.collections}


def test_missed_constituents_are_circled() -> None:
    t = finding_table()
    spec = MergeJob("known-ties-00", "ties", ("json", "sort"), (0.5, 0.5), 0, "known")
    t.add("strict", spec, Decomposition(np.array([0.5, 0.0, 0.0]), np.zeros(0), None, None, {"verdict": "explained"}),
          {"recon_error": 0.3})
    found = next(ax for ax in coefficient_figure(t, "strict").axes if ax.get_gid() == "found-panel")
    marks = {c.get_gid(): np.asarray(c.get_offsets()).tolist() for c in found.collections}
    assert [2.0, 1.0] in marks["missed"]  # sort in the second known row (rows are sorted by group)


def test_no_legend_entry_or_line_is_left_unexplained() -> None:
    fig = precision_recall_figure(finding_table())
    for ax in fig.axes:
        for line in ax.get_lines():
            assert isinstance(line, Line2D) and not line.get_label().startswith("_child"), line.get_label()
