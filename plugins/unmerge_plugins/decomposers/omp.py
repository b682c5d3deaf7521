"""``omp``: Orthogonal matching pursuit (scikit-learn), scale invariant."""

from __future__ import annotations

import warnings

import numpy as np
from pydantic import Field

from unmerge_core import Decomposition, DecompositionProblem, PluginParams, PluginSpec, Stage
from unmerge_plugins.lib.solve import decomposition


class OmpParams(PluginParams):
    n_nonzero_coefs: int | None = Field(None, ge=1, description="stop after this many atoms")
    tol_relative: float | None = Field(1e-3, gt=0, description="stop when ||residual||² ≤ this × ||y||²")


class Omp:
    """Orthogonal matching pursuit (scikit-learn): greedy atom selection with least-squares refits."""

    def __init__(self, params: OmpParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        from sklearn.linear_model import orthogonal_mp_gram

        # scikit-learn's OrthogonalMatchingPursuit.fit forms DᵀD and Dᵀy and calls orthogonal_mp_gram;
        # here DᵀD is the run's shared one (n_coords × atoms per target instead of × atoms²)
        gram, rhs = problem.normal_equations()
        y = problem.target
        n_atoms = gram.shape[0]
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        norms[norms == 0] = 1.0
        y_norm = float(np.linalg.norm(y)) or 1.0  # scikit-learn's stopping rule is absolute: work at unit scale
        gram_n = gram / np.outer(norms, norms)
        rhs_n = rhs / norms / y_norm
        y_sq = float(y @ y) / y_norm**2
        kwargs: dict[str, object] = {}
        if self.params.n_nonzero_coefs is not None:
            kwargs["n_nonzero_coefs"] = min(self.params.n_nonzero_coefs, n_atoms)
        else:
            kwargs["tol"] = (self.params.tol_relative or 1e-3) * y_sq
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            coef = orthogonal_mp_gram(gram_n, rhs_n, norms_squared=np.array([y_sq]), copy_Gram=False,
                                      copy_Xy=False, **kwargs)
        return decomposition(problem, np.asarray(coef).reshape(-1) / norms * y_norm)


SPEC = PluginSpec("omp", Stage.DECOMPOSER, "Orthogonal matching pursuit (scikit-learn)",
                  "https://doi.org/10.1109/ACSSC.1993.342465", OmpParams, Omp)
