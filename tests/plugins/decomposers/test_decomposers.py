"""Decomposers on synthetic problems with a known answer, the Gram helpers and per-layer mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.errors import UnmergeError
from unmerge_core.manager import PluginManager
from unmerge_core.config.manifest import load_manifest
from unmerge_core.pipeline.runner import Runner
from unmerge_core.types import DecompositionProblem
from unmerge_plugins.decomposers.per_layer import PerLayerDecomposer, PerLayerOptions, split_units, unit_name
from unmerge_plugins.lib.gram import accumulate_gram, lora_gram, reduce_gram

ATOMS = tuple("abcdefgh")
TRUE_IDX = [1, 4, 6]
TRUE_W = [0.5, 0.3, 0.2]
THRESHOLD = 1e-3
# decomposers expected to find exactly the true support of a noise-free sparse non-negative target
EXACT = ["nnls", "paper-nnls", "lasso", "omp", "lasso-ic", "elastic-net", "lars", "ard", "simplex-ls", "gram-nnls"]

MANAGER = PluginManager()
ALL = MANAGER.names("decomposer")
BUILTIN = ["nnls", "paper-nnls", "lasso", "omp", "ridge", "dot-product", *EXACT[4:]]


def decomposer(name: str, **params: object):
    return MANAGER.instantiate("decomposer", name, params)


def dictionary(n: int = 2000, p: int = 8, shared: float = 0.3, scale: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Columns share a common direction (correlation ≈ ``shared``), like adapters of one base model."""
    gen = np.random.default_rng(seed)
    common = gen.standard_normal(n)
    return (np.sqrt(shared) * common[:, None] + np.sqrt(1 - shared) * gen.standard_normal((n, p))) * scale


def true_coef(p: int = 8) -> np.ndarray:
    c = np.zeros(p)
    c[TRUE_IDX] = TRUE_W
    return c


def problem(noise: float = 0.0, seed: int = 0, groups: dict[str, slice] | None = None) -> DecompositionProblem:
    d = dictionary(seed=seed)
    y = d @ true_coef()
    if noise:
        gen = np.random.default_rng(seed + 100)
        y = y + noise * np.linalg.norm(y) / np.sqrt(len(y)) * gen.standard_normal(len(y))
    return DecompositionProblem(d, y, ATOMS, groups or {}, seed)


def support_of(result) -> np.ndarray:
    if result.support is not None:
        return np.asarray(result.support, dtype=bool)
    return np.abs(result.coefficients) > THRESHOLD


def test_every_builtin_decomposer_is_registered() -> None:
    assert set(BUILTIN) <= set(ALL)


# --------------------------------------------------------------------------------------------------
# Every decomposer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_output_lengths_and_determinism(name: str) -> None:
    prob = problem(noise=0.1)
    first = decomposer(name).decompose(prob)
    second = decomposer(name).decompose(prob)
    assert first.coefficients.shape == (len(ATOMS),)
    assert first.reconstruction.shape == prob.target.shape
    assert np.all(np.isfinite(first.coefficients))
    np.testing.assert_array_equal(first.coefficients, second.coefficients)
    np.testing.assert_array_equal(first.reconstruction, second.reconstruction)
    json.dumps(first.info)  # diagnostics must be JSON-serialisable for per_target.json


@pytest.mark.parametrize("name", EXACT)
def test_exact_support_recovery_noise_free(name: str) -> None:
    result = decomposer(name).decompose(problem())
    assert np.flatnonzero(support_of(result)).tolist() == TRUE_IDX
    np.testing.assert_allclose(result.coefficients, true_coef(), atol=0.02)


@pytest.mark.parametrize("name", ["nnls", "paper-nnls", "omp", "lasso-ic", "lars", "ard", "simplex-ls", "gram-nnls"])
def test_unpenalised_methods_recover_coefficients_exactly(name: str) -> None:
    result = decomposer(name).decompose(problem())
    np.testing.assert_allclose(result.coefficients, true_coef(), atol=1e-6)


def test_ridge_is_dense_but_close() -> None:
    result = decomposer("ridge").decompose(problem())
    assert sorted(np.argsort(result.coefficients)[-3:].tolist()) == TRUE_IDX
    np.testing.assert_allclose(result.coefficients, true_coef(), atol=0.01)


def test_dot_product_ranks_true_atoms_first() -> None:
    result = decomposer("dot-product").decompose(problem())
    assert sorted(np.argsort(result.coefficients)[-3:].tolist()) == TRUE_IDX
    assert support_of(result).sum() > 3  # correlated atoms all score: not a sparse method


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lasso_ic_under_noise(seed: int) -> None:
    # little noise: BIC finds exactly the true atoms
    low = decomposer("lasso-ic").decompose(problem(noise=0.05, seed=seed))
    assert np.flatnonzero(support_of(low)).tolist() == TRUE_IDX
    assert low.info["noise_variance_source"] == "least-squares residual"
    # heavy noise: every true atom is kept; an extra one may enter with a tiny coefficient (choosing along
    # the LASSO path, less shrinkage of the true atoms can pay for one more degree of freedom)
    bic = decomposer("lasso-ic").decompose(problem(noise=0.5, seed=seed))
    aic = decomposer("lasso-ic", criterion="aic").decompose(problem(noise=0.5, seed=seed))
    for result in (bic, aic):
        assert support_of(result)[TRUE_IDX].all()
        assert np.abs(np.delete(result.coefficients, TRUE_IDX)).max() < 0.03  # noise level ≈ 0.01
    assert support_of(bic).sum() <= support_of(aic).sum()


@pytest.mark.parametrize("name", ["lasso-ic", "lasso", "elastic-net"])
@pytest.mark.parametrize("noise", [0.0, 0.1, 0.5])
def test_penalised_methods_are_scale_invariant(name: str, noise: float) -> None:
    prob = problem(noise=noise)
    small = DecompositionProblem(prob.dictionary * 1e-4, prob.target * 1e-4, ATOMS)
    a, b = decomposer(name).decompose(prob), decomposer(name).decompose(small)
    np.testing.assert_array_equal(support_of(a), support_of(b))
    np.testing.assert_allclose(a.coefficients, b.coefficients, atol=1e-9)


def test_lars_options() -> None:
    result = decomposer("lars", n_nonzero_coefs=2).decompose(problem())
    assert 1 <= np.count_nonzero(result.coefficients) <= 2
    assert set(np.flatnonzero(result.coefficients)) <= set(TRUE_IDX)
    lar = decomposer("lars", method="lar", positive=False).decompose(problem())
    np.testing.assert_allclose(lar.coefficients, true_coef(), atol=1e-8)
    with pytest.raises(UnmergeError, match="positive"):
        decomposer("lars", method="lar")


def test_ard_clip_negative() -> None:
    d = dictionary()
    c = true_coef()
    c[2] = -0.2
    prob = DecompositionProblem(d, d @ c, ATOMS)
    clipped = decomposer("ard").decompose(prob)
    raw = decomposer("ard", clip_negative=False).decompose(prob)
    assert raw.coefficients[2] == pytest.approx(-0.2, abs=1e-6)
    assert clipped.coefficients[2] == 0.0 and clipped.info["n_negative"] == 1
    np.testing.assert_allclose(clipped.reconstruction, d @ clipped.coefficients)


def test_gram_nnls_equals_nnls() -> None:
    for noise in (0.0, 0.5):
        prob = problem(noise=noise, seed=3)
        a, b = decomposer("gram-nnls").decompose(prob), decomposer("nnls").decompose(prob)
        np.testing.assert_allclose(a.coefficients, b.coefficients, atol=1e-10)
        # the Gram form computes the residual as cᵀGc − 2bᵀc + yᵀy: accurate to ~1e-8 ‖y‖, not relatively
        assert a.info["residual"] == pytest.approx(b.info["residual"], abs=1e-6 * np.linalg.norm(prob.target))


def test_gram_nnls_with_linearly_dependent_atoms() -> None:
    d = dictionary()
    d = np.column_stack([d, d[:, 1]])  # duplicate atom: G is singular, the eigen route is used
    y = d[:, :8] @ true_coef()
    prob = DecompositionProblem(d, y, (*ATOMS, "dup"))
    a, b = decomposer("gram-nnls").decompose(prob), decomposer("nnls").decompose(prob)
    assert a.info["residual"] == pytest.approx(b.info["residual"], abs=1e-9 * np.linalg.norm(y))
    assert a.coefficients[1] + a.coefficients[8] == pytest.approx(0.5, abs=1e-8)


@pytest.mark.parametrize("solver", ["nnls", "slsqp"])
def test_simplex_sums_to_total(solver: str) -> None:
    d = dictionary()
    y = d @ (2.0 * true_coef())  # true weights sum to 2: the simplex fit must still sum to 1
    result = decomposer("simplex-ls", solver=solver).decompose(DecompositionProblem(d, y, ATOMS))
    assert result.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
    assert (result.coefficients >= 0).all()
    exact = decomposer("simplex-ls", solver=solver, total=2.0).decompose(DecompositionProblem(d, y, ATOMS))
    np.testing.assert_allclose(exact.coefficients, 2.0 * true_coef(), atol=1e-5)


def test_simplex_solvers_agree() -> None:
    prob = problem(noise=0.5, seed=5)
    y = prob.target * 1.7
    prob = DecompositionProblem(prob.dictionary, y, ATOMS)
    a = decomposer("simplex-ls").decompose(prob)
    b = decomposer("simplex-ls", solver="slsqp").decompose(prob)
    np.testing.assert_allclose(a.coefficients, b.coefficients, atol=1e-5)
    loss = [float(np.sum((prob.dictionary @ r.coefficients - y) ** 2)) for r in (a, b)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-7)


# --------------------------------------------------------------------------------------------------
# Gram helpers
# --------------------------------------------------------------------------------------------------


SHAPES = {"model.layers.0.q": (6, 5), "model.layers.0.k": (3, 5), "model.layers.1.q": (6, 5)}


def write_adapter(directory: Path, seed: int, modules: dict[str, tuple[int, int]], rank: int = 2) -> LoraAdapter:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (n_out, n_in) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 4}))
    return LoraAdapter(directory)


def test_accumulate_gram_equals_dense(tmp_path: Path) -> None:
    adapters = [write_adapter(tmp_path / f"a{i}", i, SHAPES) for i in range(3)]
    # the fourth atom does not adapt model.layers.0.k: zeros there
    adapters.append(write_adapter(tmp_path / "a3", 3, {k: v for k, v in SHAPES.items() if "k" not in k}))
    gen = torch.Generator().manual_seed(9)
    targets = {m: torch.randn(*s, generator=gen) for m, s in SHAPES.items()}

    def deltas(module: str) -> list[torch.Tensor]:
        return [a.delta(module) if module in a.modules else torch.zeros(SHAPES[module]) for a in adapters]

    dense = np.column_stack([np.concatenate([deltas(m)[j].reshape(-1).double().numpy() for m in SHAPES])
                             for j in range(len(adapters))])
    y = np.concatenate([targets[m].reshape(-1).double().numpy() for m in SHAPES])

    got = accumulate_gram(deltas, targets.__getitem__, SHAPES, chunk=7)  # chunk smaller than a module
    np.testing.assert_allclose(got.gram, dense.T @ dense, rtol=1e-6)
    np.testing.assert_allclose(got.rhs, dense.T @ y, rtol=1e-6)
    assert got.target_sq == pytest.approx(float(y @ y), rel=1e-6)

    low_rank = lora_gram(adapters, targets.__getitem__, list(SHAPES))
    np.testing.assert_allclose(low_rank.gram, dense.T @ dense, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(low_rank.rhs, dense.T @ y, rtol=1e-5, atol=1e-8)
    assert low_rank.target_sq == pytest.approx(float(y @ y), rel=1e-6)
    default_modules = lora_gram(adapters)
    np.testing.assert_allclose(default_modules.gram, low_rank.gram)
    assert not default_modules.rhs.any() and default_modules.target_sq == 0.0


def test_accumulate_gram_rejects_mismatched_deltas() -> None:
    with pytest.raises(ValueError, match="sizes"):
        accumulate_gram(lambda m: [np.zeros(4), np.zeros(5)], None, ["m"])


def test_reduce_gram_preserves_the_objective() -> None:
    prob = problem(noise=0.3)
    d, y = prob.dictionary, prob.target
    r, z = reduce_gram(d.T @ d, d.T @ y)
    gen = np.random.default_rng(1)
    gaps = [float(np.sum((d @ c - y) ** 2) - np.sum((r @ c - z) ** 2)) for c in gen.random((5, d.shape[1]))]
    np.testing.assert_allclose(gaps, gaps[0], rtol=1e-8, atol=1e-12 * float(y @ y))


@pytest.mark.parametrize(("name", "params"), [
    ("nnls", {}), ("paper-nnls", {}), ("gram-nnls", {}), ("simplex-ls", {}), ("lasso", {}), ("elastic-net", {}),
    ("ridge", {}), ("lars", {}), ("lars", {"n_nonzero_coefs": 2}), ("dot-product", {}), ("omp", {"n_nonzero_coefs": 3}),
])
def test_gram_reduced_problem_is_equivalent(name: str, params: dict) -> None:
    """What ``unmerge attribute`` relies on: these decomposers give the same answer on (R, d) as on (D, y)."""
    prob = problem(noise=0.3, seed=2)
    d, y = prob.dictionary, prob.target
    r, z = reduce_gram(d.T @ d, d.T @ y)
    full = decomposer(name, **params).decompose(prob)
    reduced = decomposer(name, **params).decompose(DecompositionProblem(r, z, ATOMS))
    np.testing.assert_allclose(reduced.coefficients, full.coefficients, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# Per-layer mode
# --------------------------------------------------------------------------------------------------


def layered_problem(intruder: bool = False) -> DecompositionProblem:
    """4 layers × 2 modules × 250 rows; with ``intruder``, layer 3 is made of atom h alone."""
    d = dictionary()
    groups = {f"model.layers.{i // 2}.{'qk'[i % 2]}_proj": slice(250 * i, 250 * (i + 1)) for i in range(8)}
    y = d @ true_coef()
    if intruder:
        y[1500:] = 0.4 * d[1500:, 7]
    return DecompositionProblem(d, y, ATOMS, groups, 0)


def test_unit_names() -> None:
    assert unit_name("model.layers.12.self_attn.q_proj") == "model.layers.12"
    assert unit_name("transformer.h.3.attn.c_attn") == "transformer.h.3"
    assert unit_name("lm_head") == "lm_head"
    assert unit_name("model.layers.12.self_attn.q_proj", "module") == "model.layers.12.self_attn.q_proj"
    units = split_units({"l.0.a": slice(0, 2), "l.0.b": slice(2, 3), "l.1.a": slice(3, 3), "l.2.a": slice(3, 5)})
    assert list(units) == ["l.0", "l.2"]  # l.1 has no rows
    np.testing.assert_array_equal(units["l.0"], [0, 1, 2])


def test_per_layer_consistent_target() -> None:
    result = PerLayerDecomposer(PerLayerOptions(), decomposer("nnls")).decompose(layered_problem())
    np.testing.assert_allclose(result.coefficients, true_coef(), atol=1e-8)
    shares = result.info["layer_consistency"]
    assert [shares[a] for a in ATOMS] == [0, 1, 0, 0, 1, 0, 1, 0]
    assert result.info["layer_consistency_mean"] == 1.0
    assert result.info["per_layer"]["n_units"] == 4
    np.testing.assert_allclose(result.reconstruction, layered_problem().dictionary @ result.coefficients)
    by_module = PerLayerDecomposer(PerLayerOptions(unit="module"), decomposer("nnls")).decompose(layered_problem())
    assert by_module.info["per_layer"]["n_units"] == 8


@pytest.mark.parametrize("combine", ["median", "mean", "vote"])
def test_per_layer_intruder_layer(combine: str) -> None:
    options = PerLayerOptions(combine=combine)
    result = PerLayerDecomposer(options, decomposer("nnls")).decompose(layered_problem(intruder=True))
    shares = result.info["layer_consistency"]
    assert [shares[a] for a in ATOMS] == [0, 0.75, 0, 0, 0.75, 0, 0.75, 0.25]
    if combine == "median":
        np.testing.assert_allclose(result.coefficients, true_coef(), atol=1e-8)
    elif combine == "mean":
        np.testing.assert_allclose(result.coefficients, 0.75 * true_coef() + 0.1 * np.eye(8)[7], atol=1e-8)
    else:
        assert np.flatnonzero(result.support).tolist() == TRUE_IDX
        assert result.info["layer_consistency_mean"] == 0.75
        strict = PerLayerDecomposer(PerLayerOptions(combine="vote", vote_threshold=0.8), decomposer("nnls"))
        assert not strict.decompose(layered_problem(intruder=True)).support.any()


@pytest.mark.parametrize("name", BUILTIN)
def test_per_layer_wraps_every_decomposer(name: str) -> None:
    prob = layered_problem()
    result = PerLayerDecomposer(PerLayerOptions(), decomposer(name)).decompose(prob)
    assert result.coefficients.shape == (len(ATOMS),)
    assert result.reconstruction.shape == prob.target.shape
    assert set(result.info["layer_consistency"]) == set(ATOMS)
    json.dumps(result.info)


def test_per_layer_tiny_units_and_zero_units() -> None:
    d = dictionary(n=40)
    y = d @ true_coef()
    y[35:] = 0.0  # the last unit has nothing to attribute
    groups = {f"layers.{i}.q": slice(5 * i, 5 * (i + 1)) for i in range(8)}  # 5 rows < 8 atoms per unit
    result = PerLayerDecomposer(PerLayerOptions(), decomposer("lasso-ic")).decompose(DecompositionProblem(d, y, ATOMS, groups))
    assert result.info["per_layer"]["skipped"] == ["layers.7"]
    assert result.info["per_layer"]["n_units"] == 7
    assert np.all(np.isfinite(result.coefficients))


def test_per_layer_needs_groups() -> None:
    with pytest.raises(ValueError, match="groups"):
        PerLayerDecomposer(PerLayerOptions(), decomposer("nnls")).decompose(problem())


# --------------------------------------------------------------------------------------------------
# Manifest and runner
# --------------------------------------------------------------------------------------------------


PER_LAYER_ENTRIES = """[[decomposers]]
plugin = "nnls"
per_layer = true
[[decomposers]]
plugin = "simplex-ls"
label = "simplex-vote"
per_layer = { unit = "module", combine = "vote", vote_threshold = 0.6 }
[[metrics]]
plugin = "support"
[[metrics]]
plugin = "layer-consistency"
"""


def per_layer_manifest(write_manifest, entries: str = PER_LAYER_ENTRIES) -> Path:
    """The conftest's synthetic manifest with its ``lasso`` entry replaced by ``entries``."""
    return write_manifest(**{'[[decomposers]]\nplugin = "lasso"\n': entries})


def test_manifest_per_layer_validates(write_manifest) -> None:
    m = load_manifest(per_layer_manifest(write_manifest))
    labels = [d.label for d in m.decomposers]
    assert labels == ["nnls", "nnls/per-layer", "simplex-vote"]
    assert m.decomposers[0].inner is None and m.decomposers[0].spec.name == "nnls"
    assert m.decomposers[1].spec.name == "per-layer" and m.decomposers[1].params == PerLayerOptions()
    assert m.decomposers[1].inner.spec.name == "nnls"
    assert m.decomposers[2].params == PerLayerOptions(unit="module", combine="vote", vote_threshold=0.6)
    assert isinstance(m.decomposers[1].build(), PerLayerDecomposer)
    # the cache key's inputs are those of the per_layer table before it became a plugin
    config = m.decomposers[1].config()
    assert set(config.pop("code")) == {"nnls", "per-layer"}  # both plugins' code identify the work
    assert config == {"plugin": "nnls", "params": {"max_iter": None},
                      "per_layer": PerLayerOptions().model_dump(mode="json")}
    assert "per_layer" not in m.decomposers[0].config()
    off = load_manifest(per_layer_manifest(write_manifest, '[[decomposers]]\nplugin = "ard"\nper_layer = false\n'))
    assert off.decomposers[1].label == "ard" and off.decomposers[1].inner is None


@pytest.mark.parametrize(("entry", "message"), [
    ('[[decomposers]]\nplugin = "nnls"\nper_layer = { combine = "max" }\n', "combine"),
    ('[[decomposers]]\nplugin = "nnls"\nper_layer = { units = "layer" }\n', "units"),
    ('[[decomposers]]\nplugin = "nnls"\nper_layer = { vote_threshold = 0 }\n', "vote_threshold"),
    ('[[decomposers]]\nplugin = "nnls"\nper_layer = "yes"\n', "per_layer: Input should be a valid dictionary"),
])
def test_manifest_per_layer_errors(write_manifest, entry: str, message: str) -> None:
    with pytest.raises(UnmergeError, match=message):
        load_manifest(per_layer_manifest(write_manifest, entry))


def test_per_layer_is_for_decomposers_only(write_manifest) -> None:
    path = write_manifest(**{'[merger]\nplugin = "mergekit"': '[merger]\nplugin = "mergekit"\nper_layer = true'})
    with pytest.raises(UnmergeError, match="merger.per_layer"):
        load_manifest(path)


def test_runner_reports_layer_consistency(write_manifest) -> None:
    result = Runner(load_manifest(per_layer_manifest(write_manifest)), progress=False, echo=lambda _: None).run()
    rows = json.loads((result.run_dir / "per_target.json").read_text())["rows"]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["decomposer"], []).append(row)
    assert set(by_label) == {"nnls", "nnls/per-layer", "simplex-vote"}
    for row in by_label["nnls"]:
        assert row["metrics"]["layer_consistency"] is None
        assert "layer_consistency" not in row["info"]
    for label in ("nnls/per-layer", "simplex-vote"):
        for row in by_label[label]:
            shares = row["info"]["layer_consistency"]
            assert set(shares) == set(result.table.atom_names)
            assert all(0.0 <= v <= 1.0 for v in shares.values())
        assert any(r["metrics"]["layer_consistency"] is not None for r in by_label[label])
    assert {r["info"]["per_layer"]["n_units"] for r in by_label["nnls/per-layer"]} == {2}  # layers.0, layers.1
    assert {r["info"]["per_layer"]["n_units"] for r in by_label["simplex-vote"]} == {3}  # three modules
    assert "layer_consistency" in (result.run_dir / "summary.csv").read_text()
