"""The worked example that ships (`make example`): merge three real chat adapters with `mergekit-yaml`,
then ask `unmerge attribute` what the merge is made of.

The adapters are those `make real` trained on SmolLM2-135M-Instruct (runs/smollm2/adapters.json names
them): chat-json-person and chat-pirate are in the dictionary, chat-formal is not. The merge is
mergekit's task arithmetic with weights 0.6 / 0.4 / 0.5, so the truth is json-person 0.6 + pirate 0.4
plus a skill outside the dictionary. Every path is written out (absolute, in runs/worked-example/) so
the YAML and the command lines it prints can be copied and run by hand:

    runs/worked-example/merge.yml        the mergekit recipe (BASE+ADAPTER references)
    runs/worked-example/merged/          what mergekit-yaml wrote
    runs/worked-example/dictionary/      one folder per known skill (links to its adapter)
    runs/attribute-worked-example/       attribution.{md,json,csv}
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN = ROOT / "runs" / "smollm2"          # `make real`'s run (another: python experiments/worked_example.py RUN_DIR)
OUT = ROOT / "runs" / "worked-example"
BASE_GGUF = ROOT / ".real" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MERGE = {"chat-json-person": 0.6, "chat-pirate": 0.4, "chat-formal": 0.5}  # the last one is not a known skill


def run(command: list[str]) -> None:
    from unmerge_core.quiet import QUIET_ENVIRONMENT

    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    # mergekit's transformers progress bars and deprecation warnings kept out of the example's output
    done = subprocess.run(command, env={**os.environ, **QUIET_ENVIRONMENT, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(done.returncode)


def link_to(link: Path, target: str) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def clear_unfinished(cache: Path) -> None:
    """mergekit creates a LoRA-merge cache folder before it writes the merged model into it, and on the next
    run takes any existing folder for a finished one ("Unable to find model files at ..."): a folder left
    without weights by an interrupted merge is removed so that mergekit merges that adapter again."""
    if cache.is_dir():
        for entry in cache.iterdir():
            if entry.is_dir() and not any(entry.glob("*.safetensors")):
                shutil.rmtree(entry)


def main(argv: list[str]) -> int:
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.io.gguf import model_source

    run_dir = Path(argv[0]).resolve() if argv else RUN
    adapters_file = run_dir / "adapters.json"
    if not adapters_file.is_file() or not BASE_GGUF.is_file():
        print("error: the worked example merges the adapters `make real` trains; run `make real` first", file=sys.stderr)
        return 2
    adapters = json.loads(adapters_file.read_text())
    known = load_manifest(ROOT / "experiments" / "smollm2.toml").file.tasks.known
    base = model_source(BASE_GGUF)  # the dequantized checkpoint folder mergekit reads (converted once)
    # adapters by skill name (the store names them by hash): the recipe's references and the dictionary
    linked = {task: link_to(OUT / "adapters" / task, str((ROOT / adapters[task]).resolve())) for task in MERGE}
    dictionary = OUT / "dictionary"
    for task in known:
        link_to(dictionary / task, str((ROOT / adapters[task]).resolve()))
    lines = ["# mergekit recipe of the worked example (written by experiments/worked_example.py)",
             "merge_method: task_arithmetic", f"base_model: {base}", "dtype: float32", "models:"]
    for task, weight in MERGE.items():
        lines += [f"  - model: {base}+{linked[task]}", f"    parameters: {{weight: {weight}}}"]
    recipe = OUT / "merge.yml"
    recipe.write_text("\n".join(lines) + "\n")
    print(f"wrote {recipe}")
    merged = OUT / "merged"
    clear_unfinished(OUT / "lora-merge-cache")
    run([str(BIN / "mergekit-yaml"), str(recipe), str(merged), "--device", "cpu", "--random-seed", "42",
         "--quiet", "--allow-crimes", "--lora-merge-cache", str(OUT / "lora-merge-cache")])
    run([str(BIN / "unmerge"), "attribute", str(merged), "--base", str(BASE_GGUF), "--dictionary", str(dictionary),
         "--truth", str(recipe), "--name", "worked-example"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
