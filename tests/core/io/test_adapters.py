"""Reading PEFT adapters lazily: ΔW = B·A·α/r equals what PEFT's merge_and_unload produces."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_state, merged_full_model, random_adapter, tiny_base

from unmerge_core.errors import UnmergeError
from unmerge_core.io.adapters import LoraAdapter, common_modules


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_base(root / "base")
    adapter = random_adapter(base, root / "adapter", seed=1)
    return root, base, adapter


def test_delta_matches_peft_merge(base_and_adapter) -> None:
    root, base, adapter_dir = base_and_adapter
    merged = load_state(merged_full_model(base, adapter_dir, root / "merged"))
    base_state = load_state(base)
    adapter = LoraAdapter(adapter_dir)
    assert len(adapter.module_names) == 2 * 4
    for module in adapter.module_names:
        expected = merged[f"{module}.weight"] - base_state[f"{module}.weight"]
        torch.testing.assert_close(adapter.delta(module), expected, atol=1e-6, rtol=1e-4)


def test_values_at_equals_dense_gather(base_and_adapter) -> None:
    _, _, adapter_dir = base_and_adapter
    adapter = LoraAdapter(adapter_dir)
    module = adapter.module_names[0]
    dense = adapter.delta(module).reshape(-1)
    idx = torch.tensor([0, 5, 17, dense.numel() - 1])
    torch.testing.assert_close(torch.from_numpy(adapter.values_at(module, idx.numpy())).float(), dense[idx])


def copy_with_config(adapter_dir, copy, **changes):
    """The same adapter weights under a changed adapter_config.json; returns the new config."""
    copy.mkdir()
    cfg = {**json.loads((adapter_dir / "adapter_config.json").read_text()), **changes}
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    (copy / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    return cfg


def test_rslora_scale(base_and_adapter, tmp_path) -> None:
    _, _, adapter_dir = base_and_adapter
    copy = tmp_path / "rs"
    cfg = copy_with_config(adapter_dir, copy, use_rslora=True)
    m = LoraAdapter(copy).module_names[0]
    assert LoraAdapter(copy).scale(m) == pytest.approx(cfg["lora_alpha"] / cfg["r"] ** 0.5)


def test_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(UnmergeError, match="not a PEFT adapter directory"):
        LoraAdapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(UnmergeError, match="pickle"):
        LoraAdapter(tmp_path)


def test_common_modules_is_the_intersection(base_and_adapter) -> None:
    _, _, adapter_dir = base_and_adapter
    a = LoraAdapter(adapter_dir, "a")
    assert common_modules([a, a]) == a.module_names


def test_fan_in_fan_out_adapters_are_transposed(base_and_adapter, tmp_path) -> None:
    """Regression: GPT-2-style (Conv1D) adapters store the base weight as (in, out); ΔW = (B·A)ᵀ."""
    _, _, adapter_dir = base_and_adapter
    copy = tmp_path / "fifo"
    copy_with_config(adapter_dir, copy, fan_in_fan_out=True)
    plain, fifo = LoraAdapter(adapter_dir), LoraAdapter(copy)
    module = next(m for m in plain.module_names if "k_proj" in m)  # not square: (16, 32)
    assert fifo.shapes[module] == tuple(reversed(plain.shapes[module]))
    torch.testing.assert_close(fifo.delta(module), plain.delta(module).T)
    idx = torch.tensor([0, 3, 40])
    torch.testing.assert_close(torch.from_numpy(fifo.values_at(module, idx.numpy())).float(),
                               fifo.delta(module).reshape(-1)[idx])


def test_file_rewritten_between_reads_is_read_again(base_and_adapter, tmp_path) -> None:
    """The adapter keeps its file open between modules; a file replaced since is read anew, and one
    truncated since is refused in one line (not a fault on pages that no longer exist)."""
    root, base, adapter_dir = base_and_adapter
    copy = tmp_path / "copy"
    copy_with_config(adapter_dir, copy)
    adapter = LoraAdapter(copy)
    module = adapter.module_names[0]
    before = adapter.delta(module)
    other = random_adapter(base, root / "other-for-rewrite", seed=7)
    (copy / "adapter_model.safetensors.new").write_bytes((other / "adapter_model.safetensors").read_bytes())
    (copy / "adapter_model.safetensors.new").replace(copy / "adapter_model.safetensors")
    after = adapter.delta(module)
    torch.testing.assert_close(after, LoraAdapter(other).delta(module))
    assert not torch.equal(before, after)
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UnmergeError, match="cannot read module") as info:
        adapter.delta(module)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_factors_with_nan_or_inf_are_refused(base_and_adapter, tmp_path, bad) -> None:
    from safetensors.torch import load_file, save_file

    _, _, adapter_dir = base_and_adapter
    copy = tmp_path / "bad"
    copy_with_config(adapter_dir, copy)
    tensors = load_file(copy / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key].view(-1)[3] = bad
    save_file(tensors, copy / "adapter_model.safetensors")
    adapter = LoraAdapter(copy)
    module = key.split(".lora_B")[0].removeprefix("base_model.model.")
    with pytest.raises(UnmergeError, match="NaN or inf"):
        adapter.factors(module)


def test_file_replaced_by_other_shapes_is_refused(tmp_path) -> None:
    """An adapter file swapped for one of other module shapes after indexing is refused in one line
    (its factors would not fit the module the index promised)."""
    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    narrow_base, wide_base = tiny_base(tmp_path / "nb"), tiny_base(tmp_path / "wb", hidden=64)
    random_adapter(narrow_base, narrow, seed=1)
    random_adapter(wide_base, wide, seed=1)
    adapter = LoraAdapter(narrow)
    module = adapter.module_names[0]
    adapter.factors(module)
    (narrow / "adapter_model.safetensors").write_bytes((wide / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UnmergeError, match="changed since it was indexed") as info:
        adapter.factors(module)
    assert "\n" not in str(info.value)


def test_missing_lora_alpha_is_peft_default_not_rank(base_and_adapter, tmp_path) -> None:
    """PEFT uses lora_alpha = 8 when the config has none; α = r made a rank-4 adapter twice too large
    (found by a hostile review: a lone adapter came out with coefficient 0.5, 'explained')."""
    root, base, adapter_dir = base_and_adapter
    copy = tmp_path / "no-alpha"
    copy_with_config(adapter_dir, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    merged = load_state(merged_full_model(base, copy, tmp_path / "merged"))
    base_state = load_state(base)
    adapter = LoraAdapter(copy)
    module = adapter.module_names[0]
    assert adapter.scale(module) == pytest.approx(8 / cfg["r"])
    torch.testing.assert_close(adapter.delta(module), merged[f"{module}.weight"] - base_state[f"{module}.weight"],
                               atol=1e-6, rtol=1e-4)


def test_null_lora_alpha_is_refused(base_and_adapter, tmp_path) -> None:
    _, _, adapter_dir = base_and_adapter
    copy = tmp_path / "null-alpha"
    copy_with_config(adapter_dir, copy, lora_alpha=None)
    with pytest.raises(UnmergeError, match="lora_alpha") as info:
        LoraAdapter(copy)
    assert "\n" not in str(info.value)


def test_fan_in_fan_out_that_peft_would_override_is_refused(base_and_adapter, tmp_path) -> None:
    """PEFT ignores fan_in_fan_out = true on nn.Linear layers (and forces it on GPT-2's Conv1D): reading
    such an adapter transposed gave a wrong attribution on square modules (found by a hostile review)."""
    from unmerge_core.io.adapters import check_orientation

    _, _, adapter_dir = base_and_adapter
    flagged = tmp_path / "fifo"
    copy_with_config(adapter_dir, flagged, fan_in_fan_out=True)
    plain, fifo = LoraAdapter(adapter_dir), LoraAdapter(flagged)
    check_orientation([plain], ["qwen2"])
    check_orientation([fifo], ["gpt2"])
    check_orientation([plain, plain], [])
    # a composite model (an encoder-decoder with a GPT-2 decoder, found by a review) or an unknown type
    # decides nothing: PEFT writes fan_in_fan_out = true for the decoder's Conv1D layers
    check_orientation([fifo], ["encoder-decoder", "bert", "gpt2"])
    check_orientation([fifo], ["some-new-model"])
    for adapters, types, message in (([fifo], ["qwen2"], "nn.Linear"), ([plain], ["gpt2"], "Conv1D"),
                                     ([plain, fifo], [], "disagree.*--base"),
                                     ([plain, fifo], ["encoder-decoder", "gpt2"], "disagree.*does not tell")):
        with pytest.raises(UnmergeError, match=message) as info:
            check_orientation(adapters, types)
        assert "\n" not in str(info.value)


def test_model_types_include_nested_configs() -> None:
    from unmerge_core.io.adapters import model_types

    config = {"model_type": "encoder-decoder", "encoder": {"model_type": "bert"},
              "decoder": {"model_type": "gpt2", "extra": {"x": 1}}}
    assert model_types(config) == ["encoder-decoder", "bert", "gpt2"]
    assert model_types(None) == [] and model_types({"model_type": 3}) == []


def test_in_place_rewrite_keeping_the_mtime_is_read_anew(tmp_path) -> None:
    """cp -p / rsync --inplace -t rewrite a file and restore its mtime: byte ranges cached from the old
    header must not be reused (found by a review: with A and B swapped in the file, A came out as B)."""
    import os
    import struct

    from helpers import write_lora

    directory = write_lora(tmp_path / "a", {"model.q": (6, 6)}, rank=6, seed=0)  # A and B both 6 × 6
    weights = directory / "adapter_model.safetensors"
    adapter = LoraAdapter(directory)
    old_a, old_b = adapter.factors("model.q")
    stat = weights.stat()
    raw = weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key_a, key_b = (next(k for k in header if f"lora_{ab}" in k) for ab in "AB")
    header[key_a]["data_offsets"], header[key_b]["data_offsets"] = header[key_b]["data_offsets"], header[key_a]["data_offsets"]
    packed = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    data = bytearray(raw[8 + n:])
    (sa, ea), (sb, eb) = header[key_a]["data_offsets"], header[key_b]["data_offsets"]
    data[sa:ea], data[sb:eb] = (2 * old_a).numpy().tobytes(), (3 * old_b).numpy().tobytes()
    with open(weights, "r+b") as fh:  # the same inode and size; the mtime restored below
        fh.write(raw[:8] + packed + bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    new_a, new_b = adapter.factors("model.q")
    torch.testing.assert_close(new_a, 2 * old_a)
    torch.testing.assert_close(new_b, 3 * old_b)
