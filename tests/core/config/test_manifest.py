"""Manifest validation: every user mistake is one line naming file, field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmerge_core.cli import main
from unmerge_core.errors import UnmergeError
from unmerge_core.config.manifest import load_manifest

from helpers import REPO, SYNTHETIC_MANIFEST  # noqa: E402


def error_of(path: Path) -> str:
    with pytest.raises(UnmergeError) as info:
        load_manifest(path)
    return str(info.value)


def test_valid_manifest_resolves_every_plugin(write_manifest) -> None:
    m = load_manifest(write_manifest())
    assert m.trainer.spec.name == "synthetic"
    assert [d.label for d in m.decomposers] == ["nnls", "lasso"]
    assert [x.spec.name for x in m.metrics] == ["support", "reconstruction", "semantic-alignment"]
    assert m.trainer.params.rank == 6


def test_unknown_plugin_lists_installed_ones(write_manifest) -> None:
    msg = error_of(write_manifest(**{'plugin = "lasso"': 'plugin = "lassoo"'}))
    assert "decomposers[1].plugin: unknown decomposer plugin 'lassoo'; did you mean 'lasso'? choose one of:" in msg
    assert "nnls" in msg and "\n" not in msg


def test_bad_param_type_names_field(write_manifest) -> None:
    msg = error_of(write_manifest(**{"rank = 6": 'rank = "six"'}))
    assert msg.startswith(str(Path(msg.split(":")[0]))) and msg.split(":")[0].endswith("manifest.toml")
    assert "trainer.params.rank: Input should be a valid integer" in msg
    assert "'six'" in msg


def test_unknown_param_lists_accepted_ones(write_manifest) -> None:
    msg = error_of(write_manifest(**{"budget = 300": "budget = 300, bugdet = 1"}))
    assert "masker.params.bugdet: unknown field; masker plugin 'topk' accepts: device, budget, aggregate" in msg


def test_missing_task(write_manifest) -> None:
    msg = error_of(write_manifest(**{'"epsilon"]': '"epsilon", "omega"]'}))
    assert "tasks.known[5]: unknown task 'omega'" in msg and "choose one of: alpha" in msg


def test_wrong_type_at_top_level(write_manifest) -> None:
    msg = error_of(write_manifest(**{"seed = 7": 'seed = "seven"'}))
    assert "manifest.toml: seed: Input should be a valid integer" in msg


def test_unknown_top_level_key(write_manifest) -> None:
    assert "manifest.toml: sede: unknown field" in error_of(write_manifest(**{"seed = 7": "sede = 7"}))


def test_unsupported_merge_method(write_manifest) -> None:
    text_path = write_manifest(**{"targets_per_group = 4": 'targets_per_group = 4\nmethods = ["ties", "slerpp"]'})
    msg = error_of(text_path)
    assert "protocol.methods[1]: merger 'mergekit' has no method 'slerpp'; did you mean 'slerp'? choose one of:" in msg


def test_unknown_group_needs_unknown_tasks(write_manifest) -> None:
    msg = error_of(write_manifest(**{'unknown = ["zeta", "eta"]': 'unknown = ["zeta"]'}))
    assert "the unknown group needs 2 unknown tasks" in msg


def test_task_in_both_lists(write_manifest) -> None:
    msg = error_of(write_manifest(**{'unknown = ["zeta", "eta"]': 'unknown = ["zeta", "alpha"]'}))
    assert "tasks both known and unknown: alpha" in msg


def test_invalid_toml(workdir) -> None:
    path = workdir / "broken.toml"
    path.write_text("x = [")
    assert "broken.toml: invalid TOML" in error_of(path)


def test_several_errors_reported_together(write_manifest) -> None:
    msg = error_of(write_manifest(**{'plugin = "lasso"': 'plugin = "x"', "rank = 6": "rank = 0"}))
    assert len(msg.splitlines()) == 2


def test_requires_missing_and_too_old(write_manifest) -> None:
    msg = error_of(write_manifest(**{"seed = 7": 'seed = 7\nrequires = ["unmerge-no-such-plugin>=0.2", "unmerge>=99"]'}))
    assert "'unmerge-no-such-plugin' is not installed; run: pip install 'unmerge-no-such-plugin>=0.2'" in msg
    assert "'unmerge' 0.1.0 is installed but 'unmerge>=99' is required; run: pip install --upgrade" in msg


def test_cli_prints_one_line_without_traceback(write_manifest, capsys) -> None:
    path = write_manifest(**{'plugin = "lasso"': 'plugin = "lassoo"'})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_validate_ok(write_manifest, capsys) -> None:
    assert main(["validate", str(write_manifest())]) == 0
    assert "ok (5 known + 2 unknown tasks, 12 targets, 2 decomposers)" in capsys.readouterr().out


@pytest.mark.parametrize("manifest", sorted((REPO / "experiments").rglob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_manifest_validates(manifest: Path) -> None:
    load_manifest(manifest)


def test_experiments_folder_is_not_empty() -> None:
    names = {p.name for p in (REPO / "experiments").glob("*.toml")}
    assert {"quickstart.toml", "paper.toml"} <= names


def test_tilde_in_output_dir_and_store_is_the_home_folder(write_manifest, tmp_path, monkeypatch) -> None:
    """Issue 20, item 15: model paths expanded ``~``, output.dir / output.store made a literal ``./~/x``."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    text = SYNTHETIC_MANIFEST.replace('dir = "{out}"', 'dir = "~/runs"') + 'store = "~/store"\n'
    manifest = load_manifest(write_manifest(text))
    assert manifest.run_dir == home / "runs" / "synthetic-test"
    assert manifest.store_dir == home / "store"
    manifest.file.output.dir = "~/elsewhere"  # what `unmerge run --output-dir` does
    assert manifest.run_dir == home / "elsewhere" / "synthetic-test"
    assert not (tmp_path / "~").exists()
