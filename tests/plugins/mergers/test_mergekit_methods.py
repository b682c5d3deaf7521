"""Every method of the ``mergekit`` merger equals mergekit's own ``run_merge`` of full models minus the
base, on a tiny Qwen2 model with three random PEFT LoRA adapters; random methods are reproducible from
the seed and keep mergekit's statistics; per-method parameters are validated."""

from __future__ import annotations

import pytest
import torch
from helpers import load_state, merged_full_model, random_adapter, tiny_base
from unmerge_plugins.lib.mergekit_methods import EXCLUDED, METHOD_FACTS, mergekit_parameters
from unmerge_plugins.mergers.mergekit_merger import MergekitMerger, MergekitParams

from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.types import MergeJob

WEIGHTS = {1: (1.0,), 2: (0.6, 0.4), 3: (0.5, 0.3, 0.2)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mk")
    base = tiny_base(root / "base")
    adapters, fulls, noisy = [], [], []
    for i in range(3):
        a = random_adapter(base, root / f"adapter{i}", seed=10 + i)
        adapters.append(LoraAdapter(a, f"t{i}"))
        fulls.append(merged_full_model(base, a, root / f"full{i}"))
        # the same model with independent noise on every tensor that is not a LoRA module: mergekit's
        # multislerp refuses tensors that are equal in every input, which run_merge meets on them
        state = load_state(fulls[-1])
        g = torch.Generator().manual_seed(100 + i)
        for k, v in state.items():
            if not k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                state[k] = v + 1e-3 * torch.randn(v.shape, generator=g)
        out = root / f"noisy{i}"
        out.mkdir()
        for f in fulls[-1].iterdir():
            if not f.name.endswith(".safetensors"):
                (out / f.name).write_bytes(f.read_bytes())
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        noisy.append(out)
    return root, base, adapters, fulls, noisy, load_state(base)


def reference(root, base, dirs, merger: MergekitMerger, method: str, tag: str) -> dict[str, torch.Tensor]:
    """mergekit's run_merge of the full models, minus the base, per LoRA module."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    ids = [str(d) for d in dirs]
    params = merger.parameters(method, ids, WEIGHTS[len(dirs)])
    per_task = {p.name for p in mergekit_parameters(method) if p.per_task} | {"weight"}
    models = []
    for i in ids:
        own = {k: (v[i] if isinstance(v, dict) else v) for k, v in params.items() if k in per_task}
        models.append({"model": i, **({"parameters": own} if own else {})})
    config = {"merge_method": method, "models": models, "dtype": "float32",
              "parameters": {k: v for k, v in params.items() if k not in per_task}}
    mode = merger.mode(method)
    if mode == "pretrained":
        config["base_model"] = str(base)
    elif mode == "first_task":
        config["base_model"] = ids[0]
    out = root / f"mk-{tag}"
    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(device="cpu", random_seed=42, quiet=True))
    merged, base_state = load_state(out), load_state(base)
    return {k[: -len(".weight")]: merged[k] - base_state[k] for k in merged if k.endswith("_proj.weight")}


CASES = [  # (method, tasks, shared parameters, methods.<method> parameters)
    ("linear", 3, {}, {}),
    ("task_arithmetic", 3, {"lambda": 0.8}, {}),
    ("ties", 3, {}, {}),
    ("breadcrumbs", 3, {}, {"gamma": 0.05}),
    ("breadcrumbs_ties", 3, {"density": 0.6}, {"gamma": 0.05}),
    ("breadcrumbs_ties", 3, {"density": 0.6, "normalize": True}, {"gamma": 0.05}),
    ("della", 3, {"density": 1.0}, {}),  # no drop: the deterministic part (sign election, normalize)
    ("della_linear", 3, {"density": 1.0}, {}),
    ("sce", 3, {}, {}),
    ("sce", 3, {}, {"select_topk": 0.5}),
    ("ram", 3, {}, {}),
    ("ramplus_tl", 3, {}, {}),
    ("ramplus_tl", 3, {}, {"epsilon": 0.01}),
    ("model_stock", 3, {}, {}),
    ("model_stock", 2, {}, {"filter_wise": True}),
    ("multislerp", 3, {}, {}),
    ("multislerp", 3, {}, {"base_mode": "none"}),
    ("nuslerp", 2, {}, {}),
    ("nuslerp", 2, {}, {"base_mode": "none"}),
    ("nuslerp", 2, {}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("slerp", 2, {}, {}),
    ("slerp", 1, {}, {"base_mode": "pretrained", "t": 0.4}),
    ("karcher", 3, {}, {}),
    ("karcher", 3, {}, {"base_mode": "pretrained"}),
    ("nearswap", 2, {}, {"t": 0.005}),
    ("nearswap", 1, {}, {"base_mode": "pretrained", "t": 0.005}),
    ("arcee_fusion", 2, {}, {}),
]


def _id(case) -> str:
    method, n, shared, own = case
    return f"{method}-{n}-" + "-".join(f"{k}={v}" for k, v in {**shared, **own}.items())


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_plugin_equals_run_merge(models, case) -> None:
    method, n, shared, own = case
    root, base, adapters, fulls, noisy, base_state = models
    merger = MergekitMerger(MergekitParams(**shared, methods={method: own} if own else {}))
    assert merger.check_method(method) is None
    lo, hi = merger.method_tasks(method)
    assert lo <= n and (hi is None or n <= hi)
    dirs = (noisy if method == "multislerp" else fulls)[:n]
    ref = reference(root, base, dirs, merger, method, _id(case).replace("=", "_"))
    job = MergeJob("t", method, tuple(f"t{i}" for i in range(n)), WEIGHTS[n], seed=1)
    for module in adapters[0].module_names:
        deltas = [a.delta(module) for a in adapters[:n]]
        if method in merger.base_methods:
            ours = merger.merge_module_on_base(job, module, deltas, base_state[module + ".weight"])
        else:
            ours = merger.merge_module(job, module, deltas)
        tolerance = 1e-6 * float(ref[module].abs().max()) + 1e-7  # float32 rounding of W0 + ΔW in the full merge
        assert float((ours - ref[module]).abs().max()) <= tolerance, module
        assert float(ref[module].abs().max()) > 0 or method == "arcee_fusion"


def test_every_registry_method_is_offered() -> None:
    from mergekit.merge_methods import registry

    names = {m.spec.name for m in registry.registered_methods()}
    assert names == set(METHOD_FACTS) | set(EXCLUDED)
    assert set(MergekitMerger.methods) == set(METHOD_FACTS)


def test_base_methods_follow_the_input_mode() -> None:
    merger = MergekitMerger(MergekitParams())
    assert {"slerp", "karcher", "arcee_fusion"} <= merger.base_methods
    assert not {"linear", "ties", "multislerp", "nuslerp", "nearswap"} & merger.base_methods
    with_none = MergekitMerger(MergekitParams(methods={"multislerp": {"base_mode": "none"}}))
    assert "multislerp" in with_none.base_methods
    assert merger.method_tasks("slerp") == (2, 2) and merger.method_tasks("model_stock") == (2, None)
    assert merger.method_tasks("ties") == (1, None)


@pytest.mark.parametrize("methods,expected", [
    ({"dela": {}}, "did you mean 'della'"),
    ({"della": {"epsilon": 0.7}}, "della.epsilon"),
    ({"della": {"epsilon": 0.1, "bogus": 1}}, "della.bogus"),
    ({"slerp": {"t": 1.5}}, "slerp.t"),
    ({"slerp": {"t": 1.0}}, "slerp.t"),  # t = 1 is the second model alone, not a merge
    ({"karcher": {"max_iter": 0}}, "karcher.max_iter"),
    ({"slerp": {"base_mode": "none"}}, "slerp.base_mode"),
])
def test_method_parameters_are_validated(methods, expected) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=expected.replace(".", r"\.")):
        MergekitParams(methods=methods)


def test_check_method_names_what_cannot_run() -> None:
    narrow = MergekitMerger(MergekitParams(density=0.1))  # della's window density ± epsilon leaves (0, 1)
    assert "density ± epsilon" in (narrow.check_method("della") or "")
    assert narrow.check_method("ties") is None
    assert "nearswap.t" in (MergekitMerger(MergekitParams()).check_method("nearswap") or "")


def test_config_of_a_run_without_method_parameters_is_unchanged() -> None:
    assert "methods" not in MergekitParams().model_dump(mode="json")
    assert MergekitParams(methods={"ram": {"epsilon": 0.1}}).model_dump(mode="json")["methods"] == {
        "ram": {"epsilon": 0.1}}


RANDOM = [("dare_linear", {}), ("dare_ties", {}), ("della", {"epsilon": 0.15}), ("della_linear", {"epsilon": 0.15})]


@pytest.mark.parametrize("method,own", RANDOM)
def test_random_methods_reproducible_from_the_seed(models, method, own) -> None:
    adapters = models[2]
    merger = MergekitMerger(MergekitParams(density=0.5, methods={method: own} if own else {}))
    module = adapters[0].module_names[0]
    deltas = [a.delta(module) for a in adapters]
    job = MergeJob("t", method, ("t0", "t1", "t2"), WEIGHTS[3], seed=7)
    a, b = merger.merge_module(job, module, deltas), merger.merge_module(job, module, deltas)
    c = merger.merge_module(MergeJob("t", method, ("t0", "t1", "t2"), WEIGHTS[3], seed=8), module, deltas)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _kept_by_row_rank(delta: torch.Tensor, kept: torch.Tensor, bins: int = 3) -> list[float]:
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
    band = torch.clamp((ranks * bins).long(), max=bins - 1)
    return [float(kept[band == i].float().mean()) for i in range(bins)]


def test_della_statistics_match_run_merge(models) -> None:
    """One task at density 0.5: DELLA keeps 0.35 → 0.65 of each row from its smallest to its largest
    entries and rescales the module to its L1 norm — ours and mergekit's run_merge (another random
    stream) agree within sampling noise."""
    root, base, adapters, fulls, _, _ = models
    merger = MergekitMerger(MergekitParams(density=0.5))
    ref = reference(root, base, fulls[:1], merger, "della_linear", "stat-della")
    ours_kept, ref_kept, deltas = [], [], []
    job = MergeJob("t", "della_linear", ("t0",), (1.0,), seed=3)
    for module in adapters[0].module_names:
        d = adapters[0].delta(module)
        ours = merger.merge_module(job, module, [d])
        for out, store in ((ours, ours_kept), (ref[module], ref_kept)):
            kept = out.abs() > 1e-9
            store.append(kept)
            ratio = out[kept] / d[kept]  # one L1-preserving factor per module
            assert float(ratio.std() / ratio.mean()) < 1e-4
            assert float(out.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-4)
        deltas.append(d)
    d_all, o_all, r_all = torch.cat(deltas), torch.cat(ours_kept), torch.cat(ref_kept)
    for o, r, e in zip(_kept_by_row_rank(d_all, o_all), _kept_by_row_rank(d_all, r_all), [0.40, 0.50, 0.60]):
        assert abs(o - e) < 0.035 and abs(r - e) < 0.035


def test_slerp_with_a_fixed_t_ignores_the_targets_weights() -> None:
    assert "slerp" not in MergekitMerger(MergekitParams()).unweighted_methods
    assert "slerp" in MergekitMerger(MergekitParams(methods={"slerp": {"t": 0.3}})).unweighted_methods
