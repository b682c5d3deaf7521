"""A trainer's relative ``base_model`` is read from the manifest's folder, as every manifest path is."""

from __future__ import annotations

from pathlib import Path

from unmerge_plugins.trainers.full_finetune import FullFinetuneParams
from unmerge_plugins.trainers.peft_lora import PeftLoraParams


def test_relative_base_model_is_read_beside_the_manifest(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base.gguf").write_bytes(b"GGUF")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the cwd holds no such file
    for params in (PeftLoraParams, FullFinetuneParams):
        p = params.model_validate({"base_model": "../models/base.gguf"},
                                  context={"manifest_dir": tmp_path / "experiments"})
        assert p.base_model == "../models/base.gguf"  # experiments/ does not exist: nothing beside it
        p = params.model_validate({"base_model": "models/base.gguf"}, context={"manifest_dir": tmp_path})
        assert Path(p.base_model) == (tmp_path / "models" / "base.gguf").resolve()


def test_hub_ids_and_absolute_paths_are_kept(tmp_path: Path) -> None:
    p = PeftLoraParams.model_validate({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                      context={"manifest_dir": tmp_path})
    assert p.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    p = PeftLoraParams.model_validate({"base_model": str(tmp_path)}, context={"manifest_dir": tmp_path / "x"})
    assert p.base_model == str(tmp_path)
    assert PeftLoraParams.model_validate({"base_model": "rel/model"}).base_model == "rel/model"  # no manifest
