"""DᵀD formed once per run and shared by every target; decomposers that use it give the answers they
gave when each formed its own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from unmerge_core import DecompositionProblem, DictionaryGram, MergeJob
from unmerge_core.pipeline.scoring import ScoreLoop, ScoreTarget
from unmerge_plugins.decomposers import gram_nnls, lasso, omp


def problem(seed: int = 0, n: int = 3000, k: int = 12) -> DecompositionProblem:
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, k)) * 1e-3
    w = np.zeros(k)
    w[[1, 4, 7]] = [0.5, 0.3, 0.2]
    y = d @ w + rng.standard_normal(n) * 1e-5
    return DecompositionProblem(d, y, tuple(f"a{i}" for i in range(k)))


@pytest.mark.parametrize("module", [gram_nnls, lasso, omp])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_shared_gram_gives_the_same_decomposition(module, seed) -> None:
    plain = problem(seed)
    shared = dataclasses.replace(plain, gram=DictionaryGram.of(plain.dictionary))
    decomposer = module.SPEC.factory(module.SPEC.params())
    a, b = decomposer.decompose(plain), decomposer.decompose(shared)
    np.testing.assert_allclose(b.coefficients, a.coefficients, rtol=1e-9, atol=1e-12)
    assert np.array_equal(np.abs(a.coefficients) > 1e-3, np.abs(b.coefficients) > 1e-3)


def test_a_gram_of_another_matrix_is_not_used() -> None:
    """A sub-problem made with dataclasses.replace keeps the field, not the matrix: recomputed."""
    full = problem()
    full = dataclasses.replace(full, gram=DictionaryGram.of(full.dictionary))
    rows = dataclasses.replace(full, dictionary=full.dictionary[:100], target=full.target[:100])
    gram, rhs = rows.normal_equations()
    np.testing.assert_allclose(gram, rows.dictionary.T @ rows.dictionary)
    assert gram is not full.gram.gram


def test_a_run_forms_the_gram_once_for_every_target(monkeypatch) -> None:
    base = problem()
    calls = []
    real = DictionaryGram.of.__func__

    def counting(cls, dictionary):
        calls.append(dictionary.shape)
        return real(cls, dictionary)

    monkeypatch.setattr(DictionaryGram, "of", classmethod(counting))

    class Plugin:
        label = "gram-nnls"

        def instance(self):
            return gram_nnls.SPEC.factory(gram_nnls.SPEC.params())

        def config(self):
            return {"plugin": "gram-nnls"}

    loop = ScoreLoop(base.atom_names, base.dictionary, {}, [Plugin()], [])
    targets = [ScoreTarget(MergeJob(f"t{i}", "linear", ("a1",), (1.0,), 0, "known"),
                           problem(i).target, None) for i in range(5)]
    results = loop.decompose(targets)
    assert len(results) == 5 and calls == [base.dictionary.shape]
    grams = {id(p.gram) for _, _, p, _, _ in results}
    assert len(grams) == 1


def test_the_gram_matrix_is_read_only_whether_shared_or_not() -> None:
    """A decomposer that changed it in place worked in its own tests and failed in a run."""
    plain = problem()
    shared = dataclasses.replace(plain, gram=DictionaryGram.of(plain.dictionary))
    for p in (plain, shared):
        gram, rhs = p.normal_equations()
        assert not gram.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            gram[0, 0] += 1.0
