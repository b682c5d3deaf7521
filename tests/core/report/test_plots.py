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
