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

*Verdict.*
- ``not-explained``: no skill is significant (BH at α) against ``δ_global`` — nothing in the target stands
  out beyond what an unknown task as close to some skill as the dictionary's closest pair could induce.
  (``ood_null="own"``: against each skill's own δ_s instead; more power, but it trusts that unknown tasks
  are no closer to a skill than its closest dictionary skill — false on data with category siblings
  outside the dictionary, the README's attribution section.) Skills significant at their own δ_s are still listed, each with a
  note that it cannot be told from a relative.
- ``partly-explained``: skills found, and the skills *not* found carry a positive mean partial
  correlation (one-sided t-test over units of ``mean_{k∉S} r_uk`` > 0 at level α). A task outside the
  dictionary shares structure with the dictionary's skills (the LOO shows every skill picks up a
  positive share of any other task) while merge noise does not; so absent skills drift above zero only
  when the target holds something the found skills do not explain. The remainder's energy share
  (1 − R² of the non-negative refit on the found skills' atoms) is reported.
- ``explained`` otherwise.

*Coefficients.* Non-negative least squares of the target on the atoms of the significant skills.

*Notes (near duplicates said out loud).*
- a significant skill that is **not** significant at ``δ_global``: "X: its evidence is within what an
  unknown task as close to X as the closest pair of dictionary skills would produce; the dictionary
  cannot tell X from such a relative".
- a significant single-training skill whose per-unit coefficient (in atom units) is not constant across
  units (Cochran's heterogeneity Q against χ²_{U−1}, level α), and every multi-training skill: "not an
  exact copy of the dictionary's X; a differently trained X, a close relative of it or a non-linear
  merge (TIES/DARE) of it give this evidence; the dictionary cannot tell them apart". An exact copy merged
  linearly has the same coefficient in every unit; a relative or another training does not.
- two found skills that are each other's closest relative in the dictionary (LOO): their split may be
  confounded.

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
              delta_quantile: float = 1.0) -> Calibration:
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
    if K < 2:  # nothing to leave out: a point null (no relatedness allowance)
        return Calibration(D, skill_names, gl, units, grams, W, C, np.zeros(K), 0.0, relation, 0, 0,
                           "point null E[m_s] <= 0 (a one-skill dictionary cannot be calibrated), t_{U-1}, BH")
    best = np.array([np.quantile(v, delta_quantile) for v in samples])
    return Calibration(D, skill_names, gl, units, grams, W, C, best, float(np.quantile(np.concatenate(samples),
                       delta_quantile)), relation, n_pseudo, max_removed)


def exactness_pvalue(cal: "Calibration", cy: np.ndarray, yy: np.ndarray, k: int) -> float | None:
    """p-value of H0 "the target holds a scaled copy of skill k's (single) atom".

    Under H0 the per-unit coefficient of the atom (in atom units) is the same constant in every unit, up to
    the unit's sampling noise: Cochran's heterogeneity Q = Σ_u w_u (β_u − β̄)², w_u = 1 / Var(β_u), against
    χ²_{U−1}. A differently trained version of the skill, a relative, or a non-linear merge (TIES / DARE)
    of it changes the coefficient from unit to unit. None for multi-training skills (centroid columns).
    """
    if len(cal.groups[k]) != 1:
        return None
    j = cal.groups[k][0]
    U, K = cy.shape
    beta, var = np.zeros(U), np.zeros(U)
    for u in range(U):
        Ci = np.linalg.pinv(cal.C[u])
        b = Ci @ cy[u]
        rss = max(yy[u] - float(b @ cy[u]), _EXACT * yy[u])
        scale = cal.W[u, j, k]
        beta[u] = b[k] * scale
        var[u] = rss / max(cal.grams.sizes[u] - K, 1) * Ci[k, k] * scale * scale
    w = 1.0 / np.maximum(var, 1e-300)
    mean = float((w * beta).sum() / w.sum())
    return float(_scipy_stats().chi2.sf(float((w * (beta - mean) ** 2).sum()), U - 1))


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
           target: tuple[np.ndarray, np.ndarray] | None = None, ood_null: str = "global",
           strict: bool = False, min_effect: float = 0.02, max_unexplained: float = 0.5) -> Decision:
    """Attribute one target.

    Args:
        cal: :func:`calibrate` result of the dictionary.
        y: the target's vector on the same coordinates as the dictionary; or
        target: ``(D_uᵀy_u, y_uᵀy_u)`` per unit (streaming path, see :func:`target_grams`).
        alpha: BH level over skills, and level of the remainder test.
        ood_null: "global" (default) — not-explained iff no skill is significant at δ_global (robust to
            unknown tasks as close to a skill as the closest dictionary pair); "own" — iff no skill is
            significant at its own δ_s (more power, less robust).
        strict: with ood_null="global", a not-explained target reports no skills (candidates go to notes).
        min_effect: the smallest mean partial correlation that can count as presence, a floor under δ_s
            and δ_global: with noise-free inputs (a target that is exactly a dictionary atom, atoms that
            share nothing) the calibrated bounds shrink to round-off and the test would compare round-off.
        max_unexplained: above this share of the target's energy left unexplained by the skills found,
            the verdict is at most ``partly-explained``: the remainder test only sees structure shared
            with the skills not found, and a skill orthogonal to the whole dictionary leaves none.
    """
    dy, yy = target if target is not None else target_grams(cal.D, np.asarray(y, dtype=float), cal.units)
    K, U = len(cal.skill_names), cal.U
    names = cal.skill_names
    m_atoms = cal.D.shape[1]
    if float(yy.sum()) <= 0:
        z = {s: 0.0 for s in names}
        return Decision(np.zeros(m_atoms), np.zeros(m_atoms, bool), [], z, z, {s: 1.0 for s in names},
                        {s: 1.0 for s in names}, {s: 1.0 for s in names}, "not-explained", 0.0, 0.0, None,
                        ["target is zero"], _describe(cal))
    cy = np.einsum("uak,ua->uk", cal.W, dy)
    R = partial_correlations(cal.C, cy, yy)
    ms = R.mean(axis=0)
    se = np.maximum(R.std(axis=0, ddof=1) / np.sqrt(U), 1e-12)
    delta = np.maximum(cal.delta, min_effect)
    delta_global = max(cal.delta_global, min_effect)
    t = (ms - delta) / se
    p = _scipy_stats().t.sf(t, U - 1)
    q = bh_qvalues(p)
    p_glob = _scipy_stats().t.sf((ms - delta_global) / se, U - 1)
    q_glob = bh_qvalues(p_glob)
    sig = [k for k in range(K) if q[k] <= alpha]

    # non-negative refit on the atoms of the significant skills (all from the Grams)
    atoms = sorted(j for k in sig for j in cal.groups[k])
    coef = np.zeros(m_atoms)
    Gt, bt, yt = cal.grams.G.sum(axis=0), dy.sum(axis=0), float(yy.sum())
    if atoms:
        coef[atoms] = nnls_gram(Gt[np.ix_(atoms, atoms)], bt[atoms])
    rss = max(yt - 2 * float(coef @ bt) + float(coef @ Gt @ coef), 0.0)
    unexplained = rss / yt

    notes: list[str] = []
    rem_p = None
    ood = not sig if ood_null == "own" else not any(q_glob[k] <= alpha for k in range(K))
    if ood and sig:
        notes.append("no skill carries more evidence than an unknown close relative could produce; candidates: "
                     + ", ".join(f"{names[k]} (q={q[k]:.2g})" for k in sig))
        if strict:
            sig, coef = [], np.zeros(m_atoms)
            unexplained = 1.0
    if ood:
        verdict = "not-explained"
        close = [names[k] for k in np.argsort(p)[:2] if p[k] <= 0.5]
        if close:
            notes.append("closest skills (not significant): " + ", ".join(
                f"{s} (p={p[names.index(s)]:.2g})" for s in close))
    else:
        absent = [k for k in range(K) if k not in sig]
        if unexplained <= _EXACT:
            partly = False      # nothing left to explain (exact fit up to round-off): the test would read noise
        elif absent:
            b = R[:, absent].mean(axis=1)
            sd = b.std(ddof=1)
            if sd > 0:
                rem_p = float(_scipy_stats().t.sf(b.mean() / (sd / np.sqrt(U)), U - 1))
            else:
                rem_p = 0.0 if b.mean() > 0 else 1.0
            partly = rem_p <= alpha
        else:
            partly = False
            notes.append("every dictionary skill is significant: the remainder test has no absent skill to use")
        if not partly and unexplained > max_unexplained:
            partly = True
            notes.append(f"{unexplained:.0%} of the target's energy on the mask is not explained by the skills "
                         f"found (more than max_unexplained = {max_unexplained:.0%}): it holds a change outside "
                         "the dictionary, other trainings of the skills found, or the noise of a merge that drops "
                         "most entries (DARE or TIES at a low density); the dictionary cannot tell which")
        verdict = "partly-explained" if partly else "explained"
        for k in sig:
            if q_glob[k] > alpha:
                notes.append(f"{names[k]}: its evidence (mean partial correlation {ms[k]:.3f}) is within what an "
                             f"unknown task as close to {names[k]} as the closest pair of dictionary skills "
                             f"(δ_global={cal.delta_global:.3f}) would produce; the dictionary cannot tell "
                             f"{names[k]} from such a relative")
                continue
            pe = exactness_pvalue(cal, cy, yy, k)
            if pe is None or pe <= alpha:
                why = ("the skill is a centroid of several trainings" if pe is None
                       else f"its coefficient varies between units, heterogeneity p={pe:.2g}")
                notes.append(f"{names[k]}: not an exact copy of the dictionary's {names[k]} ({why}); a differently "
                             f"trained {names[k]}, a close relative of it (a variant of the task) or a non-linear "
                             f"merge (TIES/DARE) of it give this evidence; the dictionary cannot tell them apart")
        for a, b2 in itertools.combinations(sig, 2):
            ra, rb = cal.relation[a, b2], cal.relation[b2, a]
            if (np.isfinite(ra) and ra >= cal.delta[a]) or (np.isfinite(rb) and rb >= cal.delta[b2]):
                notes.append(f"{names[a]} and {names[b2]} are each other's closest relatives in the dictionary; "
                             f"their split may be confounded")
    return Decision(
        coefficients=coef, support=coef > 0, skills=[names[k] for k in sig],
        statistic=dict(zip(names, map(float, ms))), t=dict(zip(names, map(float, t))),
        p=dict(zip(names, map(float, p))), q=dict(zip(names, map(float, q))),
        p_global=dict(zip(names, map(float, p_glob))), verdict=verdict,
        remainder_share=unexplained if verdict == "partly-explained" else 0.0,
        unexplained_share=unexplained, remainder_p=rem_p, notes=notes, null=_describe(cal, ood_null))


def _describe(cal: Calibration, ood_null: str = "global") -> str:
    return (f"{cal.null}; U={cal.U} units; {cal.n_pseudo} pseudo-targets (up to {cal.max_removed} skills removed); "
            f"delta_s in [{cal.delta.min():.3f}, {cal.delta.max():.3f}], delta_global={cal.delta_global:.3f}; "
            f"out-of-dictionary verdict against {'delta_global' if ood_null == 'global' else 'delta_s'}")
