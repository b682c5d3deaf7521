"""The quickstart's training stage (12 PEFT LoRA adapters) with the local executor and with Ray on 1
and 2 CPUs of this machine: wall time of each and the speed-up of 2 Ray workers over 1.

    .venv/bin/python benchmarks/ray_training.py            # the quickstart manifest (~5 min on 2 cores)

Each configuration trains into its own empty store (nothing reused); the adapters must come out
byte-identical across configurations, which is checked (exit status 1 otherwise). Ray gives each task
``num_cpus_per_task = 1`` CPU, and sets its torch threads to match; the local executor lets torch use
every core for one adapter at a time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_once(manifest_path: Path, workers: int | None) -> tuple[float, dict[str, bytes]]:
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.pipeline.runner import Runner

    manifest = load_manifest(manifest_path)
    executor = None
    if workers is not None:
        import ray

        from unmerge_core.pipeline.ray_executor import RayExecutor

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        executor = RayExecutor(manifest.store_dir, progress=False)
        executor.connect()  # start-up and the store check are not the training's time
    runner = Runner(manifest, executor=executor, progress=False, echo=lambda s: None)
    start = time.perf_counter()
    paths = runner.train()
    seconds = time.perf_counter() - start
    if workers is not None:
        import ray

        ray.shutdown()
    weights = {name: (Path(p) / "adapter_model.safetensors").read_bytes() for name, p in paths.items()}
    return seconds, weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(REPO / "experiments" / "quickstart.toml"))
    args = parser.parse_args()
    source = Path(args.manifest).resolve()
    text = source.read_text()
    text = re.sub(r'^registry = "(.*)"$', lambda m: f'registry = "{(source.parent / m[1]).resolve()}"', text,
                  flags=re.M)
    text = re.sub(r"^\[output\]\n(?:[^\[\n].*\n)*", "", text, flags=re.M)
    results: dict[str, float] = {}
    reference: dict[str, bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="unmerge-ray-bench-") as scratch:
        for label, workers in (("local", None), ("ray-1", 1), ("ray-2", 2)):
            path = Path(scratch) / f"{label}.toml"
            path.write_text(f"{text}\n[output]\ndir = \"{Path(scratch) / label}\"\n")
            seconds, weights = train_once(path, workers)
            results[label] = seconds
            print(f"{label:6s} {seconds:7.1f} s  ({len(weights)} adapters)", flush=True)
            if reference is None:
                reference = weights
            elif weights != reference:
                print(f"error: {label} trained different adapters than the local executor", file=sys.stderr)
                return 1
    print(json.dumps({**{k: round(v, 2) for k, v in results.items()},
                      "speedup_ray2_over_ray1": round(results["ray-1"] / results["ray-2"], 2),
                      "ray2_over_local": round(results["local"] / results["ray-2"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
