"""``causal-ablation``: verify an attribution by removing the attributed component from the model.

A decomposition claims ``ΔW_T ≈ Σ cᵢ·τᵢ``. For a sampled target ``T`` and each atom ``i`` the
decomposer attributes (in its support, ``cᵢ > 0``) the metric builds the edited model
``θ_T − cᵢ·τᵢ`` (``τᵢ`` over every adapted weight, or only on the mask: ``scope``) and scores every
task of the run on held-out examples before and after. Per example of atom ``i``'s own task, the
*selectivity* is ``x = (after − before) − Δ_others`` where ``Δ_others`` is the mean change over the
other tasks; the effect is ``mean(x)`` (loss in nats, or exact-match error) and the effect size
``d_z = mean(x) / sd(x)``. With ``δ = max(min_effect_size · sd(x), min_delta)`` the smallest effect
that counts, the verdict is

- **confirmed**: ``mean(x) ≥ δ`` and a one-sided paired test says ``x > 0`` (``p < alpha``);
- **refuted**: a one-sided test says ``x < δ`` (``p < alpha``): removing the component does not hurt
  its own task clearly more than the others;
- **inconclusive**: neither.

Under ``score = "checker"`` (or ``"auto"`` when every skill has a checker) a skill is measured as
an instruct model is used: its first ``max_prompts`` held-out prompts (through the chat template when
the tokenizer has one) are answered by greedy decoding and judged by the skill's checker
(``lib/tasks/checkers.py``, :mod:`unmerge_plugins.lib.generation`); the verdict is :func:`judge_checker`:
confirmed when the skill's checker score drops by at least ``min_drop``, an exact one-sided McNemar test
over the prompts that flipped says the drop is real (``p < alpha``), and every other skill's score holds
(drops by at most ``hold_tolerance``, or by at least ``min_drop`` less than the own skill) — every other skill but the *transferred* ones, which the target does
better than the base although nothing of theirs is attributed (:func:`transferred_skills`; listed per
edit in ``others_transferred``, with every other skill that dropped in ``others_dropped``).
``score = "checker"`` with a skill that has no checker is an error naming those skills; ``auto`` then falls back to ``loss``. Nothing is teacher-forced then (exact match is
read from the greedy answers), and after an edit only the edit's own skill and the skills the target does
(checker score above 0 before the edit) are answered again: a skill at 0 cannot drop.

**not-performed** (checker score only; :func:`performs`): an attributed skill (or a missed constituent)
that the target does not perform measurably better than the base model cannot be confirmed or refuted
by removing it — at most the removal brings the target back to what the base does anyway, and a drop
below the base is what subtracting any task vector does (the null controls). The target *performs* a
skill when its checker score exceeds the base's by at least ``performed_gain`` (0.25, the default
``min_drop``: less could not show a confirming drop by returning to the base) **and** an exact one-sided
McNemar test over the prompts whose verdict differs between target and base says so (``P(Bin(won +
lost, ½) ≥ won) < alpha``); otherwise the verdict is ``not-performed`` whatever the removal did (its
numbers are still in the row: ``own_checker_base``, ``performed_gain``, ``performed_won`` /
``performed_lost``, ``performed_p``). ``performed_gain = None`` turns the rule off. The controls keep
the rule's own verdict. The columns give both denominators: ``causal_confirmed`` and the other verdict
shares are over every attributed atom (``causal_n_attributed``; they add up to 1, ``causal_not_performed``
included), ``causal_confirmed_performed`` over the attributed skills the target performs
(``causal_n_performed``); under the loss or exact-match score the rule is not applied and those three
columns are None.

``autocast = "bf16"`` decodes the greedy answers under bfloat16 autocast (the weights, hence every edit,
stay float32); it is refused in one line where the CPU (or GPU) has no native bf16. It is off by
default: measured on one SmolLM2 target it saved 7 % of the CPU time (22 % of the wall time on a shared
machine) with the same verdicts, too little to leave the float32 reference (docs/causal.md).

Controls, on the same target and model:

- ``random``: for each confirmed atom, a random direction with the per-module Frobenius norms of
  ``cᵢ·τᵢ`` (same support: dense for ``full``, the mask coordinates for ``mask``), judged against
  atom ``i``'s task — the control that could falsify the confirmation;
- ``null``: dictionary atoms that are neither attributed nor constituents, removed at the norm of the
  largest attributed removal; a specific test should not confirm them (their confirmed share is the
  test's false-positive rate);
- ``missed``: a true constituent the decomposer left out, removed at its true merge weight — the
  own-task cost of the false negative.

Only ``targets_per_cell`` targets per (group, merge method) cell are verified — the first ones of
the cell in the run's target order (``RunContext.targets``), so every decomposer is judged on the
same targets whatever order the metric is called in (a resumed run included); the other targets get
``None``.
``decomposers`` limits verification to some decomposers' attributions (each costs its own edits).
Evaluations are cached per (target, edit, quantised coefficient): decomposers that agree cost nothing
more. Per-target details go to ``<run_dir>/causal/<decomposer>/<target_id>.json`` and every edit to
``<run_dir>/causal/edits.csv``; the run's cache keeps each target's details beside its values
(``metric_details`` / ``restore_details``, :mod:`unmerge_core.pipeline.scoring`), so a rerun that reuses
them writes the files again.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from unmerge_core import (
    Capability,
    LoraAdapter,
    MergeJob,
    MetricValue,
    PluginParams,
    PluginSpec,
    RunContext,
    Stage,
    TargetEvaluation,
    UnmergeError,
    atomic_write_json,
    atomic_write_text,
    content_key,
    derive_seed,
    safe_filename,
    torch_threads,
)
from unmerge_plugins.lib.generation import Checker, CheckerLookup, GenerationSet, resolve_checker
from unmerge_plugins.lib.lm import HeldoutSet, TaskScores, WeightEditor, encode_examples, load_causal_lm, resolve_device
from unmerge_plugins.lib.tasks import load_examples

COLUMNS: tuple[str, ...] = (
    "causal_confirmed", "causal_refuted", "causal_inconclusive", "causal_not_performed",
    "causal_confirmed_performed", "causal_n_attributed", "causal_n_performed", "causal_effect",
    "causal_control", "causal_null_confirmed", "causal_null_effect", "causal_fn_cost",
)
VERDICTS: tuple[str, ...] = ("confirmed", "refuted", "inconclusive", "not-performed")
CLAIM_EDITS = ("attributed", "missed")
"""Edits that check a claim about the target (the not-performed rule applies to them); the controls
(``random``, ``null``) keep the rule's own verdict: a null control's false-positive rate is measured on
skills the target does not do."""
DIRECTION_CACHE_BYTES = 256 * 2**20


class CausalParams(PluginParams):
    """Sampling, evaluation and decision parameters of ``causal-ablation``."""

    targets_per_cell: int = Field(1, ge=0, description="targets verified per (group, merge method) cell")
    decomposers: list[str] | None = Field(None, min_length=1, description="verify only these decomposers' "
                                          "attributions (None: every decomposer's); the others get None")
    max_targets: int | None = Field(None, ge=0, description="cap on the total number of verified targets")
    examples_per_task: int = Field(64, ge=4, le=1000, description="held-out examples scored per task")
    scope: Literal["full", "mask"] = Field("full", description="remove cᵢ·τᵢ over every adapted weight or "
                                                               "only on the mask coordinates")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    score: Literal["loss", "exact_match", "checker", "auto"] = Field(
        "loss", description="per-example response loss, teacher-forced exact-match error, the skill's checker on "
                            "greedy answers (checker), or checker when every skill has one, else loss (auto)")
    test: Literal["wilcoxon", "ttest"] = Field("wilcoxon", description="one-sided paired test over examples")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance level of both one-sided tests")
    min_effect_size: float = Field(0.5, ge=0, description="smallest d_z that counts")
    min_delta: float = Field(0.05, ge=0, description="smallest effect that counts, in score units")
    threshold: float = Field(1e-3, ge=0, description="|c| above this is attributed (if the decomposer "
                                                     "gives no support)")
    relative: bool = Field(False, description="threshold is a fraction of max |c|")
    null_atoms: int = Field(2, ge=0, description="unattributed, absent atoms removed as controls per target")
    random_control: bool = Field(True, description="for each confirmed atom, also remove a random direction "
                                                   "with the same per-module norms")
    coef_digits: int = Field(2, ge=1, le=12, description="significant digits coefficients are rounded to")
    batch_size: int = Field(128, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads while scoring (None: torch's own); "
                                                          "1 is fastest for the tiny model on a busy machine")
    max_length: int = Field(256, ge=8, description="tokens per example (prompt + response)")
    max_prompts: int = Field(32, ge=1, le=1000, description="checker score: held-out prompts answered per skill "
                                                           "(at most examples_per_task)")
    min_drop: float = Field(0.25, gt=0, le=1, description="checker score: smallest drop of the own skill's "
                                                          "checker score that confirms")
    performed_gain: float | None = Field(
        0.25, ge=0, le=1, description="checker score: the target performs a skill when its checker score exceeds "
                                      "the base model's by at least this and an exact one-sided McNemar test over "
                                      "the prompts says so (p < alpha); an attributed skill it does not perform "
                                      "is 'not-performed' (None: no such check)")
    hold_tolerance: float = Field(0.15, ge=0, le=1, description="checker score: largest drop of another skill's "
                                                                "checker score that still holds")
    new_tokens_margin: int = Field(8, ge=1, description="checker score: new tokens beyond the skill's longest "
                                                        "reference response (its end-of-turn token included)")
    max_new_tokens: int = Field(256, ge=1, description="checker score: cap on the new tokens of an answer")
    generation_batch_size: int = Field(32, ge=1, description="checker score: prompts decoded together")
    autocast: Literal["off", "bf16"] = Field(
        "off", description="checker score: greedy decoding under torch.autocast in bfloat16 (weights and edits stay "
                           "float32); needs a CPU with native bf16 (avx512_bf16, AMX, Arm bf16) or a CUDA GPU "
                           "with bf16, refused otherwise. Off by default: one SmolLM2 target took 0.78x the wall "
                           "time and 0.93x the CPU time of float32 on a shared 2-core CPU, verdicts the same "
                           "(docs/causal.md)")
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# Decision rule (pure functions)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """The verdict on one edit. Effects are in score units (nats, or exact-match error)."""

    own_delta: float
    others_delta: float
    others_max: float
    effect: float
    effect_size: float
    p_value: float
    p_below: float
    verdict: str


def one_sided_p(x: np.ndarray, alternative: Literal["greater", "less"], test: str) -> float:
    """p-value of ``mean/median(x) > 0`` (``greater``) or ``< 0`` (``less``) over paired differences."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return 1.0
    if np.all(x == x[0]):  # no spread: the sign decides
        hit = x[0] > 0 if alternative == "greater" else x[0] < 0
        return 0.0 if hit else 1.0
    from scipy import stats  # imported when a test runs: scipy.stats adds 0.4 s to every start-up

    if test == "ttest":
        p = stats.ttest_1samp(x, 0.0, alternative=alternative).pvalue
    else:
        p = stats.wilcoxon(x, zero_method="zsplit", alternative=alternative).pvalue
    return 1.0 if p is None or math.isnan(p) else float(p)


def judge(own_diffs: np.ndarray, others: Sequence[float], params: CausalParams) -> Judgement:
    """Verdict on one removal from per-example own-task changes and the other tasks' mean changes."""
    own = np.asarray(own_diffs, dtype=np.float64)
    others_delta = float(np.mean(others)) if len(others) else 0.0
    others_max = float(np.max(others)) if len(others) else 0.0
    x = own - others_delta
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    effect_size = mean / sd if sd > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
    smallest = max(params.min_effect_size * sd, params.min_delta)
    p_value = one_sided_p(x, "greater", params.test)
    p_below = one_sided_p(x - smallest, "less", params.test)
    if p_value < params.alpha and mean >= smallest and mean > 0:
        verdict = "confirmed"
    elif p_below < params.alpha:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    return Judgement(float(own.mean()), others_delta, others_max, mean, effect_size, p_value, p_below, verdict)


def judge_checker(own_diffs: np.ndarray, others: Sequence[float], params: CausalParams) -> Judgement:
    """Verdict on one removal under ``score = "checker"``.

    ``own_diffs`` is, per held-out prompt of the own skill, the checker's verdict before minus after
    (1: accepted, then rejected; −1: the reverse; 0: unchanged); ``others`` are the other skills' drops
    of their checker scores. With ``lost`` / ``gained`` the prompts that flipped each way:

    - **confirmed**: the own score drops by at least ``min_drop``, an exact one-sided McNemar test says
      more prompts were lost than gained (``P(Bin(lost + gained, ½) ≥ lost) < alpha``), and the other
      skills hold: none drops by more than ``hold_tolerance``, or the own score drops by at least
      ``min_drop`` more than any of them (the removal is specific to the skill);
    - **refuted**: the share of prompts lost is significantly below ``min_drop``
      (``P(Bin(n, min_drop) ≤ lost) < alpha``), or another skill drops as much as the own one and by more
      than ``hold_tolerance`` (the removal is not specific to the skill);
    - **inconclusive**: neither.
    """
    x = np.asarray(own_diffs, dtype=np.float64)
    n = int(x.size)
    lost, gained = int((x > 0).sum()), int((x < 0).sum())
    drop = float(x.mean()) if n else 0.0
    others_delta = float(np.mean(others)) if len(others) else 0.0
    others_max = float(np.max(others)) if len(others) else 0.0
    effect = drop - others_delta
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    effect_size = drop / sd if sd > 0 else (math.copysign(math.inf, drop) if drop else 0.0)
    from scipy import stats

    p_value = float(stats.binom.sf(lost - 1, lost + gained, 0.5)) if lost else 1.0
    p_below = float(stats.binom.cdf(lost, n, params.min_drop)) if n else 1.0
    # the others hold when none falls by more than the tolerance, or the own skill falls by at least
    # min_drop more than any of them (specific: on 16 prompts one answer is 0.06, and removing one of the
    # constituents of a TSV-M / Iso-C merge moves the others a little, the own skill by 0.9)
    holds = others_max <= params.hold_tolerance + 1e-12 or drop - others_max >= params.min_drop - 1e-12
    if drop >= params.min_drop - 1e-12 and p_value < params.alpha and holds:
        verdict = "confirmed"
    elif p_below < params.alpha or (not holds and others_max >= drop):
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    return Judgement(drop, others_delta, others_max, effect, effect_size, p_value, p_below, verdict)


def transferred_skills(target: Mapping[str, float], base: Mapping[str, float], attributed: set[str],
                       tolerance: float) -> set[str]:
    """Skills the target does better than the base model although no component of theirs is attributed
    (checker scores, by skill): **transferred** behaviour. Real chat LoRAs share a component (answering
    tersely, in the asked format: on SmolLM2 a merge of a sort and an uppercase adapter answers 75 % of the
    JSON prompts the base wraps in prose), so removing any constituent can take such a skill down with it.
    They are left out of "the other skills hold": their drop says the constituents share that component,
    not that the removal is unspecific (a drop of an attributed skill or of a skill at its base level does)."""
    return {t for t, score in target.items()
            if t not in attributed and t in base and score - base[t] > tolerance + 1e-12}


@dataclass(frozen=True)
class Performance:
    """Whether the target performs a skill measurably better than the base model (checker score)."""

    gain: float  # target's checker score minus the base's
    won: int  # prompts the target's answer passes and the base's fails
    lost: int  # the reverse
    p_value: float  # exact one-sided McNemar: P(Bin(won + lost, ½) ≥ won)
    performed: bool


def performs(target: np.ndarray, base: np.ndarray, params: CausalParams) -> Performance:
    """The **not-performed** rule. ``target`` / ``base``: per held-out prompt of one skill, whether the
    checker accepts the target's / the base model's greedy answer (the same prompts, in order). The target
    performs the skill when its checker score exceeds the base's by at least ``performed_gain`` **and**
    an exact one-sided McNemar test over the prompts whose verdict differs says the target is better
    (``P(Bin(won + lost, ½) ≥ won) < alpha``). Otherwise removing the skill's component cannot show that
    the target *has* it: at most it can bring the target back to what the base does anyway, and a drop
    below that is what subtracting a task vector does to a skill whether or not the merge holds it (the
    null controls), so an attribution is then neither confirmed nor refuted by behaviour."""
    t = np.asarray(target, dtype=bool)
    b = np.asarray(base, dtype=bool)
    if t.shape != b.shape:
        raise ValueError(f"target and base answers differ in number ({t.size} and {b.size})")
    won, lost = int((t & ~b).sum()), int((b & ~t).sum())
    gain = float(t.mean() - b.mean()) if t.size else 0.0
    from scipy import stats

    p_value = float(stats.binom.sf(won - 1, won + lost, 0.5)) if won else 1.0
    performed = params.performed_gain is None or (gain >= params.performed_gain - 1e-12 and p_value < params.alpha)
    return Performance(gain, won, lost, p_value, performed)


def quantise(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits (the coefficient actually applied)."""
    return float(f"{value:.{digits}g}") if value else 0.0


def attributed_mask(evaluation: TargetEvaluation, threshold: float, relative: bool) -> np.ndarray:
    """Atoms the decomposition attributes: its own support (or ``|c| > threshold``) with ``c > 0``."""
    coef = np.asarray(evaluation.decomposition.coefficients, dtype=np.float64)
    return evaluation.decomposition.selected(threshold, relative) & (coef > 0)


def sample_targets(targets: Sequence[MergeJob], per_cell: int, limit: int | None) -> list[str]:
    """Ids of the targets to verify: the first ``per_cell`` of each (group, method) cell in run order,
    at most ``limit`` in all (run order)."""
    counts: dict[tuple[str, str], int] = {}
    chosen: list[str] = []
    for target in targets:
        cell = (target.group, target.method)
        if counts.get(cell, 0) >= per_cell or (limit is not None and len(chosen) >= limit):
            continue
        counts[cell] = counts.get(cell, 0) + 1
        chosen.append(target.target_id)
    return chosen


def write_edits_csv(root: Path) -> None:
    """``causal/edits.csv``: every edit of every verified (decomposer, target), from their JSON files.

    Rebuilt from the files each time, so a resumed run (whose earlier targets come from the cache)
    still lists every edit, in a stable order.
    """
    rows: list[dict[str, Any]] = []
    for path in sorted(root.glob("*/*.json")):
        try:
            rows.extend(json.loads(path.read_text())["edits"])
        except (OSError, ValueError, KeyError):
            continue
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / "edits.csv", buf.getvalue())


# --------------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkillScores:
    """Per-example scores of one skill on one model: ``loss`` and ``correct`` (teacher-forced, every
    held-out example) and ``accepted`` (the checker on greedy answers to the first ``max_prompts``
    prompts; None unless the checker score is used). Under the checker score nothing is teacher-forced:
    ``loss`` is None and ``correct`` is whether each greedy answer is the reference exactly."""

    loss: np.ndarray | None
    correct: np.ndarray
    accepted: np.ndarray | None = None

    def values(self, score: str) -> np.ndarray:
        """Per-example *harm*: the loss, the exact-match error or the checker's rejection; higher is worse."""
        if score == "checker":
            assert self.accepted is not None
            return 1.0 - self.accepted.astype(np.float64)
        assert self.loss is not None, "no teacher-forced loss under the checker score"
        return TaskScores(self.loss, self.correct).values(score)


@dataclass(frozen=True)
class EditEffect:
    """Changes of every task's scores caused by one edit of one target (cached)."""

    loss_delta: dict[str, float] | None  # None under the checker score (nothing teacher-forced)
    em_delta: dict[str, float]
    own_diffs: np.ndarray
    norm: float
    checker_drop: dict[str, float] | None = None  # drop of each skill's checker score


@dataclass
class _Edit:
    kind: str  # attributed | random | null | missed
    atom: str
    coefficient: float  # as given (decomposer's, true weight, or norm-matching scale)
    applied: float  # quantised value actually removed
    task: str = ""  # the atom's skill: the task whose held-out examples it is judged on

    def __post_init__(self) -> None:
        self.task = self.task or self.atom


class CausalAblation:
    """The ``causal-ablation`` metric (see the module docstring)."""

    def __init__(self, params: CausalParams, checker_for: CheckerLookup | None = None) -> None:
        self.params = params
        self._checker_for = checker_for  # None: the registry's checkers (lib/tasks/checkers.py)
        self._score = params.score if params.score in ("loss", "exact_match") else ""  # resolved in _prepare
        self._generation: GenerationSet | None = None
        self._sample: frozenset[str] | None = None
        self._device: torch.device | None = None
        self._model: Any = None
        self._editor: WeightEditor | None = None
        self._heldout: HeldoutSet | None = None
        self._base_scores: dict[str, SkillScores] | None = None
        self._before: dict[str, dict[str, SkillScores]] = {}
        self._effects: dict[tuple[Any, ...], EditEffect] = {}
        self._adapters: dict[str, LoraAdapter] = {}
        self._norms: dict[str, float] = {}
        self._directions: dict[str, dict[str, torch.Tensor]] = {}
        self._direction_bytes = 0
        self._current: str | None = None
        self._details: dict[tuple[str, str], dict[str, Any]] = {}  # until the run's cache keeps them
        self.evaluations = 0  # forward passes over the held-out set (for tests and timing)

    # -- sampling ----------------------------------------------------------------------------------
    def is_sampled(self, evaluation: TargetEvaluation) -> bool:
        """Whether the target is verified: among the first ``targets_per_cell`` of its (group, method)
        cell in the run's target order, and within the first ``max_targets`` so chosen."""
        if self._sample is None:
            assert evaluation.context is not None
            self._sample = frozenset(sample_targets(evaluation.context.targets, self.params.targets_per_cell,
                                                    self.params.max_targets))
        return evaluation.target_id in self._sample

    # -- entry point -------------------------------------------------------------------------------
    def compute(self, evaluation: TargetEvaluation) -> Mapping[str, MetricValue]:
        out: dict[str, MetricValue] = dict.fromkeys(COLUMNS)
        if evaluation.context is None or evaluation.merge_job is None or not self.is_sampled(evaluation):
            return out
        if self.params.decomposers is not None and evaluation.decomposer not in self.params.decomposers:
            return out
        with torch_threads(self.params.threads or torch.get_num_threads()):
            return self._verify(evaluation, out)

    def _verify(self, evaluation: TargetEvaluation, out: dict[str, MetricValue]) -> dict[str, MetricValue]:
        ctx = evaluation.context
        assert ctx is not None
        self._prepare(ctx)
        p = self.params
        atoms = evaluation.atom_names
        coef = np.asarray(evaluation.decomposition.coefficients, dtype=np.float64)
        chosen = attributed_mask(evaluation, p.threshold, p.relative)
        truth = dict(zip(evaluation.true_tasks, evaluation.true_weights))
        skill = dict(zip(atoms, evaluation.skill_of_atom))
        found = {skill[a] for a, on in zip(atoms, chosen) if on}
        edits = [_Edit("attributed", a, float(c), quantise(float(c), p.coef_digits), skill[a])
                 for a, c, on in zip(atoms, coef, chosen) if on]
        missed = {}  # one atom per missed skill (its first training)
        for a in atoms:
            if skill[a] in truth and skill[a] not in found:
                missed.setdefault(skill[a], a)
        edits += [_Edit("missed", a, float(truth[t]), quantise(float(truth[t]), p.coef_digits), t)
                  for t, a in missed.items()]
        if edits and edits[0].kind == "attributed" and p.null_atoms:
            # absent atoms removed at the norm of the largest attributed removal (a conservative null)
            reference = max(e.applied * self._norm(ctx, e.atom) for e in edits if e.kind == "attributed")
            for atom in self._null_atoms(evaluation, chosen):
                scale = reference / (self._norm(ctx, atom) or 1.0)
                edits.append(_Edit("null", atom, scale, quantise(scale, p.coef_digits), skill[atom]))

        assert self._heldout is not None
        edits = [e for e in edits if e.task in self._heldout.tasks]  # a skill without task data cannot be judged
        before = self._target_scores(evaluation)
        transferred: set[str] = set()
        if self._score == "checker":
            assert self._base_scores is not None
            transferred = transferred_skills(
                {t: float(np.mean(sc.accepted)) for t, sc in before.items() if sc.accepted is not None},
                {t: float(np.mean(sc.accepted)) for t, sc in self._base_scores.items() if sc.accepted is not None},
                found, p.hold_tolerance)
        rows = []
        while edits:
            edit = edits.pop(0)
            effect = self._effect(evaluation, edit, before)
            others = [v for t, v in self._deltas(effect).items() if t != edit.task and t not in transferred]
            verdict = (judge_checker if self._score == "checker" else judge)(effect.own_diffs, others, p)
            performance = self._performance(edit, before)
            if performance is not None and not performance.performed and edit.kind in CLAIM_EDITS:
                verdict = replace(verdict, verdict="not-performed")
            rows.append(self._row(evaluation, edit, effect, verdict, before, transferred, performance))
            if edit.kind == "attributed" and verdict.verdict == "confirmed" and p.random_control:
                # the control that could falsify a confirmation: a random direction of the same norms
                edits.insert(0, _Edit("random", edit.atom, edit.coefficient, edit.applied, edit.task))
        self._write(evaluation, rows, before)
        return self._columns(rows, out)

    def _performance(self, edit: _Edit, before: dict[str, SkillScores]) -> Performance | None:
        """Whether the target performs the edit's skill (checker score only; None otherwise)."""
        if self._score != "checker" or self._base_scores is None:
            return None
        target, base = before[edit.task].accepted, self._base_scores[edit.task].accepted
        if target is None or base is None:
            return None
        return performs(target, base, self.params)

    # -- results -----------------------------------------------------------------------------------
    def _deltas(self, effect: EditEffect) -> dict[str, float]:
        if self._score == "checker":
            assert effect.checker_drop is not None
            return effect.checker_drop
        if self._score == "loss":
            assert effect.loss_delta is not None
            return effect.loss_delta
        return {t: -v for t, v in effect.em_delta.items()}  # rise of the exact-match error

    @staticmethod
    def _columns(rows: list[dict[str, Any]], out: dict[str, MetricValue]) -> dict[str, MetricValue]:
        def of(kind: str) -> list[dict[str, Any]]:
            return [r for r in rows if r["kind"] == kind]

        def mean(values: list[float]) -> MetricValue:
            return float(np.mean(values)) if values else None

        attributed, null = of("attributed"), of("null")
        checked = [r for r in attributed if r.get("performed") is not None]  # the checker score decides it
        if attributed:
            for verdict in VERDICTS:  # shares of every attributed atom: they add up to 1
                if verdict == "not-performed" and len(checked) < len(attributed):
                    continue  # not assessed (loss / exact-match score): None, not 0
                out[f"causal_{verdict.replace('-', '_')}"] = (
                    sum(r["verdict"] == verdict for r in attributed) / len(attributed))
            out["causal_n_attributed"] = float(len(attributed))
            if len(checked) == len(attributed):
                performed = [r for r in attributed if r["performed"]]
                out["causal_n_performed"] = float(len(performed))
                out["causal_confirmed_performed"] = (
                    sum(r["verdict"] == "confirmed" for r in performed) / len(performed) if performed else None)
        for r in attributed:  # per atom: 1 confirmed, 0 inconclusive or not performed, -1 refuted
            out[f"causal_verdict[{r['atom']}]"] = {"confirmed": 1.0, "refuted": -1.0}.get(r["verdict"], 0.0)
            if r.get("performed") is not None:  # per atom: 1 the target performs the skill, 0 not
                out[f"causal_performed[{r['atom']}]"] = float(r["performed"])
        out["causal_effect"] = mean([r["effect"] for r in attributed])
        out["causal_control"] = mean([r["effect"] for r in of("random")])
        out["causal_null_confirmed"] = (sum(r["verdict"] == "confirmed" for r in null) / len(null)) if null else None
        out["causal_null_effect"] = mean([r["effect"] for r in null])
        out["causal_fn_cost"] = mean([r["own_delta"] for r in of("missed")])
        return out

    def _row(self, ev: TargetEvaluation, edit: _Edit, effect: EditEffect, j: Judgement,
             before: dict[str, SkillScores], transferred: set[str],
             performance: Performance | None = None) -> dict[str, Any]:
        own_before = float(before[edit.task].values(self._score).mean())
        assert self._base_scores is not None
        own_base = float(self._base_scores[edit.task].values(self._score).mean())
        row = {
            "decomposer": ev.decomposer or "", "target_id": ev.target_id, "group": ev.group, "method": ev.method,
            "kind": edit.kind, "atom": edit.atom, "constituent": edit.task in ev.true_tasks,
            "coefficient": edit.coefficient, "applied": edit.applied, "norm": effect.norm,
            "own_before": own_before, "own_gain_over_base": own_base - own_before,
            "own_delta": j.own_delta, "others_delta": j.others_delta, "others_max_delta": j.others_max,
            "effect": j.effect, "effect_size": j.effect_size, "p_value": j.p_value, "p_below": j.p_below,
            "verdict": j.verdict, "score": self._score, "own_loss_delta": None if effect.loss_delta is None else effect.loss_delta[edit.task],
            "own_exact_match_delta": effect.em_delta[edit.task],
        }
        if self._score == "checker":
            accepted = before[edit.task].accepted
            assert accepted is not None
            drops = effect.checker_drop or {}
            row.update({"own_checker_before": float(accepted.mean()),
                        "own_checker_after": float(accepted.mean()) - j.own_delta,
                        "lost": int((effect.own_diffs > 0).sum()), "gained": int((effect.own_diffs < 0).sum()),
                        "own_transferred": edit.task in transferred,
                        "others_dropped": ";".join(f"{t}={d:.2f}" for t, d in sorted(drops.items())
                                                   if t != edit.task and d > 0),
                        "others_transferred": ";".join(sorted(transferred - {edit.task}))})
        if performance is not None:
            assert self._base_scores is not None and self._base_scores[edit.task].accepted is not None
            row.update({"own_checker_base": float(self._base_scores[edit.task].accepted.mean()),
                        "performed": performance.performed, "performed_gain": performance.gain,
                        "performed_won": performance.won, "performed_lost": performance.lost,
                        "performed_p": performance.p_value})
        return row

    # -- details kept with the cached values (unmerge_core.pipeline.scoring) ----------------------
    def metric_details(self, evaluation: TargetEvaluation) -> dict[str, Any] | None:
        """The per-target details the last ``compute`` of ``evaluation`` wrote (None: not verified), kept
        by the run's cache beside the values so that a rerun which reuses them writes them again."""
        return self._details.pop(self._details_key(evaluation), None)

    def restore_details(self, evaluation: TargetEvaluation, details: Mapping[str, Any]) -> None:
        """Write the kept per-target details of ``evaluation`` again (its values came from the cache) and
        rebuild ``causal/edits.csv``."""
        if evaluation.context is None or not isinstance(details, Mapping) or "edits" not in details:
            return
        path = self._details_path(evaluation)
        atomic_write_json(path, dict(details))
        write_edits_csv(path.parent.parent)

    @staticmethod
    def _details_key(ev: TargetEvaluation) -> tuple[str, str]:
        return (ev.decomposer or "", ev.target_id)

    @staticmethod
    def _details_path(ev: TargetEvaluation) -> Path:
        """``<run_dir>/causal/<decomposer>/<target_id>.json``."""
        assert ev.context is not None
        coef = [float(c) for c in ev.decomposition.coefficients]
        label = safe_filename(ev.decomposer or f"coef-{content_key(coef)}")
        return Path(ev.context.run_dir) / "causal" / label / f"{safe_filename(ev.target_id)}.json"

    def _write(self, ev: TargetEvaluation, rows: list[dict[str, Any]], before: dict[str, SkillScores]) -> None:
        assert ev.context is not None
        path = self._details_path(ev)
        coef = [float(c) for c in ev.decomposition.coefficients]
        details = {
            "target_id": ev.target_id, "decomposer": ev.decomposer, "group": ev.group, "method": ev.method,
            "true_tasks": list(ev.true_tasks), "true_weights": list(ev.true_weights),
            "coefficients": dict(zip(ev.atom_names, coef)),
            "params": self.params.model_dump(mode="json"),
            "target_scores": {t: {"loss": None if s.loss is None else float(s.loss.mean()),
                                  "exact_match": float(s.correct.mean()),
                                  **({} if s.accepted is None else {"checker": float(s.accepted.mean())})}
                              for t, s in before.items()},
            "edits": rows,
        }
        atomic_write_json(path, details)
        write_edits_csv(path.parent.parent)
        self._details[self._details_key(ev)] = details

    # -- model and data ----------------------------------------------------------------------------
    def _adapter(self, ctx: RunContext, task: str) -> LoraAdapter:
        if task not in self._adapters:
            self._adapters[task] = LoraAdapter(ctx.adapter_dirs[task], task)
        return self._adapters[task]

    def _prepare(self, ctx: RunContext) -> None:
        """Load the base model, the editor and the held-out set once per run."""
        if self._model is not None:
            return
        adapters = [self._adapter(ctx, t) for t in ctx.adapter_dirs]
        base = ctx.base_model
        if base is None:
            bases = {a.base_model for a in adapters}
            if len(bases) != 1 or None in bases:
                raise UnmergeError(f"causal-ablation: the adapters name {sorted(map(str, bases))} as base model; "
                                   "one real base model is needed")
            base = bases.pop()
        assert base is not None
        checkers = self._resolve_score(ctx)
        self._device = resolve_device(self.params.device)
        self._check_autocast(self._device)
        self._model, tokenizer = load_causal_lm(base, self._device)
        modules = list(dict.fromkeys(m for a in adapters for m in a.module_names))
        self._editor = WeightEditor(self._model, modules)
        seed = derive_seed(ctx.seed, "causal-heldout", self.params.seed)
        examples = {name: load_examples(task, self.params.examples_per_task, seed, split="heldout")
                    for name, task in ctx.tasks.items()}
        encoded = {name: encode_examples(tokenizer, exs, self.params.max_length) for name, exs in examples.items()}
        self._heldout = HeldoutSet(encoded, tokenizer.pad_token_id, self.params.batch_size)
        if self._score == "checker":
            p = self.params
            self._generation = GenerationSet(tokenizer, {t: exs[: p.max_prompts] for t, exs in examples.items()},
                                             checkers, p.generation_batch_size, p.new_tokens_margin, p.max_new_tokens)
        self._base_scores = self._evaluate()

    def _check_autocast(self, device: torch.device) -> None:
        """Refuse, in one line, bf16 autocast where this device has no native bfloat16."""
        if self.params.autocast == "off":
            return
        if device.type == "cpu":
            from unmerge_plugins.lib.training import cpu_supports_bf16

            if not cpu_supports_bf16():
                raise UnmergeError("causal-ablation: autocast = 'bf16' needs a CPU with native bf16 (avx512_bf16, "
                                   "AMX or Arm bf16) and this one has none; set autocast = 'off'")
        elif device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UnmergeError("causal-ablation: autocast = 'bf16' needs bfloat16 support and this GPU has none; "
                               "set autocast = 'off'")

    def _generation_precision(self) -> Any:
        """The context greedy decoding runs in: bf16 autocast (``autocast = "bf16"``) or nothing."""
        assert self._device is not None
        if self.params.autocast == "bf16":
            return torch.autocast(self._device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _resolve_score(self, ctx: RunContext) -> dict[str, Checker]:
        """The score actually used (``auto``: ``checker`` when every skill has a checker, else ``loss``)
        and the skills' checkers; ``checker`` with a skill without one is a one-line error."""
        if self.params.score in ("loss", "exact_match"):
            self._score = self.params.score
            return {}
        # a fallback checker (exact match, `unmerge attribute --verify`) counts under "checker" only
        found = {name: resolve_checker(task, self._checker_for, fallback=self.params.score == "checker")
                 for name, task in ctx.tasks.items()}
        missing = [name for name, checker in found.items() if checker is None]
        if missing and self.params.score == "checker":
            raise UnmergeError(f"causal-ablation: score = \"checker\" needs a checker for every skill; none for "
                               f"{', '.join(missing)} (score = \"auto\" falls back to the loss)")
        self._score = "loss" if missing else "checker"
        return {} if missing else {name: c for name, c in found.items() if c is not None}

    def _evaluate(self, tasks: Sequence[str] | None = None) -> dict[str, SkillScores]:
        """Every skill's scores on the model as it is now (only ``tasks`` when given, checker score only).

        Under the checker score nothing is teacher-forced (the verdict reads the checker only, and a
        teacher-forced pass over ``examples_per_task`` examples of every skill costs several times the
        greedy answers on a real model): exact match is read from the greedy answers instead."""
        assert self._heldout is not None and self._device is not None
        self.evaluations += 1
        if self._generation is not None:
            with self._generation_precision():
                judged = self._generation.judged(self._model, self._device, tasks)
            return {t: SkillScores(None, exact, accepted) for t, (accepted, exact) in judged.items()}
        assert tasks is None
        scores = self._heldout.evaluate(self._model, self._device)
        return {t: SkillScores(s.loss, s.correct) for t, s in scores.items()}

    def _set_target(self, ev: TargetEvaluation) -> None:
        """Put ``θ_base + ΔW_T`` into the model; ΔW_T comes from the run, module by module."""
        if self._current == ev.target_id:
            return
        assert ev.context is not None and ev.merge_job is not None and self._editor is not None
        self._current = None
        touched = set()
        for module, delta in ev.context.target_deltas(ev.merge_job):  # one module in memory at a time
            self._editor.set_module(module, delta)
            touched.add(module)
        for module in list(self._editor.params):
            if module not in touched:
                self._editor.set_module(module)
        self._current = ev.target_id

    def _target_scores(self, ev: TargetEvaluation) -> dict[str, SkillScores]:
        if ev.target_id not in self._before:
            self._set_target(ev)
            self._before[ev.target_id] = self._evaluate()
        return self._before[ev.target_id]

    def _direction(self, ctx: RunContext, atom: str) -> dict[str, torch.Tensor]:
        """τ of one atom, module by module, restricted to the mask when ``scope = "mask"``.

        Kept in memory while all directions together stay under ``DIRECTION_CACHE_BYTES`` (every
        atom of the tiny model; none of a 7B model, whose directions are recomputed per edit).
        """
        if atom in self._directions:
            return self._directions[atom]
        out = self._compute_direction(ctx, atom)
        size = sum(d.numel() * d.element_size() for d in out.values())
        if self._direction_bytes + size <= DIRECTION_CACHE_BYTES:
            self._directions[atom] = out
            self._direction_bytes += size
        return out

    def _compute_direction(self, ctx: RunContext, atom: str) -> dict[str, torch.Tensor]:
        adapter = self._adapter(ctx, atom)
        out = {}
        for module in adapter.module_names:
            delta = adapter.delta(module)
            if self.params.scope == "mask":
                idx = ctx.mask.indices.get(module)
                if idx is None:
                    continue
                kept = torch.zeros_like(delta).reshape(-1)
                flat = torch.from_numpy(np.asarray(idx, dtype=np.int64))
                kept[flat] = delta.reshape(-1)[flat]
                delta = kept.reshape(delta.shape)
            out[module] = delta
        return out

    def _norm(self, ctx: RunContext, atom: str) -> float:
        if atom not in self._norms:
            self._norms[atom] = float(math.sqrt(sum(float(d.square().sum()) for d in self._direction(ctx, atom).values())))
        return self._norms[atom]

    def _random_like(self, direction: Mapping[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
        """Gaussian directions with the per-module norms (and support) of ``direction``."""
        gen = torch.Generator().manual_seed(derive_seed(self.params.seed, "causal-random", key))
        out = {}
        for module, delta in direction.items():
            noise = torch.randn(delta.shape, generator=gen)
            if self.params.scope == "mask":
                noise = noise * (delta != 0)
            norm = float(noise.norm())
            out[module] = noise * (float(delta.norm()) / norm) if norm > 0 else noise
        return out

    def _null_atoms(self, ev: TargetEvaluation, chosen: np.ndarray) -> list[str]:
        """Up to ``null_atoms`` atoms neither attributed nor constituents, in a per-target random order."""
        order = np.random.default_rng(derive_seed(self.params.seed, "causal-null", ev.target_id)).permutation(
            len(ev.atom_names))
        skills = ev.skill_of_atom
        picks = [ev.atom_names[i] for i in order if not chosen[i] and skills[i] not in ev.true_tasks]
        return picks[: self.params.null_atoms]

    def _effect(self, ev: TargetEvaluation, edit: _Edit, before: dict[str, SkillScores]) -> EditEffect:
        key = (ev.target_id, edit.kind, edit.atom, edit.applied)
        if key in self._effects:
            return self._effects[key]
        assert ev.context is not None and self._editor is not None
        direction = self._direction(ev.context, edit.atom)
        scale = edit.applied
        if edit.kind == "random":
            scaled = {m: d * edit.applied for m, d in direction.items()}
            direction = self._random_like(scaled, f"{ev.target_id}:{edit.atom}:{edit.applied}")
            scale = 1.0
        norm = abs(scale) * math.sqrt(sum(float(d.square().sum()) for d in direction.values()))
        self._set_target(ev)
        # Under the checker score a skill the target does not do (checker score 0 before the edit) cannot
        # drop: it is not answered again (its scores stay as before); the edit's own skill always is.
        wanted = None if self._generation is None else [
            t for t, s in before.items() if t == edit.task or (s.accepted is not None and s.accepted.any())]
        with self._editor.edit(direction, scale):
            answered = self._evaluate(wanted)
        after = {t: answered.get(t, s) for t, s in before.items()}
        loss_delta = None if self._generation is not None else {
            t: float((after[t].loss - before[t].loss).mean()) for t in after}  # type: ignore[operator]
        em_delta = {t: float((after[t].correct.astype(float) - before[t].correct.astype(float)).mean())
                    for t in after}
        own = after[edit.task].values(self._score) - before[edit.task].values(self._score)
        drop = None
        if self._score == "checker":
            drop = {t: float(after[t].values("checker").mean() - before[t].values("checker").mean()) for t in after}
        effect = EditEffect(loss_delta, em_delta, own, norm, drop)
        self._effects[key] = effect
        return effect


__all__ = ["COLUMNS", "CausalAblation", "CausalParams", "EditEffect", "Judgement", "Performance", "SkillScores",
           "judge", "judge_checker", "one_sided_p", "performs", "transferred_skills"]


SPEC = PluginSpec("causal-ablation", Stage.METRIC,
                  "Causal check: removing an attributed atom from the model must hurt its own task most",
                  "https://arxiv.org/abs/2212.04089", CausalParams, CausalAblation,
                  requires=(Capability.BASE_MODEL, Capability.TASK_DATA, Capability.TARGET_DELTAS))
