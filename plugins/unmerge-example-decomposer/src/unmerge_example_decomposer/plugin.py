"""``bic-nnls``: forward selection with NNLS refits; the number of atoms is chosen by BIC."""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field
from scipy.optimize import nnls

from unmerge_core import Decomposition, DecompositionProblem, PluginParams, PluginSpec, Stage, hookimpl


class BicNnlsParams(PluginParams):
    max_atoms: int | None = Field(None, ge=1, description="largest support tried (default: all atoms)")
    penalty: float = Field(1.0, gt=0, description="multiplies BIC's log(n) per atom")


class BicNnls:
    """Adds, one at a time, the atom that most reduces the NNLS residual; keeps the lowest-BIC size."""

    def __init__(self, params: BicNnlsParams) -> None:
        self.params = params

    def decompose(self, problem: DecompositionProblem) -> Decomposition:
        d, y = problem.dictionary, problem.target
        n, k = d.shape
        limit = min(self.params.max_atoms or k, k)
        rss0 = float(y @ y)
        best = (_bic(rss0, n, 0, self.params.penalty), np.zeros(k))
        chosen: list[int] = []
        path = []
        for _ in range(limit):
            trials = []
            for j in range(k):
                if j in chosen:
                    continue
                cols = chosen + [j]
                coef, res = nnls(d[:, cols], y)
                trials.append((res**2, j, coef))
            rss, j, coef = min(trials, key=lambda t: t[0])
            chosen.append(j)
            full = np.zeros(k)
            full[chosen] = coef
            score = _bic(rss, n, int(np.count_nonzero(full)), self.params.penalty)
            path.append({"atom": problem.atom_names[j], "bic": score})
            if score < best[0]:
                best = (score, full)
        coef = best[1]
        return Decomposition(coef, d @ coef, coef > 0, None, {"path": path})


def _bic(rss: float, n: int, size: int, penalty: float) -> float:
    return n * math.log(max(rss, 1e-300) / n) + penalty * size * math.log(n)


@hookimpl
def unmerge_decomposers() -> list[PluginSpec]:
    return [PluginSpec("bic-nnls", Stage.DECOMPOSER, "Forward-selection NNLS, support size chosen by BIC",
                       "https://doi.org/10.1214/aos/1176344136", BicNnlsParams, BicNnls)]
