"""Decomposer plugins: ``nnls``, ``paper-nnls``, ``lasso``, ``omp``, ``ridge``, ``dot-product``."""

from __future__ import annotations

from unmerge_core import PluginSpec, Stage, hookimpl

from . import linear_models as lm


@hookimpl
def unmerge_decomposers() -> list[PluginSpec]:
    return [
        PluginSpec("nnls", Stage.DECOMPOSER, "Non-negative least squares (SciPy)",
                   "https://docs.scipy.org/doc/scipy/reference/generated/scipy.optimize.nnls.html",
                   lm.NnlsParams, lm.Nnls),
        PluginSpec("paper-nnls", Stage.DECOMPOSER, "The seeds' protocol: SciPy NNLS, support |c| > 1e-6",
                   "https://doi.org/10.1137/1.9781611971217", lm.PaperNnlsParams, lm.PaperNnls),
        PluginSpec("lasso", Stage.DECOMPOSER, "L1-penalised least squares, penalty relative to α_max",
                   "https://doi.org/10.1111/j.2517-6161.1996.tb02080.x", lm.LassoParams, lm.Lasso),
        PluginSpec("omp", Stage.DECOMPOSER, "Orthogonal matching pursuit (scikit-learn)",
                   "https://doi.org/10.1109/ACSSC.1993.342465", lm.OmpParams, lm.Omp),
        PluginSpec("ridge", Stage.DECOMPOSER, "L2-penalised least squares (scikit-learn)",
                   "https://doi.org/10.1080/00401706.1970.10488634", lm.RidgeParams, lm.Ridge),
        PluginSpec("dot-product", Stage.DECOMPOSER, "Per-atom projection or cosine score",
                   "https://arxiv.org/abs/2212.04089", lm.DotProductParams, lm.DotProduct),
    ]
