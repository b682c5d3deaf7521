"""``skill-fdr``: which skills are present, with a calibrated test per skill and the false-discovery
rate controlled across skills — built to recognise a skill trained by someone else.

Fixed thresholds on explained energy (``nnls-select``) lose an independently trained skill: its weights
share only ≈ 20–40 % of their direction with the dictionary's adapter for that skill, so it explains
little energy, although it is consistently present. This decomposer asks a question that does not
depend on energy (the full rule is in :mod:`unmerge_plugins.lib.skill_test`):

- **Units.** Every module's masked coordinates are cut into ``bands`` row bands: the replication units
  (never single coordinates, which are correlated).
- **Statistic.** In each unit the target is regressed on all skills; each skill gets its partial
  correlation with the target given the others. ``m_s`` is its mean over the units. A skill with several
  trainings in the dictionary (``problem.skills``) is their centroid.
- **Null, calibrated on the dictionary.** "Skill s is absent; what it picks up comes from related
  tasks": ``E[m_s] ≤ δ_s``, δ_s the largest ``m_s`` reached when s itself (and up to ``max_removed − 1``
  other skills) are left out of the dictionary and used as the target (leave-skills-out), and never
  below ``min_effect`` (noise-free inputs would otherwise shrink it to round-off).
- **p-value** of the one-sided t-test over units; **Benjamini–Hochberg** at ``alpha`` across skills.
- **Exact-copy evidence**, at the atoms' own scale: NNLS + backward elimination by unique energy
  (``nnls-select``'s rule), then each kept atom's per-unit coefficient consistency against a bound
  calibrated on the dictionary (:mod:`unmerge_plugins.lib.claims`).
- **One decision, a claim level per skill** (``claims``, also in ``info["claims"]``): ``exact`` (this
  adapter), ``retrained`` (this skill, another training: significant against δ_s and against the relative
  bound, by default δ_global and never below ``relative_effect``), ``relative`` (this skill or a close relative, cannot tell apart: listed,
  not claimed). The atoms of listed skills are refitted by non-negative least squares.
- **Verdict derived from the claims** (``info["verdict"]``): ``not-explained`` when nothing is claimed exact
  or retrained; ``partly-explained`` when something is and a remainder shows (a relative listed; the
  absent skills' mean partial correlation ≠ 0, two-sided; an absent skill significantly negative; more
  than ``max_unexplained`` of the energy left); ``explained`` otherwise. ``info["remainder_share"]`` with
  every verdict; decisions within a factor 2 of α are named in the notes. ``out_of_dictionary`` is
  ``verdict != "explained"`` (the report's flag and the metrics' ``ood_flag`` are the same).

``info`` also holds, per skill, the statistic, t, p, BH q, the p-values against ``δ_global`` and the
relative bound, the exact-copy evidence (kept atoms, unique energy, consistency, κ), the null's
description, and ``scores`` (the statistic per atom, for ranking metrics). The calibration
depends only on the dictionary: it is computed once per dictionary and parameters and reused (a pure
function of them, so the "no state between calls" rule holds).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Literal

import numpy as np
from pydantic import Field

from unmerge_core import Decomposition, DecompositionProblem, PluginParams, PluginSpec, Stage
from unmerge_plugins.lib.skill_test import Calibration, calibrate, decide


class SkillFdrParams(PluginParams):
    alpha: float = Field(0.05, gt=0, lt=1, description="false-discovery rate across skills (Benjamini–Hochberg), "
                                                       "and level of the remainder test")
    bands: int = Field(4, ge=1, le=64, description="row bands per module: the replication units")
    max_removed: int = Field(5, ge=1, le=16, description="largest number of skills left out together when "
                                                        "calibrating (merges of up to this many tasks)")
    delta_quantile: float = Field(1.0, gt=0, le=1, description="δ_s = this quantile of the leave-out statistics "
                                                              "(1: the maximum, conservative)")
    relative_null: Literal["global", "pair", "own"] = Field(
        "global", description="bound a 'retrained' claim must beat beyond its own δ_s: 'global' δ_global (what an "
                              "unknown task as close to the skill as the dictionary's closest skills are to each "
                              "other could produce), 'pair' max(δ_s, the closest single pair of the other skills), "
                              "'own' δ_s alone; below it the claim is 'relative'")
    relative_effect: float = Field(0.15, ge=0, lt=1, description="floor under the bound a 'retrained' claim must "
                                   "beat: the mean partial correlation an unknown close relative of a skill is taken "
                                   "to reach on it (real chat skills on SmolLM2: relatives' task-vector cosines "
                                   "0.07-0.14, two trainings of one skill 0.29-0.48); 0: the dictionary's bounds only")
    strict: bool = Field(False, description="relative claims are not listed (they go to the notes only)")
    min_unique_energy: float = Field(0.05, ge=0, lt=1, description="exact-copy evidence: the non-negative elimination "
                                     "keeps atoms whose removal loses at least this share of ‖y‖² (nnls-select's rule)")
    min_consistency: float = Field(3.0, gt=0, description="exact-copy evidence: floor under the calibrated bound of "
                                   "an atom's per-unit coefficient consistency (median / robust SD)")
    min_effect: float = Field(0.02, ge=0, lt=1, description="smallest mean partial correlation that can count as "
                                                            "presence (a floor under the calibrated bounds)")
    max_unexplained: float = Field(1 / 3, gt=0, le=1, description="a target with more than this share of its "
                                   "energy unexplained by the skills claimed is at most partly-explained")
    max_pseudo: int = Field(2000, ge=10, le=100_000, description="pseudo-targets per number of removed skills")
    seed: int = Field(0, ge=0, description="which training of a removed skill forms a pseudo-target")


class SkillFdr:
    """The calibrated, FDR-controlled skill test (see the module docstring)."""

    def __init__(self, params: SkillFdrParams) -> None:
        self.params = params
        self._calibrations: dict[str, Calibration] = {}
        self._lock = threading.Lock()

    def calibration(self, problem: DecompositionProblem) -> Calibration:
        """The dictionary's null, computed once per dictionary (and skills, module slices, parameters)."""
        key = _dictionary_key(problem)
        with self._lock:
            cal = self._calibrations.get(key)
            if cal is None:
                p = self.params
                skills = problem.skill_of_atom
                groups: dict[str, list[int]] = {}
                for j, skill in enumerate(skills):
                    groups.setdefault(skill, []).append(j)
                cal = calibrate(problem.dictionary, problem.groups, groups, bands=p.bands, max_removed=p.max_removed,
                                max_pseudo=p.max_pseudo, seed=p.seed, delta_quantile=p.delta_quantile,
                                min_unique_energy=p.min_unique_energy, min_consistency=p.min_consistency)
                self._calibrations[key] = cal
        return cal

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        p = self.params
        cal = self.calibration(problem)
        decision = decide(cal, problem.target, p.alpha, relative_null=p.relative_null, strict=p.strict,
                          min_effect=p.min_effect, max_unexplained=p.max_unexplained,
                          relative_effect=p.relative_effect)
        skill_of = problem.skill_of_atom
        support = np.asarray(decision.support, dtype=bool)
        claims = tuple(decision.claims.get(s) if on else None for s, on in zip(skill_of, support))
        coef = np.asarray(decision.coefficients, dtype=np.float64)
        names = problem.atom_names
        ex = decision.exact
        info = {
            "verdict": decision.verdict,
            "claims": dict(decision.claims),
            "remainder_share": decision.remainder_share,
            "unexplained_share": decision.unexplained_share,
            "remainder_p": decision.remainder_p,
            "notes": decision.notes,
            "skills": decision.skills,
            "statistic": decision.statistic,
            "t": decision.t,
            "p_values": [decision.p[s] for s in skill_of],
            "q_values": {s: decision.q[s] for s in decision.q},
            "p_global": decision.p_global,
            "p_relative": decision.p_relative,
            "exact_evidence": {
                "kept": [names[j] for j in ex.get("kept", [])],
                "unique_energy": {names[j]: v for j, v in ex.get("unique_energy", {}).items()},
                "consistency": {names[j]: v for j, v in ex.get("consistency", {}).items()},
                "kappa": dict(zip(names, ex.get("kappa", []))),
            },
            "scores": [decision.statistic[s] for s in skill_of],
            "null": decision.null,
            "delta": {s: float(d) for s, d in zip(cal.skill_names, cal.delta)},
            "delta_global": cal.delta_global,
            "delta_relative": {s: float(d) for s, d in zip(cal.skill_names, cal.delta_relative)}
            if cal.delta_relative is not None else None,
        }
        # out of the dictionary = not (wholly) made of claimed skills: the report's and the metric's flag agree
        return Decomposition(coef, problem.dictionary @ coef, support, decision.verdict != "explained", info, claims)


def _dictionary_key(problem: DecompositionProblem) -> str:
    h = hashlib.sha256()
    d = np.ascontiguousarray(problem.dictionary, dtype=np.float64)
    h.update(str(d.shape).encode())
    h.update(d.tobytes())
    h.update(repr(problem.skill_of_atom).encode())
    h.update(repr([(k, s.start, s.stop) for k, s in problem.groups.items()]).encode())
    return h.hexdigest()


SPEC = PluginSpec("skill-fdr", Stage.DECOMPOSER,
                  "Exact-copy evidence + calibrated per-skill test (BH FDR): a claim level per skill, the verdict "
                  "derived from the claims",
                  "https://doi.org/10.1111/j.2517-6161.1995.tb02031.x", SkillFdrParams, SkillFdr)
