"""Decomposers built on SciPy and scikit-learn solvers.

All take the masked dictionary ``D`` (coords × atoms) and target ``y`` and return coefficients ``c``
with reconstruction ``D c``. Penalties are given relative to the data (a fraction of the smallest
penalty that zeroes every coefficient, or of the dictionary's energy) so results do not depend on the
absolute scale of ΔW, which for LoRA adapters is tiny and varies by model.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from pydantic import Field
from scipy.optimize import nnls as scipy_nnls

from unmerge_core.types import Decomposition, DecompositionProblem, PluginParams


def _result(problem: DecompositionProblem, coef: np.ndarray, support: np.ndarray | None = None, **info: object) -> Decomposition:
    coef = np.asarray(coef, dtype=np.float64).reshape(-1)
    return Decomposition(coef, problem.dictionary @ coef, support, None, dict(info))


class NnlsParams(PluginParams):
    max_iter: int | None = Field(None, ge=1, description="SciPy's default: 3 × number of atoms")


class Nnls:
    """Non-negative least squares: min ||Dc − y||² s.t. c ≥ 0 (SciPy's active-set solver)."""

    def __init__(self, params: NnlsParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        coef, residual = scipy_nnls(problem.dictionary, problem.target, maxiter=self.params.max_iter)
        return _result(problem, coef, residual=float(residual))


class PaperNnlsParams(PluginParams):
    support_threshold: float = Field(1e-6, ge=0, description="|c| above this counts as selected (the paper's rule)")


class PaperNnls:
    """The seeds' exact protocol: SciPy NNLS on the raw masked vectors, support |c| > 1e-6."""

    def __init__(self, params: PaperNnlsParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        coef, residual = scipy_nnls(problem.dictionary, problem.target)
        return _result(problem, coef, np.abs(coef) > self.params.support_threshold, residual=float(residual))


class LassoParams(PluginParams):
    alpha_ratio: float = Field(0.01, gt=0, description="penalty as a fraction of α_max = max|Dᵀy| / n")
    positive: bool = True
    max_iter: int = Field(10_000, ge=1)
    tol: float = Field(1e-8, gt=0)


class Lasso:
    """L1-penalised least squares (scikit-learn coordinate descent), optionally non-negative."""

    def __init__(self, params: LassoParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        from sklearn.linear_model import Lasso as SkLasso

        d, y = problem.dictionary, problem.target
        scale = float(np.abs(d).max()) or 1.0  # conditioning: solve on D / s, map coefficients back
        ds, ys = d / scale, y / scale
        alpha_max = float(np.abs(ds.T @ ys).max()) / max(len(ys), 1)
        alpha = max(alpha_max * self.params.alpha_ratio, 1e-300)
        model = SkLasso(alpha=alpha, positive=self.params.positive, fit_intercept=False,
                        max_iter=self.params.max_iter, tol=self.params.tol, precompute=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(ds, ys)
        return _result(problem, model.coef_, alpha=alpha * scale**2, n_iter=int(model.n_iter_))


class OmpParams(PluginParams):
    n_nonzero_coefs: int | None = Field(None, ge=1, description="stop after this many atoms")
    tol_relative: float | None = Field(1e-3, gt=0, description="stop when ||residual||² ≤ this × ||y||²")


class Omp:
    """Orthogonal matching pursuit (scikit-learn): greedy atom selection with least-squares refits."""

    def __init__(self, params: OmpParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        from sklearn.linear_model import OrthogonalMatchingPursuit

        d, y = problem.dictionary, problem.target
        n_atoms = d.shape[1]
        norms = np.linalg.norm(d, axis=0)
        norms[norms == 0] = 1.0
        dn = d / norms
        y_norm = float(np.linalg.norm(y)) or 1.0
        y = y / y_norm  # scikit-learn's stopping rule is absolute: work at unit scale
        kwargs: dict[str, object] = {"fit_intercept": False}
        if self.params.n_nonzero_coefs is not None:
            kwargs["n_nonzero_coefs"] = min(self.params.n_nonzero_coefs, n_atoms)
        else:
            kwargs["tol"] = (self.params.tol_relative or 1e-3) * float(y @ y)
        model = OrthogonalMatchingPursuit(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(dn, y)
        return _result(problem, model.coef_ / norms * y_norm)


class RidgeParams(PluginParams):
    alpha_ratio: float = Field(1e-3, ge=0, description="penalty as a fraction of mean diag(DᵀD)")


class Ridge:
    """L2-penalised least squares (scikit-learn); dense coefficients, a baseline for the sparse methods."""

    def __init__(self, params: RidgeParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        from sklearn.linear_model import Ridge as SkRidge

        d, y = problem.dictionary, problem.target
        scale = float(np.abs(d).max()) or 1.0
        ds, ys = d / scale, y / scale
        alpha = self.params.alpha_ratio * float(np.mean(np.sum(ds * ds, axis=0)))
        model = SkRidge(alpha=alpha, fit_intercept=False, solver="auto")
        model.fit(ds, ys)
        return _result(problem, model.coef_)


class DotProductParams(PluginParams):
    score: Literal["projection", "cosine"] = Field(
        "projection", description="projection: ⟨d,y⟩/‖d‖² per atom; cosine: ⟨d,y⟩/(‖d‖‖y‖)")
    clip_negative: bool = True


class DotProduct:
    """Per-atom scores independent of the other atoms: the simplest attribution baseline."""

    def __init__(self, params: DotProductParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        d, y = problem.dictionary, problem.target
        dots = d.T @ y
        norms = np.linalg.norm(d, axis=0)
        norms[norms == 0] = 1.0
        if self.params.score == "projection":
            coef = dots / norms**2
        else:
            coef = dots / (norms * (np.linalg.norm(y) or 1.0))
        if self.params.clip_negative:
            coef = np.clip(coef, 0, None)
        if self.params.score == "cosine":
            # cosines are not coefficients: reconstruct with the least-squares fit on the chosen scale
            recon_coef = np.clip(dots / norms**2, 0, None) if self.params.clip_negative else dots / norms**2
            return Decomposition(coef, d @ recon_coef, None, None, {})
        return _result(problem, coef)
