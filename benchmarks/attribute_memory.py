"""Peak memory of ``unmerge attribute`` on one 7B-shaped sharded checkpoint.

Builds, in a scratch folder, a Llama-2-7B-shaped base (32 layers, hidden 4096, MLP 11008, vocab 32000,
bf16, sharded with ``model.safetensors.index.json``), a dictionary of random rank-8 LoRA adapters on
every linear module, and a target = base + 0.6·ΔW(atom0) + 0.4·ΔW(atom1) of the same shapes. The base
is a sparse file (all zeros, no disk blocks); the target's linear modules are written for real
(~13 GB). Then it runs ``unmerge attribute`` in a child process (started from a small wrapper process,
so that the peak is the command's own) and reports its peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``
in the wrapper), the wall time, and whether the right atoms came out.

    .venv/bin/python benchmarks/attribute_memory.py                 # the 7B measurement
    .venv/bin/python benchmarks/attribute_memory.py --layers 2 --hidden 256 --intermediate 512 --vocab 1000

Exit status 1 when the peak exceeds ``--limit-gb`` (default 3) or the attribution is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
WEIGHTS = {"atom0": 0.6, "atom1": 0.4}


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    hidden: int = 4096
    intermediate: int = 11008
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 32

    def linear(self, module: str) -> tuple[int, int]:
        kv = self.hidden // self.heads * self.kv_heads
        return {"self_attn.q_proj": (self.hidden, self.hidden), "self_attn.k_proj": (kv, self.hidden),
                "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, self.hidden),
                "mlp.gate_proj": (self.intermediate, self.hidden), "mlp.up_proj": (self.intermediate, self.hidden),
                "mlp.down_proj": (self.hidden, self.intermediate)}[module]

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield "model.embed_tokens.weight", (self.vocab, self.hidden)
        for i in range(self.layers):
            yield f"model.layers.{i}.input_layernorm.weight", (self.hidden,)
            for m in LINEAR:
                yield f"model.layers.{i}.{m}.weight", self.linear(m)
            yield f"model.layers.{i}.post_attention_layernorm.weight", (self.hidden,)
        yield "model.norm.weight", (self.hidden,)
        yield "lm_head.weight", (self.vocab, self.hidden)

    def config(self) -> dict[str, object]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "torch_dtype": "bfloat16"}


def write_sparse_checkpoint(directory: Path, shape: Shape, shard_bytes: int) -> dict[str, tuple[Path, int]]:
    """A bf16 sharded safetensors checkpoint of zeros (sparse files); returns tensor -> (file, data offset)."""
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        nbytes = 2 * math.prod(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    where: dict[str, tuple[Path, int]] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for k, tensors in enumerate(shards, 1):
        file = directory / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims in tensors:
            nbytes = 2 * math.prod(dims)
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        start = 8 + len(blob)
        with open(file, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            fh.truncate(start + offset)  # zeros without disk blocks
        for name, _ in tensors:
            begin = header[name]["data_offsets"][0]  # type: ignore[index]
            where[name] = (file, start + begin)
            weight_map[name] = file.name
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(shape.config(), indent=1))
    return where


def write_adapter(directory: Path, shape: Shape, seed: int, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random PEFT LoRA adapter on every linear module; returns module -> (A, B)."""
    gen = torch.Generator().manual_seed(seed)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for i in range(shape.layers):
        for m in LINEAR:
            out_f, in_f = shape.linear(m)
            a = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
            b = torch.randn(out_f, rank, generator=gen) * 0.02
            module = f"model.layers.{i}.{m}"
            factors[module] = (a, b)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": [m.split(".")[1] for m in LINEAR],
              "base_model_name_or_path": "synthetic-7b", "task_type": "CAUSAL_LM"}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return factors


def write_target(directory: Path, shape: Shape, shard_bytes: int, atoms: dict[str, dict], layers: int | None) -> None:
    """Sparse zeros, then ΔW = Σ w·B·A·α/r written (bf16) into the linear modules of the first ``layers``."""
    where = write_sparse_checkpoint(directory, shape, shard_bytes)
    for i in range(shape.layers if layers is None else layers):
        for m in LINEAR:
            module = f"model.layers.{i}.{m}"
            delta = sum(w * (atoms[n][module][1] @ atoms[n][module][0]) * 2.0 for n, w in WEIGHTS.items())
            file, offset = where[f"{module}.weight"]
            with open(file, "r+b") as fh:
                fh.seek(offset)
                fh.write(delta.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
            del delta


def read_routes(target: Path, per_module: int, seed: int = 0) -> dict[str, float]:
    """The target's values at ``per_module`` uniformly drawn coordinates of every linear module (the
    mask's density), read two ways in this process: page by page (``Checkpoint.gather``, what
    ``unmerge attribute`` does) and the naive route (each tensor read whole, then indexed)."""
    import numpy as np

    from unmerge_core.io.checkpoints import Checkpoint

    checkpoint = Checkpoint(target)
    keys = [k for k in checkpoint.keys if any(k.endswith(f"{m}.weight") for m in LINEAR)]
    rng = np.random.default_rng(seed)
    draws = {k: torch.from_numpy(np.sort(rng.choice(math.prod(checkpoint.shapes[k]), per_module, replace=False)))
             for k in keys}
    start = time.perf_counter()
    paged = {k: checkpoint.gather(k, idx) for k, idx in draws.items()}
    paged_s, paged_bytes = time.perf_counter() - start, checkpoint.bytes_read
    start, naive_bytes = time.perf_counter(), 0
    for k, idx in draws.items():
        stored = checkpoint.tensor(k)
        naive_bytes += stored.numel() * stored.element_size()
        # the naive route converts the whole tensor (as a subtraction from the base would): this reads
        # every page; indexing the memory-mapped tensor alone would touch only the gathered pages
        full = stored.to(torch.float32)
        assert torch.equal(full.reshape(-1)[idx].to(torch.float64), paged[k])
        del full, stored
    naive_s = time.perf_counter() - start
    return {"modules": len(keys), "entries_per_module": per_module, "paged_s": round(paged_s, 2),
            "paged_mb": round(paged_bytes / 2**20, 1), "naive_s": round(naive_s, 2),
            "naive_mb": round(naive_bytes / 2**20, 1), "time_ratio": round(naive_s / max(paged_s, 1e-9), 1),
            "bytes_ratio": round(naive_bytes / max(paged_bytes, 1), 1)}


_PEAK_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)
"""Runs a command and prints its peak RSS (KiB) on stderr, as measured from a small parent."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="scratch folder (default: a new temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    for field, default in Shape().__dict__.items():
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=default)
    p.add_argument("--atoms", type=int, default=4, help="dictionary size (atom0 and atom1 are in the target)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--target-layers", type=int, help="write ΔW into the first N layers only (default: all)")
    p.add_argument("--limit-gb", type=float, default=3.0)
    p.add_argument("--json", default="bench-results/attribute_memory.json", help="where to write the numbers")
    args = p.parse_args(argv)
    shape = Shape(args.layers, args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="unmerge-bench-attribute-"))
    shard_bytes = int(args.shard_gb * 2**30)
    try:
        t0 = time.perf_counter()
        write_sparse_checkpoint(work / "base", shape, shard_bytes)
        atoms = {f"atom{k}": write_adapter(work / "dictionary" / f"atom{k}", shape, seed=k, rank=args.rank)
                 for k in range(args.atoms)}
        write_target(work / "target", shape, shard_bytes, atoms, args.target_layers)
        del atoms
        build_s = time.perf_counter() - t0
        truth = json.dumps({"tasks": list(WEIGHTS), "weights": list(WEIGHTS.values())})
        unmerge = Path(sys.executable).with_name("unmerge")
        cmd = [str(unmerge), "attribute", "--base", str(work / "base"), "--dictionary", str(work / "dictionary"),
               str(work / "target"), "--truth-json", truth, "--output-dir", str(work / "run")]
        t1 = time.perf_counter()
        # through a small wrapper process: Linux records, as a child's peak RSS, the peak of the
        # process it was started from too (vfork + exec), which here is this one, holding ~1 GB after
        # writing the checkpoints; the wrapper's own footprint is ~10 MB
        proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *cmd], capture_output=True, text=True)
        wall_s = time.perf_counter() - t1
        peak_kib = int(proc.stderr.rsplit("peak_rss_kib=", 1)[1].split()[0]) if "peak_rss_kib=" in proc.stderr else 0
        peak_gb = peak_kib / 2**20
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
            return 1
        result = json.loads((work / "run" / "attribution.json").read_text())["targets"][0]["results"][0]
        n_params = sum(math.prod(d) for _, d in shape.tensors())
        record = {
            "shape": shape.__dict__, "parameters": n_params, "checkpoint_gb": 2 * n_params / 2**30,
            "shards": len(list((work / "target").glob("model-*.safetensors"))), "atoms": args.atoms,
            "target_layers_written": args.target_layers or shape.layers, "build_s": round(build_s, 1),
            "attribute_wall_s": round(wall_s, 1), "peak_rss_gb": round(peak_gb, 3), "limit_gb": args.limit_gb,
            "support": result["support"], "coefficients": result["coefficients"],
            "recon_error": result["recon_error"], "perfect_match": result["metrics"].get("perfect_match"),
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
        n_modules = shape.layers * len(LINEAR)
        record["read"] = read_routes(work / "target", max(1, 99_904 // n_modules))
        out.write_text(json.dumps(record, indent=2) + "\n")
        r = record["read"]
        print(f"target read at the mask's density ({r['entries_per_module']} entries × {r['modules']} modules): "
              f"page by page {r['paged_s']} s, {r['paged_mb']} MB; whole tensors {r['naive_s']} s, "
              f"{r['naive_mb']} MB ({r['time_ratio']}× the time, {r['bytes_ratio']}× the bytes)")
        ok = peak_gb <= args.limit_gb and set(result["support"]) == set(WEIGHTS)
        print(f"attribute: peak RSS {peak_gb:.2f} GB (limit {args.limit_gb} GB), {wall_s:.0f} s, "
              f"support {result['support']} -> {'OK' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
