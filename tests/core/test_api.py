"""The Python API (``unmerge_core.api``): ``attribute`` and ``run`` for a notebook.

Adapters are written directly in PEFT's layout (no model, milliseconds); the run uses the synthetic
trainer (seconds)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO, SYNTHETIC_MANIFEST, write_lora
from unmerge_core import api
from unmerge_core.cli import main
from unmerge_core.config.manifest import load_manifest
from unmerge_core.errors import UnmergeError

MODULES = {f"model.layers.{i}.{m}": (16, 24) for i in range(2) for m in "qk"}


def _sum(first: Path, second: Path, directory: Path, weights=(0.6, 0.4)) -> Path:
    """An adapter whose ΔW is weights[0]·first + weights[1]·second (ranks stacked; α/r = 2 at any rank)."""
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(second / "adapter_model.safetensors"))
    tensors = {k: torch.cat([a[k], b[k]], 0) if "lora_A" in k else torch.cat([weights[0] * a[k], weights[1] * b[k]], 1)
               for k in a}
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = json.loads((first / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "r": 2 * config["r"],
                                                               "lora_alpha": 4 * config["r"]}))
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    dictionary = root / "dict"
    alpha = write_lora(dictionary / "alpha", MODULES, seed=0)
    beta = write_lora(dictionary / "beta", MODULES, seed=1)
    write_lora(dictionary / "gamma", MODULES, seed=2)
    return {"dict": dictionary, "target": _sum(alpha, beta, root / "merged"), "outsider": write_lora(root / "zeta", MODULES, seed=9)}


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def test_attribute_takes_str_paths_prints_and_writes_nothing(world, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # a default output folder would land here
    before = _files(world["dict"].parent)
    result = api.attribute(str(world["target"]), dictionary=str(world["dict"]), decomposers=("nnls", "skill-fdr"),
                           budget=128)
    assert _files(tmp_path) == set() and _files(world["dict"].parent) == before
    assert capsys.readouterr() == ("", "")
    assert result.output_dir is None and result.atoms == ("alpha", "beta", "gamma")
    target = result["merged"]
    assert isinstance(target, api.TargetResult) and result[0] is target and len(result) == 1
    assert target.kind == "adapter" and isinstance(target.path, Path)
    nnls = target["nnls"]
    assert isinstance(nnls, api.DecomposerResult) and target.verdict == nnls.verdict == "explained"
    assert [s.skill for s in nnls.skills] == ["alpha", "beta"]
    assert all(isinstance(s, api.SkillResult) for s in nnls.skills)
    assert nnls.skills[0].coefficient == pytest.approx(0.6, abs=1e-3)
    assert nnls.skills[1].coefficient == pytest.approx(0.4, abs=1e-3)
    assert nnls.coefficients["gamma"] == pytest.approx(0.0, abs=1e-3)
    fdr = target["skill-fdr"]
    assert {s.skill for s in fdr.skills} == {"alpha", "beta"}
    assert {s.claim for s in fdr.skills} <= {"exact", "retrained", "relative"} and fdr.skills[0].claim is not None
    assert fdr.remainder_share is not None and fdr.remainder_share < 0.05
    assert target.sentence and target.sentence.startswith("merged")
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # plain JSON, no NaN
    assert data["targets"][0]["results"][0]["skills"][0]["skill"] == "alpha"
    assert data["targets"][0]["path"] == str(world["target"]) and data["output_dir"] is None


def test_attribute_writes_the_report_only_into_output_dir(world, tmp_path) -> None:
    result = api.attribute({"m": world["target"], "z": world["outsider"]}, dictionary=world["dict"], budget=128,
                           decomposers="nnls", output_dir=str(tmp_path / "report"))
    assert [t.name for t in result] == ["m", "z"] and result.output_dir == tmp_path / "report"
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"attribution.json", "attribution.md", "attribution.csv"}
    assert result["z"].verdict != "explained" and result["z"].results[0].out_of_dictionary
    report = json.loads((tmp_path / "report" / "attribution.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["m", "z"]


def test_attribute_takes_a_list_and_adapters_by_skill(world, tmp_path) -> None:
    result = api.attribute([world["target"]], adapters={"alpha": str(world["dict"] / "alpha"),
                                                        "beta": world["dict"] / "beta"}, budget=128, decomposers="nnls",
                           params={"nnls": {}})
    assert result.atoms == ("alpha", "beta") and result["merged"].skills[0].skill == "alpha"


def _cli_error(capsys, *argv: str) -> str:
    assert main(["attribute", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("warning:", "note:"))]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


def test_user_mistakes_raise_the_clis_one_line_error(world, tmp_path, capsys) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(UnmergeError) as caught:
        api.attribute(missing, dictionary=str(world["dict"]))
    message = str(caught.value)
    assert "\n" not in message and missing in message
    assert message == _cli_error(capsys, missing, "--dictionary", str(world["dict"]), "--output-dir", str(tmp_path / "r"))
    with pytest.raises(UnmergeError) as caught:
        api.attribute(str(world["target"]), dictionary=str(tmp_path / "nodict"))
    assert str(caught.value) == f"--dictionary {tmp_path / 'nodict'}: not a directory"
    with pytest.raises(UnmergeError, match="unknown decomposer plugin 'nope'"):
        api.attribute(world["target"], dictionary=world["dict"], decomposers=["nope"])
    with pytest.raises(UnmergeError, match="'lassoo' is not the masker or a chosen decomposer or metric"):
        api.attribute(world["target"], dictionary=world["dict"], params={"lassoo": {"alpha_ratio": 0.1}})
    with pytest.raises(UnmergeError, match="expected a path"):
        api.attribute(42, dictionary=world["dict"])  # type: ignore[arg-type]
    assert not (tmp_path / "r").exists() and capsys.readouterr() == ("", "")


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


def test_run_resolves_output_against_the_registrys_folder_not_the_cwd(workdir, tmp_path_factory, monkeypatch,
                                                                      capsys) -> None:
    """A manifest in experiments/ naming ../registry.toml, with relative output.dir and output.store:
    called from elsewhere, the API writes where `unmerge run experiments/m.toml` from the project root does."""
    text = textwrap.dedent(SYNTHETIC_MANIFEST).replace('seed = 7\n', 'seed = 7\nregistry = "../registry.toml"\n')
    text = text.replace('dir = "{out}"', 'dir = "runs"\nstore = "shared"')
    (workdir / "experiments").mkdir()
    manifest = workdir / "experiments" / "m.toml"
    manifest.write_text(text)
    monkeypatch.chdir(workdir)
    expected = load_manifest("experiments/m.toml").run_dir.resolve()  # what the CLI uses from the root
    assert expected == workdir / "runs" / "synthetic-test"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    result = api.run(str(manifest))
    assert isinstance(result, api.RunResult) and result.run_dir == expected
    assert _files(elsewhere) == set() and capsys.readouterr() == ("", "")
    assert (expected / "summary.csv").is_file() and (workdir / "shared" / "cache").is_dir()
    assert len(result.summary) == 24 and {r["group"] for r in result.summary} == {"known", "mixed", "unknown"}
    assert result.per_target and result.timings[0]["stage"] == "trainer"
    json.dumps(result.to_dict(), allow_nan=False)
    again = api.run(manifest, redo="metric")  # a Path; the same run directory, artifacts reused
    assert again.run_dir == expected and next(t for t in again.timings if t["stage"] == "trainer")["reused"] > 0
    with pytest.raises(UnmergeError, match="--redo nope: unknown stage"):
        api.run(manifest, redo="nope")


def test_the_quickstart_resolves_to_the_repositorys_runs_folder_from_any_cwd(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    manifest = load_manifest(REPO / "experiments" / "quickstart.toml")  # loads, trains nothing
    assert api.run_root(manifest) / manifest.file.output.dir / manifest.name == REPO / "runs" / "quickstart"


def test_a_missing_manifest_is_one_line(tmp_path) -> None:
    with pytest.raises(UnmergeError) as caught:
        api.run(str(tmp_path / "none.toml"))
    assert str(caught.value) == f"manifest not found: {tmp_path / 'none.toml'}"


def test_run_attribute_without_output_dir_refuses_verify_in_one_line(world) -> None:
    """``--verify``'s metric writes its details into the run directory: none given is a user's error."""
    from unmerge_core.pipeline.attribute import AttributeRequest, run_attribute

    request = AttributeRequest(targets=[("t", world["target"])], output_dir=None, dictionary=world["dict"], verify=True)
    with pytest.raises(UnmergeError, match="--verify: give an output directory"):
        run_attribute(request, echo=lambda s: None)


def test_the_command_line_takes_relative_output_from_the_registrys_folder_too(workdir, tmp_path_factory,
                                                                              monkeypatch, capsys) -> None:
    """`unmerge run` took a relative output.dir / output.store from the current folder while the API took
    them from the registry's: started elsewhere, the command line retrained everything into ./runs."""
    text = textwrap.dedent(SYNTHETIC_MANIFEST).replace('seed = 7\n', 'seed = 7\nregistry = "../registry.toml"\n')
    text = text.replace('dir = "{out}"', 'dir = "runs"\nstore = "shared"')
    (workdir / "experiments").mkdir()
    manifest = workdir / "experiments" / "m.toml"
    manifest.write_text(text)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(manifest), "--no-progress", "--no-plots"]) == 0
    assert _files(elsewhere) == set()
    assert (workdir / "runs" / "synthetic-test" / "summary.csv").is_file() and (workdir / "shared" / "cache").is_dir()
    assert f"-> {workdir / 'runs' / 'synthetic-test'}" in capsys.readouterr().err
    monkeypatch.chdir(workdir)  # below the current folder, the path is shown relative to it
    assert main(["run", str(manifest), "--no-progress", "--no-plots"]) == 0
    assert "-> runs/synthetic-test" in capsys.readouterr().err
