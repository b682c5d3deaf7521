"""A trainer's relative ``base_model`` is read from the manifest's folder, as every manifest path is."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmerge_plugins.trainers.full_finetune import FullFinetuneParams
from unmerge_plugins.trainers.peft_lora import PeftLoraParams


def test_relative_base_model_is_read_beside_the_manifest(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base.gguf").write_bytes(b"GGUF")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the cwd holds no such file
    for params in (PeftLoraParams, FullFinetuneParams):
        with pytest.raises(ValueError, match=r"base_model: .*experiments/\.\./models/base\.gguf does not exist"):
            params.model_validate({"base_model": "../models/base.gguf"},  # exists from the cwd, not beside
                                  context={"manifest_dir": tmp_path / "experiments"})
        p = params.model_validate({"base_model": "models/base.gguf"}, context={"manifest_dir": tmp_path})
        assert Path(p.base_model) == (tmp_path / "models" / "base.gguf").resolve()


def test_hub_ids_and_absolute_paths_are_kept(tmp_path: Path) -> None:
    p = PeftLoraParams.model_validate({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                      context={"manifest_dir": tmp_path})
    assert p.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    p = PeftLoraParams.model_validate({"base_model": str(tmp_path)}, context={"manifest_dir": tmp_path / "x"})
    assert p.base_model == str(tmp_path)
    assert PeftLoraParams.model_validate({"base_model": "rel/model"}).base_model == "rel/model"  # no manifest


def test_a_missing_model_file_is_one_line_naming_the_make_target(tmp_path: Path) -> None:
    """Before: a missing GGUF path validated as if it were a Hub id and failed at training time."""
    for params in (PeftLoraParams, FullFinetuneParams):
        with pytest.raises(ValueError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf does not exist .*make real-model"):
            params.model_validate({"base_model": "../.real/SmolLM2-135M-Instruct.Q4_1.gguf"},
                                  context={"manifest_dir": tmp_path})
        with pytest.raises(ValueError, match=r"base_model: /no/such/model does not exist \(a path, not a Hub id\)"):
            params.model_validate({"base_model": "/no/such/model"}, context={"manifest_dir": tmp_path})
