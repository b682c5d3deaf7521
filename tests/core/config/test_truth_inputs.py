"""Ground truth of existing targets: weights are validated, and a mergekit YAML gives the effective
coefficient of each constituent's task vector in the merged ΔW (weight, normalize, lambda as mergekit
resolves them). Every refusal is one line naming the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from unmerge_core.config.manifest import load_manifest
from unmerge_core.config.targets import Truth, read_mergekit_truth, read_truth_json
from unmerge_core.errors import UnmergeError


def one_line(info: pytest.ExceptionInfo[UnmergeError]) -> str:
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# --------------------------------------------------------------------------------------------------
# Weights: finite, non-negative, not absurd, with a positive sum
# --------------------------------------------------------------------------------------------------

BAD_WEIGHTS = [
    ("NaN", "weights[1]: Input should be a finite number (got nan)"),
    ("Infinity", "weights[1]: Input should be a finite number (got inf)"),
    ("-Infinity", "weights[1]: Input should be a finite number (got -inf)"),
    ("-0.5", "weights[1]: Input should be greater than or equal to 0 (got -0.5)"),
    ("1e308", "weights[1]: Input should be less than or equal to 1000000 (got 1e+308)"),
]


@pytest.mark.parametrize(("value", "expected"), BAD_WEIGHTS)
def test_truth_json_refuses_bad_weight(value: str, expected: str) -> None:
    with pytest.raises(UnmergeError) as info:
        read_truth_json(f'{{"tasks": ["alpha", "beta"], "weights": [0.5, {value}]}}')
    assert one_line(info) == f"--truth-json json: {expected}"


def test_truth_json_refuses_all_zero_weights() -> None:
    with pytest.raises(UnmergeError) as info:
        read_truth_json('{"tasks": ["alpha", "beta"], "weights": [0, 0.0]}')
    assert one_line(info) == "--truth-json json: weights sum to 0; at least one weight must be positive"


def test_truth_json_still_accepts_a_zero_among_positive_weights() -> None:
    truth = read_truth_json('{"tasks": ["alpha", "beta"], "weights": [0, 2]}')
    assert truth.weights == (0.0, 2.0)


def test_truth_json_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "truth.json"
    path.write_text('{"tasks": ["alpha"], "weights": [Infinity]}')
    with pytest.raises(UnmergeError) as info:
        read_truth_json(str(path))
    assert one_line(info) == f"--truth-json {path}: weights[0]: Input should be a finite number (got inf)"


@pytest.mark.parametrize(("value", "expected"), [
    ("nan", "targets[0].truth.weights[1]: Input should be a finite number (got nan)"),
    ("-inf", "targets[0].truth.weights[1]: Input should be a finite number (got -inf)"),
    ("-1", "targets[0].truth.weights[1]: Input should be greater than or equal to 0 (got -1)"),
    ("1e7", "targets[0].truth.weights[1]: Input should be less than or equal to 1000000 (got 10000000.0)"),
    ("0", "targets[0].truth: weights sum to 0; at least one weight must be positive"),
])
def test_manifest_truth_refuses_bad_weight(write_manifest, value: str, expected: str) -> None:
    first = "0" if value == "0" else "0.5"
    path = write_manifest()
    path.write_text(path.read_text() + textwrap.dedent(f"""
        [[targets]]
        path = "merged"
        truth = {{ tasks = ["alpha", "beta"], weights = [{first}, {value}] }}
    """))
    with pytest.raises(UnmergeError) as info:
        load_manifest(path)
    assert one_line(info) == f"{path}: {expected}"


@pytest.mark.parametrize("weights", [(float("nan"),), (float("inf"),), (-1.0,), (2e6,), (0.0,)])
def test_truth_itself_refuses_bad_weights(weights: tuple[float, ...]) -> None:
    with pytest.raises(UnmergeError) as info:
        Truth(("alpha",), weights, "somewhere")
    message = one_line(info)
    assert message.startswith("truth from somewhere: weights")


# --------------------------------------------------------------------------------------------------
# mergekit YAML: the effective coefficient of each task vector
# --------------------------------------------------------------------------------------------------


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(textwrap.dedent(text))
    return path


def truth_of(tmp_path: Path, text: str) -> Truth:
    return read_mergekit_truth(recipe(tmp_path, text), {})


def refusal(tmp_path: Path, text: str) -> str:
    path = recipe(tmp_path, text)
    with pytest.raises(UnmergeError) as info:
        read_mergekit_truth(path, {})
    message = one_line(info)
    assert message.startswith(f"--truth {path}: ")
    return message.removeprefix(f"--truth {path}: ")


def test_task_arithmetic_lambda_scales_the_weights(tmp_path: Path) -> None:
    truth = truth_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - model: ./fm/alpha
            parameters: {weight: 0.6}
          - model: ./fm/beta
            parameters: {weight: 0.4}
        parameters:
          lambda: 0.5
    """)
    assert truth.tasks == ("alpha", "beta") and truth.weights == pytest.approx((0.3, 0.2))


def test_global_weight_is_every_model_default_and_lambda_per_model_is_ignored(tmp_path: Path) -> None:
    # mergekit resolves weight per model, then from the top-level parameters; lambda only from the top level
    truth = truth_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - model: ./fm/alpha
          - model: ./fm/beta
            parameters: {weight: 0.4, lambda: 7}
        parameters: {weight: 0.6, lambda: 0.5}
    """)
    assert truth.weights == pytest.approx((0.3, 0.2))


def test_task_arithmetic_normalize_ignores_the_base_weight(tmp_path: Path) -> None:
    truth = truth_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - model: ./base
            parameters: {weight: 5}
          - model: ./fm/alpha
            parameters: {weight: 1}
          - model: ./fm/beta
            parameters: {weight: 3}
        parameters: {normalize: true, lambda: 2}
    """)
    assert truth.tasks == ("alpha", "beta") and truth.weights == pytest.approx((0.5, 1.5))


@pytest.mark.parametrize(("method", "extra", "expected"), [
    ("ties", "", (0.25, 0.75)),  # normalizes by default (sign-consensus approximation)
    ("ties", "parameters: {normalize: false}", (1.0, 3.0)),
    ("ties", "parameters: {lambda: 2}", (0.5, 1.5)),
    ("della", "", (0.25, 0.75)),
    ("dare_ties", "", (1.0, 3.0)),
    ("dare_linear", "", (1.0, 3.0)),
    ("breadcrumbs", "parameters: {lambda: 0.1}", (0.1, 0.3)),
    ("breadcrumbs_ties", "", (1.0, 3.0)),
    ("della_linear", "parameters: {normalize: true}", (0.25, 0.75)),
])
def test_task_arithmetic_family_defaults(tmp_path: Path, method: str, extra: str, expected: tuple[float, ...]) -> None:
    truth = truth_of(tmp_path, f"""
        merge_method: {method}
        base_model: ./base
        models:
          - model: ./base
          - model: ./fm/alpha
            parameters: {{weight: 1}}
          - model: ./fm/beta
            parameters: {{weight: 3}}
        {extra}
    """)
    assert truth.tasks == ("alpha", "beta") and truth.weights == pytest.approx(expected)


@pytest.mark.parametrize("listed", [True, False])
def test_linear_base_with_a_weight_joins_the_normalizer(tmp_path: Path, listed: bool) -> None:
    # mergekit feeds the base to linear as one more input; with a (global) weight it is averaged in
    base_entry = "  - model: ./base\n" if listed else ""
    truth = truth_of(tmp_path, f"""
merge_method: linear
base_model: ./base
models:
{base_entry}  - model: ./fm/alpha
  - model: ./fm/beta
    parameters: {{weight: 2}}
parameters: {{weight: 1}}
""")
    assert truth.tasks == ("alpha", "beta") and truth.weights == pytest.approx((0.25, 0.5))


def test_linear_without_normalize_keeps_the_weights(tmp_path: Path) -> None:
    truth = truth_of(tmp_path, """
        merge_method: linear
        models:
          - model: a
            parameters: {weight: 0.7}
          - model: b
            parameters: {weight: 0.7}
        parameters: {normalize: false}
    """)
    assert truth.weights == pytest.approx((0.7, 0.7))


@pytest.mark.parametrize("method", ["slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "passthrough",
                                    "nearswap", "arcee_fusion", "ram", "my_own_method"])
def test_method_without_stated_coefficients_is_refused(tmp_path: Path, method: str) -> None:
    message = refusal(tmp_path, f"""
        merge_method: {method}
        base_model: ./base
        models:
          - model: ./fm/alpha
          - model: ./fm/beta
        parameters: {{t: 0.5}}
    """)
    assert message.startswith(f"merge_method: '{method}' ")
    assert "--truth-json" in message


def test_missing_merge_method_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, """
        models:
          - model: ./fm/alpha
    """)
    assert message.startswith("merge_method: missing")


@pytest.mark.parametrize(("params", "field", "value"), [
    ("models:\n  - model: a\n    parameters: {weight: .nan}\n", "models[0].parameters.weight", "nan"),
    ("models:\n  - model: a\n    parameters: {weight: -0.5}\n", "models[0].parameters.weight", "-0.5"),
    ("models:\n  - model: a\n    parameters: {weight: 1.0e+308}\n", "models[0].parameters.weight", "1e+308"),
    ("models:\n  - model: a\nparameters: {weight: .inf}\n", "parameters.weight", "inf"),
    ("models:\n  - model: a\nparameters: {lambda: -.inf}\n", "parameters.lambda", "-inf"),
    ("models:\n  - model: a\nparameters: {lambda: [0.5, 1.0]}\n", "parameters.lambda", "[0.5, 1.0]"),
    ("models:\n  - model: a\nparameters: {normalize: maybe}\n", "parameters.normalize", "'maybe'"),
])
def test_mergekit_bad_parameter_names_its_field(tmp_path: Path, params: str, field: str, value: str) -> None:
    message = refusal(tmp_path, "merge_method: task_arithmetic\nbase_model: base\n" + params)
    assert message.startswith(f"{field}: ") and message.endswith(f"(got {value})")


def test_mergekit_zero_weights_and_zero_lambda_are_refused(tmp_path: Path) -> None:
    zeros = "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 0}\n"
    assert refusal(tmp_path, zeros) == "the models' weights sum to 0; at least one weight must be positive"
    no_lambda = "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\nparameters: {lambda: 0}\n"
    assert refusal(tmp_path, no_lambda) == "parameters.lambda: must be positive (got 0)"


def test_family_never_reads_the_base_weight(tmp_path: Path) -> None:
    truth = truth_of(tmp_path, """
        merge_method: ties
        base_model: ./base
        models:
          - model: ./base
            parameters: {weight: -3}
          - model: ./fm/alpha
            parameters: {weight: 2}
    """)
    assert truth.tasks == ("alpha",) and truth.weights == pytest.approx((1.0,))


def test_huge_yaml_integer_weight_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {10**400}}}\n")
    assert message.startswith("models[0].parameters.weight: must be a finite number from 0 to 1,000,000 (got 1000")


# --------------------------------------------------------------------------------------------------
# mergekit's slices: and modules: forms (issue 20, item 14)
# --------------------------------------------------------------------------------------------------

SLICES = """
    merge_method: linear
    base_model: ./base
    slices:
      - sources:
          - model: ./fm/alpha
            layer_range: [0, 2]
            parameters: {weight: 0.6}
          - model: ./fm/beta
            layer_range: [0, 2]
            parameters: {weight: 0.2}
      - sources:
          - model: ./fm/alpha
            layer_range: [2, 4]
            parameters: {weight: 0.6}
          - model: ./fm/beta
            layer_range: [2, 4]
        parameters: {weight: 0.2}
    parameters: {normalize: false}
"""


def test_slices_that_agree_on_every_layer_range_are_one_truth(tmp_path: Path) -> None:
    """`--truth` was suggested for slices: recipes, then refused them with "no 'models:' list"."""
    truth = truth_of(tmp_path, SLICES)
    assert truth.tasks == ("alpha", "beta") and truth.weights == pytest.approx((0.6, 0.2))


def test_slices_with_other_weights_per_layer_range_are_refused_in_one_line(tmp_path: Path) -> None:
    message = refusal(tmp_path, SLICES.replace("parameters: {weight: 0.2}\n    parameters",
                                               "parameters: {weight: 0.3}\n    parameters"))
    assert "slices[1] (layers 2-4)" in message and "slices[0] (layers 0-2)" in message
    assert "--truth-json" in message


def test_modules_form_with_models_or_slices(tmp_path: Path) -> None:
    truth = truth_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: ./base
        modules:
          text_decoder:
            models:
              - model: ./fm/alpha
                parameters: {weight: 0.6}
              - model: ./fm/beta
            parameters: {weight: 0.4, lambda: 0.5}
    """)
    assert truth.tasks == ("alpha", "beta") and truth.weights == pytest.approx((0.3, 0.2))
    message = refusal(tmp_path, """
        merge_method: linear
        modules:
          text_decoder:
            slices:
              - sources:
                  - {model: ./fm/alpha, layer_range: [0, 4], parameters: {weight: 1.0}}
          vision_tower:
            models:
              - {model: ./fm/beta, parameters: {weight: 1.0}}
    """)
    assert "modules.vision_tower.models" in message and "modules.text_decoder.slices[0] (layers 0-4)" in message


def test_a_recipe_with_two_forms_or_none_is_refused(tmp_path: Path) -> None:
    assert "exactly one of models:, slices: or modules:" in refusal(tmp_path, """
        merge_method: linear
        models: [{model: ./fm/alpha}]
        slices: [{sources: [{model: ./fm/alpha, layer_range: [0, 2]}]}]
    """)
    assert "exactly one of models:, slices: or modules:" in refusal(tmp_path, "merge_method: linear\n")


def test_the_truth_suggestion_only_for_recipes_truth_can_read(tmp_path: Path) -> None:
    """`unmerge attribute` suggests --truth for a folder's mergekit_config.yml: only when following it works."""
    from unmerge_core.pipeline.attribute import recipe_has_truth

    assert recipe_has_truth(recipe(tmp_path, SLICES))
    assert not recipe_has_truth(recipe(tmp_path, SLICES.replace("parameters: {weight: 0.2}\n    parameters",
                                                                "parameters: {weight: 0.3}\n    parameters")))
