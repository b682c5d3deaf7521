"""LoRA training throughput on the real pretrained model: the real-model experiment's trainer settings
(experiments/smollm2.toml) on one chat skill, in float32 and under bf16 autocast, tokens per second of each.

    .venv/bin/python benchmarks/real_training.py            # after `make real-model`; ~2 minutes on 2 cores
    .venv/bin/python benchmarks/real_training.py --steps 20 --task chat-pirate

Both runs train the same skill from the same seed for the same number of steps into their own empty
folder; the figures come from each adapter's ``training_log.json`` (tokens of the batches / seconds of
the training loop, model loading excluded). Results in ``bench-results/real_training.json``. A CPU
without bf16 support refuses the autocast run in one line (the trainer's own check), which is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
GGUF = REPO / ".real" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def train(task_name: str, autocast: str, steps: int, workspace: Path) -> dict:
    from unmerge_core import TrainJob, UnmergeError
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.config.registry import Registry
    from unmerge_plugins.trainers.peft_lora import PeftLoraParams, PeftLoraTrainer

    manifest = load_manifest(REPO / "experiments" / "smollm2.toml")
    task = Registry.load(REPO / "registry.toml").task(task_name)
    settings = {**manifest.file.trainer.params, "autocast": autocast, "max_steps": steps, "checkpoint_every": None}
    params = PeftLoraParams.model_validate(settings, context={"manifest_dir": manifest.path.parent.resolve()})
    out = workspace / autocast
    out.mkdir()
    try:
        PeftLoraTrainer(params).train(TrainJob(task=task, output_dir=out, seed=0, workspace=workspace))
    except UnmergeError as exc:
        return {"autocast": autocast, "error": str(exc)}
    log = json.loads((out / "training_log.json").read_text())
    return {key: log[key] for key in ("autocast", "dtype", "threads", "steps", "tokens", "seconds", "tokens_per_second")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="chat-uppercase", help="chat skill to train (registry name)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "real_training.json")
    args = parser.parse_args(argv)
    if not GGUF.is_file():
        print(f"error: {GGUF.relative_to(REPO)} is absent; `make real-model` fetches it", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="unmerge-bench-real-") as tmp:
        rows = [train(args.task, autocast, args.steps, Path(tmp)) for autocast in ("off", "bf16")]
    ok = [r for r in rows if "error" not in r]
    if len(ok) == 2:
        rows[1]["speed-up over fp32"] = round(ok[1]["tokens_per_second"] / ok[0]["tokens_per_second"], 2)
    print(tabulate([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                   headers="keys"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"task": args.task, "steps": args.steps, "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
