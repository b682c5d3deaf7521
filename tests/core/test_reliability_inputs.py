"""Bad input gives one line naming the file or field — never a traceback, never numbers with exit 0.

One test (or parametrised case) per item of the reliability issue that concerns input: manifests,
registries, adapter configs, checkpoints and ``unmerge attribute`` options.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import write_lora
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.pipeline.attribute import AttributeRequest, run_attribute
from unmerge_core.io.checkpoints import Checkpoint
from unmerge_core.cli import main
from unmerge_core.errors import UnmergeError
from unmerge_core.config.manifest import load_manifest
from unmerge_core.io.store import check_output_dir, is_safe_name, safe_filename

MODULES = {"model.layers.0.q": (8, 16), "model.layers.0.k": (4, 16)}


def one_line_error(call, *args, **kwargs) -> str:
    """The UnmergeError message of ``call``; fails on any other exception or a multi-line message."""
    with pytest.raises(UnmergeError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert "Traceback" not in message and len(message) < 400, message
    return message


def edit(path: Path, pattern: str, replacement: str) -> Path:
    text = path.read_text()
    new = re.sub(pattern, lambda _: replacement, text, count=1, flags=re.M)
    assert new != text, pattern
    path.write_text(new)
    return path


# --------------------------------------------------------------------------------------------------
# Manifests (items 1, 5, 8, 9, 10, 16, 17, 18, 19)
# --------------------------------------------------------------------------------------------------

BAD_MANIFESTS = [
    # 1: duplicates used to produce duplicate target ids with another target's truth
    (r"^\[protocol\]", '[protocol]\ngroups = ["known", "mixed", "known"]', r"protocol\.groups: groups lists known more than once"),
    (r"^\[protocol\]", '[protocol]\nmethods = ["linear", "ties", "linear", "ties"]', r"protocol\.methods: methods lists"),
    # 5: run directories escaping runs/
    (r'^name = .*$', 'name = ".."', r"name: '\.\.' is not a safe directory name"),
    (r'^name = .*$', 'name = "."', r"name: '\.' is not a safe"),
    (r'^name = .*$', 'name = "a/b"', r"name: 'a/b' is not a safe"),
    (r'^name = .*$', 'name = "a\\u0000b"', r"name: .* is not a safe"),
    # 8: negative seed failed after training
    (r"^seed = 7", "seed = -3", r"seed: Input should be greater than or equal to 0"),
    # 9: min = max = 1 with the mixed group failed after training
    (r"^min_tasks = 2\nmax_tasks = 3", "min_tasks = 1\nmax_tasks = 1", r"the mixed group needs targets of at least 2 tasks"),
    # 10: output directories that cannot be created
    (r'^dir = .*$', 'dir = "/dev/null"', r"output\.dir: '/dev/null' cannot hold the run directory: .*file"),
    (r'^dir = .*$', 'dir = "runs\\u0000x"', r"output\.dir: .*NUL byte"),
    # 16: sizes that cannot run validated and then hung
    (r"^targets_per_group = 4", "targets_per_group = 1e15",  # a TOML float, so not an integer (strict numbers)
     r"protocol\.targets_per_group: Input should be a valid integer \(got 1000000000000000\.0\)"),
    (r"^targets_per_group = 4", "targets_per_group = 10001", r"protocol\.targets_per_group: Input should be less than or equal to 10000"),
    (r'^params = \{ module_shapes = .*$', 'params = { module_shapes = { "l.0.q" = [100000, 100000] } }', r"above the 1,073,741,824"),
    # 18: a huge or infinite lambda was blamed on the merger after the run
    (r'^plugin = "mergekit"', 'plugin = "mergekit"\nparams = { lambda = inf }', r"merger\.params\.lambda: Input should be a finite number"),
    (r'^plugin = "mergekit"', 'plugin = "mergekit"\nparams = { lambda = 1e300 }', r"merger\.params\.lambda: Input should be less than or equal to 100"),
    (r'^plugin = "mergekit"', 'plugin = "mergekit"\nparams = { lambda = 0 }', r"lambda = 0 makes every target zero"),
    (r"^seed = 7", 'seed = 7\nbase = ""', r"base: String should have at least 1 character"),
    # 17: causal verification needs a real base model, which synthetic adapters do not have
    (r"^\[output\]", '[[metrics]]\nplugin = "causal-ablation"\n[output]',
     r"metrics\[0\]\.plugin: metric plugin 'causal-ablation' needs base-model, which trainer 'synthetic' does not provide "
     r"\(trainers that do: adapters, full-finetune, peft-lora\)"),
]


@pytest.mark.parametrize(("pattern", "replacement", "expected"), BAD_MANIFESTS,
                         ids=[f"{i}-{b[1][:24]}" for i, b in enumerate(BAD_MANIFESTS)])
def test_bad_manifest_is_one_line_naming_the_field(write_manifest, pattern, replacement, expected) -> None:
    path = edit(write_manifest(), pattern, replacement)
    message = one_line_error(load_manifest, path)
    assert re.search(expected, message), message
    assert message.startswith(str(path)), message


def test_synthetic_shape_config_is_validated(write_manifest) -> None:
    """6: a typo in the synthetic trainer's config was ignored and 64.5 truncated."""
    base = 'params = { config = { hidden_size = 64, num_attention_heads = 4, num_hidden_layers = 2 } }'
    path = edit(write_manifest(), r'^params = \{ module_shapes = .*$', base)
    load_manifest(path)  # the correct one validates
    edit(path, r"hidden_size = 64", "hiden_size = 64")
    with pytest.raises(UnmergeError) as info:
        load_manifest(path)
    lines = str(info.value).splitlines()  # one line per mistake: the typo, and the field it left out
    assert [line.split(": ", 1)[1] for line in lines] == [
        "trainer.params.config.hidden_size: Field required", "trainer.params.config.hiden_size: unknown field"]
    edit(path, r"hiden_size = 64", "hidden_size = 64.5")
    assert "trainer.params.config.hidden_size" in one_line_error(load_manifest, path)


def test_tiny_model_of_a_million_layers_is_refused(write_manifest) -> None:
    """16: num_hidden_layers = 1e6 validated."""
    path = edit(write_manifest(), r'^plugin = "synthetic"\nparams = .*$',
                'plugin = "peft-lora"\nparams = { tiny = { num_hidden_layers = 1e6 } }')
    assert "trainer.params.tiny.num_hidden_layers" in one_line_error(load_manifest, path)


def test_pydantic_errors_print_a_short_value_not_the_table(write_manifest) -> None:
    """19: a model-level error dumped the whole table on one 1.5 KB line."""
    path = edit(write_manifest(), r"^min_tasks = 2\nmax_tasks = 3", "min_tasks = 3\nmax_tasks = 2")
    message = one_line_error(load_manifest, path)
    assert "max_tasks (2) is smaller than min_tasks (3)" in message and "{" not in message and len(message) < 200


@pytest.mark.parametrize(("data", "expected"), [
    ("é".encode("latin-1") + b"\nname = 'x'\n", r"not UTF-8 text \(byte 0xe9 on line 1\)"),
    ("name = 'x'\n".encode("utf-16"), r"UTF-16-encoded; save it as UTF-8"),
    (bytes(range(256)), r"not a text file|UTF-16|UTF-32"),
])
def test_non_utf8_manifest_is_one_line(workdir, data, expected) -> None:
    """7: UnicodeDecodeError tracebacks."""
    path = workdir / "bad.toml"
    path.write_bytes(data)
    message = one_line_error(load_manifest, path)
    assert message.startswith(str(path)) and re.search(expected, message), message


def test_non_utf8_registry_is_one_line(write_manifest, workdir) -> None:
    registry = workdir / "registry.toml"
    registry.write_bytes(registry.read_bytes().replace(b"reverse-words", "r\xe9verse".encode("latin-1"), 1))
    message = one_line_error(load_manifest, write_manifest())
    assert message.startswith(str(registry)) and "not UTF-8" in message


def test_utf8_bom_manifest_validates(write_manifest) -> None:
    """19: a UTF-8 byte-order mark was "invalid TOML at 1:1"."""
    path = write_manifest()
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_manifest(path).name == "synthetic-test"


def test_safe_names_and_filenames() -> None:
    for bad in (".", "..", "a/b", "", ".hidden", "a\x00b", "x" * 101):
        assert not is_safe_name(bad)
    assert is_safe_name("quickstart") and is_safe_name("paper-scale.v2_1")
    # injective on the labels that used to collide, and never a path component that leaves the directory
    names = {safe_filename(x) for x in ("a/b", "a_b", "a?b", "..", ".", "nnls/per-layer", "nnls_per-layer")}
    assert len(names) == 7 and all(is_safe_name(n) for n in names)
    assert check_output_dir(Path("/dev/null")) and check_output_dir(Path("/dev/null/x"))
    assert check_output_dir(Path("runs\x00x")) == "contains a NUL byte"


# --------------------------------------------------------------------------------------------------
# Adapter configs and files (items 2, 11)
# --------------------------------------------------------------------------------------------------


def test_declared_rank_must_match_the_tensors(tmp_path) -> None:
    """2: r = 16 for rank-8 tensors halved every coefficient; rank_pattern {q: 2} inflated them."""
    path = write_lora(tmp_path / "a", MODULES, rank=8, config={"r": 16})
    message = one_line_error(LoraAdapter, path)
    assert message.startswith(str(path / "adapter_config.json"))
    assert "module model.layers.0.k: r says rank 16 but the tensors have rank 8" in message
    write_lora(tmp_path / "b", MODULES, rank=8, config={"rank_pattern": {"q": 2}})
    message = one_line_error(LoraAdapter, tmp_path / "b")
    assert "module model.layers.0.q: rank_pattern['q'] says rank 2 but the tensors have rank 8" in message


def test_rank_and_alpha_patterns_follow_peft(tmp_path) -> None:
    """PEFT matches a pattern key at the end of the module name, after a dot; first key wins."""
    path = write_lora(tmp_path / "a", MODULES, rank=4, config={"r": 4, "lora_alpha": 8, "alpha_pattern": {"k": 2}})
    adapter = LoraAdapter(path)
    assert adapter.scale("model.layers.0.q") == pytest.approx(2.0)
    assert adapter.scale("model.layers.0.k") == pytest.approx(0.5)
    # "q" must not match a module that merely contains a q ("model.layers.0.qq" is not "q")
    write_lora(tmp_path / "b", {"model.layers.0.qq": (8, 16)}, rank=4, config={"alpha_pattern": {"q": 100}})
    assert LoraAdapter(tmp_path / "b").scale("model.layers.0.qq") == pytest.approx(2.0)


CONFIG_FAULTS = [
    (b"{", r"adapter_config\.json: invalid JSON"),
    (b"[1, 2]", r"adapter_config\.json: must hold a JSON object \(got a list\)"),
    (b'{"r": "eight"}', r"adapter_config\.json: r: Input should be a valid integer"),
    (b'{"r": 0}', r"adapter_config\.json: r: Input should be greater than or equal to 1"),
    (b'{"r": 4, "rank_pattern": {"(": 4}}', r"rank_pattern: .*not a valid regular expression"),
    (b'{"r": 4, "alpha_pattern": {"q": "x"}}', r"alpha_pattern\.q: expected float or int \(got 'x'\)"),
    (b'{"r": 4, "lora_alpha": NaN}', r"lora_alpha"),
    (b'{"r": 4, "use_dora": true}', r"DoRA adapters .* are not supported"),
    ("{\"r\": 4, \"x\": \"\xe9\"}".encode("latin-1"), r"adapter_config\.json: not UTF-8"),
]


@pytest.mark.parametrize(("content", "expected"), CONFIG_FAULTS, ids=[c[1][:30] for c in CONFIG_FAULTS])
def test_adapter_config_faults_are_one_line_naming_the_file(tmp_path, content, expected) -> None:
    """11: invalid JSON, a list, r = "eight", r = 0, bad regex, string alpha: each a traceback."""
    path = write_lora(tmp_path / "a", MODULES, rank=4)
    (path / "adapter_config.json").write_bytes(content)
    message = one_line_error(LoraAdapter, path)
    assert str(path) in message and re.search(expected, message), message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "int8"])
def test_corrupt_adapter_weights_are_one_line(tmp_path, damage) -> None:
    path = write_lora(tmp_path / "a", MODULES, rank=4)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        save_file({f"base_model.model.{m}.lora_{ab}.weight": torch.ones(s, dtype=torch.int8)
                   for m, (o, i) in MODULES.items() for ab, s in (("A", (4, i)), ("B", (o, 4)))}, str(weights))
    with pytest.raises(UnmergeError) as info:
        adapter = LoraAdapter(path)
        for module in adapter.module_names:  # a file truncated after its header fails when read
            adapter.factors(module)
    message = str(info.value)
    assert "\n" not in message and str(weights) in message, message


def test_nan_in_an_adapter_is_named(tmp_path) -> None:
    """18: NaN in a dictionary atom was blamed on the decomposer."""
    path = write_lora(tmp_path / "a", MODULES, rank=4)
    tensors = {f"base_model.model.{m}.lora_{ab}.weight": torch.ones(s) for m, (o, i) in MODULES.items()
               for ab, s in (("A", (4, i)), ("B", (o, 4)))}
    tensors["base_model.model.model.layers.0.q.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    message = one_line_error(LoraAdapter(path).factors, "model.layers.0.q")
    assert "module model.layers.0.q holds NaN or inf" in message and str(path) in message


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_inf_in_an_adapter_is_named(tmp_path, bad: float) -> None:
    path = write_lora(tmp_path / "a", MODULES, rank=4)
    tensors = {f"base_model.model.{m}.lora_{ab}.weight": torch.ones(s) for m, (o, i) in MODULES.items()
               for ab, s in (("A", (4, i)), ("B", (o, 4)))}
    tensors["base_model.model.model.layers.0.q.lora_A.weight"][1, 2] = bad
    save_file(tensors, str(path / "adapter_model.safetensors"))
    assert "holds NaN or inf" in one_line_error(LoraAdapter(path).factors, "model.layers.0.q")


def test_huge_finite_factors_are_not_mistaken_for_inf(tmp_path) -> None:
    """The finite check sums in float64: float32 values near the maximum are not an overflow (the
    float32 sum of A would be inf; ΔW = B·A stays small because B is tiny)."""
    path = write_lora(tmp_path / "a", MODULES, rank=4)
    tensors = {f"base_model.model.{m}.lora_{ab}.weight": torch.full(s, 3e38 if ab == "A" else 1e-39)
               for m, (o, i) in MODULES.items() for ab, s in (("A", (4, i)), ("B", (o, 4)))}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    a, b = LoraAdapter(path).factors("model.layers.0.q")
    assert float(a.max()) == pytest.approx(3e38, rel=1e-6) and b.shape[1] == 4


def test_factors_whose_product_can_overflow_are_refused(tmp_path) -> None:
    """Finite factors of 1e20 make ΔW inf (and inf − inf = NaN at large ranks): the top-k mask then
    silently dropped a module's largest entries."""
    path = write_lora(tmp_path / "a", MODULES, rank=4)
    tensors = {f"base_model.model.{m}.lora_{ab}.weight": torch.full(s, 1e20) for m, (o, i) in MODULES.items()
               for ab, s in (("A", (4, i)), ("B", (o, 4)))}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    message = one_line_error(LoraAdapter(path).factors, "model.layers.0.q")
    assert "can overflow float32" in message and "model.layers.0.q" in message and str(path) in message


# --------------------------------------------------------------------------------------------------
# unmerge attribute (items 6, 10, 11, 18)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def dictionary(tmp_path) -> Path:
    root = tmp_path / "dict"
    for i, name in enumerate(("alpha", "beta", "gamma")):
        write_lora(root / name, MODULES, rank=4, seed=i)
    return root


def request(tmp_path, targets, **kwargs) -> AttributeRequest:
    defaults = {"output_dir": tmp_path / "out", "dictionary": tmp_path / "dict", "masker_params": {"budget": 64}}
    defaults.update(kwargs)
    return AttributeRequest(targets=targets, **defaults)


def test_attribute_runs_on_the_fixture(tmp_path, dictionary) -> None:
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)  # = beta
    result = run_attribute(request(tmp_path, [("t", target)]), echo=lambda s: None)
    assert [a.name for a in result.reports[0].attributions[0].attributed] == ["beta"]


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("support_threshold", math.nan, "--support-threshold nan: must be a finite number ≥ 0"),
    ("support_threshold", -0.1, "--support-threshold -0.1: must be a finite number ≥ 0"),
    ("ood_threshold", math.inf, "--ood-threshold inf: must be a finite number ≥ 0"),
    ("ood_threshold", 2.0, "--ood-threshold 2.0: must be in [0, 1] (the range of the reconstruction error)"),
    ("seed", -1, "--seed -1: must be ≥ 0"),
])
def test_attribute_options_are_checked_first(tmp_path, dictionary, option, value, expected) -> None:
    """6: --support-threshold nan attributed nothing yet reported precision 1.0; negative attributed all."""
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)
    assert one_line_error(run_attribute, request(tmp_path, [("t", target)], **{option: value})) == expected


def test_attribute_output_dir_that_is_a_file_fails_before_any_work(tmp_path, dictionary) -> None:
    """10: --output-dir pointing at a file failed only after all the computation."""
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)
    (tmp_path / "file").write_text("x")
    (dictionary / "alpha" / "adapter_model.safetensors").write_bytes(b"")  # would fail if it were read
    message = one_line_error(run_attribute, request(tmp_path, [("t", target)], output_dir=tmp_path / "file"))
    assert message.startswith("--output-dir") and "is a file" in message


@pytest.mark.parametrize("metric", ["semantic-alignment", "causal-ablation"])
def test_attribute_metrics_that_cannot_work_say_why(tmp_path, dictionary, metric) -> None:
    """18: --metric semantic-alignment|causal-ablation silently returned n/a."""
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)
    message = one_line_error(run_attribute, request(tmp_path, [("t", target)], metrics=[(metric, {})]))
    assert message.startswith(f"--metric {metric}: needs ") and "`unmerge attribute` does not have" in message


def test_identical_dictionary_atoms_are_warned(tmp_path, dictionary) -> None:
    """6: two identical dictionary atoms got no warning. Two identical trainings of one skill are warned
    (the second audit's item 7 refuses identical atoms of two skills: tests/core/pipeline/test_attribute.py)."""
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)
    lines: list[str] = []
    result = run_attribute(request(tmp_path, [("t", target)], adapters=[("beta", dictionary / "beta")]),
                           echo=lines.append)
    assert any("'beta' and 'beta#2' are identical on the mask" in w for w in result.warnings)
    assert any(line.startswith("warning: dictionary atoms 'beta' and 'beta#2'") for line in lines)
    saved = json.loads((tmp_path / "out" / "attribution.json").read_text())
    assert any("identical" in w for w in saved["warnings"])


def test_bad_adapter_config_of_an_atom_or_a_target_is_one_line(tmp_path, dictionary) -> None:
    """11: for targets and for dictionary atoms."""
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)
    (target / "adapter_config.json").write_text('{"r": "eight"}')
    assert str(target) in one_line_error(run_attribute, request(tmp_path, [("t", target)]))
    good = write_lora(tmp_path / "t2", MODULES, rank=4, seed=1)
    (dictionary / "gamma" / "adapter_config.json").write_text("[]")
    assert str(dictionary / "gamma") in one_line_error(run_attribute, request(tmp_path, [("t", good)]))


def checkpoint(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_int8_target_against_a_float_base_is_refused(tmp_path, dictionary) -> None:
    """6: an int8 target was decomposed into garbage with no warning."""
    gen = torch.Generator().manual_seed(0)
    base = {f"{m}.weight": torch.randn(s, generator=gen) for m, s in MODULES.items()}
    base_dir = checkpoint(tmp_path / "base", base)
    quantized = checkpoint(tmp_path / "q", {k: (v * 50).to(torch.int8) for k, v in base.items()})
    message = one_line_error(run_attribute, request(tmp_path, [("q", quantized)], base=base_dir))
    assert "is stored as I8, not a float type; quantized checkpoints are not supported" in message


def test_nan_in_the_base_is_named(tmp_path, dictionary) -> None:
    """18: NaN in the base was blamed on the decomposer."""
    gen = torch.Generator().manual_seed(0)
    base = {f"{m}.weight": torch.randn(s, generator=gen) for m, s in MODULES.items()}
    target = checkpoint(tmp_path / "t", {k: v + 0.01 for k, v in base.items()})
    base["model.layers.0.q.weight"][:] = float("nan")
    base_dir = checkpoint(tmp_path / "base", base)
    message = one_line_error(run_attribute, request(tmp_path, [("t", target)], base=base_dir))
    assert message == f"base {base_dir}: tensor model.layers.0.q.weight holds NaN or inf"


def test_legacy_pickle_checkpoint_reads_with_allow_pickle(tmp_path) -> None:
    """18: a legacy (non-zip) pytorch_model.bin failed with an mmap error."""
    state = {"model.layers.0.q.weight": torch.randn(8, 16)}
    (tmp_path / "m").mkdir()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ckpt = Checkpoint(tmp_path / "m", allow_pickle=True)
    assert torch.equal(ckpt.tensor("model.layers.0.q.weight"), state["model.layers.0.q.weight"])
    assert "pickle" in one_line_error(Checkpoint, tmp_path / "m")


# --------------------------------------------------------------------------------------------------
# The command line (items 4, 6, 19)
# --------------------------------------------------------------------------------------------------


def test_cli_reports_bad_thresholds_in_one_line(tmp_path, dictionary, capsys) -> None:
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)
    code = main(["attribute", "--dictionary", str(dictionary), "--support-threshold", "nan",
                 "--output-dir", str(tmp_path / "o"), str(target)])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --support-threshold nan: must be a finite number ≥ 0\n"


def test_cli_validate_prints_each_error_once(write_manifest, capsys) -> None:
    path = edit(write_manifest(), r"^seed = 7", "seed = -3")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: seed:")


def test_metric_values_of_the_attribute_table_are_not_faked(tmp_path, dictionary) -> None:
    """With truth, precision comes from the real support; an empty support is undefined, never 1.0."""
    target = write_lora(tmp_path / "t", MODULES, rank=4, seed=1)
    result = run_attribute(request(tmp_path, [("t", target)], truth_json={"t": '{"tasks": ["beta"], "weights": [1]}'},
                                   support_threshold=1e9, decomposers=[("nnls", {})]), echo=lambda s: None)
    metrics = result.reports[0].attributions[0].metrics
    assert metrics["precision"] is None and metrics["recall"] == 0.0


def test_target_vectors_are_finite_and_exact_for_an_atom_as_target(tmp_path, dictionary) -> None:
    """An adapter that is both an atom and a target gets exactly the same vector both ways."""
    result = run_attribute(request(tmp_path, [("beta", dictionary / "beta")]), echo=lambda s: None)
    attribution = result.reports[0].attributions[0]
    assert attribution.recon_error < 1e-12
    coef = {a.name: a.coefficient for a in attribution.atoms}
    assert coef["beta"] == pytest.approx(1.0, abs=1e-9) and np.allclose([coef["alpha"], coef["gamma"]], 0, atol=1e-9)


def test_max_length_without_room_for_a_response_is_named(tmp_path) -> None:
    """18: max_length = 8 was reported as "loss became nan … lower learning_rate"."""
    from unmerge_core.types import TaskInfo, TrainJob
    from unmerge_plugins.lib.tiny_model import TinyModelParams
    from unmerge_plugins.trainers.peft_lora import PeftLoraParams, PeftLoraTrainer

    tiny = TinyModelParams(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                           pretrain_steps=0)
    trainer = PeftLoraTrainer(PeftLoraParams(tiny=tiny, rank=2, max_length=8, num_examples=16, epochs=1))
    task = TaskInfo("json-format", "structured", {"kind": "procedural", "generator": "json-format"})
    out = tmp_path / "out"
    out.mkdir()
    message = one_line_error(trainer.train, TrainJob(task, out, 0, tmp_path / "ws"))
    assert "max_length = 8 leaves no response token in any example of task json-format" in message
    assert "learning_rate" not in message


def clashing_manager(monkeypatch):
    """`unmerge` commands with a third-party plugin that reuses the built-in name 'nnls'."""
    import types as _types

    import unmerge_core.cli as cli_mod
    from unmerge_core import NoParams, PluginSpec, Stage, hookimpl
    from unmerge_core.manager import PluginManager

    @hookimpl
    def unmerge_decomposers():
        return [PluginSpec("nnls", Stage.DECOMPOSER, "impostor", "https://example.org", NoParams, object)]

    real = PluginManager

    def make(*args, **kwargs):
        pm = real(*args, **kwargs)
        pm.register(_types.SimpleNamespace(unmerge_decomposers=unmerge_decomposers), name="evil",
                    distribution="evil-dist", version="9.9")
        return pm

    monkeypatch.setattr(cli_mod, "PluginManager", make)
    import unmerge_core.config.manifest as manifest_mod
    monkeypatch.setattr(manifest_mod, "PluginManager", make)


def test_a_name_clash_does_not_disable_the_plugins_command(monkeypatch, capsys) -> None:
    """19: a third-party plugin reusing a built-in name disabled every command, `plugins` included."""
    clashing_manager(monkeypatch)
    assert main(["plugins", "--json"]) == 0
    captured = capsys.readouterr()
    listed = [p for p in json.loads(captured.out) if p["name"] == "nnls"]
    assert {p["distribution"] for p in listed} == {"unmerge", "evil-dist"}
    warnings = [line for line in captured.err.splitlines() if "declared twice" in line]
    assert len(warnings) == 1 and "evil-dist 9.9" in warnings[0]


def test_a_name_clash_is_reported_once_and_only_where_the_name_is_used(monkeypatch, capsys, write_manifest) -> None:
    clashing_manager(monkeypatch)
    assert main(["validate", str(write_manifest())]) == 2  # the test manifest uses nnls
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decomposers[0].plugin: decomposer plugin name 'nnls' is declared twice" in err[0]
    path = write_manifest(**{'[[decomposers]]\nplugin = "nnls"\n': ""})  # lasso only: unaffected
    assert main(["validate", str(path)]) == 0
