"""Unit tests of the built-in trainers, masker and metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.errors import UnmergeError
from unmerge_core.types import Decomposition, TargetEvaluation, TaskInfo, TrainJob
from unmerge_plugins.maskers.topk import TopKMasker, TopKParams
from unmerge_plugins.metrics.reconstruction import ReconstructionMetric, reconstruction_error
from unmerge_plugins.metrics.semantic_alignment import AlignmentMetrics
from unmerge_plugins.metrics.support import SupportMetrics, SupportParams
from unmerge_plugins.lib.shapes import module_shapes_from_config
from unmerge_plugins.trainers.adapters import ExistingAdapters, ExistingAdaptersParams
from unmerge_plugins.trainers.synthetic import SyntheticParams, SyntheticTrainer

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 24), "model.layers.0.self_attn.k_proj": (8, 24)}


def synthetic_adapter(tmp_path, name: str, category: str = "code", seed: int = 1, **params) -> LoraAdapter:
    out = tmp_path / name
    out.mkdir()
    p = SyntheticParams(module_shapes=SHAPES, rank=6, **params)
    task = TaskInfo(name, category, {"kind": "procedural", "generator": "x"})
    SyntheticTrainer(p).train(TrainJob(task, out, seed, tmp_path))
    return LoraAdapter(out, name)


def test_qwen25_7b_shapes() -> None:
    cfg = {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28}
    shapes = module_shapes_from_config(cfg, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(shapes) == 112
    assert shapes["model.layers.0.self_attn.q_proj"] == (3584, 3584)
    assert shapes["model.layers.27.self_attn.k_proj"] == (512, 3584)
    assert sum(a * b for a, b in shapes.values()) == 822_083_584


def test_synthetic_adapter_shapes_scale_and_determinism(tmp_path) -> None:
    a = synthetic_adapter(tmp_path, "a", scale=1e-3)
    again = synthetic_adapter(tmp_path, "a2", seed=1, scale=1e-3)
    assert a.shapes == SHAPES
    d = a.delta("model.layers.0.self_attn.q_proj")
    assert 3e-4 < float(d.std()) < 3e-3
    (tmp_path / "again").mkdir()
    same = synthetic_adapter(tmp_path / "again", "a", scale=1e-3)
    torch.testing.assert_close(same.delta("model.layers.0.self_attn.q_proj"), d, rtol=0, atol=0)
    assert a.config["r"] == 6 and json.loads((a.path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not torch.equal(d, again.delta("model.layers.0.self_attn.q_proj"))  # task name seeds its own part


def test_synthetic_shared_structure_correlates_atoms(tmp_path) -> None:
    def corr(shared: float, cat: float, same_category: bool) -> float:
        x = synthetic_adapter(tmp_path, f"x{shared}{cat}{same_category}", "code", 1, shared=shared, category_shared=cat)
        y = synthetic_adapter(tmp_path, f"y{shared}{cat}{same_category}", "code" if same_category else "style", 2,
                              shared=shared, category_shared=cat)
        m = "model.layers.0.self_attn.q_proj"
        u, v = x.delta(m).reshape(-1), y.delta(m).reshape(-1)
        return float(u @ v / (u.norm() * v.norm()))

    assert abs(corr(0.0, 0.0, True)) < 0.3
    assert corr(0.6, 0.0, False) > 0.35
    assert corr(0.3, 0.4, True) > corr(0.3, 0.4, False) + 0.2


def test_synthetic_params_need_one_shape_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SyntheticParams()


def test_existing_adapters_trainer_copies_and_reports_missing(tmp_path) -> None:
    src = synthetic_adapter(tmp_path, "src")
    out = tmp_path / "out"
    out.mkdir()
    trainer = ExistingAdapters(ExistingAdaptersParams(paths={"t": str(src.path)}))
    trainer.train(TrainJob(TaskInfo("t", "code", {"kind": "procedural"}), out, 0, tmp_path))
    assert LoraAdapter(out).module_names == src.module_names
    with pytest.raises(UnmergeError, match="no adapter for task 'u'"):
        trainer.train(TrainJob(TaskInfo("u", "code", {"kind": "procedural"}), out, 0, tmp_path))


@pytest.mark.parametrize("aggregate", ["max", "mean", "l2"])
def test_topk_mask_matches_dense_selection(tmp_path, aggregate: str) -> None:
    adapters = [synthetic_adapter(tmp_path, f"m{i}", seed=i) for i in range(3)]
    mask = TopKMasker(TopKParams(budget=40, aggregate=aggregate)).build_mask(adapters)
    assert mask.size == 40 and set(mask.indices) == set(SHAPES)
    for module, idx in mask.indices.items():
        stack = torch.stack([a.delta(module).abs() for a in adapters])
        score = {"max": stack.max(0).values, "mean": stack.mean(0), "l2": stack.square().sum(0).sqrt()}[aggregate]
        expected = np.sort(torch.topk(score.reshape(-1), 20).indices.numpy())
        assert np.array_equal(idx, expected)
        assert np.all(np.diff(idx) > 0)


def evaluation(group: str, coef, true_tasks=("a", "b"), support=None, ood=None) -> TargetEvaluation:
    atoms = ("a", "b", "c", "d")
    rng = np.random.default_rng(0)
    vectors = {n: rng.standard_normal(50) for n in ("a", "b", "c", "d", "u", "v")}
    d = np.stack([vectors[a] for a in atoms], axis=1)
    coef = np.asarray(coef, dtype=float)
    target = sum(vectors[t] for t in true_tasks) / len(true_tasks)
    dec = Decomposition(coef, d @ coef, None if support is None else np.asarray(support), ood)
    cats = {"a": "code", "b": "style", "c": "code", "d": "other", "u": "style", "v": "reasoning"}
    return TargetEvaluation("t", group, "linear", tuple(true_tasks), tuple([1 / len(true_tasks)] * len(true_tasks)),
                            atoms, target, dec, vectors, cats)


def test_support_metrics_known() -> None:
    m = SupportMetrics(SupportParams(threshold=1e-3)).compute(evaluation("known", [0.5, 0.5, 0.0, 0.0005]))
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["perfect_match"] == 1.0 and m["sparsity"] == 2
    assert m["coef_mae"] == pytest.approx(0.0005 / 4)
    m = SupportMetrics(SupportParams()).compute(evaluation("known", [0.5, 0.0, 0.3, 0.0]))
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["perfect_match"] == 0.0


def test_precision_undefined_when_nothing_selected() -> None:
    m = SupportMetrics(SupportParams()).compute(evaluation("known", [0, 0, 0, 0]))
    assert m["precision"] is None and m["recall"] == 0.0 and m["sparsity"] == 0


def test_unknown_targets_never_score_precision_zero() -> None:
    m = SupportMetrics(SupportParams()).compute(evaluation("unknown", [0.4, 0, 0, 0], true_tasks=("u", "v"), ood=True))
    assert m["precision"] is None and m["recall"] is None and m["perfect_match"] is None
    assert m["sparsity"] == 1 and m["ood_flag"] == 1.0


def test_mixed_scores_only_dictionary_constituents() -> None:
    m = SupportMetrics(SupportParams()).compute(evaluation("mixed", [0.5, 0, 0.2, 0], true_tasks=("a", "u")))
    assert m["precision"] == 0.5 and m["recall"] == 1.0


def test_decomposer_support_overrides_threshold() -> None:
    m = SupportMetrics(SupportParams()).compute(evaluation("known", [0.5, 0.5, 0.2, 0], support=[1, 1, 0, 0]))
    assert m["precision"] == 1.0


def test_relative_threshold() -> None:
    m = SupportMetrics(SupportParams(threshold=0.5, relative=True)).compute(evaluation("known", [1.0, 0.6, 0.2, 0]))
    assert m["sparsity"] == 2


def test_reconstruction_error_definition() -> None:
    y = np.array([1.0, 0.0])
    assert reconstruction_error(y, y * 3) == pytest.approx(0.0)
    assert reconstruction_error(y, np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert reconstruction_error(y, -y) == pytest.approx(1.0)  # max(0, cos)
    assert reconstruction_error(y, np.array([1.0, 1.0])) == pytest.approx(0.5)
    assert reconstruction_error(y, np.zeros(2)) == 1.0
    v = np.array([0.1, 0.7, 0.3]) / 3.0  # regression: cos rounds to 1 + 2e-16 here, error was -4e-16
    assert reconstruction_error(v, v * 1e-3) >= 0.0
    assert ReconstructionMetric(None).compute(evaluation("known", [0.5, 0.5, 0, 0]))["recon_error"] < 1e-12


def test_alignment_on_unknown_and_undefined_on_known() -> None:
    ev = evaluation("unknown", [0.0, 0.3, 0.0, 0.0], true_tasks=("u", "v"))
    m = AlignmentMetrics(SupportParams()).compute(ev)
    assert m["category_match"] == 1.0  # b is "style", like u
    assert m["alignment_atoms"] is not None and -1 <= m["alignment_atoms"] <= 1
    assert AlignmentMetrics(SupportParams()).compute(evaluation("known", [1, 0, 0, 0]))["category_match"] is None


def test_topk_budget_below_one_coordinate_per_module_is_refused(tmp_path) -> None:
    """A budget of 1 over 8 modules silently became 8 coordinates (found by a hostile review)."""
    from helpers import random_adapter, tiny_base
    from unmerge_core.io.adapters import LoraAdapter
    from unmerge_plugins.maskers.topk import TopKMasker, TopKParams

    base = tiny_base(tmp_path / "base")
    adapter = LoraAdapter(random_adapter(base, tmp_path / "a", seed=1))
    modules = len(adapter.module_names)
    from unmerge_core.errors import UnmergeError

    with pytest.raises(UnmergeError, match=f"less than one coordinate per module \\({modules} modules\\)"):
        TopKMasker(TopKParams(budget=modules - 1)).build_mask([adapter])
    assert TopKMasker(TopKParams(budget=modules)).build_mask([adapter]).size == modules
