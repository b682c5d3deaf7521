"""``peft-lora``: train a real LoRA adapter per micro-task with PEFT and transformers."""

from __future__ import annotations

import json

from pydantic import Field

from unmerge_core import Capability, InputStatistics, InputStatisticsJob, PluginSpec, Stage, TrainJob
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


class PeftLoraParams(CausalLmTrainingParams):
    """Proposal defaults: r=32, α=32, lr 2e-4, 3 epochs on Qwen/Qwen2.5-7B-Instruct."""

    rank: int = Field(32, ge=1, le=4096)
    alpha: float = Field(32.0, gt=0, le=1e6)
    dropout: float = Field(0.0, ge=0, lt=1)


class PeftLoraTrainer:
    """LoRA on ``target_modules`` of the base model, trained on the task's examples, saved by PEFT."""

    def __init__(self, params: PeftLoraParams) -> None:
        self.params = params

    def plan(self, task: object) -> dict[str, object]:
        """Estimates for ``unmerge plan``: shapes from the base model's config (nothing is loaded)."""
        from unmerge_plugins.lib.plan_estimates import causal_lm_plan

        return causal_lm_plan(self.params, rank=self.params.rank)

    def train(self, job: TrainJob) -> None:
        from peft import LoraConfig, get_peft_model

        quiet_transformers()
        p = self.params
        seed = job.seed + p.seed
        device = training_device(p, "peft-lora")
        seed_everything(seed)
        model, tokenizer = load_base(p.base_path(job.workspace), "peft-lora")
        # again: building the tiny base (first job only) draws from torch's generator, and the adapter
        # must not depend on whether this job built it or found it built
        seed_everything(seed)
        config = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout,
                            target_modules=list(p.target_modules), bias="none", task_type="CAUSAL_LM")
        # LoRA weights stay float32 whatever dtype the base is held in (prepare_model)
        model = prepare_model(get_peft_model(model, config), p, device)
        examples = training_examples(tokenizer, job.task, p, seed, "peft-lora")
        checkpoint = training_checkpoint(job.workspace, job.task.name, seed, p, examples)
        log = train_causal_lm(model, tokenizer, examples, p, seed, device, "peft-lora", job.task.name, checkpoint)
        model.save_pretrained(job.output_dir, safe_serialization=True)
        (job.output_dir / "training_log.json").write_text(json.dumps(log, indent=2))
        if checkpoint is not None:
            checkpoint.remove()


    def input_statistics(self, job: InputStatisticsJob) -> dict[str, InputStatistics]:
        """The base model's inputs to ``job.modules`` on the task's training examples (for Scale-SVD)."""
        return task_input_statistics(self.params, job, "peft-lora")

SPEC = PluginSpec("peft-lora", Stage.TRAINER, "Train a LoRA adapter per task with PEFT + transformers",
                  "https://arxiv.org/abs/2106.09685", PeftLoraParams, PeftLoraTrainer, provides=(Capability.BASE_MODEL, Capability.ACTIVATION_STATISTICS))
