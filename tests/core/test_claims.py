"""Claim levels of a decomposition (issue 22): what an attributed atom stands for, and what counts as a claim.

Every entry of ``attribution.json``'s ``attributed`` list carries ``"claim"``; metrics and suites count every
attributed atom as a claim of its skill except ``"claim": "relative"`` (the skill *or a close relative*).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unmerge_core import CLAIMS, Decomposition, DecompositionProblem
from unmerge_core.errors import PluginError
from unmerge_core.pipeline.scoring import check_decomposition, load_decomposition, save_decomposition
from unmerge_core.types import TargetEvaluation

NAMES = ("a", "b", "c", "d")


def problem() -> DecompositionProblem:
    d = np.eye(6, 4)
    return DecompositionProblem(d, d @ [1.0, 0.5, 0.0, 0.2], NAMES)


def evaluation(result: Decomposition, truth=("a", "b")) -> TargetEvaluation:
    p = problem()
    return TargetEvaluation("t", "known", "linear", truth, (0.5,) * len(truth), NAMES, p.target, result, {}, {})


@given(levels=st.lists(st.sampled_from((None, *CLAIMS)), min_size=4, max_size=4))
@settings(max_examples=40, deadline=None)
def test_relative_entries_are_listed_but_not_claimed(levels) -> None:
    support = np.array([c is not None for c in levels])
    result = Decomposition(np.where(support, 0.5, 0.0), np.zeros(6), support, None, {}, tuple(levels))
    assert result.claim_levels() == list(levels)
    assert result.claimed().tolist() == [c is not None and c != "relative" for c in levels]
    assert evaluation(result).selected_skills() == {n for n, c in zip(NAMES, levels) if c not in (None, "relative")}


def test_without_levels_every_attributed_atom_is_claimed_exact() -> None:
    result = Decomposition(np.array([1.0, 0.5, 0.0, 0.0]), np.zeros(6))
    assert result.claim_levels() == ["exact", "exact", None, None]
    assert evaluation(result).selected_skills() == {"a", "b"}


def test_claims_are_checked_and_cached() -> None:
    p = problem()
    good = Decomposition(np.array([1.0, 0.5, 0.0, 0.2]), p.target, np.array([True, True, False, True]), False, {},
                         ("exact", "retrained", None, "relative"))
    checked = check_decomposition(good, p, "x", "t")
    assert checked.claims == good.claims
    for bad in (("exact",), ("exact", "copy", None, None)):
        with pytest.raises(PluginError, match="claims"):
            check_decomposition(Decomposition(good.coefficients, p.target, good.support, False, {}, bad), p, "x", "t")


def test_claims_survive_the_cache(tmp_path) -> None:
    p = problem()
    result = Decomposition(np.array([1.0, 0.5, 0.0, 0.2]), p.dictionary @ [1.0, 0.5, 0.0, 0.2],
                           np.array([True, True, False, True]), False, {}, ("exact", "retrained", None, "relative"))
    save_decomposition(tmp_path / "d.json", result, p)
    assert load_decomposition(tmp_path / "d.json", p).claims == result.claims
