"""experiments/scale_svd_scores.py on a tiny run (peft-lora on a tiny base, task arithmetic and
Scale-SVD): its files, a missing input statistic recorded and said so, and task arithmetic's row equal
to what the run's own target ΔW gives when put into the base model and scored the causal metric's way."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import shutil
import sys

import numpy as np
import pytest

from helpers import REPO, SCALE_SVD_MANIFEST  # noqa: E402
from unmerge_core.config.manifest import load_manifest
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.masks import load_mask
from unmerge_core.io.store import derive_seed, load_tensors
from unmerge_core.pipeline.runner import RoutedDenseMerge, Runner
from unmerge_core.types import MergeJob
from unmerge_plugins.lib.generation import GenerationSet, resolve_checker
from unmerge_plugins.lib.lm import WeightEditor, load_causal_lm
from unmerge_plugins.lib.tasks import load_examples

PROMPTS = 4


def _script():
    spec = importlib.util.spec_from_file_location("scale_svd_scores", REPO / "experiments" / "scale_svd_scores.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("scale-svd-scores")
    path = root / "m.toml"
    path.write_text(SCALE_SVD_MANIFEST.format(name="scale-svd-scores", seed=3, groups='["known"]',
                                          scale_params="calibration_batches = 2, rank_ratio = 0.5",
                                          metrics='[[metrics]]\nplugin = "support"\n', registry=REPO / "registry.toml",
                                          out=root / "runs"))
    manifest = load_manifest(path)
    result = Runner(manifest, progress=False, echo=lambda s: None).run()
    run_dir = result.run_dir
    # one task's statistics gone from the store: the script records them again, the runner's way
    stats_root = run_dir / "cache" / "input-stats"
    removed = sorted(stats_root.iterdir())[0]
    removed_task = json.loads((removed / "DONE").read_text())["task"]
    shutil.rmtree(removed)
    status = (run_dir / "run.json").read_text()
    script = _script()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = script.main(["--run-dir", str(run_dir), "--targets", "3", "--prompts", str(PROMPTS),
                            "--sparsities", "0.1,0.7"])
    assert code == 0, err.getvalue()
    return manifest, run_dir, script, removed, removed_task, status, out.getvalue(), err.getvalue()


def test_writes_the_three_files_and_records_missing_statistics(scored) -> None:
    manifest, run_dir, script, removed, removed_task, status, out, err = scored
    assert f"no input statistics of {removed_task}: recording them now" in err  # never silent
    assert removed.is_dir()  # back in the store, under the runner's key
    assert (run_dir / "run.json").read_text() == status  # the finished run is left as it was
    md = (run_dir / "scale-svd-scores.md").read_text()
    assert md == out and "What to look at" in md and "Scale-SVD activation ρ=0.7" in md
    data = json.loads((run_dir / "scale-svd-scores.json").read_text())
    targets = json.loads((run_dir / "targets.json").read_text())
    known_ta = [t for t in targets if t["method"] == "task_arithmetic" and t["group"] == "known"]
    assert [t["target_id"] for t in data["targets"]] == [t["target_id"] for t in known_ta][:3]
    keys = {"base", "adapter-alone", "task_arithmetic", "scale-svd-activation-0.1", "scale-svd-uniform-0.1",
            "scale-svd-activation-0.7", "scale-svd-uniform-0.7"}
    for target in data["targets"]:
        assert set(target["models"]) == keys
        for model in target["models"].values():
            assert set(model["skills"]) == set(target["tasks"])
            assert all(s["prompts"] == PROMPTS for s in model["skills"].values())
        svd = target["models"]
        assert svd["scale-svd-activation-0.7"]["kept_effective"] < svd["scale-svd-activation-0.1"]["kept_effective"] < 1
        assert svd["scale-svd-activation-0.1"]["kept_nominal"] == pytest.approx(0.9)
        # activation scaling changed the ΔW: it is not the uniform variant's
        assert svd["scale-svd-activation-0.7"]["distance_to_ta"] != svd["scale-svd-uniform-0.7"]["distance_to_ta"]
    with (run_dir / "scale-svd-scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(keys) * len(t["tasks"]) for t in data["targets"])


def test_task_arithmetic_row_is_the_run_own_target_applied_to_the_base(scored) -> None:
    manifest, run_dir, *_ = scored
    data = json.loads((run_dir / "scale-svd-scores.json").read_text())
    adapters = json.loads((run_dir / "adapters.json").read_text())
    input_dirs = {}
    for folder in (run_dir / "cache" / "input-stats").iterdir():
        done = json.loads((folder / "DONE").read_text())
        input_dirs[(done["task"], done["batches"])] = folder
    routed = RoutedDenseMerge({m: manifest.merger_for(m) for m in manifest.protocol.methods}, adapters, None,
                              input_dirs)
    base = LoraAdapter(adapters["python-function"]).base_model
    model, tokenizer = load_causal_lm(base, "cpu")
    modules = list(dict.fromkeys(m for p in adapters.values() for m in LoraAdapter(p).module_names))
    editor = WeightEditor(model, modules)
    tasks = {t.name: t for t in manifest.all_tasks}
    seed = derive_seed(manifest.seed, "causal-heldout", 0)
    mask = load_mask(next((run_dir / "cache" / "masks").iterdir()))
    cached = {json.loads((d / "target.json").read_text())["target_id"]: d
              for d in (run_dir / "cache" / "targets").iterdir()}
    for target in data["targets"]:
        entry = next(t for t in json.loads((run_dir / "targets.json").read_text())
                     if t["target_id"] == target["target_id"])
        job = MergeJob(entry["target_id"], entry["method"], tuple(entry["tasks"]), tuple(entry["weights"]),
                       entry["seed"], entry["group"])
        deltas = dict(routed(job))
        # the run's own target: its masked vector is this ΔW on the mask
        vector = load_tensors(cached[job.target_id] / "target.safetensors")["vector"].numpy()
        on_mask = np.concatenate([deltas[m].reshape(-1).double().numpy()[np.asarray(mask.indices[m])]
                                  for m in mask.modules])
        assert np.allclose(on_mask, vector, rtol=1e-5, atol=1e-8)
        editor.set_delta(deltas)
        examples = {s: load_examples(tasks[s], 64, seed, split="heldout")[:PROMPTS] for s in job.tasks}
        generation = GenerationSet(tokenizer, examples, {s: resolve_checker(tasks[s]) for s in job.tasks})
        judged = generation.judged(model, "cpu")
        answers = generation.answers(model, "cpu")
        ta = target["models"]["task_arithmetic"]["skills"]
        for skill, (accepted, exact) in judged.items():
            assert ta[skill]["answers"] == answers[skill]  # the same greedy answers, token for token
            assert ta[skill]["accepted"] == int(accepted.sum())
            assert ta[skill]["accuracy"] == pytest.approx(float(accepted.mean()))
            assert ta[skill]["exact_match"] == pytest.approx(float(exact.mean()))
        # and the base row is the base model's
        editor.set_delta({})
        for skill, got in generation.answers(model, "cpu").items():
            assert target["models"]["base"]["skills"][skill]["answers"] == got
        # a Scale-SVD model is another model than task arithmetic's
        assert target["models"]["scale-svd-activation-0.7"]["distance_to_ta"] > 0.05


def test_bad_input_is_one_line(scored, tmp_path, capsys) -> None:
    _, run_dir, script, *_ = scored
    assert script.main(["--run-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such run directory" in err and err.count("\n") == 1
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps({"status": "running", "stage": "trainer"}))
    assert script.main(["--run-dir", str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert "not complete" in err and err.count("\n") == 1
    # --no-record: a constituent without statistics is an error naming it, nothing is recorded
    folder = sorted((run_dir / "cache" / "input-stats").iterdir())[-1]
    task = json.loads((folder / "DONE").read_text())["task"]
    aside = tmp_path / "aside"
    folder.rename(aside)
    try:
        assert script.main(["--run-dir", str(run_dir), "--no-record", "--prompts", "1"]) == 2
        err = capsys.readouterr().err
        assert f"no input statistics of {task}" in err and err.strip().splitlines()[-1].startswith("error: ")
        assert not folder.exists()
    finally:
        aside.rename(folder)
    # a finished run of a manifest without the scale-svd merger: nothing to take its parameters from
    plain = tmp_path / "plain.toml"
    text = (run_dir / "manifest.toml").read_text()
    text = text.replace('methods = ["task_arithmetic", "scale-svd"]', 'methods = ["task_arithmetic"]')
    text = text.replace('[[merger]]\nplugin = "scale-svd"\nparams = { calibration_batches = 2, rank_ratio = 0.5 }\n', "")
    text = text.replace(str(run_dir.parent), str(tmp_path / "runs"))
    plain.write_text(text)
    (tmp_path / "runs" / "scale-svd-scores").mkdir(parents=True)
    (tmp_path / "runs" / "scale-svd-scores" / "run.json").write_text(
        json.dumps({"status": "complete", "manifest": str(plain)}))
    assert script.main(["--run-dir", str(tmp_path / "runs" / "scale-svd-scores")]) == 2
    err = capsys.readouterr().err
    assert "no scale-svd merger" in err and err.count("\n") == 1
