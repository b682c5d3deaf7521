"""Checkpoint.gather reads the mask's entries through a memory map: the same numbers as reading the
tensor whole, for every float dtype and shard layout, and one-line errors for damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from unmerge_core.errors import UnmergeError
from unmerge_core.io.checkpoints import Checkpoint, safetensors_layout

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       count=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_mapped_gather_equals_reading_the_tensor(tmp_path_factory, rows, cols, dtype, count, seed) -> None:
    directory = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(seed)
    tensors = {"pad.weight": torch.randn(3, generator=g).to(dtype),  # the tensor of interest is not first
               "m.weight": (torch.randn(rows, cols, generator=g) * 10).to(dtype)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = Checkpoint(directory)
    idx = np.sort(np.random.default_rng(seed).choice(rows * cols, min(count, rows * cols), replace=False))
    fast = checkpoint.gather("m.weight", torch.from_numpy(idx))
    reference = tensors["m.weight"].reshape(-1)[torch.from_numpy(idx)].to(torch.float64)
    assert fast.dtype == torch.float64 and torch.equal(fast, reference)


def test_sharded_checkpoint_reads_each_shard(tmp_path) -> None:
    a, b = torch.randn(8, 6), torch.randn(4, 6).to(torch.bfloat16)
    save_file({"x.weight": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y.weight": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x.weight": "model-00001-of-00002.safetensors", "y.weight": "model-00002-of-00002.safetensors"}}))
    checkpoint = Checkpoint(tmp_path)
    idx = torch.tensor([0, 5, 23])
    assert torch.equal(checkpoint.gather("x.weight", idx), a.reshape(-1)[idx].double())
    assert torch.equal(checkpoint.gather("y.weight", idx), b.reshape(-1)[idx].double())


def test_damaged_offsets_and_truncated_files_are_one_line(tmp_path) -> None:
    save_file({"m.weight": torch.randn(16, 16)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    assert set(safetensors_layout(path)) == {"m.weight"}
    checkpoint = Checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # truncated after it was indexed
    checkpoint._layouts.clear()
    with pytest.raises(UnmergeError, match="invalid data_offsets") as info:
        checkpoint.gather("m.weight", torch.tensor([0, 1]))
    assert "\n" not in str(info.value)
    path.write_bytes(data)
    checkpoint._layouts.clear()
    with pytest.raises(UnmergeError, match="index 256 is out of range"):
        checkpoint.gather("m.weight", torch.tensor([0, 256]))


def test_single_file_beside_a_sharded_index_wins_as_in_transformers(tmp_path) -> None:
    """transformers 5 loads ``model.safetensors`` when a folder also holds an index (and its shards):
    the attribution must read the same weights (issue 20, item 11)."""
    single, sharded = torch.ones(4, 4), torch.zeros(4, 4)
    save_file({"x.weight": single}, str(tmp_path / "model.safetensors"))
    save_file({"x.weight": sharded}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x.weight": "model-00001-of-00001.safetensors"}}))
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.files == [tmp_path / "model.safetensors"]
    assert torch.equal(checkpoint.tensor("x.weight"), single)


def test_single_pickle_beside_a_pickle_index_wins_as_in_transformers(tmp_path) -> None:
    torch.save({"x.weight": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    torch.save({"x.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "x.weight": "pytorch_model-00001-of-00001.bin"}}))
    checkpoint = Checkpoint(tmp_path, allow_pickle=True)
    assert checkpoint.files == [tmp_path / "pytorch_model.bin"]
    assert torch.equal(checkpoint.tensor("x.weight"), torch.ones(2, 2))
