"""Decomposers from the sparse-regression literature, on scikit-learn and SciPy solvers.

``lasso-ic``, ``elastic-net``, ``lars``, ``ard``, ``simplex-ls`` and ``gram-nnls``. Each solves on the
dictionary and target divided by ``max |D|`` (coefficients are unchanged by a common scale of ``D`` and
``y``; the division only keeps solver tolerances meaningful for ΔW entries of order 1e-4) and states its
penalty relative to the data, so the chosen support does not depend on the absolute scale of ΔW.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from pydantic import Field, model_validator
from scipy.optimize import minimize
from scipy.optimize import nnls as scipy_nnls

from unmerge_core.gram import reduce_gram
from unmerge_core.types import Decomposition, DecompositionProblem, PluginParams


def _result(problem: DecompositionProblem, coef: np.ndarray, support: np.ndarray | None = None,
            **info: object) -> Decomposition:
    coef = np.asarray(coef, dtype=np.float64).reshape(-1)
    return Decomposition(coef, problem.dictionary @ coef, support, None, dict(info))


def _scaled(problem: DecompositionProblem) -> tuple[np.ndarray, np.ndarray, float]:
    """``(D / s, y / s, s)`` with ``s = max |D|`` (1 for an all-zero dictionary)."""
    d, y = problem.dictionary, problem.target
    scale = float(np.abs(d).max()) if d.size else 1.0
    scale = scale or 1.0
    return d / scale, y / scale, scale


def _quiet_fit(model: object, x: np.ndarray, y: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# lasso-ic
# --------------------------------------------------------------------------------------------------


class LassoIcParams(PluginParams):
    criterion: Literal["aic", "bic"] = Field("bic", description="information criterion that picks the penalty")
    positive: bool = Field(True, description="non-negative coefficients")
    max_iter: int = Field(500, ge=1, description="maximum LARS steps")


class LassoIc:
    """LASSO whose penalty is chosen on the LARS path by AIC or BIC (scikit-learn ``LassoLarsIC``).

    No penalty grid: the criterion compares the models of the whole path, so the choice is the same
    for ``(D, y)`` and ``(s·D, s·y)``. scikit-learn estimates the noise variance from the full
    least-squares residual, which needs more coordinates than atoms plus one; a unit with fewer rows
    (per-layer mode on a tiny layer) uses ``‖y‖² / n`` instead, the most conservative value, and says so
    in ``info["noise_variance_source"]``.
    """

    def __init__(self, params: LassoIcParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        from sklearn.linear_model import LassoLarsIC

        ds, ys, scale = _scaled(problem)
        n, p = ds.shape
        noise, source = None, "least-squares residual"
        if n <= p + 1:
            noise, source = max(float(ys @ ys) / max(n, 1), 1e-300), "target energy (too few rows)"
        if not np.any(ys) or not np.any(ds):
            return _result(problem, np.zeros(p), criterion=self.params.criterion, alpha=0.0)
        model = LassoLarsIC(criterion=self.params.criterion, fit_intercept=False, positive=self.params.positive,
                            max_iter=self.params.max_iter, noise_variance=noise)
        _quiet_fit(model, ds, ys)
        return _result(problem, model.coef_, criterion=self.params.criterion,
                       alpha=float(model.alpha_) * scale**2, n_path=int(len(model.alphas_)),
                       noise_variance_source=source)


# --------------------------------------------------------------------------------------------------
# elastic-net
# --------------------------------------------------------------------------------------------------


class ElasticNetParams(PluginParams):
    alpha_ratio: float = Field(0.01, gt=0, description="penalty as a fraction of α_max = max|Dᵀy| / (n · l1_ratio)")
    l1_ratio: float = Field(0.5, gt=0, le=1, description="share of the L1 term (1 is the LASSO)")
    positive: bool = True
    max_iter: int = Field(10_000, ge=1)
    tol: float = Field(1e-8, gt=0)


class ElasticNet:
    """L1 + L2 penalised least squares (scikit-learn coordinate descent); groups correlated atoms.

    The penalty is a fraction of ``α_max``, the smallest one that zeroes every coefficient, as for
    ``lasso``; with correlated adapters the L2 part keeps the LASSO from picking one atom of a
    correlated pair arbitrarily.
    """

    def __init__(self, params: ElasticNetParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        from sklearn.linear_model import ElasticNet as SkElasticNet

        ds, ys, scale = _scaled(problem)
        n = max(len(ys), 1)
        alpha_max = float(np.abs(ds.T @ ys).max(initial=0.0)) / (n * self.params.l1_ratio)
        if alpha_max == 0:
            return _result(problem, np.zeros(ds.shape[1]), alpha=0.0)
        alpha = alpha_max * self.params.alpha_ratio
        # coordinate descent on the precomputed Gram matrix: same iterates, O(atoms²) per sweep instead of
        # O(coords · atoms) (about 100× faster on 100k coordinates)
        model = SkElasticNet(alpha=alpha, l1_ratio=self.params.l1_ratio, positive=self.params.positive,
                             fit_intercept=False, max_iter=self.params.max_iter, tol=self.params.tol,
                             precompute=ds.shape[0] > ds.shape[1])
        _quiet_fit(model, ds, ys)
        return _result(problem, model.coef_, alpha=alpha * scale**2, n_iter=int(model.n_iter_))


# --------------------------------------------------------------------------------------------------
# lars
# --------------------------------------------------------------------------------------------------


class LarsParams(PluginParams):
    method: Literal["lasso", "lar"] = Field("lasso", description="lasso: LARS-LASSO path; lar: least angle regression")
    positive: bool = Field(True, description="non-negative coefficients (method 'lasso' only)")
    n_nonzero_coefs: int | None = Field(None, ge=1, description="stop after this many steps (≈ atoms)")
    alpha_ratio: float = Field(0.0, ge=0, lt=1, description="stop at α = this × α_max (0: end of the path)")

    @model_validator(mode="after")
    def _positive_needs_lasso(self) -> LarsParams:
        if self.positive and self.method == "lar":
            raise ValueError("positive = true needs method = 'lasso' (least angle regression has no sign constraint)")
        return self


class Lars:
    """Least angle regression / LARS-LASSO path (scikit-learn ``lars_path``), stopped early.

    The path adds atoms one at a time in order of correlation with the residual; ``n_nonzero_coefs``
    and ``alpha_ratio`` say where to stop (whichever comes first). At the end of the path the
    positive LASSO method gives the non-negative least-squares fit.
    """

    def __init__(self, params: LarsParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        from sklearn.linear_model import lars_path

        ds, ys, _ = _scaled(problem)
        n, p = ds.shape
        alpha_max = float(np.abs(ds.T @ ys).max(initial=0.0)) / max(n, 1)
        if alpha_max == 0:
            return _result(problem, np.zeros(p), n_steps=0)
        max_iter = min(self.params.n_nonzero_coefs or 500, 500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alphas, _, coefs = lars_path(ds, ys, method=self.params.method, positive=self.params.positive,
                                         alpha_min=alpha_max * self.params.alpha_ratio, max_iter=max_iter)
        return _result(problem, coefs[:, -1], n_steps=int(len(alphas) - 1),
                       alpha_ratio_reached=float(alphas[-1] / alpha_max))


# --------------------------------------------------------------------------------------------------
# ard
# --------------------------------------------------------------------------------------------------


class ArdParams(PluginParams):
    threshold_lambda: float = Field(1e4, gt=0, description="prune an atom whose prior precision exceeds this")
    max_iter: int = Field(300, ge=1)
    tol: float = Field(1e-3, gt=0)
    clip_negative: bool = Field(True, description="set negative coefficients to 0 (ARD has no sign constraint)")


class Ard:
    """Automatic relevance determination / sparse Bayesian regression (scikit-learn ``ARDRegression``).

    Each atom gets its own Gaussian prior precision, estimated by evidence maximisation; atoms whose
    precision exceeds ``threshold_lambda`` (prior standard deviation below ``1/√threshold_lambda`` in
    coefficient units, which do not depend on the scale of ΔW) are pruned to exactly 0. ARD has no sign
    constraint: ``clip_negative`` zeroes negative coefficients (the reconstruction then uses the
    clipped ones); ``info["n_negative"]`` counts them.
    """

    def __init__(self, params: ArdParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        from sklearn.linear_model import ARDRegression

        ds, ys, _ = _scaled(problem)
        p = ds.shape[1]
        if not np.any(ys) or not np.any(ds):
            return _result(problem, np.zeros(p), n_negative=0)
        model = ARDRegression(fit_intercept=False, threshold_lambda=self.params.threshold_lambda,
                              max_iter=self.params.max_iter, tol=self.params.tol)
        _quiet_fit(model, ds, ys)
        coef = np.asarray(model.coef_, dtype=np.float64)
        n_negative = int((coef < 0).sum())
        if self.params.clip_negative:
            coef = np.clip(coef, 0.0, None)
        return _result(problem, coef, n_negative=n_negative, lambda_=[float(v) for v in model.lambda_],
                       noise_precision=float(model.alpha_))


# --------------------------------------------------------------------------------------------------
# simplex-ls and gram-nnls: constrained least squares on the Gram system
# --------------------------------------------------------------------------------------------------


def _normalised_gram(problem: DecompositionProblem) -> tuple[np.ndarray, np.ndarray]:
    d, y = problem.dictionary, problem.target
    gram, rhs = d.T @ d, d.T @ y
    s = float(np.mean(np.diag(gram))) if gram.size else 1.0
    s = s or 1.0
    return gram / s, rhs / s


def solve_gram_nnls(gram: np.ndarray, rhs: np.ndarray, *, rcond: float = 1e-12,
                    max_iter: int | None = None) -> np.ndarray:
    """``argmin_{c ≥ 0} cᵀGc − 2bᵀc`` (= NNLS on ``D``, ``y`` when ``G = DᵀD``, ``b = Dᵀy``).

    Scales ``G`` and ``b`` by ``mean diag G`` (does not change the minimiser), reduces them with
    :func:`unmerge_core.gram.reduce_gram` and solves the small NNLS with SciPy.
    """
    gram = np.asarray(gram, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    s = float(np.mean(np.diag(gram))) if gram.size else 1.0
    s = s or 1.0
    r, d = reduce_gram(gram / s, rhs / s, rcond=rcond)
    if r.shape[0] == 0:
        return np.zeros(gram.shape[0])
    coef, _ = scipy_nnls(r, d, maxiter=max_iter)
    return coef


class GramNnlsParams(PluginParams):
    rcond: float = Field(1e-12, gt=0, lt=1, description="eigenvalues below this × the largest are dropped")
    max_iter: int | None = Field(None, ge=1, description="SciPy's default: 3 × number of atoms")


class GramNnls:
    """NNLS solved from ``G = DᵀD`` and ``b = Dᵀy`` only (see :func:`solve_gram_nnls`).

    Same minimiser as ``nnls``; the point is that ``G`` and ``b`` can be summed module by module over
    every ΔW coordinate (:func:`unmerge_core.gram.lora_gram`), so the same decomposition runs without a
    mask. On a masked problem it forms ``G`` and ``b`` from the dictionary and reconstructs ``D c``.
    """

    def __init__(self, params: GramNnlsParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        d, y = problem.dictionary, problem.target
        gram, rhs = d.T @ d, d.T @ y
        coef = solve_gram_nnls(gram, rhs, rcond=self.params.rcond, max_iter=self.params.max_iter)
        sq = float(coef @ gram @ coef - 2 * rhs @ coef + y @ y)
        return _result(problem, coef, residual=float(np.sqrt(max(sq, 0.0))))


class SimplexLsParams(PluginParams):
    total: float = Field(1.0, gt=0, description="Σc: 1 is the shape of a linear merge with normalised weights")
    solver: Literal["nnls", "slsqp"] = Field("nnls", description="nnls: augmented NNLS; slsqp: SciPy SLSQP")
    weight: float = Field(1e4, gt=0, description="nnls: weight of the Σc row, relative to the atoms' scale")


class SimplexLs:
    """Least squares on the scaled simplex: ``min ‖Dc − y‖²`` s.t. ``c ≥ 0``, ``Σc = total``.

    The fit a linear merge ``Σ wᵢ τᵢ`` with ``Σ wᵢ = 1`` would produce. Two SciPy routes:

    - ``nnls`` (default): NNLS on the Gram-reduced system (:func:`unmerge_core.gram.reduce_gram`,
      with ``mean diag G`` scaled to 1) augmented by one row ``weight · 1ᵀc = weight · total``. The
      penalised sum misses ``total`` by ``O(1/weight²)``; the result is then rescaled to sum to
      ``total`` exactly, so it is exactly feasible and optimal up to ``O(1/weight²)`` relative (about
      1e-8 with the default). The active-set solver returns exact zeros.
    - ``slsqp``: ``scipy.optimize.minimize(method="SLSQP")`` with the equality constraint and bounds
      (exact constraint handling, optimality to ``ftol`` = 1e-12; off-support values are ≈ 0, not 0).

    A free scale (``Σc = s`` for any ``s ≥ 0``) is not offered: with ``c ≥ 0`` it is plain ``nnls``.
    """

    def __init__(self, params: SimplexLsParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        gram, rhs = _normalised_gram(problem)
        p = gram.shape[0]
        total = self.params.total
        if self.params.solver == "nnls":
            r, d = reduce_gram(gram, rhs)
            w = self.params.weight
            a = np.vstack([r, np.full((1, p), w)])
            z = np.concatenate([d, [w * total]])
            coef, _ = scipy_nnls(a, z)
            iterations = None
        else:
            result = minimize(lambda c: float(c @ gram @ c - 2 * rhs @ c), np.full(p, total / p),
                              jac=lambda c: 2 * (gram @ c - rhs), method="SLSQP", bounds=[(0.0, None)] * p,
                              constraints=[{"type": "eq", "fun": lambda c: np.sum(c) - total,
                                            "jac": lambda c: np.ones_like(c)}],
                              options={"ftol": 1e-12, "maxiter": 1000})
            coef = np.clip(result.x, 0.0, None)
            iterations = int(result.nit)
        s = float(coef.sum())
        if s > 0:
            coef = coef * (total / s)
        else:  # cannot happen with a heavy sum row; keep a feasible answer anyway
            coef = np.zeros(p)
            coef[int(np.argmax(rhs))] = total
        return _result(problem, coef, solver=self.params.solver, sum_before_rescale=s, iterations=iterations)
