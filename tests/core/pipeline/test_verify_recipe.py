"""``unmerge verify-recipe``: a model checked against the mergekit recipe that supposedly made it.

A tiny Qwen2 base and two random LoRA adapters are built locally and merged by mergekit's own CLI
(task_arithmetic 0.6/0.4 of ``BASE+ADAPTER`` references, in float32 and in bfloat16); the true recipe
matches, other weights do not, a random method cannot be checked, bad inputs are one-line errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from helpers import load_state, random_adapter, tiny_base
from unmerge_core.cli import main
from unmerge_core.pipeline.verify_recipe import EXACT_METHODS, read_recipe, verify_recipe


def recipe_of(base: Path, adapters: dict[Path, float], method: str = "task_arithmetic", dtype: str = "float32",
              **parameters) -> dict:
    out = {"merge_method": method, "base_model": str(base), "dtype": dtype,
           "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}} for a, w in adapters.items()]}
    if parameters:
        out["parameters"] = parameters
    return out


def write(path: Path, recipe: dict) -> Path:
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def mergekit(recipe: Path, out: Path, cache: Path) -> Path:
    exe = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run([str(exe), str(recipe), str(out), "--device", "cpu", "--quiet", "--lora-merge-cache", str(cache)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = tiny_base(root / "base", hidden=16, layers=1)
    one = random_adapter(base, root / "dict" / "one", seed=1, targets=["q_proj", "v_proj"])
    two = random_adapter(base, root / "dict" / "two", seed=2, targets=["q_proj", "v_proj"])
    weights = {one: 0.6, two: 0.4}
    true32 = write(root / "true32.yml", recipe_of(base, weights))
    true16 = write(root / "true16.yml", recipe_of(base, weights, dtype="bfloat16"))
    merged32 = mergekit(true32, root / "merged32", root / "cache")
    merged16 = mergekit(true16, root / "merged16", root / "cache")
    return {"root": root, "base": base, "one": one, "two": two, "true32": true32, "true16": true16,
            "merged32": merged32, "merged16": merged16}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["verify-recipe", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_true_recipe_matches(world, tmp_path, capsys) -> None:
    out = tmp_path / "v.json"
    rc, stdout, err = cli(capsys, world["merged32"], world["true32"], "--json", out)
    assert rc == 0, (stdout, err)
    assert stdout.startswith("matches: merged32 is the task_arithmetic merge of true32.yml") and stdout.count("\n") == 1
    data = json.loads(out.read_text())
    assert data["verdict"] == "matches" and data["method"] == "task_arithmetic"
    assert [c["weight"] for c in data["constituents"]] == [0.6, 0.4]
    assert data["modules_compared"] == 2 and len(data["modules"]) == 2  # q_proj and v_proj of the one layer
    assert data["relative_error"] < 1e-5 and data["model_dtype"] == "F32"
    assert all(m["matches"] for m in data["modules"]) and data["changed_outside"] == []


def test_swapped_weights_do_not_match(world, tmp_path, capsys) -> None:
    wrong = write(tmp_path / "wrong.yml", recipe_of(world["base"], {world["one"]: 0.4, world["two"]: 0.6}))
    out = tmp_path / "v.json"
    rc, stdout, _ = cli(capsys, world["merged32"], wrong, "--json", out)
    assert rc == 1 and "best explanation: coefficients 0.6/0.4 of one/two (a weighted sum) fit with relative " \
        "residual" in stdout and "the recipe says 0.4/0.6" in stdout
    assert stdout.startswith("does not match: ") and "2 of 2 modules differ beyond rounding; worst: model.layers.0" \
        in stdout
    data = json.loads(out.read_text())
    assert data["verdict"] == "does not match" and data["relative_error"] > 0.05
    assert data["modules_not_matching"] == 2 and len(data["worst_modules"]) == 2
    explanation = data["explanation"]
    assert explanation["best"] == "refitted weights" and explanation["explained"] is True
    refit = explanation["candidates"][0]
    assert refit["relative_residual"] < 1e-5 and abs(refit["coefficients"]["one"] - 0.6) < 1e-5


def test_a_missing_constituent_and_another_method_are_named(world, tmp_path) -> None:
    """With --dictionary, a recipe that leaves a constituent out is explained by that adapter; a ties recipe
    for the task-arithmetic model is explained by the weighted sum (another method: task_arithmetic)."""
    only = write(tmp_path / "only.yml", recipe_of(world["base"], {world["one"]: 0.6}))
    result = verify_recipe(world["merged32"], only, dictionary=world["one"].parent)
    assert result.verdict == "does not match"
    e = result.details["explanation"]
    assert e["best"] == "constituent missing" and e["explained"] and "two is missing" in e["line"]
    ties = write(tmp_path / "ties.yml", recipe_of(world["base"], {world["one"]: 0.6, world["two"]: 0.4},
                                                  method="ties", density=0.5, normalize=False))
    e = verify_recipe(world["merged32"], ties).details["explanation"]
    assert e["explained"] and e["best"] in ("refitted weights", "another method")
    kinds = {c.get("method") for c in e["candidates"] if c["kind"] == "another method" and c["relative_residual"] < 1e-5}
    assert "task_arithmetic" in kinds


@pytest.mark.parametrize("method,parameters", [("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
                                               ("slerp", {}), ("model_stock", {}), ("karcher", {})])
def test_other_deterministic_methods_are_recomputed(world, tmp_path, method, parameters) -> None:
    """A merge made by mergekit's own CLI matches its recipe; the task-arithmetic model does not."""
    weights = {world["one"]: 0.6, world["two"]: 0.4}
    recipe = recipe_of(world["base"], weights, method=method, **parameters)
    if method == "slerp":  # mergekit's form: base_model is the first of the two models, t from parameters
        recipe["base_model"] = recipe["models"][0]["model"]
        recipe["parameters"] = {"t": 0.4}
        for m in recipe["models"]:
            del m["parameters"]
    if method == "karcher":
        del recipe["base_model"]
        for m in recipe["models"]:
            del m["parameters"]
    path = write(tmp_path / f"{method}.yml", recipe)
    merged = mergekit(path, tmp_path / method, world["root"] / "cache")
    result = verify_recipe(merged, path, base=str(world["base"]) if method == "karcher" else None)
    assert result.verdict == "matches", result.line
    assert verify_recipe(world["merged32"], path, base=str(world["base"])).verdict == "does not match"


def test_bfloat16_tolerance_comes_from_rounding(world, tmp_path) -> None:
    """A bf16 model differs from the exact claim by rounding: it matches its recipe, within a few times the
    rounding noise (which is far above float32's), and still refuses the swapped weights."""
    result = verify_recipe(world["merged16"], world["true16"])
    assert result.verdict == "matches", result.line
    d = result.details
    assert d["model_dtype"] == "BF16" and 0 < d["relative_error"] <= d["tolerance"]
    assert d["rounding_noise"] > 1e-4  # bf16 keeps 8 significant bits
    wrong = write(tmp_path / "wrong16.yml", recipe_of(world["base"], {world["one"]: 0.4, world["two"]: 0.6},
                                                      dtype="bfloat16"))
    assert verify_recipe(world["merged16"], wrong).verdict == "does not match"
    # the float32 model keeps a tolerance orders of magnitude tighter
    assert verify_recipe(world["merged32"], world["true32"]).details["tolerance"] < d["tolerance"] / 100


def test_linear_normalizes_weights_unless_told_not_to(world, tmp_path) -> None:
    """mergekit's linear divides by Σw: 1.2/0.8 is the same merge as task_arithmetic 0.6/0.4."""
    linear = write(tmp_path / "linear.yml", recipe_of(world["base"], {world["one"]: 1.2, world["two"]: 0.8},
                                                       method="linear"))
    assert verify_recipe(world["merged32"], linear).verdict == "matches"
    raw = write(tmp_path / "raw.yml", recipe_of(world["base"], {world["one"]: 0.6, world["two"]: 0.4},
                                                method="linear", normalize=False))
    assert verify_recipe(world["merged32"], raw).verdict == "matches"
    unscaled = write(tmp_path / "unscaled.yml", recipe_of(world["base"], {world["one"]: 1.2, world["two"]: 0.8},
                                                          method="linear", normalize=False))
    result = verify_recipe(world["merged32"], unscaled)
    assert result.verdict == "cannot check exactly" and "scales the base weights" in result.line


def test_ties_is_recomputed_by_the_merger_plugin(world, tmp_path) -> None:
    """TIES (trim, sign election) is not a weighted sum: the task-arithmetic model is not a ties merge at
    density 0.5, and a ties merge made by mergekit matches its own recipe."""
    recipe = write(tmp_path / "ties.yml", recipe_of(world["base"], {world["one"]: 0.6, world["two"]: 0.4},
                                                    method="ties", density=0.5))
    assert verify_recipe(world["merged32"], recipe).verdict == "does not match"
    merged = mergekit(recipe, tmp_path / "ties", world["root"] / "cache")
    result = verify_recipe(merged, recipe)
    assert result.verdict == "matches", result.line
    assert result.details["parameters"]["density"] == 0.5 and result.details["parameters"]["normalize"] is True


def test_random_methods_without_a_seed_get_a_statistical_check(world, tmp_path, capsys) -> None:
    """DARE without unmerge.seed: never "matches"; the task-arithmetic model is rejected by the statistical
    check (its coordinates are no rescaled drop), a DARE merge made by mergekit is consistent with it;
    DELLA without a seed cannot be checked."""
    dare = write(tmp_path / "dare.yml", recipe_of(world["base"], {world["one"]: 0.6, world["two"]: 0.4},
                                                  method="dare_ties", density=0.5))
    out = tmp_path / "v.json"
    rc, stdout, _ = cli(capsys, world["merged32"], dare, "--json", out)
    assert rc == 1 and stdout.startswith("does not match: ") and "statistical check of dare_ties" in stdout
    assert stdout.count("\n") == 1
    data = json.loads(out.read_text())
    assert data["check"] == "statistical" and data["explained_share"] < 0.5
    merged = mergekit(dare, tmp_path / "dare", world["root"] / "cache")
    result = verify_recipe(merged, dare)
    assert result.verdict == "cannot check exactly", result.line
    assert result.details["explained_share"] > 0.95 and "consistent with the recipe" in result.line
    della = write(tmp_path / "della.yml", recipe_of(world["base"], {world["one"]: 0.6, world["two"]: 0.4},
                                                    method="della", density=0.5))
    assert "no statistical check of della" in verify_recipe(world["merged32"], della).line


def test_unknown_method_and_other_base_are_errors(world, tmp_path, capsys) -> None:
    bad = write(tmp_path / "bad.yml", recipe_of(world["base"], {world["one"]: 0.6}, method="tiess"))
    rc, _, err = cli(capsys, world["merged32"], bad)
    assert rc == 2 and "unknown method 'tiess'" in err and "did you mean 'ties'" in err and err.count("\n") == 1
    other = tiny_base(tmp_path / "other", hidden=32, layers=1)
    capsys.readouterr()
    rc, _, err = cli(capsys, world["merged32"], world["true32"], "--base", other)
    assert rc == 2 and "the recipe is for another base" in err and err.count("\n") == 1


def test_change_outside_the_merged_modules_does_not_match(world, tmp_path) -> None:
    """A model whose norms (not merged by the recipe) also changed is not what the recipe makes."""
    edited = tmp_path / "edited"
    edited.mkdir()
    state = load_state(world["merged32"])
    key = next(k for k in state if k.endswith("input_layernorm.weight"))
    state[key] = state[key] + 0.5
    save_file(state, str(edited / "model.safetensors"))
    (edited / "config.json").write_text((world["merged32"] / "config.json").read_text())
    result = verify_recipe(edited, world["true32"])
    assert result.verdict == "does not match" and "outside the merged modules changed" in result.line
    assert result.details["changed_outside"] == [key]


def test_dictionary_and_base_options_resolve_references(world, tmp_path) -> None:
    """Bare adapter names are looked up in --dictionary; --base replaces a base_model not found."""
    recipe = {"merge_method": "task_arithmetic", "base_model": "nowhere/base-model",
              "models": [{"model": "nowhere/base-model+one", "parameters": {"weight": 0.6}},
                         {"model": "nowhere/base-model+two", "parameters": {"weight": 0.4}}]}
    path = write(tmp_path / "named.yml", recipe)
    result = verify_recipe(world["merged32"], path, base=str(world["base"]), dictionary=world["one"].parent)
    assert result.verdict == "matches", result.line
    assert [Path(c["path"]).name for c in result.details["constituents"]] == ["one", "two"]


def test_missing_files_are_one_line_errors(world, tmp_path, capsys) -> None:
    for argv, expected in [((world["merged32"], tmp_path / "absent.yml"), "no such file"),
                           ((tmp_path / "absent", world["true32"]), "no such folder")]:
        rc, stdout, err = cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and stdout == "" and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("error: ") and expected in lines[0]
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [\n")
    rc, _, err = cli(capsys, world["merged32"], bad)
    assert rc == 2 and err.startswith("error: recipe ") and "invalid YAML" in err and err.count("\n") == 1
    missing = write(tmp_path / "missing.yml", recipe_of(world["base"], {tmp_path / "nope": 1.0}))
    rc, _, err = cli(capsys, world["merged32"], missing)
    assert rc == 2 and "models[0].model" in err and "no such folder" in err


def test_recipe_rules(world, tmp_path) -> None:
    """Parameters resolve as mergekit reads them: a model's own weight, else the top level's; per-model
    densities that differ, or slices:, cannot be checked in this version."""
    recipe = recipe_of(world["base"], {world["one"]: 0.6, world["two"]: 0.4}, method="ties", weight=0.3)
    del recipe["models"][1]["parameters"]
    r = read_recipe(write(tmp_path / "a.yml", recipe))
    assert [c.weight for c in r.constituents] == [0.6, 0.3] and r.normalize is True and r.density == 1.0
    recipe["models"][0]["parameters"]["density"] = 0.3
    recipe["models"][1]["parameters"] = {"density": 0.7}
    from unmerge_core.pipeline.verify_recipe import CannotCheck

    with pytest.raises(CannotCheck, match="different densities"):
        read_recipe(write(tmp_path / "b.yml", recipe))
    with pytest.raises(CannotCheck, match="slices"):
        read_recipe(write(tmp_path / "c.yml", {"merge_method": "linear", "slices": [{"sources": []}]}))


def test_a_bug_is_exit_2_not_does_not_match(world, monkeypatch, capsys) -> None:
    """Exit 1 means "does not match": an internal error is a one-line exit 2 (a traceback with --debug)."""
    import unmerge_core.pipeline.verify_recipe as module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, "verify_recipe", broken)
    rc, stdout, err = cli(capsys, world["merged32"], world["true32"], "--verbose")
    assert rc == 2 and stdout == "" and err.startswith("error: internal error (RuntimeError: boom)")
    assert err.count("\n") == 1
    with pytest.raises(RuntimeError):
        main(["--debug", "verify-recipe", str(world["merged32"]), str(world["true32"])])


def test_emitted_recipe_round_trips(world, tmp_path, capsys) -> None:
    """`unmerge attribute --emit-recipe` writes the recovered recipe (task arithmetic of the attributed adapters
    with their coefficients); verify-recipe finds that the model is that merge."""
    import yaml

    out = tmp_path / "recovered.yml"
    rc = main(["attribute", str(world["merged32"]), "--base", str(world["base"]), "--dictionary",
               str(world["one"].parent), "--decomposer", "nnls", "--emit-recipe", str(out),
               "--output-dir", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert rc == 0 and f"recipe of merged32: {out}" in err
    recipe = yaml.safe_load(out.read_text())
    assert recipe["merge_method"] == "task_arithmetic" and recipe["parameters"] == {"normalize": False, "lambda": 1.0}
    weights = {Path(m["model"].split("+", 1)[1]).name: m["parameters"]["weight"] for m in recipe["models"]}
    assert set(weights) == {"one", "two"} and abs(weights["one"] - 0.6) < 1e-4 and abs(weights["two"] - 0.4) < 1e-4
    result = verify_recipe(world["merged32"], out)
    assert result.verdict == "matches", result.line


def test_emit_recipe_needs_the_base(world, tmp_path, capsys) -> None:
    rc = main(["attribute", str(world["one"]), "--dictionary", str(world["one"].parent), "--emit-recipe",
               str(tmp_path / "r.yml"), "--output-dir", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert rc == 2 and "--emit-recipe: pass --base" in err
