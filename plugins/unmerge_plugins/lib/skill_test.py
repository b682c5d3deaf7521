"""Calibrated skill attribution with an interval (effect-size) null: per-skill p-values, BH, three verdicts.

The numerics of the ``skill-fdr`` decomposer (:mod:`unmerge_plugins.decomposers.skill_fdr`). Two entry points:

    cal = calibrate(D, slices, groups)            # once per dictionary (milliseconds on the tiny model)
    res = decide(cal, y)                          # once per target

The rule (README paragraph)
---------------------------
*Units.* Each module is cut into ``bands`` contiguous row bands (a masked vector keeps flat indices in
row-major order, so a contiguous chunk of a module's slice is a band of rows; on whole modules it is
literally a block of rows). The U bands of all modules are the replication units.

*Skills.* A skill with several trainings in the dictionary is the per-module centroid of its
unit-normalised atoms; a single training is itself.

*Statistic.* In every unit u the target is regressed (least squares, no sign constraint) on the K
skill columns. The statistic of skill s in unit u is its **partial correlation** with the target given
the other skills, ``r_us = z / sqrt(z² + RSS_u)`` with ``z = b_us · ‖x_us ⟂ others‖`` (the part of
the target carried by what only s has, relative to what no skill explains). It is scale free, does not
depend on the merge weights, and is ≈ 1 for an exact atom in a noise-free merge. Per skill:
``m_s = mean_u r_us``, ``se_s = sd_u(r_us) / √U``.

*Interval null (calibrated on the dictionary).* H0_s: "skill s is absent; whatever it picks up comes
from tasks related to it", i.e. ``E[m_s] ≤ δ_s``. δ_s is measured by leave-skills-out on the dictionary
itself: every subset of up to ``max_removed`` skills is removed in turn, the sum of one (per-module
unit-normalised) training of each removed skill is the pseudo-target, and ``m_s`` of every skill left
in the dictionary is recorded; ``δ_s`` = the largest ``m_s`` skill s reached when it was absent. It is
the strongest share that another task of the dictionary's own kind induces on s. ``δ_global`` = the
largest over all skills (the closest pair of the dictionary).

*p-value.* ``t_s = (m_s − δ_s) / se_s``, ``p_s = P(t_{U−1} ≥ t_s)``. Benjamini–Hochberg at level α
over the K skills; q-values reported. Significant skills = the attribution.

*Exact-copy evidence* (:mod:`unmerge_plugins.lib.claims`): a sparse non-negative fit at the atoms' own
scale (NNLS + backward elimination by unique energy, ``nnls-select``'s rule) and the consistency of each
kept atom's per-unit coefficient (median / robust SD), against a bound ``κ_j`` calibrated the same
leave-skills-out way (never below ``min_consistency``). An exact copy has its merge weight in every unit;
bf16 / fp16 rounding of the checkpoint adds independent noise and keeps it.

*Claims* (per skill, the strongest that holds): ``exact`` (an atom of it is an exact copy); ``retrained``
(BH-significant against δ_s *and* against the relative bound — by default δ_global, what an unknown task
as close to it as the dictionary's closest skills are to each other could produce, and never below
``relative_effect``, what a close relative does on a real model); ``relative``
(significant against δ_s only: the skill or a close relative of it, which the dictionary cannot tell
apart; listed, never counted as a claim of the skill).

*Verdict, derived from the claims.*
- ``not-explained``: no skill is claimed exact or retrained (relatives may be listed, with a note);
- ``partly-explained``: skills claimed, and a remainder: a relative is listed, or the skills not listed
  carry a mean partial correlation that differs from 0 (two-sided t-test over units at level α: an
  unknown task shares structure with the absent skills, a subtracted one gives them a negative share),
  or an absent skill is significantly negative (a subtracted task, named), or more than
  ``max_unexplained`` (a third) of the target's energy is left by the claimed skills;
- ``explained`` otherwise.
The remainder's share (1 − R² of the non-negative refit on the claimed skills' atoms) is reported with
every verdict, and every decision whose q- or p-value lies within a factor 2 of α is named in a note.

*Coefficients.* Non-negative least squares of the target on the atoms of the listed skills.

*Notes (near duplicates said out loud).* A retrained claim says what else gives that evidence (another
training or a non-linear merge of the adapter); two claimed skills that are each other's closest relatives
in the dictionary: their split may be confounded.

Everything is computed from per-unit Gram quantities (atomsᵀatoms, atomsᵀy, yᵀy per unit), so the
whole-module path can stream a module block of rows by block of rows: build ``UnitGrams.accumulate`` over
(unit, module, block-of-atom-rows) blocks, pass it as ``calibrate(..., grams=...)`` (D is then only used for
its number of columns), and call ``decide(cal, target=(Dᵀy per unit, yᵀy per unit))`` with the target's
Grams accumulated the same way . The mask-only path is the same code on the
masked vectors. Cost: calibration = (number of pseudo-targets) × U small K×K solves (0.2–0.5 s for K = 8,
218 pseudo-targets); per target = U K×K solves + an NNLS on the found atoms (2–9 ms).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from unmerge_plugins.lib.claims import calibrate_consistency, exact_evidence
from unmerge_plugins.lib.gram import nnls_gram

VERDICTS = ("explained", "partly-explained", "not-explained")
_EXACT = 1e-6   # relative RSS floor: a unit whose residual is below 0.1 % of the target's amplitude counts as fitted
                # exactly (float32 round-off of merged targets is ~1e-7 in amplitude; the README shows the results are flat around it)


# ------------------------------------------------------------------------------------------------
# units and per-unit Gram quantities
# ------------------------------------------------------------------------------------------------

def make_units(slices: Mapping[str, slice], n: int, bands: int = 4, min_size: int = 32,
               min_units: int = 4) -> list[tuple[str, slice]]:
    """Row bands of every module: (module, slice of coordinates), contiguous chunks of each module slice.

    ``bands`` per module (fewer when a module has fewer than ``bands × min_size`` coordinates); a problem
    too small for ``min_units`` units that way is cut into ``min_units`` equal chunks (as many as it has
    coordinates at most), so the t-test over units always has replicates.
    """
    mods = {k: v for k, v in dict(slices).items() if (v.stop or n) > (v.start or 0)} or {"all": slice(0, n)}
    out = []
    for name, s in mods.items():
        start, stop = s.start or 0, n if s.stop is None else s.stop
        size = stop - start
        parts = max(1, min(bands, size // min_size))
        out += [(name, slice(start + size * b // parts, start + size * (b + 1) // parts)) for b in range(parts)]
    if len(out) < min_units and n >= 2:
        parts = min(min_units, n)
        out = [("all", slice(n * b // parts, n * (b + 1) // parts)) for b in range(parts)]
    return out


@dataclass
class UnitGrams:
    """Per-unit Gram quantities of the atoms (and optionally of targets): the only thing the rule needs.

    ``G[u] = D_uᵀ D_u`` (atoms × atoms), ``modules[u]`` the module of unit u. Build from dense vectors
    with :meth:`from_vectors` or stream blocks of rows with :meth:`accumulate`.
    """

    G: np.ndarray                 # U × m × m
    modules: list[str]
    sizes: np.ndarray             # coordinates per unit

    @staticmethod
    def from_vectors(D: np.ndarray, units: Sequence[tuple[str, slice]]) -> UnitGrams:
        G = np.stack([D[s].T @ D[s] for _, s in units])
        return UnitGrams(G, [m for m, _ in units], np.array([s.stop - s.start for _, s in units]))

    @staticmethod
    def accumulate(blocks: Iterable[tuple[int, str, np.ndarray]], n_units: int, m: int) -> UnitGrams:
        """Stream (unit index, module, block of rows of the atoms flattened to coords × m) blocks."""
        G = np.zeros((n_units, m, m))
        mods = [""] * n_units
        sizes = np.zeros(n_units, dtype=int)
        for u, mod, block in blocks:
            G[u] += block.T @ block
            mods[u] = mod
            sizes[u] += block.shape[0]
        return UnitGrams(G, mods, sizes)


def target_grams(D: np.ndarray, y: np.ndarray, units: Sequence[tuple[str, slice]]) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: D_uᵀ y_u (U × m) and y_uᵀ y_u (U). Stream-able the same way as the atom Grams."""
    dy = np.stack([D[s].T @ y[s] for _, s in units])
    yy = np.array([float(y[s] @ y[s]) for _, s in units])
    return dy, yy


def _skill_transform(grams: UnitGrams, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Per-unit matrix W_u (m × K): skill column = atoms @ W_u (per-module centroid of unit-normalised atoms)."""
    U, m, _ = grams.G.shape
    mods = sorted(set(grams.modules))
    norms = {md: np.sqrt(np.maximum(sum(np.diag(grams.G[u]) for u in range(U) if grams.modules[u] == md), 0))
             for md in mods}
    W = np.zeros((U, m, len(groups)))
    for u in range(U):
        nrm = norms[grams.modules[u]]
        for k, idx in enumerate(groups):
            for j in idx:
                W[u, j, k] = (1.0 / nrm[j] if nrm[j] > 0 else 0.0) / len(idx)
    return W


def partial_correlations(C: np.ndarray, cy: np.ndarray, yy: np.ndarray,
                         inverse: np.ndarray | None = None) -> np.ndarray:
    """Per-unit partial correlation of y with every skill given the others (U × K), from skill Grams.

    C: U × K × K skill Gram, cy: U × K skill·y, yy: U.  r = z / sqrt(z² + RSS), z = b · ‖x ⟂ others‖.
    ``inverse``: the (pseudo-)inverses of C when the caller has them (see :func:`_kept_inverses`).
    """
    U, K, _ = C.shape
    R = np.zeros((U, K))
    live = np.flatnonzero(yy > 0)
    if live.size == 0 or K == 0:
        return R
    # every unit at once: numpy's pinv and matmul work on stacks of matrices (Grams are symmetric:
    # eigh, a third of the cost of an SVD)
    Ci = np.linalg.pinv(C[live], hermitian=True) if inverse is None else inverse[live]
    b = np.matmul(Ci, cy[live][:, :, None])[:, :, 0]
    y2 = yy[live]
    rss = np.maximum(y2 - np.einsum("uk,uk->u", b, cy[live]), _EXACT * y2)
    unique = 1.0 / np.sqrt(np.maximum(np.diagonal(Ci, axis1=1, axis2=2), 1e-300))
    z = b * unique
    R[live] = z / np.sqrt(z * z + rss[:, None])
    return R


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """The reusable null of one dictionary (from :func:`calibrate`)."""

    D: np.ndarray
    skill_names: list[str]
    groups: list[list[int]]
    units: list[tuple[str, slice]]
    grams: UnitGrams
    W: np.ndarray                  # U × m × K atom→skill transform
    C: np.ndarray                  # U × K × K skill Grams
    delta: np.ndarray              # per-skill interval bound δ_s
    delta_global: float            # closest pair of the dictionary
    relation: np.ndarray           # K × K: relation[s, k] = m_s when k alone is the pseudo-target
    n_pseudo: int
    max_removed: int
    null: str = "interval null E[m_s] <= delta_s (LOO max over removed subsets), t_{U-1}, BH"
    kappa: np.ndarray | None = None        # per atom: consistency bound of the exact-copy evidence
    min_unique_energy: float = 0.05
    delta_relative: np.ndarray | None = None  # per skill: what an unknown relative could produce on it

    @property
    def U(self) -> int:
        return len(self.units)


PROGRESS_FROM = 2000
"""Pseudo-targets from which the calibration shows a progress bar (on a terminal only)."""

_CONDITION = 1e-5
"""Smallest eigenvalue, relative to the largest, of every unit's skill Gram for the leave-out inverses
to come from the full inverse (:func:`_kept_inverses`); below it each pseudo-target takes a pseudo-inverse.
Below the limit the two routes' bounds agree to 1e-9 (near-collinear skills at condition 4e4: 1e-10;
at 2e5 they would differ by 1e-7, and take the pseudo-inverse route)."""


def _well_conditioned_inverse(C: np.ndarray) -> np.ndarray | None:
    """``C⁻¹`` of every unit when all are well conditioned (else ``None``: near-duplicate skills)."""
    if C.shape[1] == 0:
        return None
    lam = np.linalg.eigvalsh(C)
    if not np.all(lam[:, 0] > _CONDITION * np.maximum(lam[:, -1], 1e-300)):
        return None
    return np.linalg.inv(C)


def _kept_inverses(full_inverse: np.ndarray, keep: Sequence[int], removed: Sequence[int]) -> np.ndarray:
    """Inverses of the kept skills' Grams from the full inverse P (Schur complement): ``C_kk⁻¹ = P_kk −
    P_kr P_rr⁻¹ P_rk``; O(K²·r) per unit for r removed skills instead of an O(K³) decomposition."""
    p_kk = full_inverse[:, keep][:, :, keep]
    p_kr = full_inverse[:, keep][:, :, removed]
    p_rr = full_inverse[:, removed][:, :, removed]
    return p_kk - np.matmul(p_kr, np.linalg.solve(p_rr, np.swapaxes(p_kr, 1, 2)))


def _check_units(units: Sequence[tuple[str, slice]], skills: int, bands: int) -> None:
    """Refuse a mask too small for the test: each unit's regression on all skills needs a few more
    coordinates than skills, or every partial correlation is an exact fit (1) or undefined, and the
    verdict would be noise (a 16-coordinate mask called an exact merge not-explained)."""
    sizes = sorted(s.stop - s.start for _, s in units)
    need, median = skills + 3, sizes[len(sizes) // 2]
    if median < need:  # (a per-layer sub-problem sees one layer: only the per-module figure is general)
        raise ValueError(f"the mask is too small for the test: its {len(units)} units hold a median of {median} "
                         f"coordinates for {skills} skills, and each needs at least {need}; give the masker a "
                         f"budget of at least {need * bands} coordinates per module")


def calibrate(D: np.ndarray, slices: Mapping[str, slice], groups: Mapping[str, Sequence[int]] | None = None,
              atom_names: Sequence[str] | None = None, *, bands: int = 4, max_removed: int = 5,
              max_pseudo: int = 2000, seed: int = 0, grams: UnitGrams | None = None,
              delta_quantile: float = 1.0, min_unique_energy: float = 0.05,
              min_consistency: float = 3.0) -> Calibration:
    """Leave-skills-out interval null of a dictionary.

    Args:
        D: coords × atoms (masked vectors; or whole modules — then pass ``grams`` built by streaming and
            any D with the right number of columns for the refit).
        slices: module -> slice of coordinates of that module.
        groups: skill -> atom indices (several trainings of one skill); default one skill per atom.
        atom_names: names of the atoms (used when ``groups`` is None).
        bands: row bands per module (replication units).
        max_removed: largest number of skills removed together in the pseudo-targets (capped at K − 1):
            merges of several tasks outside the dictionary add up their shared structure coherently, so the
            pseudo-targets must include such sums (2–5 constituents is the merge size of the scenarios).
        max_pseudo: cap on the pseudo-targets per subset size (random subsets beyond it; all singles always).
        delta_quantile: δ_s = this quantile of skill s's LOO statistics (1.0 = the maximum, the default;
            lower values were tried for power and rejected, the README's attribution section).
        seed: picks which training of a removed skill forms the pseudo-target.
        grams: precomputed per-unit atom Grams (whole-module streaming path).
        min_unique_energy, min_consistency: the exact-copy evidence (:mod:`unmerge_plugins.lib.claims`):
            elimination level, and floor under the calibrated consistency bounds ``κ_j``.
    """
    D = np.asarray(D, dtype=float)
    n, m = D.shape
    if groups is None:
        names = list(atom_names) if atom_names is not None else [str(j) for j in range(m)]
        groups = {a: [j] for j, a in enumerate(names)}
    skill_names = list(groups)
    gl = [list(groups[s]) for s in skill_names]
    K = len(gl)
    units = make_units(slices, n, bands)
    _check_units(units, K, bands)
    grams = grams or UnitGrams.from_vectors(D, units)
    W = _skill_transform(grams, gl)
    C = np.einsum("uak,uab,ubl->ukl", W, grams.G, W)
    rng = np.random.default_rng(seed)
    mods = sorted(set(grams.modules))
    mod_norm = {md: np.sqrt(np.maximum(sum(np.diag(grams.G[u]) for u in range(len(units))
                                           if grams.modules[u] == md), 1e-300)) for md in mods}
    scale = np.array([[1.0 / mod_norm[grams.modules[u]][j] for j in range(m)] for u in range(len(units))])

    full_inverse = _well_conditioned_inverse(C)
    samples: list[list[float]] = [[] for _ in range(K)]
    relation = np.full((K, K), np.nan)
    n_pseudo = 0
    sizes = range(1, min(max_removed, K - 1) + 1)
    planned = sum(min(_n_choose(K, size), max_pseudo if size > 1 else K) for size in sizes)
    # seconds for a large dictionary: a bar on a terminal (none in logs and tests), closed with the loop
    progress = tqdm(total=planned, desc="skill-fdr: calibrating the dictionary's null", unit="pseudo-target",
                    leave=False, disable=None if planned >= PROGRESS_FROM else True)
    for size in sizes:
        subsets: Iterable[tuple[int, ...]] = itertools.combinations(range(K), size)
        if size > 1 and _n_choose(K, size) > max_pseudo:
            subsets = {tuple(sorted(rng.choice(K, size, replace=False).tolist())) for _ in range(max_pseudo)}
        for removed in subsets:
            keep = [k for k in range(K) if k not in removed]
            picks = [gl[k][int(rng.integers(len(gl[k])))] for k in removed]
            # pseudo-target = Σ picked atoms, each unit-normalised per module: all quantities from the Grams
            a = np.zeros((len(units), m))
            for j in picks:
                a[:, j] += scale[:, j]
            Ga = np.einsum("uab,ub->ua", grams.G, a)                 # D_uᵀ y_u
            yy = np.einsum("ua,ua->u", a, Ga)
            cy = np.einsum("uak,ua->uk", W[:, :, keep], Ga)
            Ck = C[:, keep][:, :, keep]
            inverse = _kept_inverses(full_inverse, keep, list(removed)) if full_inverse is not None else None
            ms = partial_correlations(Ck, cy, yy, inverse).mean(axis=0)
            n_pseudo += 1
            progress.update()
            for i, k in enumerate(keep):
                samples[k].append(float(ms[i]))
                if size == 1:
                    relation[k, removed[0]] = ms[i]
    progress.close()
    kappa = calibrate_consistency(grams.G, gl, min_unique_energy, min_consistency, scale, seed=seed)
    if K < 2:  # nothing to leave out: a point null (no relatedness allowance)
        return Calibration(D, skill_names, gl, units, grams, W, C, np.zeros(K), 0.0, relation, 0, 0,
                           "point null E[m_s] <= 0 (a one-skill dictionary cannot be calibrated), t_{U-1}, BH",
                           kappa, min_unique_energy, np.zeros(K))
    best = np.array([np.quantile(v, delta_quantile) for v in samples])
    return Calibration(D, skill_names, gl, units, grams, W, C, best, float(np.quantile(np.concatenate(samples),
                       delta_quantile)), relation, n_pseudo, max_removed, kappa=kappa,
                       min_unique_energy=min_unique_energy, delta_relative=relative_bounds(relation, best))


def relative_bounds(relation: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Per skill s: what an unknown close relative of s could produce on it, ``max(δ_s, ρ_s)``.

    ``ρ_s`` is the largest statistic one dictionary skill induces on another, over the pairs that do not
    involve s (``relation``: single skills left out): an unknown task may be as close to s as the
    dictionary's closest pair of *other* skills is (per pair, from one task each — never the coherent sum
    of several removed skills, which inflates the bound); and never less than what s's own dictionary
    neighbours induce on it (δ_s). A pair of related skills raises the bound of every skill to their
    relatedness, but no higher, and the pair's own skills keep their own δ_s.
    """
    K = relation.shape[0]
    out = np.array(delta, dtype=float)
    for s in range(K):
        others = [k for k in range(K) if k != s]
        sub = relation[np.ix_(others, others)]
        if np.isfinite(sub).any():
            out[s] = max(out[s], float(np.nanmax(sub)))
    return out


def _scipy_stats() -> Any:
    """``scipy.stats``, imported on first use (it adds 0.4 s to every start-up of the CLI otherwise)."""
    from scipy import stats

    return stats


def _n_choose(n: int, k: int) -> int:
    return math.comb(n, k)


# ------------------------------------------------------------------------------------------------
# decision
# ------------------------------------------------------------------------------------------------

@dataclass
class Decision:
    coefficients: np.ndarray            # per atom, non-negative (0 outside the support)
    support: np.ndarray                 # per atom, bool
    skills: list[str]                   # significant skills (the attribution)
    statistic: dict[str, float]         # m_s: mean partial correlation per skill
    t: dict[str, float]                 # (m_s − δ_s) / se_s
    p: dict[str, float]
    q: dict[str, float]
    p_global: dict[str, float]          # same test at δ_global (robust to unknown relatives)
    verdict: str
    remainder_share: float              # 1 − R² of the refit on the found skills (0 when explained)
    unexplained_share: float            # 1 − R² of the refit, whatever the verdict
    remainder_p: float | None
    notes: list[str] = field(default_factory=list)
    null: str = ""
    claims: dict[str, str] = field(default_factory=dict)      # skill -> exact / retrained / relative
    p_relative: dict[str, float] = field(default_factory=dict)  # p-value against the relative bound
    exact: dict[str, Any] = field(default_factory=dict)       # the exact-copy evidence (atom indices)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values."""
    p = np.asarray(p, dtype=float)
    mm = len(p)
    order = np.argsort(p)
    q = np.empty(mm)
    running = 1.0
    for rank in range(mm, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * mm / rank)
        q[i] = running
    return q


def decide(cal: Calibration, y: np.ndarray | None = None, alpha: float = 0.05, *,
           target: tuple[np.ndarray, np.ndarray] | None = None, relative_null: str = "global",
           strict: bool = False, min_effect: float = 0.02, max_unexplained: float = 1 / 3,
           relative_effect: float = 0.15) -> Decision:
    """Attribute one target: a claim level per skill, the verdict derived from the claims and the remainder.

    Args:
        cal: :func:`calibrate` result of the dictionary.
        y: the target's vector on the same coordinates as the dictionary; or
        target: ``(D_uᵀy_u, y_uᵀy_u)`` per unit (streaming path, see :func:`target_grams`).
        alpha: BH level over skills, and level of the remainder test.
        relative_null: the bound a *retrained* claim must beat, beyond its own δ_s: ``"global"`` (default)
            δ_global, what an unknown task as close to the skill as the dictionary's closest skills are to each
            other (or a merge of up to ``max_removed`` such tasks) could produce; ``"pair"`` ``max(δ_s, ρ_s)`` of
            :func:`relative_bounds` (single pairs only); ``"own"`` δ_s alone (every skill significant at its own
            bound is claimed: more recall, and close relatives are claimed as the skill).
        strict: relative claims are not listed (they go to the notes only).
        min_effect: the smallest mean partial correlation that can count as presence, a floor under every
            bound: with noise-free inputs the calibrated bounds shrink to round-off.
        max_unexplained: above this share of the target's energy left unexplained by the claimed skills, the
            verdict is at most ``partly-explained``.
        relative_effect: a floor under the relative bound: the largest mean partial correlation an unknown close
            relative of a skill is taken to produce on it whatever the dictionary shows. A dictionary of
            unrelated skills calibrates its bounds to ~0.05, below what a relative does (on SmolLM2 close
            relatives — a pirate and a cowboy rewrite, JSON and XML — have task-vector cosines of 0.07–0.14,
            two trainings of one skill 0.29–0.48; the statistic of a constituent does not exceed its cosine).

    Claims (per skill, the strongest that holds):

    - ``exact``: one of its atoms is an exact copy (:func:`unmerge_plugins.lib.claims.exact_evidence`:
      kept by the non-negative elimination at the atoms' scale, coefficient consistent across units
      beyond its calibrated bound κ_j);
    - ``retrained``: significant (BH at α) against its own δ_s *and* against its relative bound (never
      below ``relative_effect``);
    - ``relative``: significant against δ_s only — the skill or a close relative of it, which the
      dictionary cannot tell apart; listed, not claimed.

    Verdict: ``not-explained`` when no skill is claimed exact or retrained; otherwise
    ``partly-explained`` when the remainder holds structure (the absent skills' mean partial correlation
    differs from 0, two-sided; or an absent skill is significantly *negative*: a subtracted task; or more
    than ``max_unexplained`` of the energy is left by the claimed skills), else ``explained``.
    """
    dy, yy = target if target is not None else target_grams(cal.D, np.asarray(y, dtype=float), cal.units)
    K, U = len(cal.skill_names), cal.U
    names = cal.skill_names
    m_atoms = cal.D.shape[1]
    stats = _scipy_stats()
    if float(yy.sum()) <= 0:
        z = {s: 0.0 for s in names}
        return Decision(np.zeros(m_atoms), np.zeros(m_atoms, bool), [], z, z, {s: 1.0 for s in names},
                        {s: 1.0 for s in names}, {s: 1.0 for s in names}, "not-explained", 1.0, 1.0, None,
                        ["target is zero"], _describe(cal), claims={}, p_relative={s: 1.0 for s in names})
    cy = np.einsum("uak,ua->uk", cal.W, dy)
    R = partial_correlations(cal.C, cy, yy)
    ms = R.mean(axis=0)
    se = np.maximum(R.std(axis=0, ddof=1) / np.sqrt(U), 1e-12)
    delta = np.maximum(cal.delta, min_effect)
    delta_global = max(cal.delta_global, min_effect)
    rel = {"own": cal.delta, "global": np.full(K, cal.delta_global),
           "pair": cal.delta_relative if cal.delta_relative is not None else cal.delta}[relative_null]
    delta_rel = np.maximum(np.maximum(rel, cal.delta), max(min_effect, relative_effect))
    t = (ms - delta) / se
    p = stats.t.sf(t, U - 1)
    q = bh_qvalues(p)
    p_glob = stats.t.sf((ms - delta_global) / se, U - 1)
    p_rel = stats.t.sf((ms - delta_rel) / se, U - 1)
    q_rel = bh_qvalues(p_rel)

    # exact-copy evidence at the atoms' own scale
    kappa = cal.kappa if cal.kappa is not None else np.full(m_atoms, np.inf)
    present = [j for k in range(K) if q[k] <= alpha for j in cal.groups[k]]
    evidence = exact_evidence(cal.grams.G, dy, yy, kappa, cal.min_unique_energy, present=present)
    exact_atoms = set(evidence.exact)
    claims: dict[str, str] = {}
    for k in range(K):
        if any(j in exact_atoms for j in cal.groups[k]):
            claims[names[k]] = "exact"
        elif q[k] <= alpha and q_rel[k] <= alpha:
            claims[names[k]] = "retrained"
        elif q[k] <= alpha:
            claims[names[k]] = "relative"
    claimed = [k for k in range(K) if claims.get(names[k]) in ("exact", "retrained")]
    relatives = [k for k in range(K) if claims.get(names[k]) == "relative"]
    listed = claimed + ([] if strict else relatives)

    # non-negative refit (all from the Grams): coefficients of the listed skills' atoms; the remainder is
    # what the claimed skills leave (a relative claim explains nothing)
    Gt, bt, yt = cal.grams.G.sum(axis=0), dy.sum(axis=0), float(yy.sum())

    def refit(ks: list[int]) -> tuple[np.ndarray, float]:
        atoms = sorted(j for k in ks for j in cal.groups[k])
        c = np.zeros(m_atoms)
        if atoms:
            c[atoms] = nnls_gram(Gt[np.ix_(atoms, atoms)], bt[atoms])
        return c, max(yt - 2 * float(c @ bt) + float(c @ Gt @ c), 0.0) / yt

    coef, _ = refit(listed)
    _, unexplained = refit(claimed)
    support = np.zeros(m_atoms, dtype=bool)
    for k in listed:
        support[cal.groups[k]] = True

    notes: list[str] = []
    rem_p = None
    if not claimed:
        verdict = "not-explained"
        if relatives:
            notes.append("no skill is claimed as this exact adapter or another training of it; the evidence of "
                         + ", ".join(f"{names[k]} (q={q[k]:.2g})" for k in relatives)
                         + " is within what a close relative of it could produce, so the dictionary cannot tell "
                         "the skill from such a relative (claim \"relative\")")
        close = [names[k] for k in np.argsort(p)[:2] if p[k] <= 0.5 and k not in relatives]
        if close:
            notes.append("closest skills (not significant): " + ", ".join(
                f"{s2} (p={p[names.index(s2)]:.2g})" for s2 in close))
    else:
        absent = [k for k in range(K) if k not in claimed and k not in relatives]
        partly = False
        if relatives:
            partly = True
            notes.append("the target holds " + ", ".join(f"{names[k]} or a close relative of it" for k in relatives)
                         + ": a remainder the claimed skills do not explain")
        if unexplained <= _EXACT:
            pass        # nothing left to explain (exact fit up to round-off): the tests would read noise
        elif absent:
            b = R[:, absent].mean(axis=1)
            sd = b.std(ddof=1)
            if sd > 0:
                rem_p = float(2 * stats.t.sf(abs(b.mean()) / (sd / np.sqrt(U)), U - 1))
            else:
                rem_p = 0.0 if b.mean() != 0 else 1.0
            if rem_p <= alpha:
                partly = True
            negative = [k for k in absent
                        if stats.t.sf((-ms[k] - delta[k]) / se[k], U - 1) * len(absent) <= alpha]
            if negative:
                partly = True
                notes.append("the target holds " + ", ".join(names[k] for k in negative) + " with a negative sign "
                             "(subtracted): a change the non-negative attribution does not explain")
        else:
            notes.append("every dictionary skill is claimed: the remainder test has no absent skill to use")
        if unexplained > max_unexplained:
            partly = True
            notes.append(f"{unexplained:.0%} of the target's energy on the mask is not explained by the skills "
                         f"claimed (more than max_unexplained = {max_unexplained:.0%}): it holds a change outside "
                         "the dictionary, other trainings of the skills found, or the noise of a merge that drops "
                         "most entries (DARE or TIES at a low density); the dictionary cannot tell which")
        verdict = "partly-explained" if partly else "explained"
        for k in claimed:
            if claims[names[k]] == "retrained":
                notes.append(f"{names[k]}: not an exact copy of the dictionary's {names[k]} (its coefficient is not "
                             f"the same across units); another training of {names[k]}, or a non-linear merge "
                             f"(TIES/DARE) of it (claim \"retrained\")")
        for a, b2 in itertools.combinations(claimed, 2):
            ra, rb = cal.relation[a, b2], cal.relation[b2, a]
            if (np.isfinite(ra) and ra >= cal.delta[a]) or (np.isfinite(rb) and rb >= cal.delta[b2]):
                notes.append(f"{names[a]} and {names[b2]} are each other's closest relatives in the dictionary; "
                             f"their split may be confounded")
    # decisions that a small change of the inputs could flip: said out loud
    near = [f"{names[k]} (q={q[k]:.2g})" for k in range(K) if alpha / 2 < q[k] <= 2 * alpha]
    near += [f"{names[k]} against its relative bound (q={q_rel[k]:.2g})" for k in range(K)
             if q[k] <= alpha and alpha / 2 < q_rel[k] <= 2 * alpha and claims.get(names[k]) != "exact"]
    if rem_p is not None and alpha / 2 < rem_p <= 2 * alpha:
        near.append(f"the remainder test (p={rem_p:.2g})")
    if near:
        notes.append(f"within a factor 2 of alpha = {alpha:g}: " + ", ".join(near)
                     + "; another mask or a little noise may decide these the other way")
    return Decision(
        coefficients=coef, support=support, skills=[names[k] for k in claimed],
        statistic=dict(zip(names, map(float, ms))), t=dict(zip(names, map(float, t))),
        p=dict(zip(names, map(float, p))), q=dict(zip(names, map(float, q))),
        p_global=dict(zip(names, map(float, p_glob))), verdict=verdict,
        remainder_share=unexplained, unexplained_share=unexplained, remainder_p=rem_p, notes=notes,
        null=_describe(cal, relative_null, max(min_effect, relative_effect)), claims=claims, p_relative=dict(zip(names, map(float, p_rel))),
        exact={"kept": [int(j) for j in evidence.kept],
               "unique_energy": {int(j): v for j, v in evidence.unique_energy.items()},
               "consistency": {int(j): v for j, v in evidence.consistency.items()},
               "kappa": [float(x) for x in kappa]})


def _describe(cal: Calibration, relative_null: str = "global", floor: float = 0.0) -> str:
    rel = cal.delta_relative if cal.delta_relative is not None else cal.delta
    return (f"{cal.null}; U={cal.U} units; {cal.n_pseudo} pseudo-targets (up to {cal.max_removed} skills removed); "
            f"delta_s in [{cal.delta.min():.3f}, {cal.delta.max():.3f}], delta_global={cal.delta_global:.3f}; "
            f"retrained claims against the '{relative_null}' relative bound"
            + (f" (in [{rel.min():.3f}, {rel.max():.3f}])" if relative_null == "pair" and len(rel) else "")
            + (f", never below {floor:.3f}" if floor > 0 else ""))
