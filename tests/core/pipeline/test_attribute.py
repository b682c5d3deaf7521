"""``unmerge attribute`` and manifest ``[[targets]]``: existing merged models and adapters as targets.

A tiny Qwen2 base and random LoRA adapters are built locally; mergekit's own CLI merges three of them
(``BASE+ADAPTER`` references, linear 0.5/0.3/0.2) into a model directory, which is then attributed.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO, load_state, random_adapter, tiny_base
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.pipeline.scoring import Scored
from unmerge_core.report.attribution import attribution_from, decomposer_confidence
from unmerge_plugins.metrics.unique_share import unique_shares
from unmerge_core.io.checkpoints import Checkpoint
from unmerge_core.cli import main
from unmerge_core.errors import UnmergeError
from unmerge_core.config.manifest import load_manifest
from unmerge_core.pipeline.runner import Runner
from unmerge_core.config.targets import read_mergekit_truth
from unmerge_core.io.target_reader import TargetReader
from unmerge_core.types import Decomposition, DecompositionProblem, Mask, MergeJob

ATOMS = ("alpha", "beta", "gamma", "delta")
MERGE = {"alpha": 0.5, "gamma": 0.3, "delta": 0.2}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribute")
    base = tiny_base(root / "base")
    dictionary = root / "dict"
    for i, name in enumerate(ATOMS):
        random_adapter(base, dictionary / name, seed=100 + i)
    outsider = random_adapter(base, root / "zeta", seed=999)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": f"{base}+{dictionary / n}", "parameters": {"weight": w}} for n, w in MERGE.items()]}
    recipe = root / "merge.yml"
    recipe.write_text(json.dumps(config))  # JSON is YAML
    merged = root / "merged"
    mergekit = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run([str(mergekit), str(recipe), str(merged), "--device", "cpu", "--random-seed", "42", "--quiet",
                    "--lora-merge-cache", str(root / "lora-cache")],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {"root": root, "base": base, "dict": dictionary, "outsider": outsider, "recipe": recipe, "merged": merged}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["attribute", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(rc: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("warning:", "note:"))]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def copy_model(src: Path, dst: Path, edit=None, config_edit=None) -> Path:
    """A copy of a single-file model directory with its state edited."""
    dst.mkdir()
    state = load_state(src)
    if edit is not None:
        edit(state)
    save_file(state, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if config_edit is not None:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def result_of(run_dir: Path, target: str, decomposer: str = "skill-fdr") -> dict:
    data = json.loads((run_dir / "attribution.json").read_text())
    entry = next(t for t in data["targets"] if t["name"] == target)
    return {**next(r for r in entry["results"] if r["decomposer"] == decomposer), "group": entry["group"]}


# --------------------------------------------------------------------------------------------------
# The main use: a mergekit merge of dictionary adapters
# --------------------------------------------------------------------------------------------------


def test_mergekit_merge_is_attributed_to_its_adapters(world, tmp_path, capsys) -> None:
    rc, out, err = run_cli(capsys, "--base", str(world["base"]), "--dictionary", str(world["dict"]),
                           str(world["merged"]), "--truth", str(world["recipe"]),
                           "--decomposer", "nnls", "--decomposer", "lasso", "--output-dir", str(tmp_path / "run"))
    assert rc == 0, err
    result = result_of(tmp_path / "run", "merged", "nnls")
    assert set(result["support"]) == set(MERGE)
    for atom, weight in MERGE.items():
        assert result["coefficients"][atom] == pytest.approx(weight, abs=1e-4)
    assert result["coefficients"]["beta"] == pytest.approx(0.0, abs=1e-4)
    assert result["recon_error"] < 1e-6 and result["verdict"] == "explained" and not result["out_of_dictionary"]
    assert result["verdict_rule"].startswith("fallback")
    assert result["group"] == "known"
    assert result["metrics"]["perfect_match"] == 1.0 and result["metrics"]["coef_mae"] < 1e-4
    # the fallback confidence is the unique share of energy: ordered like the weights here
    conf = result["confidence"]
    assert conf["alpha"] > conf["gamma"] > conf["delta"] > 0
    assert re.search(r"alpha +— +0\.500", out) and "explained" in out
    assert (tmp_path / "run" / "attribution.md").is_file() and (tmp_path / "run" / "attribution.csv").is_file()
    assert set(result_of(tmp_path / "run", "merged", "lasso")["support"]) == set(MERGE)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_merge_saved_in_half_precision_keeps_exact_claims_and_one_ood_flag(world, tmp_path, capsys, dtype) -> None:
    """The merge of dictionary adapters, saved in bf16 / fp16: every attributed entry carries its claim level
    (issue 22), the adapters stay 'this exact adapter' (the rounding noted 'a differently trained X' before),
    and ``out_of_dictionary`` never disagrees with the metric's ``ood_flag``."""
    half = getattr(torch, dtype)
    merged = copy_model(world["merged"], tmp_path / "half",
                        edit=lambda state: state.update({k: v.to(half) for k, v in state.items()
                                                         if v.is_floating_point()}),
                        config_edit=lambda config: config.update(torch_dtype=dtype))
    rc, out, err = run_cli(capsys, "--base", str(world["base"]), "--dictionary", str(world["dict"]), str(merged),
                           "--truth", str(world["recipe"]), "--output-dir", str(tmp_path / "run"))
    assert rc == 0, err
    result = result_of(tmp_path / "run", "half")
    claims = {a["atom"]: a["claim"] for a in result["attributed"]}
    assert all(claims.get(atom) == "exact" for atom in MERGE)
    # the absent adapter is never an exact copy (an α-level false 'retrained' from the rounding noise can be)
    assert claims.get("beta") in (None, "retrained", "relative")
    assert {s["skill"]: s["claim"] for s in result["skills"]} == claims
    assert result["verdict"] != "not-explained" and isinstance(result["remainder_share"], float)
    assert result["out_of_dictionary"] == bool(result["metrics"]["ood_flag"])


def test_mergekit_truth_maps_references_to_atoms(world) -> None:
    atoms = {n: world["dict"] / n for n in ATOMS}
    truth = read_mergekit_truth(world["recipe"], atoms)
    assert truth.tasks == ("alpha", "gamma", "delta") and truth.weights == pytest.approx((0.5, 0.3, 0.2))
    other = world["root"] / "ties.yml"
    other.write_text(textwrap.dedent(f"""
        merge_method: linear
        base_model: {world["base"]}
        models:
          - model: {world["base"]}
          - model: somewhere/else/beta
            parameters: {{weight: 2}}
          - model: hub-org/stranger
            parameters: {{weight: 2}}
    """))
    truth = read_mergekit_truth(other, atoms)
    assert truth.tasks == ("beta", "stranger") and truth.weights == pytest.approx((0.5, 0.5))  # normalised


def test_sharded_checkpoints_read_like_single_files(world, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(world["merged"]).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    single, multi = Checkpoint(world["merged"]), Checkpoint(sharded)
    assert multi.keys == single.keys and multi.shapes == single.shapes
    for key in single.keys:
        torch.testing.assert_close(multi.tensor(key), single.tensor(key), rtol=0, atol=0)
    adapters = [LoraAdapter(world["dict"] / n, n) for n in ATOMS]
    mask = Mask({m: np.arange(0, 40, 3, dtype=np.int64) for m in adapters[0].module_names}, adapters[0].shapes)
    reader = TargetReader(mask, Checkpoint(world["base"]))
    np.testing.assert_array_equal(reader.model_vector(multi)[0], reader.model_vector(single)[0])


def test_sharded_index_naming_a_missing_shard_is_an_error(world, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(world["merged"]).save_pretrained(sharded, max_shard_size="20KB")
    next(iter(sorted(sharded.glob("model-*.safetensors")))).unlink()
    with pytest.raises(UnmergeError, match="shard model-00001-of-.* is missing"):
        Checkpoint(sharded)


# --------------------------------------------------------------------------------------------------
# Adapters as targets, out-of-dictionary verdict, module intersection
# --------------------------------------------------------------------------------------------------


def test_adapter_targets_and_out_of_dictionary_fallback(world, tmp_path, capsys) -> None:
    rc, out, err = run_cli(capsys, "--dictionary", str(world["dict"]), f"own={world['dict'] / 'gamma'}",
                           str(world["outsider"]), "--output-dir", str(tmp_path / "run"), "--decomposer", "nnls",
                           "--decomposer", "skill-fdr")
    assert rc == 0, err
    # the default decomposer: the outsider is explained by no dictionary skill
    calibrated = result_of(tmp_path / "run", "zeta", "skill-fdr")
    assert calibrated["verdict"] == "not-explained" and calibrated["support"] == []
    assert result_of(tmp_path / "run", "own", "skill-fdr")["support"] == ["gamma"]
    own = result_of(tmp_path / "run", "own", "nnls")
    assert own["support"] == ["gamma"] and own["coefficients"]["gamma"] == pytest.approx(1.0, abs=1e-6)
    assert own["verdict"] == "explained" and own["group"] == "external"
    assert own["remainder_share"] == pytest.approx(own["recon_error"]) and own["remainder_share"] < 1e-6
    # metrics run without ground truth too: the truth-based ones are undefined, the others are not
    assert own["metrics"]["precision"] is None and own["metrics"]["recon_error"] < 1e-9
    stranger = result_of(tmp_path / "run", "zeta", "nnls")
    assert stranger["recon_error"] > 0.5
    # plain nnls attributes something to anything: known skills "found", plus a large remainder
    assert stranger["verdict"] == "partly-explained" and stranger["verdict_rule"] == "fallback: recon_error > 0.5"
    assert stranger["out_of_dictionary"] and stranger["remainder_share"] == pytest.approx(stranger["recon_error"])
    assert re.search(r"partly-explained\n.*% unexplained\n.*recon err [\d.]+\n.*recon err > 0\.5", out), out


def test_dictionary_with_different_module_sets_uses_the_intersection(world, tmp_path, capsys) -> None:
    narrow = tmp_path / "dict" / "narrow"
    narrow.mkdir(parents=True)
    state = load_file(str(world["dict"] / "beta" / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if "q_proj" in k}, str(narrow / "adapter_model.safetensors"))
    config = json.loads((world["dict"] / "beta" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (narrow / "adapter_config.json").write_text(json.dumps(config))
    shutil.copytree(world["dict"] / "alpha", tmp_path / "dict" / "alpha")
    rc, _, err = run_cli(capsys, "--dictionary", str(tmp_path / "dict"), str(world["dict"] / "alpha"),
                         "--output-dir", str(tmp_path / "run"))
    assert rc == 0, err
    assert "warning: dictionary adapters adapt different modules: using the 2 they all adapt" in err
    data = json.loads((tmp_path / "run" / "attribution.json").read_text())
    assert data["mask"]["modules"] == 2 and len(data["mask"]["dropped_modules"]) == 6
    assert data["targets"][0]["results"][0]["support"] == ["alpha"]


def test_decomposer_verdict_and_confidence_are_shown_when_given() -> None:
    rng = np.random.default_rng(0)
    d = rng.normal(size=(50, 3))
    y = d @ np.array([1.0, 0.0, 0.5])
    problem = DecompositionProblem(d, y, ("a", "b", "c"))
    result = Decomposition(np.array([1.0, 0.0, 0.5]), y, None, True, {"p_values": [0.01, 0.9, 0.2]})
    scored = Scored(MergeJob("t", "model", (), (), 0, "external"), "x", problem, result,
                    {"recon_error": 0.0, "unique_share[a]": 0.7})
    att = attribution_from(scored)
    assert att.out_of_dictionary and att.verdict_rule == "decomposer"
    assert att.confidence_source == "decomposer: 1 − p-value"
    assert [a.confidence for a in att.atoms] == pytest.approx([0.99, 0.1, 0.8])
    assert decomposer_confidence({"confidence": {"b": 0.3}}, ("a", "b"))[0] == [None, 0.3]
    # without the decomposer's own confidence, the unique-share metric's values are shown
    plain = attribution_from(Scored(scored.spec, "x", problem, Decomposition(result.coefficients, y),
                                    {"recon_error": 0.6, "unique_share[a]": 0.7}))
    assert plain.confidence_source == "unique-share metric" and plain.atoms[0].confidence == 0.7
    assert plain.out_of_dictionary and plain.verdict_rule == "fallback: recon_error > 0.5"
    shares = unique_shares(d, y, [0, 2])
    assert shares[0] > shares[2] > 0 and unique_shares(d, y, []) == {}


# --------------------------------------------------------------------------------------------------
# Errors: one line each
# --------------------------------------------------------------------------------------------------


def _reshape_up_proj(state: dict) -> None:
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(8, 32)


@pytest.mark.parametrize(("case", "expected"), [
    ("shape", "tensor model.layers.1.mlp.up_proj.weight has shape [8, 32], the base has [64, 32]"),
    ("architecture", "architecture llama (LlamaForCausalLM) differs from the base's qwen2"),
    ("missing", "missing tensor model.layers.0.self_attn.q_proj.weight"),
    ("identical", "is identical to the base (ΔW = 0)"),
    ("elsewhere", "differs from the base only elsewhere (first: lm_head.weight)"),
    ("pickle", "pickle (pytorch_model.bin)"),
    ("no-base", "pass --base PATH"),
    ("truth-json", "--truth-json json: 1 tasks but 2 weights"),
    ("param", "'lassoo' is not the masker or a chosen decomposer or metric"),
    ("decomposer", "unknown decomposer plugin 'nope'"),
    ("empty-dictionary", "no dictionary adapters"),
])
def test_errors_are_one_line(world, tmp_path, capsys, case: str, expected: str) -> None:
    base, merged = world["base"], world["merged"]
    target = merged
    extra: list[str] = []
    if case == "shape":
        target = copy_model(merged, tmp_path / "t", _reshape_up_proj)
    elif case == "architecture":
        target = copy_model(merged, tmp_path / "t", config_edit=lambda c: c.update(
            model_type="llama", architectures=["LlamaForCausalLM"]))
    elif case == "missing":
        target = copy_model(merged, tmp_path / "t", lambda s: s.pop("model.layers.0.self_attn.q_proj.weight"))
    elif case == "identical":
        target = copy_model(base, tmp_path / "t")
    elif case == "elsewhere":
        target = copy_model(base, tmp_path / "t", lambda s: s["lm_head.weight"].add_(1.0))
    elif case == "pickle":
        target = tmp_path / "t"
        target.mkdir()
        torch.save(load_state(merged), target / "pytorch_model.bin")
    elif case == "truth-json":
        extra = ["--truth-json", '{"tasks": ["alpha"], "weights": [1, 2]}']
    elif case == "param":
        extra = ["--param", "lassoo.alpha_ratio=0.1"]
    elif case == "decomposer":
        extra = ["--decomposer", "nope"]
    args = ["--base", str(base), "--dictionary", str(world["dict"]), str(target), "--output-dir", str(tmp_path / "r"),
            *extra]
    if case == "no-base":
        args = args[2:]
    if case == "empty-dictionary":
        (tmp_path / "empty").mkdir()
        args[3] = str(tmp_path / "empty")
    rc, _, err = run_cli(capsys, *args)
    assert expected in one_line_error(rc, err)


def test_pickle_checkpoint_with_opt_in(world, tmp_path, capsys) -> None:
    target = tmp_path / "bin"
    target.mkdir()
    torch.save(load_state(world["merged"]), target / "pytorch_model.bin")
    shutil.copyfile(world["merged"] / "config.json", target / "config.json")
    rc, _, err = run_cli(capsys, "--base", str(world["base"]), "--dictionary", str(world["dict"]), str(target),
                         "--allow-pickle", "--output-dir", str(tmp_path / "run"))
    assert rc == 0, err
    result = result_of(tmp_path / "run", "bin")
    assert set(result["support"]) == set(MERGE)
    assert result["coefficients"]["alpha"] == pytest.approx(0.5, abs=1e-4)


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path) -> None:
    target = tmp_path / "evil"
    target.mkdir()
    torch.save({"w": torch.zeros(2), "extra": _Evil()}, target / "pytorch_model.bin")
    with pytest.raises(UnmergeError, match=r"weights_only=True"):
        Checkpoint(target, allow_pickle=True)


class _Evil:
    pass


# --------------------------------------------------------------------------------------------------
# Manifest [[targets]]
# --------------------------------------------------------------------------------------------------

TARGETS_MANIFEST = """
name = "external"
seed = 3
base = "{base}"
[tasks]
known = ["alpha", "beta", "gamma", "delta"]
unknown = ["zeta"]
[protocol]
groups = []
methods = ["linear"]
targets_per_group = 1
[trainer]
plugin = "adapters"
[trainer.params.paths]
alpha = "{dict}/alpha"
beta = "{dict}/beta"
gamma = "{dict}/gamma"
delta = "{dict}/delta"
zeta = "{zeta}"
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
[[decomposers]]
plugin = "nnls"
[[targets]]
path = "{merged}"
name = "merged"
truth = {{ tasks = ["alpha", "gamma", "delta"], weights = [0.5, 0.3, 0.2] }}
[[targets]]
path = "{zeta}"
[output]
dir = "{{out}}"
"""


def _targets_manifest(world) -> str:
    return TARGETS_MANIFEST.format(base=world["base"], dict=world["dict"], zeta=world["outsider"],
                                   merged=world["merged"])


def test_manifest_targets_join_the_results(world, write_manifest, capsys) -> None:
    manifest = load_manifest(write_manifest(_targets_manifest(world)))
    result = Runner(manifest, progress=False, echo=lambda _: None).run()
    rows = {r.target_id: r for r in result.table.rows}
    assert set(rows) == {"merged", "zeta"}
    merged, zeta = rows["merged"], rows["zeta"]
    assert merged.group == "known" and merged.method == "model" and merged.metrics["perfect_match"] == 1.0
    assert merged.coefficients == pytest.approx([0.5, 0.0, 0.3, 0.2], abs=1e-4)
    assert zeta.group == "external" and zeta.method == "adapter"
    assert zeta.metrics["precision"] is None and zeta.metrics["recon_error"] > 0.5
    report = json.loads((result.run_dir / "attribution.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["merged", "zeta"]
    assert report["targets"][1]["results"][0]["out_of_dictionary"]
    assert "external" in (result.run_dir / "summary.csv").read_text()
    assert main(["validate", str(manifest.path)]) == 0
    assert "2 targets" in capsys.readouterr().out


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('base = "{base}"', "", 'base: full-model [[targets]] need the base model; add base = "path/to/base"'),
    ('tasks = ["alpha", "gamma", "delta"]', 'tasks = ["alpha", "gamma", "omega"]',
     "targets[0].truth.tasks[2]: 'omega' is not a task of this manifest"),
    ('path = "{merged}"', 'path = "/nonexistent/model"', "targets[0].path: target /nonexistent/model: no such"),
    ('path = "{zeta}"', 'path = "{zeta}"\nname = "merged"', "name 'merged' is used twice"),
])
def test_manifest_targets_errors(world, write_manifest, old: str, new: str, expected: str) -> None:
    text = _targets_manifest(world)
    paths = {"base": world["base"], "merged": world["merged"], "zeta": world["outsider"]}
    old, new = old.format(**paths), new.format(**paths)
    assert old in text
    with pytest.raises(UnmergeError) as info:
        load_manifest(write_manifest(text.replace(old, new)))
    assert expected in str(info.value)


def test_manifest_without_generated_or_external_targets_is_an_error(write_manifest) -> None:
    with pytest.raises(UnmergeError, match="protocol.groups is empty and there is no"):
        load_manifest(write_manifest(**{"[protocol]": "[protocol]\ngroups = []"}))


def test_benchmark_checkpoint_writer_makes_a_readable_sharded_model(tmp_path) -> None:
    """The 7B memory benchmark's synthetic writer, at toy shapes (keeps the benchmark from rotting)."""
    import importlib.util

    script = REPO / "benchmarks" / "attribute_memory.py"
    spec = importlib.util.spec_from_file_location("attribute_memory", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["attribute_memory"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    shape = bench.Shape(layers=2, hidden=16, intermediate=24, vocab=40, heads=4, kv_heads=2)
    atoms = {f"atom{k}": bench.write_adapter(tmp_path / "dict" / f"atom{k}", shape, seed=k, rank=2) for k in range(3)}
    bench.write_sparse_checkpoint(tmp_path / "base", shape, shard_bytes=2_000)
    bench.write_target(tmp_path / "target", shape, 2_000, atoms, layers=None)
    base, target = Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "target")
    assert len(base.files) > 2 and base.shapes["model.layers.1.self_attn.k_proj.weight"] == (8, 16)
    assert not base.tensor("lm_head.weight").any()
    module = "model.layers.1.mlp.down_proj"
    expected = sum(w * atoms[n][module][1] @ atoms[n][module][0] * 2.0 for n, w in bench.WEIGHTS.items())
    torch.testing.assert_close(target.tensor(f"{module}.weight").float(), expected, rtol=1e-2, atol=1e-4)
    assert LoraAdapter(tmp_path / "dict" / "atom0").delta(module).shape == (16, 24)


def test_a_skill_with_several_trainings_is_attributed_as_one_skill(tmp_path) -> None:
    """--dictionary: a folder of adapter folders is one skill; --adapter NAME=PATH twice adds a training."""
    from helpers import write_lora
    from unmerge_core.pipeline.attribute import AttributeRequest, run_attribute

    modules = {"model.layers.0.q": (8, 16), "model.layers.0.k": (4, 16)}
    root = tmp_path / "dict"
    write_lora(root / "alpha", modules, rank=4, seed=0)
    write_lora(root / "beta" / "run1", modules, rank=4, seed=1)
    write_lora(root / "beta" / "run2", modules, rank=4, seed=2)
    extra = write_lora(tmp_path / "gamma-b", modules, rank=4, seed=3)
    request = AttributeRequest(targets=[("t", root / "beta" / "run2")], output_dir=tmp_path / "out", dictionary=root,
                               adapters=[("alpha", extra)], masker_params={"budget": 64},
                               truth_json={"t": '{"tasks": ["beta"], "weights": [1.0]}'})
    result = run_attribute(request, echo=lambda s: None)
    report = json.loads((tmp_path / "out" / "attribution.json").read_text())
    assert report["skills"] == {"alpha": "alpha", "beta/run1": "beta", "beta/run2": "beta", "alpha#2": "alpha"}
    attribution = result.reports[0].attributions[0]
    assert [s.name for s in attribution.skills] == ["beta"] and attribution.skills[0].atoms == ["beta/run1", "beta/run2"]
    assert attribution.metrics["precision"] == 1.0 and attribution.metrics["recall"] == 1.0
    assert result.reports[0].group == "known"


def test_cli_errors_name_the_flag_once_and_fit_on_one_line(world, tmp_path, capsys) -> None:
    """Found by a hostile review: '--decomposer lasso.--param lasso.alpha_ratio: …', the masker's own
    name refused in --param, and argparse's usage block printed before its error."""
    common = ["--dictionary", str(world["dict"]), "--output-dir", str(tmp_path / "out"), str(world["outsider"])]
    rc, _, err = run_cli(capsys, "--decomposer", "lasso", "--param", "lasso.alpha_ratio=-1", *common)
    assert one_line_error(rc, err) == "error: --param lasso.alpha_ratio: Input should be greater than 0 (got -1)"
    rc, _, err = run_cli(capsys, "--param", "topk.budget=abc", *common)
    assert one_line_error(rc, err).startswith("error: --param topk.budget: Input should be a valid integer")
    with pytest.raises(SystemExit) as exit_info:
        main(["attribute", "--budget", "x", *common])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "invalid int value: 'x'" in err


def test_per_layer_wraps_a_decomposer_from_the_cli(world, tmp_path, capsys) -> None:
    """The README says every decomposer works in `unmerge attribute`; per-layer needed manifest syntax."""
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "--base", str(world["base"]), "--dictionary", str(world["dict"]), "--output-dir",
                         str(out), "--decomposer", "nnls", "--param", "nnls.per_layer=true", str(world["merged"]))
    assert rc == 0, err
    result = result_of(out, "merged", "nnls/per-layer")
    assert {s["skill"] for s in result["skills"]} == set(MERGE)
    rc, _, err = run_cli(capsys, "--dictionary", str(world["dict"]), "--output-dir", str(out), "--decomposer",
                         "per-layer", str(world["outsider"]))
    assert "--param NAME.per_layer=true" in one_line_error(rc, err)


def test_the_recipe_note_only_for_methods_with_stated_coefficients(world, tmp_path, capsys) -> None:
    """The note suggesting --truth with the folder's mergekit_config.yml is given only where --truth can
    read it (a slerp recipe is refused by --truth)."""
    import yaml

    from unmerge_core.pipeline.attribute import recipe_has_truth

    recipe = tmp_path / "mergekit_config.yml"
    for method, expected in (("linear", True), ("ties", True), ("task_arithmetic", True), ("slerp", False),
                             ("model_stock", False)):
        recipe.write_text(yaml.safe_dump({"merge_method": method, "models": [{"model": "./fm/alpha"}]}))
        assert recipe_has_truth(recipe) is expected, method
    recipe.write_text("{not yaml: [")
    assert recipe_has_truth(recipe) is False


def test_attribute_refuses_a_maskers_wrong_mask_naming_plugin_and_module(tmp_path) -> None:
    """The same check of a masker's mask as ``unmerge run`` (found by a hostile audit: never checked)."""
    from helpers import write_lora

    from unmerge_core.errors import PluginError
    from unmerge_core.pipeline.attribute import build_mask

    adapters = [LoraAdapter(write_lora(tmp_path / n, {"q": (6, 8)}, seed=i), n) for i, n in enumerate("ab")]

    class Unsorted:
        def build_mask(self, adapters):
            return Mask({"q": np.array([5, 2, 9])}, {"q": (6, 8)})

    with pytest.raises(PluginError, match=r"^masker plugin 'unsorted': mask module 'q': indices are not in ascending"):
        build_mask(adapters, Unsorted(), "unsorted")


def _sum_of_adapters(first: Path, second: Path, directory: Path, weights=(0.5, 0.5)) -> Path:
    """An adapter whose ΔW is ``weights[0]`` first + ``weights[1]`` second (ranks stacked; both written
    by ``write_lora``, whose α/r is 2 at every rank)."""
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(second / "adapter_model.safetensors"))
    tensors = {k: torch.cat([a[k], b[k]], 0) if "lora_A" in k else torch.cat([weights[0] * a[k], weights[1] * b[k]], 1)
               for k in a}
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = json.loads((first / "adapter_config.json").read_text())
    rank = config["r"] * 2
    (directory / "adapter_config.json").write_text(json.dumps({**config, "r": rank, "lora_alpha": 2 * rank}))
    return directory


_DUP_MODULES = {f"model.layers.{i}.{m}": (16, 24) for i in range(2) for m in "qkvo"}


def _add_json_dictionary(tmp_path: Path) -> tuple[Path, Path]:
    from helpers import write_lora

    root = tmp_path / "dict"
    add = write_lora(root / "add", _DUP_MODULES, seed=0)
    write_lora(root / "json", _DUP_MODULES, seed=1)
    write_lora(root / "other", _DUP_MODULES, seed=2)
    return root, _sum_of_adapters(add, root / "json", tmp_path / "target")


def test_an_identical_copy_of_an_atom_in_the_dictionary_is_refused_naming_both(tmp_path, capsys) -> None:
    """Hostile audit 20.7: with `add` and a copy of it in the dictionary, skill-fdr called 0.5 add + 0.5 json
    'not-explained' (the test cannot tell add from its copy). Which of two skills an identical ΔW is cannot
    be decided, so the run stops in one line naming both adapters."""
    root, target = _add_json_dictionary(tmp_path)
    shutil.copytree(root / "add", root / "add_copy")
    rc, _, err = run_cli(capsys, "--dictionary", str(root), "--output-dir", str(tmp_path / "out"), str(target))
    line = one_line_error(rc, err)
    assert "'add'" in line and "'add_copy'" in line and str(root / "add_copy") in line and "identical" in line
    assert not (tmp_path / "out").exists()
    # --adapter NAME=PATH naming a dictionary adapter under another skill: the same refusal
    shutil.rmtree(root / "add_copy")
    rc, _, err = run_cli(capsys, "--dictionary", str(tmp_path / "dict"), "--adapter", f"again={root / 'json'}",
                         "--output-dir", str(tmp_path / "out"), str(target))
    assert "'json'" in one_line_error(rc, err) and "'again'" in err
    # two identical trainings of one skill are harmless (the skill is still one column group): warned only
    (root / "add_runs").mkdir()
    shutil.move(root / "add", root / "add_runs" / "r1")
    shutil.copytree(root / "add_runs" / "r1", root / "add_runs" / "r2")
    rc, _, err = run_cli(capsys, "--dictionary", str(root), "--output-dir", str(tmp_path / "out"), str(target))
    assert rc == 0, err
    assert "'add_runs/r1' and 'add_runs/r2' are identical on the mask" in err
    result = result_of(tmp_path / "out", "target")
    assert result["verdict"] == "explained" and {s["skill"] for s in result["skills"]} == {"add_runs", "json"}


@pytest.mark.parametrize("link", ["self", "parent", "inner"])
def test_a_symlink_back_into_the_dictionary_is_not_followed(tmp_path, capsys, link: str) -> None:
    """Hostile audit 20.7: `DIR/self -> DIR` made a phantom skill `self/*` (every atom twice), and skill-fdr
    then explained nothing. A link to the dictionary, into it or to a folder holding it is skipped with a
    warning; a link to an adapter elsewhere is an ordinary atom."""
    from helpers import write_lora

    root, target = _add_json_dictionary(tmp_path)
    made = {"self": (root / "self", root), "parent": (root / "up", tmp_path),
            "inner": (root / "skill" / "run", root / "add")}[link]
    made[0].parent.mkdir(exist_ok=True)
    made[0].symlink_to(made[1], target_is_directory=True)
    elsewhere = write_lora(tmp_path / "store" / "zeta", _DUP_MODULES, seed=5)
    (root / "zeta").symlink_to(elsewhere, target_is_directory=True)
    rc, _, err = run_cli(capsys, "--dictionary", str(root), "--output-dir", str(tmp_path / "out"), str(target))
    assert rc == 0, err
    assert f"warning: --dictionary: skipping {made[0]} (a symbolic link back into the dictionary" in err
    report = json.loads((tmp_path / "out" / "attribution.json").read_text())
    assert sorted(report["skills"]) == ["add", "json", "other", "zeta"]
    result = result_of(tmp_path / "out", "target")
    assert result["verdict"] == "explained" and {s["skill"] for s in result["skills"]} == {"add", "json"}
