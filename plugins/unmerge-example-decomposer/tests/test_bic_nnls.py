from __future__ import annotations

import numpy as np

from unmerge_core import DecompositionProblem, PluginSpec
from unmerge_example_decomposer.plugin import BicNnls, BicNnlsParams, unmerge_decomposers


def problem(noise: float, seed: int = 0) -> tuple[DecompositionProblem, np.ndarray]:
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(3000)
    d = rng.standard_normal((3000, 8)) + 0.5 * common[:, None]
    c = np.array([0.5, 0, 0.3, 0, 0, 0.2, 0, 0])
    y = d @ c + noise * rng.standard_normal(3000)
    return DecompositionProblem(d, y, tuple(f"a{i}" for i in range(8))), c


def test_recovers_support_with_noise() -> None:
    p, c = problem(noise=0.3)
    out = BicNnls(BicNnlsParams()).decompose(p)
    assert list(np.flatnonzero(out.support)) == [0, 2, 5]
    assert np.allclose(out.coefficients, c, atol=0.05)


def test_max_atoms_limits_the_support() -> None:
    p, _ = problem(noise=0.0)
    out = BicNnls(BicNnlsParams(max_atoms=2)).decompose(p)
    assert out.support.sum() == 2


def test_declares_itself() -> None:
    (spec,) = unmerge_decomposers()
    assert isinstance(spec, PluginSpec) and spec.name == "bic-nnls" and spec.stage.value == "decomposer"
