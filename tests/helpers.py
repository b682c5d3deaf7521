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


TINY_GGUF = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 64}
"""The tiny llama-architecture model of :func:`write_tiny_gguf` (every row a multiple of 32: one quant block)."""
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_gguf_tensors(seed: int = 0, scale: float = 0.1) -> dict:
    """Random float32 weights of a tiny llama model, by GGUF tensor name, in GGUF's layout (llama.cpp's
    row order of attn_q / attn_k: transformers permutes those rows back when it loads them)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, f, hd = TINY_GGUF["hidden"], TINY_GGUF["ffn"], TINY_GGUF["hidden"] // TINY_GGUF["heads"]
    vocab = len(_gguf_tokens())
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    for i in range(TINY_GGUF["layers"]):
        shapes |= {f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                   f"blk.{i}.attn_q.weight": (TINY_GGUF["heads"] * hd, h),
                   f"blk.{i}.attn_k.weight": (TINY_GGUF["kv_heads"] * hd, h),
                   f"blk.{i}.attn_v.weight": (TINY_GGUF["kv_heads"] * hd, h),
                   f"blk.{i}.attn_output.weight": (h, TINY_GGUF["heads"] * hd),
                   f"blk.{i}.ffn_gate.weight": (f, h), f"blk.{i}.ffn_up.weight": (f, h), f"blk.{i}.ffn_down.weight": (h, f)}
    return {name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else scale * rng.standard_normal(shape))
            .astype(np.float32) for name, shape in shapes.items()}


def _gguf_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]


def write_tiny_gguf(path: Path, qtype: str = "F32", tensors: dict | None = None, *, seed: int = 0,
                    architecture: str = "llama", raw: dict | None = None) -> Path:
    """A tiny llama-architecture GGUF file transformers can load: config and byte-level BPE tokenizer
    metadata (with a chat template), the 2-D weights in ``qtype`` (``gguf.quants.quantize``), the
    norms in F32. ``raw`` maps a tensor name to ``(bytes as a uint8 array, type name)`` written as is."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    tensors = tiny_gguf_tensors(seed) if tensors is None else tensors
    tokens = _gguf_tokens()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(TINY_GGUF["hidden"])
    writer.add_block_count(TINY_GGUF["layers"])
    writer.add_feed_forward_length(TINY_GGUF["ffn"])
    writer.add_head_count(TINY_GGUF["heads"])
    writer.add_head_count_kv(TINY_GGUF["kv_heads"])
    writer.add_rope_dimension_count(TINY_GGUF["hidden"] // TINY_GGUF["heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, data in tensors.items():
        if raw and name in raw:
            writer.add_tensor(name, raw[name][0], raw_dtype=gguf.GGMLQuantizationType[raw[name][1]])
        elif data.ndim == 2 and kind != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, quantize(np.ascontiguousarray(data), kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_reference(path: Path) -> dict:
    """What transformers should make of a GGUF file's 2-D weights: ``gguf.quants.dequantize`` of each,
    attn_q / attn_k rows permuted back (llama), by transformers' parameter name."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    heads, kv = TINY_GGUF["heads"], TINY_GGUF["kv_heads"]
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    out = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        values = dequantize(tensor.data, tensor.tensor_type).reshape([int(d) for d in reversed(tensor.shape)])
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                n = heads if parts[2] == "attn_q" else kv
                values = values.reshape(n, values.shape[0] // n // 2, 2, -1).swapaxes(2, 1).reshape(values.shape)
        else:
            name = f"{names[parts[0]]}.weight"
        out[name] = np.asarray(values, dtype=np.float32)
    return out


def to_gguf_layout(name: str, values):
    """An HF-layout q_proj / k_proj weight in GGUF's row order (llama.cpp's permute); others unchanged."""
    heads = TINY_GGUF["heads"] if name.endswith("attn_q.weight") else TINY_GGUF["kv_heads"]
    if not name.endswith(("attn_q.weight", "attn_k.weight")):
        return values
    return values.reshape(heads, 2, values.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(values.shape)


SCALE_SVD_MANIFEST = """
name = "{name}"
seed = {seed}
registry = "{registry}"
[tasks]
known = ["python-function", "json-format", "pirate-style"]
unknown = ["uppercase"]
[protocol]
groups = {groups}
methods = ["task_arithmetic", "scale-svd"]
targets_per_group = 4
min_tasks = 2
max_tasks = 2
[trainer]
plugin = "peft-lora"
[trainer.params]
rank = 4
alpha = 8
learning_rate = 1e-2
epochs = 1
batch_size = 8
num_examples = 32
max_length = 48
tiny = {{ hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, intermediate_size = 64, pretrain_steps = 20 }}
[[merger]]
plugin = "mergekit"
[[merger]]
plugin = "scale-svd"
params = {{ {scale_params} }}
[masker]
plugin = "topk"
params = {{ budget = 1024 }}
[[decomposers]]
plugin = "nnls"
{metrics}[output]
dir = "{out}"
"""
"""Task arithmetic beside activation-scaled Scale-SVD on tiny PEFT adapters (the Scale-SVD end-to-end tests)."""
