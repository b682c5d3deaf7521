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
    real = REPO / ".real" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if manifest.name.startswith("smollm2") and not real.is_file():
        # without `make real-model` (CI, make test) the real-model manifest says so in one line
        with pytest.raises(UnmergeError, match=r"base_model: .*SmolLM2-135M-Instruct\.Q4_1\.gguf does not exist "
                                               r"\(a path, not a Hub id\); `make real-model` fetches it$"):
            load_manifest(manifest)
        return
    load_manifest(manifest)


def test_experiments_folder_is_not_empty() -> None:
    names = {p.name for p in (REPO / "experiments").glob("*.toml")}
    assert {"quickstart.toml", "paper.toml"} <= names


@pytest.mark.parametrize("field", ["dir", "store"])
@pytest.mark.parametrize("value,expected", [("x" * 300, "is 300 bytes long; a file name may have at most 255"),
                                            ("/proc/unmerge-runs", "cannot create a folder in /proc")])
def test_output_folders_that_cannot_be_made_fail_validate_in_one_line(write_manifest, field, value, expected) -> None:
    """Issue 20, item 13: 300 characters (ENAMETOOLONG) or a folder under /proc passed validate, then the
    run failed with a traceback."""
    if value.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs a /proc file system")
    text = (SYNTHETIC_MANIFEST + f'store = "{value}"\n' if field == "store"
            else SYNTHETIC_MANIFEST.replace('dir = "{out}"', f'dir = "{value}"'))
    path = write_manifest(text)
    message = error_of(path)
    assert "\n" not in message and f"output.{field}: " in message and expected in message
    assert main(["validate", str(path)]) == 2


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


_VARIANT = """[[variants]]
name = "other"
plugin = "synthetic"
params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, rank = 6 }
"""


def _with_variant(write_manifest, tasks: str = "", protocol: str = "", variant_tasks: str | None = None) -> Path:
    variant = _VARIANT + (f"tasks = {variant_tasks}\n" if variant_tasks is not None else "")
    return write_manifest(**{"[merger]": variant + "[merger]", "[tasks]": "[tasks]\n" + tasks,
                             "[protocol]": "[protocol]\n" + protocol})


def test_a_dictionary_variant_listed_twice_is_refused(write_manifest) -> None:
    """Hostile audit 20.8: ["other", "other"] made 12 atoms, pairs sharing a name."""
    message = error_of(_with_variant(write_manifest, tasks='dictionary_variants = ["other", "other"]'))
    assert message.endswith("tasks.dictionary_variants: lists 'other' more than once; list each [[variants]] "
                            "name once"), message
    assert "\n" not in message


def test_a_variant_with_an_empty_task_list_is_refused(write_manifest) -> None:
    """Hostile audit 20.19: tasks = [] used as constituents quietly made every target from the dictionary's
    own adapters."""
    message = error_of(_with_variant(write_manifest, protocol='constituents = ["other"]', variant_tasks="[]"))
    assert message.endswith("variants[0].tasks: an empty list trains nothing; list the tasks this variant "
                            "trains, or leave tasks out to train every task of the manifest"), message
    assert "\n" not in message


def test_a_dictionary_variant_that_trains_no_known_task_is_refused(write_manifest) -> None:
    """Hostile audit 20.19: a dictionary variant training only unknown tasks added no atom, silently."""
    message = error_of(_with_variant(write_manifest, tasks='dictionary_variants = ["other"]',
                                     variant_tasks='["zeta", "eta"]'))
    assert message.endswith("tasks.dictionary_variants: variant 'other' trains none of tasks.known (it trains "
                            "zeta, eta), so it adds no atom to the dictionary; list known tasks in its tasks or "
                            "leave it out of dictionary_variants"), message
    assert "\n" not in message
    load_manifest(_with_variant(write_manifest, tasks='dictionary_variants = ["other"]',
                                variant_tasks='["zeta", "alpha"]'))  # one known task: one more atom


@pytest.mark.parametrize("old,new,expected", [
    ('plugin = "lasso"', 'plugin = "skill-fdr"\nparams = { strict = 1.0 }',
     "decomposers[1].params.strict: Input should be a valid boolean (got 1.0)"),
    ("rank = 6,", "rank = true,", "trainer.params.rank: Input should be a valid integer (got True)"),
    ("seed = 7", "seed = true", "seed: Input should be a valid integer (got True)"),
    ("targets_per_group = 4", "targets_per_group = 4.0",
     "protocol.targets_per_group: Input should be a valid integer (got 4.0)"),
    ("shared = 0.3", "shared = false", "trainer.params.shared: Input should be a valid number (got False)"),
    ('plugin = "mergekit"', 'plugin = "mergekit"\nparams = { normalize = 1 }',
     "merger.params.normalize: Input should be a valid boolean (got 1)"),
    ("[output]", '[[targets]]\npath = "x"\ntruth = { tasks = ["alpha"], weights = [true] }\n[output]',
     "targets[0].truth.weights[0]: Input should be a valid number (got True)"),
])
def test_a_bool_is_not_an_int_and_a_float_is_not_a_bool(write_manifest, old, new, expected) -> None:
    """Hostile audit 20.22: ``skill-fdr.strict = 1.0`` and a count of ``true`` were coerced."""
    message = error_of(write_manifest(**{old: new}))
    assert message.endswith(expected) and "\n" not in message, message


def test_a_toml_integer_is_still_a_float(write_manifest) -> None:
    m = load_manifest(write_manifest(**{"shared = 0.3": "shared = 0, alpha = 6"}))
    assert m.trainer.params.alpha == 6.0 and isinstance(m.trainer.params.alpha, float)


def test_a_synthetic_config_with_more_heads_than_hidden_size_says_so(write_manifest) -> None:
    """Hostile audit 20.22: 1024 heads of a hidden size of 512 was reported as "module shape (0, 512)"."""
    message = error_of(write_manifest(**{
        'module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }':
        "config = { hidden_size = 512, num_attention_heads = 1024, num_hidden_layers = 1 }"}))
    assert message.endswith("trainer.params.config: num_attention_heads (1024) is more than hidden_size (512): each "
                            "head would have 512 // 1024 = 0 dimensions; set fewer heads or head_dim"), message


@pytest.mark.parametrize("value", ["1e-9", "0.00009", "0"])
def test_ray_resources_below_what_ray_accepts_are_refused(write_manifest, value) -> None:
    """Hostile audit 20.13: ``num_cpus_per_task = 1e-9`` passed validate, then Ray failed with a traceback
    (Ray takes a fraction of a resource in steps of 0.0001)."""
    message = error_of(write_manifest(**{"[output]": f'[executor]\nkind = "ray"\nnum_cpus_per_task = {value}\n'
                                                     "[output]"}))
    assert "executor.num_cpus_per_task: Input should be greater than or equal to 0.0001" in message, message
    message = error_of(write_manifest(**{"[output]": f'[executor]\nkind = "ray"\nnum_gpus_per_task = 1e-9\n[output]'}))
    assert "executor.num_gpus_per_task: 0 or at least 0.0001 (Ray's smallest fraction of a resource)" in message
