"""``gram-nnls``: NNLS from DᵀD and Dᵀy only, so the same fit can run on every ΔW coordinate without a mask."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from unmerge_core import Decomposition, DecompositionProblem, PluginParams, PluginSpec, Stage
from unmerge_plugins.lib.gram import nnls_gram
from unmerge_plugins.lib.solve import decomposition


class GramNnlsParams(PluginParams):
    rcond: float = Field(1e-12, gt=0, lt=1, description="eigenvalues below this × the largest are dropped")
    max_iter: int | None = Field(None, ge=1, description="SciPy's default: 3 × number of atoms")


class GramNnls:
    """NNLS solved from ``G = DᵀD`` and ``b = Dᵀy`` only (see :func:`solve_gram_nnls`).

    Same minimiser as ``nnls``; the point is that ``G`` and ``b`` can be summed module by module over
    every ΔW coordinate (:func:`unmerge_plugins.lib.gram.lora_gram`), so the same decomposition runs without a
    mask. On a masked problem it forms ``G`` and ``b`` from the dictionary and reconstructs ``D c``.
    """

    def __init__(self, params: GramNnlsParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        y = problem.target
        gram, rhs = problem.normal_equations()  # the run's shared DᵀD: n_coords × n_atoms per target
        coef = nnls_gram(gram, rhs, rcond=self.params.rcond, max_iter=self.params.max_iter)
        sq = float(coef @ gram @ coef - 2 * rhs @ coef + y @ y)
        return decomposition(problem, coef, residual=float(np.sqrt(max(sq, 0.0))))


SPEC = PluginSpec("gram-nnls", Stage.DECOMPOSER, "NNLS from DᵀD and Dᵀy only (mask-free, module by module)",
                  "https://doi.org/10.1002/(SICI)1099-128X(199709/10)11:5%3C393::AID-CEM483%3E3.0.CO;2-L", GramNnlsParams, GramNnls)
