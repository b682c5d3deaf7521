"""``lasso``: L1-penalised least squares (scikit-learn coordinate descent), penalty relative to α_max."""

from __future__ import annotations

import warnings

import numpy as np
from pydantic import Field

from unmerge_core import Decomposition, DecompositionProblem, PluginParams, PluginSpec, Stage
from unmerge_plugins.lib.solve import decomposition


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
        gram, rhs = problem.normal_equations()  # the run's shared DᵀD: no n_coords × n_atoms² per target
        alpha_max = float(np.abs(rhs).max()) / scale**2 / max(len(ys), 1)
        alpha = max(alpha_max * self.params.alpha_ratio, 1e-300)
        model = SkLasso(alpha=alpha, positive=self.params.positive, fit_intercept=False,
                        max_iter=self.params.max_iter, tol=self.params.tol, precompute=gram / scale**2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(ds, ys)
        return decomposition(problem, model.coef_, alpha=alpha * scale**2, n_iter=int(model.n_iter_))


SPEC = PluginSpec("lasso", Stage.DECOMPOSER, "L1-penalised least squares, penalty relative to α_max",
                  "https://doi.org/10.1111/j.2517-6161.1996.tb02080.x", LassoParams, Lasso)
