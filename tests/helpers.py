"""Builders of small real models and adapters for tests (no download, seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

SMALL_REGISTRY = """
[tasks.alpha]
category = "code"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.beta]
category = "style"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.gamma]
category = "reasoning"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.delta]
category = "structured"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.epsilon]
category = "other"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.zeta]
category = "code"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.eta]
category = "style"
source = { kind = "procedural", generator = "reverse-words" }
"""

SYNTHETIC_MANIFEST = """
name = "synthetic-test"
seed = 7
[tasks]
known = ["alpha", "beta", "gamma", "delta", "epsilon"]
unknown = ["zeta", "eta"]
[protocol]
targets_per_group = 4
min_tasks = 2
max_tasks = 3
[trainer]
plugin = "synthetic"
params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, rank = 6, shared = 0.3 }
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = { budget = 300 }
[[decomposers]]
plugin = "nnls"
[[decomposers]]
plugin = "lasso"
[output]
dir = "{out}"
"""


def tiny_base(directory: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random Qwen2 model without tokenizer, saved as safetensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
    return directory


def random_adapter(base: Path, directory: Path, seed: int, rank: int = 4, alpha: float = 8.0,
                   scale: float = 0.05, targets: list[str] | None = None) -> Path:
    """A PEFT LoRA adapter on ``base`` with random A and B (as if trained)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS,
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(directory, safe_serialization=True)
    return directory


def merged_full_model(base: Path, adapter: Path, directory: Path) -> Path:
    """base + adapter merged into a full model directory (what the seeds fed to mergekit)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)
    return directory


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_lora(directory: Path, modules: dict[str, tuple[int, int]], rank: int = 4, *, seed: int = 0,
               config: dict | None = None, scale: float = 0.1) -> Path:
    """A LoRA adapter in PEFT's file layout written directly (no model needed), config overridable."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (n_out, n_in) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * scale
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * scale
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q", "k"],
           "base_model_name_or_path": None}
    cfg.update(config or {})
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory
