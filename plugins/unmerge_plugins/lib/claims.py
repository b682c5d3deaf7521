"""Exact-copy evidence at the atoms' own scale, and its null calibrated on the dictionary.

The second kind of evidence ``skill-fdr`` combines with its per-skill test
(:mod:`unmerge_plugins.lib.skill_test`):

*Sparse non-negative fit.* NNLS of the target on every atom, then backward elimination by **unique
energy**: the share of ``‖y‖²`` lost when an atom is removed and the others are refitted; the atom with the
smallest unique energy is dropped while it is below ``min_unique_energy`` (the rule of ``nnls-select``,
which is what makes that decomposer precise on merges of the dictionary's own adapters).

*Coefficient consistency.* The surviving atoms are refitted (NNLS) in every replication unit (row band
of a module) separately. An exact copy of an atom merged into the target has the same coefficient — its
merge weight — in every unit, up to the unit's noise; another training of the skill, a relative, or an
atom picked up through shared directions does not (its per-unit coefficient follows the per-unit
cosine of two different vectors). ``consistency = median_u / (1.4826 · MAD_u)`` of the per-unit
coefficients: a robust signal-to-noise ratio (the inverse of a robust coefficient of variation).
Rounding the merged checkpoint to bf16 / fp16 adds independent noise to every coordinate: it leaves the
median where it is and the consistency of an exact adapter high.

*Null of the consistency, calibrated on the dictionary.* Leave-skills-out, as for the skill test: each
skill (and each pair of skills) in turn is removed and one of its trainings is the pseudo-target; the
elimination runs on the atoms left and the consistency of every survivor is recorded. ``κ_j`` = the
largest consistency atom j reached while it was absent (what another task of the dictionary's own kind
induces on it), and never below ``min_consistency``. An atom is an **exact copy** when it survives the
elimination and its consistency exceeds ``κ_j``.

Everything is computed from per-unit Gram quantities (``D_uᵀD_u``, ``D_uᵀy_u``, ``y_uᵀy_u``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unmerge_plugins.lib.gram import nnls_gram, nnls_gram_rss

MAD_SCALE = 1.4826
"""MAD × this estimates the standard deviation of a normal sample."""
CONSISTENCY_CAP = 1e6
"""Consistency of a coefficient that does not vary at all (MAD 0): capped, so reports stay finite."""


@dataclass
class ExactEvidence:
    """Exact-copy evidence of one target."""

    kept: list[int]                       # atoms surviving the elimination
    unique_energy: dict[int, float]       # share of ‖y‖² lost without the atom (atoms of the NNLS support)
    consistency: dict[int, float]         # per kept atom
    exact: list[int]                      # kept atoms whose consistency exceeds their calibrated bound


def eliminate(G: np.ndarray, b: np.ndarray, yy: float, min_unique_energy: float,
              candidates: Sequence[int] | None = None,
              dropped: list[tuple[int, float]] | None = None) -> tuple[list[int], dict[int, float]]:
    """NNLS then backward elimination by unique energy (``nnls-select``'s rule) from Gram quantities:
    the atoms kept and the unique energy of every atom of the NNLS support (its last value). ``dropped``,
    when given, receives ``(atom, unique energy)`` of each eliminated atom in order."""
    if yy <= 0:
        return [], {}
    cols = list(range(G.shape[0])) if candidates is None else list(candidates)
    scale = float(np.max(np.abs(np.diag(G)))) if G.size else 1.0
    scale = scale if scale > 0 else 1.0
    Gs, bs, ys = G / scale, b / scale, yy / scale          # conditioning only: every share is scale free
    full = np.zeros(G.shape[0])
    if cols:
        full[cols] = nnls_gram(Gs[np.ix_(cols, cols)], bs[cols])
    selected = [j for j in cols if full[j] > 0]
    unique: dict[int, float] = {}
    while selected:
        rss, _ = nnls_gram_rss(Gs, bs, ys, selected)
        gains = [(nnls_gram_rss(Gs, bs, ys, selected[:k] + selected[k + 1:])[0] - rss) / ys
                 for k in range(len(selected))]
        for j, g in zip(selected, gains):
            unique[j] = float(g)
        worst = int(np.argmin(gains))
        if gains[worst] >= min_unique_energy:
            break
        if dropped is not None:
            dropped.append((selected[worst], float(gains[worst])))
        selected.pop(worst)
    return selected, unique


def consistency(G_units: np.ndarray, b_units: np.ndarray, kept: Sequence[int]) -> dict[int, float]:
    """Robust signal-to-noise of every kept atom's per-unit NNLS coefficient (units where it has energy)."""
    kept = list(kept)
    if not kept:
        return {}
    U = G_units.shape[0]
    table = np.full((U, len(kept)), np.nan)
    for u in range(U):
        diag = np.diag(G_units[u])[kept]
        live = [i for i, d in enumerate(diag) if d > 1e-12 * max(float(diag.max()), 1e-300)]
        if not live:
            continue
        cols = [kept[i] for i in live]
        table[u, live] = nnls_gram(G_units[u][np.ix_(cols, cols)], b_units[u][cols])
    out = {}
    for i, j in enumerate(kept):
        col = table[:, i][np.isfinite(table[:, i])]
        if col.size < 3:
            out[j] = 0.0
            continue
        med = float(np.median(col))
        mad = MAD_SCALE * float(np.median(np.abs(col - med)))
        out[j] = float(min(med / mad, CONSISTENCY_CAP)) if mad > 1e-12 * max(abs(med), 1e-300) else (
            CONSISTENCY_CAP if med > 0 else 0.0)
    return out


def exact_evidence(G_units: np.ndarray, b_units: np.ndarray, yy_units: np.ndarray, kappa: np.ndarray,
                   min_unique_energy: float, candidates: Sequence[int] | None = None,
                   present: Sequence[int] = ()) -> ExactEvidence:
    """The exact-copy evidence of a target from its per-unit Gram quantities.

    ``present``: atoms the skill-level test already finds (a small adapter, exact, can carry less than
    ``min_unique_energy`` of the target's energy): their consistency is measured with the kept atoms'.
    """
    kept, unique = eliminate(G_units.sum(axis=0), b_units.sum(axis=0), float(yy_units.sum()), min_unique_energy,
                             candidates)
    tested = sorted(set(kept) | set(present))
    cons = consistency(G_units, b_units, tested)
    return ExactEvidence(kept, unique, cons, [j for j in tested if cons[j] > kappa[j]])


def calibrate_consistency(G_units: np.ndarray, groups: Sequence[Sequence[int]], min_unique_energy: float,
                          min_consistency: float, scale: np.ndarray, max_removed: int = 2,
                          seed: int = 0) -> np.ndarray:
    """``κ_j`` per atom: the largest consistency atom j reaches on leave-skills-out pseudo-targets (every
    single skill and every pair removed, one training each, unit-normalised per module), never below
    ``min_consistency``. ``scale``: U × m per-unit factors that unit-normalise every atom per module."""
    U, m, _ = G_units.shape
    K = len(groups)
    kappa = np.full(m, float(min_consistency))
    rng = np.random.default_rng(seed)
    for size in range(1, min(max_removed, K - 1) + 1):
        for removed in itertools.combinations(range(K), size):
            out = [j for k in removed for j in groups[k]]
            keep = [j for j in range(m) if j not in out]
            a = np.zeros((U, m))
            for k in removed:
                j = groups[k][int(rng.integers(len(groups[k])))]
                a[:, j] += scale[:, j]
            b_units = np.einsum("uab,ub->ua", G_units, a)
            yy_units = np.einsum("ua,ua->u", a, b_units)
            kept, _ = eliminate(G_units.sum(axis=0), b_units.sum(axis=0), float(yy_units.sum()), min_unique_energy,
                                keep)
            for j, c in consistency(G_units, b_units, kept).items():
                kappa[j] = max(kappa[j], c)
    return kappa
