"""``full-finetune``: fine-tune the full weights of the target modules (no LoRA) on one micro-task.

A full fine-tune changes every entry of the trained weights: its ΔW = W − W₀ is dense and of full
rank, unlike a LoRA adapter's. It is stored *exactly* in the adapter layout every stage reads — as
the factors of its singular value decomposition, ``ΔW = B·A`` with ``B = U·√S`` and ``A = √S·Vᵀ``,
one rank per module (``rank_pattern``, the full ``min(out, in)``) and scale 1 (``alpha_pattern``) —
so masks, merges and decompositions treat it like any adapter, and ``B·A`` gives back ΔW up to
float32 rounding. Only the ``target_modules`` are trained (the rest of the model is frozen), with
the same data, loss and schedule as ``peft-lora``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field, model_validator

from unmerge_core import Capability, InputStatistics, InputStatisticsJob, PluginSpec, Stage, TrainJob, UnmergeError
from unmerge_plugins.lib.training import (
    CausalLmTrainingParams,
    load_base,
    prepare_model,
    quiet_transformers,
    seed_everything,
    train_causal_lm,
    training_checkpoint,
    training_device,
    task_input_statistics,
    training_examples,
)


class FullFinetuneParams(CausalLmTrainingParams):
    """Full fine-tuning of the ``target_modules`` weights (learning rates are smaller than LoRA's)."""

    learning_rate: float = Field(1e-3, gt=0, le=10)

    @model_validator(mode="after")
    def _float32_weights(self) -> FullFinetuneParams:
        if self.dtype != "float32":
            raise ValueError(f"full-finetune trains the weights themselves, which must stay float32 (AdamW steps "
                             f"vanish in {self.dtype}): set dtype = 'float32' and autocast = 'bf16' for speed")
        return self


class FullFinetuneTrainer:
    """Trains the ``target_modules`` weights in place; writes ΔW as an exact full-rank LoRA."""

    def __init__(self, params: FullFinetuneParams) -> None:
        self.params = params

    def plan(self, task: object) -> dict[str, object]:
        """Estimates for ``unmerge plan``: shapes from the base model's config (nothing is loaded)."""
        from unmerge_plugins.lib.plan_estimates import causal_lm_plan

        return causal_lm_plan(self.params, rank=None)

    def train(self, job: TrainJob) -> None:
        import torch
        from safetensors.torch import save_file

        quiet_transformers()
        p = self.params
        seed = job.seed + p.seed
        device = training_device(p, "full-finetune")
        seed_everything(seed)
        model, tokenizer = load_base(p.base_path(job.workspace), "full-finetune")
        seed_everything(seed)
        targets = {name: module for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in p.target_modules}
        if not targets:
            raise UnmergeError(f"trainer 'full-finetune': the base model has no linear module named "
                               f"{', '.join(p.target_modules)} (trainer.params.target_modules)")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        before = {}
        for name, module in targets.items():
            module.weight.requires_grad_(True)
            before[name] = module.weight.detach().clone()
        prepare_model(model, p, device)
        examples = training_examples(tokenizer, job.task, p, seed, "full-finetune")
        checkpoint = training_checkpoint(job.workspace, job.task.name, seed, p, examples)
        log = train_causal_lm(model, tokenizer, examples, p, seed, device, "full-finetune", job.task.name, checkpoint)
        tensors, ranks = {}, {}
        for name, module in targets.items():
            a, b = exact_factors(module.weight.detach().cpu() - before[name])
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            ranks[re.escape(name)] = int(a.shape[0])
        save_file(tensors, str(job.output_dir / "adapter_model.safetensors"))
        top = max(ranks.values())
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": top, "lora_alpha": top,
            "rank_pattern": ranks, "alpha_pattern": {k: float(v) for k, v in ranks.items()},
            "target_modules": sorted(p.target_modules), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "base_model_name_or_path": p.base_path(job.workspace),
            "unmerge_full_finetune": True,
        }
        (job.output_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (job.output_dir / "training_log.json").write_text(json.dumps(log, indent=2))
        if checkpoint is not None:
            checkpoint.remove()

    def input_statistics(self, job: InputStatisticsJob) -> dict[str, InputStatistics]:
        """The base model's inputs to ``job.modules`` on the task's training examples (for Scale-SVD)."""
        return task_input_statistics(self.params, job, "full-finetune")


def exact_factors(delta: Any) -> tuple[Any, Any]:
    """``(A, B)`` float32 with ``B @ A == delta`` up to float32 rounding: the SVD, ``B = U√S``, ``A = √S Vᵀ``."""
    import torch

    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    root = s.sqrt()
    return (root[:, None] * vh).to(torch.float32).contiguous(), (u * root).to(torch.float32).contiguous()


SPEC = PluginSpec("full-finetune", Stage.TRAINER,
                  "Full fine-tune of the target modules' weights; ΔW stored exactly as a full-rank LoRA (SVD)",
                  "https://arxiv.org/abs/2106.09685", FullFinetuneParams, FullFinetuneTrainer,
                  provides=(Capability.BASE_MODEL, Capability.ACTIVATION_STATISTICS))
