"""A target's change outside the dictionary's modules is said, not silently dropped (found by a hostile
review: a model whose MLP carried 99.99 % of its change was reported 'alpha 1.000, explained')."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import load_state, merged_full_model, random_adapter, tiny_base
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.checkpoints import Checkpoint, changed_outside
from unmerge_core.io.target_reader import TargetReader
from unmerge_core.types import Mask


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    base = tiny_base(root / "base")
    alpha = random_adapter(base, root / "alpha", seed=1)
    merged = merged_full_model(base, alpha, root / "merged")
    adapter = LoraAdapter(alpha)
    mask = Mask({m: np.arange(0, 64, 3) for m in adapter.module_names}, adapter.shapes)
    return {"root": root, "base": base, "alpha": alpha, "merged": merged, "mask": mask}


def model_with(state_of, edit, directory):
    directory.mkdir()
    state = load_state(state_of)
    edit(state)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text((state_of / "config.json").read_text())
    return directory


def test_a_model_changed_outside_the_dictionary_is_warned(world, tmp_path) -> None:
    def touch_mlp(state):
        key = next(k for k in state if "mlp.gate_proj" in k)
        state[key] += 0.5 * torch.randn_like(state[key])

    target = model_with(world["merged"], touch_mlp, tmp_path / "with-mlp")
    reader = TargetReader(world["mask"], Checkpoint(world["base"]))
    _, warnings = reader.model_vector(Checkpoint(target, name="t"))
    outside = [w for w in warnings if "outside the dictionary's modules differ" in w]
    assert len(outside) == 1 and "mlp.gate_proj" in outside[0] and "1 tensor(s)" in outside[0]


def test_a_model_changed_only_in_the_dictionary_modules_is_not_warned(world) -> None:
    reader = TargetReader(world["mask"], Checkpoint(world["base"]))
    _, warnings = reader.model_vector(Checkpoint(world["merged"], name="t"))
    assert not [w for w in warnings if "outside" in w]
    assert changed_outside(Checkpoint(world["base"]), Checkpoint(world["merged"]), world["mask"].modules) == []


def test_an_adapter_with_modules_outside_the_dictionary_is_warned_with_their_share(world, tmp_path) -> None:
    wide = random_adapter(world["base"], tmp_path / "wide", seed=2,
                          targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapter = LoraAdapter(wide)
    _, warnings = TargetReader(world["mask"]).adapter_vector(adapter)
    outside = [m for m in adapter.module_names if m not in world["mask"].indices]
    energy = {m: float(adapter.delta(m).double().square().sum()) for m in adapter.module_names}
    share = sum(energy[m] for m in outside) / sum(energy.values())
    [warning] = [w for w in warnings if "not in the dictionary" in w]
    assert f"{len(outside)} adapted module(s)" in warning and f"{share:.1%}" in warning


def test_adapter_energy_equals_the_dense_norm(world) -> None:
    adapter = LoraAdapter(world["alpha"])
    for module in adapter.module_names:
        assert adapter.energy(module) == pytest.approx(float(adapter.delta(module).double().square().sum()), rel=1e-5)


def test_tensors_that_are_not_lora_factors_are_warned(world, tmp_path) -> None:
    from safetensors.torch import load_file

    copy = tmp_path / "with-bias"
    copy.mkdir()
    (copy / "adapter_config.json").write_text((world["alpha"] / "adapter_config.json").read_text())
    tensors = load_file(world["alpha"] / "adapter_model.safetensors")
    key_b = next(k for k in tensors if "lora_B" in k)
    tensors[key_b.replace(".weight", ".bias")] = torch.ones(tensors[key_b].shape[0])
    save_file(tensors, copy / "adapter_model.safetensors")
    _, warnings = TargetReader(world["mask"]).adapter_vector(LoraAdapter(copy))
    assert any("not LoRA factors" in w and ".bias" in w for w in warnings)


def test_rounding_outside_the_dictionary_is_not_a_change(world, tmp_path) -> None:
    """A linear merge of models equal outside the dictionary rounds those tensors by an ulp
    (0.3·x + 0.7·x ≠ x), and a bf16 copy rounds every weight: neither is a change (found by a review)."""
    def average(state):
        for key in state:
            if "self_attn" not in key:
                state[key] = 0.3 * state[key] + 0.7 * state[key]

    def to_bf16(state):
        for key in state:
            state[key] = state[key].to(torch.bfloat16)

    base = Checkpoint(world["base"])
    for edit, name in ((average, "avg"), (to_bf16, "bf16")):
        target = model_with(world["merged"], edit, tmp_path / name)
        assert changed_outside(base, Checkpoint(target), world["mask"].modules) == [], name
