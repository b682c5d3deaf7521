"""GGUF files as a model source: tiny llama GGUF files written with the ``gguf`` package, dequantized
once into a plain checkpoint folder and compared with ``gguf.quants.dequantize`` exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import REPO, gguf_reference, tiny_gguf_tensors, write_tiny_gguf
from unmerge_core import UnmergeError, dequantized_checkpoint, model_source
from unmerge_core.io import gguf as gguf_io
from unmerge_core.io.gguf import find_gguf, inspect_gguf, quantization_warning
from unmerge_core.types import Mask

REAL = Path(os.environ.get("UNMERGE_REAL_GGUF", REPO / ".real" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantized_checkpoint_matches_the_reference(tmp_path, qtype):
    source = write_tiny_gguf(tmp_path / f"tiny.{qtype}.gguf", qtype, seed=3)
    folder = dequantized_checkpoint(source, tmp_path / "store")
    assert folder.parent == tmp_path / "store" / "cache" / "gguf" and (folder / "DONE").is_file()
    state = load_file(str(folder / "model.safetensors"))
    reference = gguf_reference(source)
    assert set(reference) <= set(state) | {"lm_head.weight"}
    for name, values in reference.items():
        assert state[name].dtype == np.float32
        np.testing.assert_array_equal(state[name], values, err_msg=name)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 2 and config["tie_word_embeddings"] is True
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)  # a plain checkpoint again
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), reference["model.embed_tokens.weight"])
    record = json.loads((folder / gguf_io.NOISE_FILE).read_text())
    noise = record["modules"]["model.layers.0.self_attn.v_proj"]
    assert noise["type"] == qtype and (noise["variance"] == 0) == (qtype == "F32")


def test_rounding_noise_estimate_matches_the_actual_error(tmp_path):
    """scale/√12 per weight: the estimate is within 20 % of the true RMS rounding error of Q4_0 / Q4_1 / Q8_0."""
    import gguf

    tensors = tiny_gguf_tensors(seed=5)
    for qtype in ("Q4_0", "Q4_1", "Q8_0"):
        source = write_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype, tensors)
        reader = gguf.GGUFReader(str(source))
        tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
        estimate, how = gguf_io._rounding_variance(tensor)
        error = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(64, 32) - tensors["blk.0.ffn_up.weight"]
        assert how == "block scale/√12"
        assert 0.8 < np.sqrt(estimate) / np.sqrt(np.mean(error.astype(np.float64) ** 2)) < 1.2, qtype


def test_second_call_reuses_the_folder_and_the_hash(tmp_path, monkeypatch):
    source = write_tiny_gguf(tmp_path / "m.gguf", "Q8_0")
    first = dequantized_checkpoint(source, tmp_path / "store")
    calls = []
    monkeypatch.setattr(gguf_io, "_convert", lambda *a: calls.append(a))
    hashed = []
    real_sha = gguf_io.hashlib.sha256

    def counting_sha256(*args):
        if not args:  # the streamed file hash (content keys hash a string)
            hashed.append(1)
        return real_sha(*args)

    monkeypatch.setattr(gguf_io.hashlib, "sha256", counting_sha256)
    assert dequantized_checkpoint(source, tmp_path / "store") == first
    assert not calls and not hashed  # neither converted nor hashed again
    copy = tmp_path / "elsewhere" / "renamed.gguf"  # the key is the content, not the name
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    assert dequantized_checkpoint(copy, tmp_path / "store") == first and not calls and hashed
    # a folder holding exactly one .gguf is that file
    assert dequantized_checkpoint(copy.parent, tmp_path / "store") == first
    edited = write_tiny_gguf(tmp_path / "other.gguf", "Q8_0", seed=9)  # other content: converted anew
    monkeypatch.undo()
    assert dequantized_checkpoint(edited, tmp_path / "store") != first


def test_user_cache_is_unmerge_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "user-cache"))
    source = write_tiny_gguf(tmp_path / "m.gguf", "F16")
    folder = model_source(source, what="--base")
    assert folder.parent == tmp_path / "user-cache" / "cache" / "gguf"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert model_source(plain) == plain  # a folder without a .gguf is what it is


def test_folder_with_two_gguf_files_is_one_line(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf", "F32")
    write_tiny_gguf(tmp_path / "b.gguf", "F32")
    with pytest.raises(UnmergeError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\)") as info:
        model_source(tmp_path, tmp_path / "store", what="--base")
    assert "\n" not in str(info.value)
    (tmp_path / "model.safetensors").write_bytes(b"")  # with safetensors it is a checkpoint folder
    assert find_gguf(tmp_path) is None


def test_bad_files_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    good = write_tiny_gguf(tmp_path / "good.gguf", "Q4_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:40])
    cases = {text: "not a GGUF file", truncated: "truncated", header_only: "truncated or damaged"}
    for path, expected in cases.items():
        with pytest.raises(UnmergeError, match=expected) as info:
            dequantized_checkpoint(path, tmp_path / "store", what="--base")
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not list((tmp_path / "store" / "cache" / "gguf").glob("[!.]*"))  # nothing half-written


def test_unsupported_type_and_architecture_are_one_line(tmp_path):
    import gguf

    tensors = tiny_gguf_tensors()
    rows = tensors["blk.0.ffn_up.weight"]
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.zeros((rows.shape[0], rows.shape[1] // size[0] * size[1]), dtype=np.uint8)
    q81 = write_tiny_gguf(tmp_path / "q81.gguf", "Q8_0", tensors, raw={"blk.0.ffn_up.weight": (raw, "Q8_1")})
    with pytest.raises(UnmergeError, match=r"blk\.0\.ffn_up\.weight is of GGUF type Q8_1, which the gguf package "
                                           "cannot dequantize"):
        dequantized_checkpoint(q81, tmp_path / "store", what="--base")
    other = write_tiny_gguf(tmp_path / "bert.gguf", "F32", architecture="bert")
    with pytest.raises(UnmergeError, match=r"GGUF architecture 'bert' is not one transformers can read from GGUF "
                                           r"\(it reads bloom, .*llama"):
        inspect_gguf(other, "--base")


def test_quantization_warning_compares_noise_with_delta_w(tmp_path):
    tensors = tiny_gguf_tensors(seed=1)
    folder = dequantized_checkpoint(write_tiny_gguf(tmp_path / "t.gguf", "Q4_1", tensors), tmp_path / "store")
    mask = Mask({"model.layers.0.self_attn.v_proj": np.arange(100), "model.layers.1.self_attn.o_proj": np.arange(50)},
                {"model.layers.0.self_attn.v_proj": (16, 32), "model.layers.1.self_attn.o_proj": (32, 32)})
    record = json.loads((folder / gguf_io.NOISE_FILE).read_text())["modules"]
    expected = np.sqrt((100 * record["model.layers.0.self_attn.v_proj"]["variance"]
                        + 50 * record["model.layers.1.self_attn.o_proj"]["variance"]) / 150)
    vector = np.full(150, expected / 2)  # ΔW RMS half the noise
    message = quantization_warning(folder, None, vector, mask, "merged")
    assert message is not None and "\n" not in message
    assert "dequantized from the GGUF file t.gguf (Q4_1 ×" in message and "block scale/√12" in message
    assert f"estimated RMS {expected:.3g}" in message and "200% of the RMS of ΔW" in message
    assert "exceeds the change being attributed" in message
    base = dequantized_checkpoint(write_tiny_gguf(tmp_path / "b.gguf", "Q4_1", seed=2), tmp_path / "store")
    assert "and the base's (also GGUF)" in quantization_warning(folder, base, vector, mask, "merged")
    assert quantization_warning(tmp_path, None, vector, mask, "plain") is None  # not from GGUF: no warning


@pytest.mark.real
@pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} is absent (make real fetches it)")
def test_real_smollm2_gguf(tmp_path):
    folder = dequantized_checkpoint(REAL, tmp_path / "store")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (folder / "chat_template.jinja").is_file()
