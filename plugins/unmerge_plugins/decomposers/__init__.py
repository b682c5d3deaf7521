"""Decomposer plugins: ``nnls``, ``paper-nnls``, ``lasso``, ``omp``, ``ridge``, ``dot-product``, and from
:mod:`.literature` ``lasso-ic``, ``elastic-net``, ``lars``, ``ard``, ``simplex-ls``, ``gram-nnls``."""

from __future__ import annotations

from unmerge_core import PluginSpec, Stage, hookimpl

from . import linear_models as lm
from . import literature as lit
from . import selection as sel


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
        PluginSpec("lasso-ic", Stage.DECOMPOSER, "Non-negative LASSO, penalty chosen by AIC/BIC on the LARS path",
                   "https://doi.org/10.1214/009053607000000127", lit.LassoIcParams, lit.LassoIc),
        PluginSpec("elastic-net", Stage.DECOMPOSER, "L1 + L2 penalised least squares, penalty relative to α_max",
                   "https://doi.org/10.1111/j.1467-9868.2005.00503.x", lit.ElasticNetParams, lit.ElasticNet),
        PluginSpec("lars", Stage.DECOMPOSER, "Least angle regression / LARS-LASSO path, stopped early",
                   "https://doi.org/10.1214/009053604000000067", lit.LarsParams, lit.Lars),
        PluginSpec("ard", Stage.DECOMPOSER, "Automatic relevance determination (sparse Bayesian regression)",
                   "https://www.jmlr.org/papers/v1/tipping01a.html", lit.ArdParams, lit.Ard),
        PluginSpec("simplex-ls", Stage.DECOMPOSER, "Least squares with c ≥ 0 and Σc = 1 (a linear merge's weights)",
                   "https://doi.org/10.1137/1.9781611971217", lit.SimplexLsParams, lit.SimplexLs),
        PluginSpec("gram-nnls", Stage.DECOMPOSER, "NNLS from DᵀD and Dᵀy only (mask-free, module by module)",
                   "https://doi.org/10.1002/(SICI)1099-128X(199709/10)11:5%3C393::AID-CEM483%3E3.0.CO;2-L",
                   lit.GramNnlsParams, lit.GramNnls),
        PluginSpec("nnls-select", Stage.DECOMPOSER,
                   "NNLS + backward elimination by unique explained energy, with an out-of-dictionary verdict",
                   "https://doi.org/10.1137/1.9781611971217", sel.NnlsSelectParams, sel.NnlsSelect),
    ]
