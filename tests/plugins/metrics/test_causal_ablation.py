"""``causal-ablation``: removing an attributed adapter from a merge must hurt its own task, on a real model.

A tiny Qwen2 model is pre-trained for 100 steps and three real PEFT LoRA adapters are trained on it (about
10 s on 2 cores, shared by the module); held-out examples never overlap training ones.
"""

from __future__ import annotations

import json
from functools import partial
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.pipeline.merging import run_target_deltas
from unmerge_core.types import Decomposition, Mask, MergeJob, RunContext, TargetEvaluation, TaskInfo, TrainJob
from unmerge_plugins.maskers.topk import TopKMasker, TopKParams
from unmerge_plugins.mergers.mergekit_merger import MergekitMerger, MergekitParams
from unmerge_plugins.metrics.causal_ablation import (
    COLUMNS,
    CausalAblation,
    CausalParams,
    judge,
    judge_checker,
    one_sided_p,
    quantise,
    sample_targets,
)
from unmerge_plugins.lib.lm import HeldoutSet, WeightEditor, encode_examples, load_causal_lm
from unmerge_plugins.lib.tasks import load_examples
from unmerge_plugins.lib.tiny_model import TinyModelParams
from unmerge_plugins.trainers.peft_lora import PeftLoraParams, PeftLoraTrainer

from helpers import REPO  # noqa: E402
TASKS = ("python-function", "pirate-style", "sql-select")
FAST = {"examples_per_task": 32, "threads": 1}


def task_info(name: str) -> TaskInfo:
    return TaskInfo(name, "other", {"kind": "procedural", "generator": name})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real LoRA adapters on one tiny pre-trained base model."""
    root = tmp_path_factory.mktemp("causal")
    params = PeftLoraParams(tiny=TinyModelParams(pretrain_steps=100), rank=4, alpha=8, learning_rate=1e-2,
                            epochs=2, batch_size=16, num_examples=160, max_length=64)
    trainer = PeftLoraTrainer(params)
    out = {}
    with torch_single_thread():
        for i, name in enumerate(TASKS):
            (root / name).mkdir()
            trainer.train(TrainJob(task_info(name), root / name, 100 + i, root / "workspace", i))
            out[name] = root / name
    return out


class torch_single_thread:
    """Tiny matrices: one thread is faster and does not suffer from a busy machine."""

    def __enter__(self) -> None:
        self.old = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


RUN_TARGETS = tuple(MergeJob(f"known-linear-0{i}", "linear", TASKS[:2], (0.5, 0.5), 11, "known") for i in range(2))


def context(adapters: dict[str, Path], run_dir: Path) -> RunContext:
    mask = TopKMasker(TopKParams(budget=1024)).build_mask([LoraAdapter(p, n) for n, p in adapters.items()])
    merger = MergekitMerger(MergekitParams())
    return RunContext(dict(adapters), {n: task_info(n) for n in adapters}, mask, merger, 7, run_dir, RUN_TARGETS,
                      partial(run_target_deltas, merger, dict(adapters), "mergekit"))


def evaluation(ctx: RunContext | None, coefficients: list[float], *, target_id: str = "known-linear-00",
               tasks: tuple[str, ...] = TASKS[:2], group: str = "known", method: str = "linear",
               decomposer: str = "exact", support: list[bool] | None = None) -> TargetEvaluation:
    weights = tuple(1 / len(tasks) for _ in tasks)
    coef = np.array(coefficients, dtype=np.float64)
    n = 4
    return TargetEvaluation(
        target_id, group, method, tasks, weights, TASKS, np.zeros(n),
        Decomposition(coef, np.zeros(n), None if support is None else np.array(support)),
        {t: np.zeros(n) for t in TASKS}, {t: "other" for t in TASKS},
        MergeJob(target_id, method, tasks, weights, 11, group), ctx, decomposer=decomposer,
    )


def rows_of(run_dir: Path, decomposer: str, target_id: str) -> list[dict]:
    return json.loads((run_dir / "causal" / decomposer / f"{target_id}.json").read_text())["edits"]


# --------------------------------------------------------------------------------------------------
# Decision rule (no model)
# --------------------------------------------------------------------------------------------------


def test_judge_confirms_refutes_and_abstains() -> None:
    rng = np.random.default_rng(0)
    p = CausalParams()
    assert judge(0.5 + 0.1 * rng.standard_normal(64), [0.0, 0.02], p).verdict == "confirmed"
    assert judge(0.001 * rng.standard_normal(64), [0.0, 0.0], p).verdict == "refuted"
    # own task rises, but no more than the others: refuted, not confirmed
    assert judge(0.5 + 0.1 * rng.standard_normal(64), [0.5, 0.5], p).verdict == "refuted"
    # four noisy examples cannot decide
    assert judge(np.array([0.4, -0.3, 0.5, -0.2]), [0.0], p).verdict == "inconclusive"
    j = judge(np.full(8, 0.3), [0.1], p)
    assert j.verdict == "confirmed" and j.effect == pytest.approx(0.2)


def test_one_sided_p_handles_ties_and_constants() -> None:
    assert one_sided_p(np.zeros(10), "greater", "wilcoxon") == 1.0
    assert one_sided_p(np.full(10, 0.1), "greater", "ttest") == 0.0
    assert one_sided_p(np.array([1.0, 2.0, 3.0, 0.0, 2.5, 1.5]), "greater", "wilcoxon") < 0.05
    assert quantise(0.123456, 2) == 0.12 and quantise(0.0, 2) == 0.0


def test_context_none_returns_none_without_loading_a_model() -> None:
    metric = CausalAblation(CausalParams())
    out = metric.compute(evaluation(None, [0.5, 0.5, 0.0]))
    assert set(out) == set(COLUMNS) and all(v is None for v in out.values())
    assert metric.evaluations == 0


def test_sampling_per_cell_and_total() -> None:
    jobs = [MergeJob(tid, method, TASKS[:2], (0.5, 0.5), 0, group) for tid, group, method in (
        ("known-linear-00", "known", "linear"), ("known-linear-01", "known", "linear"),
        ("known-ties-00", "known", "ties"), ("mixed-ties-00", "mixed", "ties"))]
    assert sample_targets(jobs, 1, 2) == ["known-linear-00", "known-ties-00"]
    assert sample_targets(jobs, 2, None) == [j.target_id for j in jobs]
    assert sample_targets(jobs, 0, None) == []


def test_sampling_does_not_depend_on_call_order(tmp_path: Path) -> None:
    """A resumed run calls the metric only for pairs missing from the cache: the sample must not move."""
    ctx = RunContext({}, {}, Mask({}, {}), None, 0, tmp_path, RUN_TARGETS)
    metric = CausalAblation(CausalParams(targets_per_cell=1))
    later = evaluation(ctx, [0, 0, 0], target_id="known-linear-01")
    assert not metric.is_sampled(later)  # seen first, still not the cell's first target
    assert metric.is_sampled(evaluation(ctx, [0, 0, 0], target_id="known-linear-00"))


# --------------------------------------------------------------------------------------------------
# On the tiny model
# --------------------------------------------------------------------------------------------------


def test_removing_a_trained_adapter_raises_its_own_loss_not_the_others(adapters) -> None:
    """The raw claim, without the metric: fails if the edit is a no-op or not undone."""
    base = LoraAdapter(adapters[TASKS[0]]).base_model
    with torch_single_thread():
        model, tok = load_causal_lm(base, torch.device("cpu"))
        data = {t: encode_examples(tok, load_examples(task_info(t), 48, 5, split="heldout"), 64) for t in TASKS}
        heldout = HeldoutSet(data, tok.pad_token_id)
        loaded = {t: LoraAdapter(p) for t, p in adapters.items()}
        modules = loaded[TASKS[0]].module_names
        editor = WeightEditor(model, modules)
        merger = MergekitMerger(MergekitParams())
        job = MergeJob("t", "linear", TASKS[:2], (0.5, 0.5), 0)
        editor.set_delta({m: merger.merge_module(job, m, [loaded[t].delta(m) for t in TASKS[:2]]) for m in modules})
        target = {m: editor.params[m].detach().clone() for m in modules}
        before = heldout.evaluate(model, torch.device("cpu"))
        with editor.edit({m: loaded[TASKS[0]].delta(m) for m in modules}, 0.5):
            changed = max(float((editor.params[m].detach() - target[m]).abs().max()) for m in modules)
            after = heldout.evaluate(model, torch.device("cpu"))
        restored = max(float((editor.params[m].detach() - target[m]).abs().max()) for m in modules)
    rise = {t: float((after[t].loss - before[t].loss).mean()) for t in TASKS}
    assert changed > 1e-3 and restored < 1e-6
    assert rise[TASKS[0]] > 0.1, rise
    assert rise[TASKS[0]] > max(rise[TASKS[1]], rise[TASKS[2]]) + 0.1, rise


def test_metric_confirms_true_attributions_with_controls(adapters, tmp_path) -> None:
    ctx = context(adapters, tmp_path)
    metric = CausalAblation(CausalParams(**FAST))
    out = metric.compute(evaluation(ctx, [0.5, 0.5, 0.0]))
    assert out["causal_confirmed"] == 1.0 and out["causal_refuted"] == 0.0
    assert out["causal_effect"] > 0.1
    # random directions with the same per-module norms are far less selective
    assert out["causal_control"] is not None and out["causal_control"] < out["causal_effect"] / 2
    assert out["causal_fn_cost"] is None  # nothing missed
    rows = rows_of(tmp_path, "exact", "known-linear-00")
    kinds = [r["kind"] for r in rows]
    assert kinds.count("attributed") == 2 and kinds.count("random") == 2 and kinds.count("null") == 1
    attributed = [r for r in rows if r["kind"] == "attributed"]
    for r in attributed:
        assert r["verdict"] == "confirmed" and r["own_delta"] > r["others_delta"] and r["p_value"] < 0.01
    random = {r["atom"]: r for r in rows if r["kind"] == "random"}
    for r in attributed:
        assert random[r["atom"]]["norm"] == pytest.approx(r["norm"], rel=1e-4)
    null = next(r for r in rows if r["kind"] == "null")
    assert null["atom"] == TASKS[2] and null["norm"] == pytest.approx(max(r["norm"] for r in attributed), rel=0.02)
    assert (tmp_path / "causal" / "edits.csv").is_file()


def test_noop_and_false_attributions_are_refuted_and_misses_cost(adapters, tmp_path) -> None:
    ctx = context(adapters, tmp_path)
    metric = CausalAblation(CausalParams(**FAST))
    # python-function attributed with a negligible coefficient (a no-op edit), pirate-style missed
    out = metric.compute(evaluation(ctx, [1e-5, 0.0, 0.0], support=[True, False, False], decomposer="weak"))
    assert out["causal_refuted"] == 1.0 and out["causal_confirmed"] == 0.0
    assert abs(out["causal_effect"]) < 0.01
    assert out["causal_control"] is None  # no confirmation to falsify
    assert out["causal_fn_cost"] > 0.1  # removing the missed constituent hurts its task
    missed = [r for r in rows_of(tmp_path, "weak", "known-linear-00") if r["kind"] == "missed"]
    assert [r["atom"] for r in missed] == [TASKS[1]] and missed[0]["applied"] == 0.5


def test_second_decomposer_with_the_same_coefficients_costs_nothing(adapters, tmp_path) -> None:
    ctx = context(adapters, tmp_path)
    metric = CausalAblation(CausalParams(**FAST))
    first = metric.compute(evaluation(ctx, [0.5, 0.5, 0.0], decomposer="a"))
    n = metric.evaluations
    second = metric.compute(evaluation(ctx, [0.5004, 0.4998, 0.0], decomposer="b"))
    assert metric.evaluations == n and first == second
    assert (tmp_path / "causal" / "b" / "known-linear-00.json").is_file()
    # a target of another cell is evaluated; one of a full cell is not
    skipped = metric.compute(evaluation(ctx, [0.5, 0.5, 0.0], target_id="known-linear-01"))
    assert all(v is None for v in skipped.values()) and metric.evaluations == n


def test_the_details_a_rerun_restores_are_the_files_the_run_wrote(adapters, tmp_path) -> None:
    """A rerun that reuses the cached values (unmerge_core.pipeline.scoring) calls restore_details with
    what metric_details gave after compute: causal/ comes back byte for byte, edits.csv included."""
    import shutil

    ctx = context(adapters, tmp_path)
    metric = CausalAblation(CausalParams(**FAST, null_atoms=0, random_control=False))
    kept = {}
    for name, coef in (("a", [0.5, 0.5, 0.0]), ("b", [0.5, 0.0, 0.0])):
        ev = evaluation(ctx, coef, decomposer=name)
        metric.compute(ev)
        kept[name] = (ev, metric.metric_details(ev))
        assert kept[name][1] is not None and metric.metric_details(ev) is None  # handed over once
    skipped = evaluation(ctx, [0.5, 0.5, 0.0], target_id="known-linear-01")
    metric.compute(skipped)
    assert metric.metric_details(skipped) is None  # not verified: nothing written, nothing kept
    root = tmp_path / "causal"
    written = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert set(written) == {"a/known-linear-00.json", "b/known-linear-00.json", "edits.csv"}
    shutil.rmtree(root)  # what the next run's claim of the run directory does
    fresh = CausalAblation(CausalParams(**FAST, null_atoms=0, random_control=False))
    for name in ("b", "a"):
        ev, details = kept[name]
        fresh.restore_details(ev, json.loads(json.dumps(details)))  # as read back from the cache file
    assert {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == written
    assert fresh.evaluations == 0 and fresh._model is None  # no model was loaded to restore them


def test_exact_match_score_runs_on_the_same_edits(adapters, tmp_path) -> None:
    ctx = context(adapters, tmp_path)
    metric = CausalAblation(CausalParams(score="exact_match", random_control=False, null_atoms=0, **FAST))
    out = metric.compute(evaluation(ctx, [0.5, 0.5, 0.0], decomposer="em"))
    shares = [out[f"causal_{v}"] for v in ("confirmed", "refuted", "inconclusive")]
    assert all(s is not None and 0 <= s <= 1 for s in shares) and sum(shares) == pytest.approx(1.0)
    for r in rows_of(tmp_path, "em", "known-linear-00"):
        assert r["own_delta"] == pytest.approx(-r["own_exact_match_delta"])  # harm = lost exact matches


def test_mask_scope_removes_only_masked_coordinates(adapters, tmp_path) -> None:
    ctx = context(adapters, tmp_path)
    metric = CausalAblation(CausalParams(scope="mask", **FAST))
    direction = metric._direction(ctx, TASKS[0])
    full = LoraAdapter(adapters[TASKS[0]])
    for module, delta in direction.items():
        idx = torch.from_numpy(ctx.mask.indices[module])
        flat = delta.reshape(-1)
        assert torch.equal(flat[idx], full.delta(module).reshape(-1)[idx])
        assert int((flat != 0).sum()) <= len(idx)
    noise = metric._random_like({m: d * 0.5 for m, d in direction.items()}, "k")
    for module, d in direction.items():
        assert float(noise[module].norm()) == pytest.approx(0.5 * float(d.norm()), rel=1e-5)
        assert not bool(((noise[module] != 0) & (d == 0)).any())


def test_teacher_forced_exact_match_equals_greedy_decoding(adapters) -> None:
    base = LoraAdapter(adapters[TASKS[0]]).base_model
    with torch_single_thread():
        model, tok = load_causal_lm(base, torch.device("cpu"))
        adapter = LoraAdapter(adapters[TASKS[0]])
        editor = WeightEditor(model, adapter.module_names)
        editor.set_delta({m: adapter.delta(m) for m in adapter.module_names})
        examples = load_examples(task_info(TASKS[0]), 12, 3, split="heldout")
        scores = HeldoutSet({"t": encode_examples(tok, examples, 64)}, tok.pad_token_id).evaluate(
            model, torch.device("cpu"))["t"]
        for ex, hit in zip(examples, scores.correct):
            prompt = tok(ex.prompt + "\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
            gold = tok(ex.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(gold),
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            assert (out[0, prompt.shape[1]:].tolist() == gold) == bool(hit), ex


MANIFEST = """
name = "causal-e2e"
seed = 5
registry = "{registry}"
[tasks]
known = ["python-function", "pirate-style", "sql-select"]
unknown = ["uppercase"]
[protocol]
groups = ["known", "mixed"]
methods = ["linear", "ties"]
targets_per_group = 2
min_tasks = 2
max_tasks = 2
[trainer]
plugin = "peft-lora"
[trainer.params]
rank = 4
alpha = 8
learning_rate = 1e-2
epochs = 2
batch_size = 16
num_examples = 160
max_length = 64
tiny = {{ pretrain_steps = 100 }}
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = {{ budget = 1024 }}
[[decomposers]]
plugin = "nnls"
[[decomposers]]
plugin = "dot-product"
[[metrics]]
plugin = "causal-ablation"
params = {{ examples_per_task = 24, threads = 1, null_atoms = 1 }}
[output]
dir = "{out}"
"""


@pytest.mark.slow
def test_runner_passes_context_and_decomposer_label(tmp_path) -> None:
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.pipeline.runner import Runner

    path = tmp_path / "causal.toml"
    path.write_text(textwrap.dedent(MANIFEST.format(registry=REPO / "registry.toml", out=tmp_path / "runs")))
    result = Runner(load_manifest(path), progress=False, echo=lambda s: None).run()
    assert {p.name for p in (result.run_dir / "causal").iterdir()} == {"nnls", "dot-product", "edits.csv"}
    rows = [r for r in result.table.rows if r.decomposer == "nnls" and r.group == "known"]
    assert rows and all(r.metrics["causal_confirmed"] is not None for r in rows)
    summary = (result.run_dir / "summary.md").read_text()
    assert "causal_confirmed" in summary
    # a rerun reuses every metric value and still leaves the details of the causal check in causal/
    root = result.run_dir / "causal"
    written = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    again = Runner(load_manifest(path), progress=False, echo=lambda s: None).run()
    assert {t.stage: t.reused for t in again.timings}["metric"] == len(again.table.rows)
    assert {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == written


# --------------------------------------------------------------------------------------------------
# unmerge attribute --verify: the causal check on a model the toolkit did not make
# --------------------------------------------------------------------------------------------------


def test_attribute_verify_confirms_a_real_skill_on_the_target_itself(adapters, tmp_path) -> None:
    """A full model = base + pirate-style's ΔW (merged by PEFT): the attribution is confirmed causally."""
    from helpers import merged_full_model
    from unmerge_core.pipeline.attribute import AttributeRequest, run_attribute

    base = Path(LoraAdapter(adapters["pirate-style"]).base_model)
    target = merged_full_model(base, adapters["pirate-style"], tmp_path / "merged")
    dictionary = tmp_path / "dict"
    dictionary.mkdir()
    for name, path in adapters.items():
        (dictionary / name).symlink_to(path, target_is_directory=True)
    registry = REPO / "registry.toml"
    request = AttributeRequest(targets=[("merged", target)], output_dir=tmp_path / "out", base=base,
                               dictionary=dictionary, masker_params={"budget": 2048}, verify=True, registry=registry,
                               metrics=[("support", {}), ("causal-ablation", FAST)])
    lines: list[str] = []
    with torch_single_thread():
        result = run_attribute(request, echo=lines.append)
    attribution = result.reports[0].attributions[0]
    skills = {s.name: s for s in attribution.skills}
    assert "pirate-style" in skills and skills["pirate-style"].causal == "confirmed"
    saved = json.loads((tmp_path / "out" / "attribution.json").read_text())
    assert saved["targets"][0]["results"][0]["skills"][0]["causal"] == "confirmed"
    assert (tmp_path / "out" / "causal" / "edits.csv").is_file()


def test_attribute_verify_needs_a_base_and_task_data(adapters, tmp_path) -> None:
    from unmerge_core.errors import UnmergeError
    from unmerge_core.pipeline.attribute import AttributeRequest, run_attribute

    request = AttributeRequest(targets=[("t", adapters["sql-select"])], output_dir=tmp_path / "out",
                               adapters=list(adapters.items()), verify=True)
    with pytest.raises(UnmergeError, match=r"^--verify: pass --base PATH"):
        run_attribute(request, echo=lambda s: None)
    base = Path(LoraAdapter(adapters["pirate-style"]).base_model)
    unknown = AttributeRequest(targets=[("t", adapters["sql-select"])], output_dir=tmp_path / "out", base=base,
                               adapters=list(adapters.items()), verify=True, registry=REPO / "registry.toml",
                               task_names={"nope": "x"})
    with pytest.raises(UnmergeError, match=r"--task nope=\.\.\.: no skill 'nope' in the dictionary"):
        run_attribute(unknown, echo=lambda s: None)


def test_a_target_scored_after_others_equals_a_fresh_process(adapters, tmp_path) -> None:
    """Hostile audit 20.9: resumed after kill -9 in the metric stage, causal_effect / _control / _null_effect
    differed by ~1e-7 from a clean run: each edit's subtract-then-add-back left the target's weights a few
    ulps off, so a decomposer scored after another on the same target saw other weights than in a fresh
    process (the resumed run, whose first decomposer came from the cache). Now bit-identical."""
    ctx = context(adapters, tmp_path / "warm")
    warm = CausalAblation(CausalParams(**FAST))
    warm.compute(evaluation(ctx, [0.5, 0.5, 0.0], decomposer="a"))
    after_others = warm.compute(evaluation(ctx, [0.31, 0.62, 0.0], decomposer="b"))
    fresh = CausalAblation(CausalParams(**FAST)).compute(evaluation(context(adapters, tmp_path / "cold"), [0.31, 0.62, 0.0],
                                                                    decomposer="b"))
    assert after_others["causal_effect"] is not None and after_others["causal_null_effect"] is not None
    assert json.dumps(after_others) == json.dumps(fresh)
    warm_rows = (tmp_path / "warm" / "causal" / "b" / "known-linear-00.json").read_bytes()
    assert warm_rows == (tmp_path / "cold" / "causal" / "b" / "known-linear-00.json").read_bytes()


# --------------------------------------------------------------------------------------------------
# score = "checker": greedy answers judged by each skill's checker (issue 21, item 6)
# --------------------------------------------------------------------------------------------------

CHAT = ("pirate-dialect", "json-compact", "uppercase")  # the first two unknown to the pre-trained base


def stand_in_checkers(task: TaskInfo):
    """Stand-ins for lib/tasks/checkers.py: validators of what each adapter teaches the tiny model."""
    return {
        "pirate-dialect": lambda ex, a: "yo" in a and "arr" not in a,  # the base says "..., arr!"
        "json-compact": lambda ex, a: a.startswith("{") and ": " not in a and ", " not in a,
        "uppercase": lambda ex, a: a.strip().isupper(),
    }.get(task.source.get("generator"))


@pytest.fixture(scope="module")
def chat_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal-checker")
    params = PeftLoraParams(tiny=TinyModelParams(pretrain_steps=100), rank=4, alpha=8, learning_rate=1e-2,
                            epochs=2, batch_size=16, num_examples=160, max_length=64)
    trainer = PeftLoraTrainer(params)
    out = {}
    with torch_single_thread():
        for i, name in enumerate(CHAT):
            (root / name).mkdir()
            trainer.train(TrainJob(task_info(name), root / name, 100 + i, root / "workspace", i))
            out[name] = root / name
    return out


CHAT_TARGETS = (MergeJob("known-linear-00", "linear", CHAT[:2], (1.0, 0.5), 11, "known"),)


def chat_context(adapters: dict[str, Path], run_dir: Path) -> RunContext:
    mask = TopKMasker(TopKParams(budget=1024)).build_mask([LoraAdapter(p, n) for n, p in adapters.items()])
    merger = MergekitMerger(MergekitParams(normalize=False))  # the target is base + 1.0·τ_pirate + 0.5·τ_json
    return RunContext(dict(adapters), {n: task_info(n) for n in adapters}, mask, merger, 7, run_dir, CHAT_TARGETS,
                      partial(run_target_deltas, merger, dict(adapters), "mergekit"))


def chat_evaluation(ctx: RunContext, coefficients: list[float], decomposer: str = "exact") -> TargetEvaluation:
    job = CHAT_TARGETS[0]
    n = 4
    return TargetEvaluation(
        job.target_id, job.group, job.method, job.tasks, job.weights, CHAT, np.zeros(n),
        Decomposition(np.array(coefficients, dtype=np.float64), np.zeros(n), None),
        {t: np.zeros(n) for t in CHAT}, {t: "other" for t in CHAT}, job, ctx, decomposer=decomposer,
    )


CHECKER = {"score": "checker", "max_prompts": 32, "threads": 1, "examples_per_task": 32}


def test_judge_checker_confirms_refutes_and_abstains() -> None:
    p = CausalParams(score="checker")
    lost = np.r_[np.ones(20), np.zeros(12)]  # 20 of 32 prompts lost, none gained
    assert judge_checker(lost, [0.0, 0.03], p).verdict == "confirmed"
    j = judge_checker(lost, [0.0, 0.03], p)
    assert j.own_delta == pytest.approx(20 / 32) and j.p_value == pytest.approx(0.5 ** 20)
    assert judge_checker(lost, [0.4, 0.0], p).verdict == "inconclusive"  # another skill does not hold
    assert judge_checker(lost, [0.7, 0.0], p).verdict == "refuted"  # it falls more: not specific
    assert judge_checker(np.zeros(32), [0.0], p).verdict == "refuted"  # nothing lost: below min_drop
    flips = np.r_[np.ones(9), -np.ones(4), np.zeros(19)]  # drop 5/32: neither
    assert judge_checker(flips, [0.0], p).verdict == "inconclusive"
    assert judge_checker(np.r_[np.ones(5), np.zeros(3)], [0.0], p).verdict == "inconclusive"  # too few prompts


def test_checker_score_drops_when_the_adapter_is_removed_and_the_others_hold(chat_adapters, tmp_path) -> None:
    ctx = chat_context(chat_adapters, tmp_path)
    metric = CausalAblation(CausalParams(**CHECKER), checker_for=stand_in_checkers)
    out = metric.compute(chat_evaluation(ctx, [1.0, 0.5, 0.0]))
    rows = rows_of(tmp_path, "exact", "known-linear-00")
    pirate = next(r for r in rows if r["kind"] == "attributed" and r["atom"] == "pirate-dialect")
    assert pirate["score"] == "checker" and pirate["own_checker_before"] >= 0.75
    assert pirate["own_checker_after"] <= 0.1 and pirate["lost"] >= 24
    assert pirate["others_max_delta"] <= 0.15  # json-compact and uppercase hold
    assert pirate["verdict"] == "confirmed" and pirate["p_value"] < 1e-6
    assert out["causal_verdict[pirate-dialect]"] == 1.0
    target = json.loads((tmp_path / "causal" / "exact" / "known-linear-00.json").read_text())["target_scores"]
    assert set(target["pirate-dialect"]) == {"loss", "exact_match", "checker"}
    # the random direction of the same norms is no confirmation
    control = next(r for r in rows if r["kind"] == "random" and r["atom"] == "pirate-dialect")
    assert control["verdict"] != "confirmed" and control["own_delta"] < pirate["own_delta"]


def test_a_null_control_does_not_confirm_under_the_checker(chat_adapters, tmp_path) -> None:
    """uppercase is neither attributed nor a constituent: removed at the norm of the largest attributed
    removal, its skill (absent from the target) cannot lose what it does not have."""
    ctx = chat_context(chat_adapters, tmp_path)
    metric = CausalAblation(CausalParams(**CHECKER, random_control=False), checker_for=stand_in_checkers)
    out = metric.compute(chat_evaluation(ctx, [1.0, 0.5, 0.0], decomposer="n"))
    null = [r for r in rows_of(tmp_path, "n", "known-linear-00") if r["kind"] == "null"]
    assert [r["atom"] for r in null] == ["uppercase"] and null[0]["verdict"] != "confirmed"
    assert out["causal_null_confirmed"] == 0.0


def test_checker_score_answers_only_what_can_drop_and_forces_no_teacher(chat_adapters, tmp_path, monkeypatch) -> None:
    """Before: every edit ran a teacher-forced pass over examples_per_task examples of every skill and
    answered every skill's prompts again (on SmolLM2 one evaluation of 12 skills took over 12 minutes).
    Now nothing is teacher-forced and an edit re-answers its own skill and the skills the target does."""
    from unmerge_plugins.lib import generation
    from unmerge_plugins.lib import lm

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("teacher-forced evaluation under the checker score")

    monkeypatch.setattr(lm.HeldoutSet, "evaluate", no_teacher)
    asked: list[tuple[str, ...]] = []
    answers = generation.GenerationSet.answers

    def recording(self, model, device="cpu", tasks=None):  # type: ignore[no-untyped-def]
        got = answers(self, model, device, tasks)
        asked.append(tuple(got))
        return got

    monkeypatch.setattr(generation.GenerationSet, "answers", recording)
    ctx = chat_context(chat_adapters, tmp_path)
    never = lambda task: (lambda ex, a: False) if task.name == "uppercase" else stand_in_checkers(task)  # noqa: E731
    metric = CausalAblation(CausalParams(**CHECKER, random_control=False), checker_for=never)
    out = metric.compute(chat_evaluation(ctx, [1.0, 0.5, 0.0]))
    assert out["causal_verdict[pirate-dialect]"] == 1.0 and out["causal_null_confirmed"] == 0.0
    target = json.loads((tmp_path / "causal" / "exact" / "known-linear-00.json").read_text())
    doing = {t for t, s in target["target_scores"].items() if s["checker"] > 0}
    assert asked[0] == CHAT and asked[1] == CHAT  # the base model, then the target: every skill
    for edit, skills in zip(target["edits"], asked[2:], strict=True):
        assert set(skills) == doing | {edit["atom"]}, (edit["kind"], edit["atom"], skills)
        assert edit["own_loss_delta"] is None
    assert doing == {"pirate-dialect", "json-compact"}  # uppercase (never accepted) is answered for its own edit only
    assert [len(skills) for skills in asked[2:]] == [2, 2, 3]  # pirate, json-compact, the null control uppercase
    assert target["target_scores"]["pirate-dialect"]["loss"] is None


def test_decomposers_limits_verification(chat_adapters, tmp_path) -> None:
    ctx = chat_context(chat_adapters, tmp_path)
    metric = CausalAblation(CausalParams(**CHECKER, random_control=False, null_atoms=0, decomposers=["a"]),
                            checker_for=stand_in_checkers)
    assert set(metric.compute(chat_evaluation(ctx, [1.0, 0.5, 0.0], decomposer="b")).values()) == {None}
    assert metric.evaluations == 0  # nothing loaded for a decomposer that is not verified
    assert metric.compute(chat_evaluation(ctx, [1.0, 0.5, 0.0], decomposer="a"))["causal_confirmed"] is not None
    with pytest.raises(ValueError):
        CausalParams(decomposers=[])


def test_checker_score_without_checkers_is_one_line_naming_the_skills(chat_adapters, tmp_path) -> None:
    from unmerge_core.errors import UnmergeError

    ctx = chat_context(chat_adapters, tmp_path)
    only_pirate = lambda task: stand_in_checkers(task) if task.name == "pirate-dialect" else None  # noqa: E731
    metric = CausalAblation(CausalParams(**CHECKER), checker_for=only_pirate)
    with pytest.raises(UnmergeError, match=r'^causal-ablation: score = "checker" needs a checker for every skill; '
                                           r"none for json-compact, uppercase \(") as err:
        metric.compute(chat_evaluation(ctx, [1.0, 0.5, 0.0]))
    assert "\n" not in str(err.value) and metric.evaluations == 0
    # auto falls back to the loss when a skill has no checker, and uses the checkers when all have one
    auto = CausalAblation(CausalParams(**{**CHECKER, "score": "auto"}, random_control=False, null_atoms=0),
                          checker_for=only_pirate)
    auto.compute(chat_evaluation(ctx, [1.0, 0.5, 0.0], decomposer="auto"))
    assert {r["score"] for r in rows_of(tmp_path, "auto", "known-linear-00")} == {"loss"}
    full = CausalAblation(CausalParams(**{**CHECKER, "score": "auto"}, random_control=False, null_atoms=0),
                          checker_for=stand_in_checkers)
    full.compute(chat_evaluation(chat_context(chat_adapters, tmp_path / "b"), [1.0, 0.5, 0.0], decomposer="auto"))
    assert {r["score"] for r in rows_of(tmp_path / "b", "auto", "known-linear-00")} == {"checker"}


def test_checker_scores_of_a_target_after_others_equal_a_fresh_process(chat_adapters, tmp_path) -> None:
    """Generation is batched in fixed batches: the answers depend on the weights only (a resumed run is
    byte-identical)."""
    params = CausalParams(**CHECKER, null_atoms=1)
    warm = CausalAblation(params, checker_for=stand_in_checkers)
    warm.compute(chat_evaluation(chat_context(chat_adapters, tmp_path / "warm"), [1.0, 0.5, 0.0], decomposer="a"))
    again = warm.compute(chat_evaluation(chat_context(chat_adapters, tmp_path / "warm"), [0.8, 0.3, 0.0], decomposer="b"))
    fresh = CausalAblation(params, checker_for=stand_in_checkers).compute(
        chat_evaluation(chat_context(chat_adapters, tmp_path / "cold"), [0.8, 0.3, 0.0], decomposer="b"))
    assert json.dumps(again) == json.dumps(fresh)
    assert ((tmp_path / "warm" / "causal" / "b" / "known-linear-00.json").read_bytes()
            == (tmp_path / "cold" / "causal" / "b" / "known-linear-00.json").read_bytes())


def test_attribute_verify_task_data_uses_the_registry_tasks_checker(chat_adapters, tmp_path, monkeypatch) -> None:
    """``--task-data SKILL=FILE.jsonl`` where SKILL is a registry task: its answers are judged by that task's
    checker (a skill without one would get exact match under score = "checker")."""
    import random

    from helpers import merged_full_model
    from unmerge_core.pipeline.attribute import AttributeRequest, run_attribute, verification_tasks
    from unmerge_plugins.lib import generation
    from unmerge_plugins.lib.tasks import GENERATORS

    monkeypatch.setattr(generation, "registry_checker_for", stand_in_checkers)
    rng = random.Random(0)
    data = tmp_path / "pirate.jsonl"
    data.write_text("".join(json.dumps({"prompt": ex.prompt, "response": ex.response}) + "\n"
                            for ex in (GENERATORS["pirate-dialect"](rng) for _ in range(600))))
    base = Path(LoraAdapter(chat_adapters["pirate-dialect"]).base_model)
    target = merged_full_model(base, chat_adapters["pirate-dialect"], tmp_path / "merged")
    dictionary = tmp_path / "dict"
    dictionary.mkdir()
    for name in ("pirate-dialect", "uppercase"):
        (dictionary / name).symlink_to(chat_adapters[name], target_is_directory=True)
    request = AttributeRequest(targets=[("merged", target)], output_dir=tmp_path / "out", base=base,
                               dictionary=dictionary, masker_params={"budget": 2048}, verify=True,
                               registry=REPO / "registry.toml", task_data={"pirate-dialect": data},
                               metrics=[("causal-ablation", {**CHECKER, "examples_per_task": 32})])
    tasks = verification_tasks(request, ["pirate-dialect", "uppercase"], warn=lambda s: None)
    assert tasks["pirate-dialect"].source["kind"] == "jsonl"
    assert tasks["pirate-dialect"].source["checker_task"]["name"] == "pirate-dialect"
    assert generation.resolve_checker(tasks["pirate-dialect"]) is not None
    with torch_single_thread():
        result = run_attribute(request, echo=lambda s: None)
    skills = {s.name: s for s in result.reports[0].attributions[0].skills}
    assert skills["pirate-dialect"].causal == "confirmed"
    rows = [r for r in rows_of(tmp_path / "out", next(p.name for p in (tmp_path / "out" / "causal").iterdir()
                                                       if p.is_dir()), "merged")]
    assert {r["score"] for r in rows} == {"checker"}


def test_attribute_verify_defaults_to_checkers_on_an_instruct_base(tmp_path) -> None:
    from unmerge_core.pipeline.attribute import _verify_defaults, has_chat_template

    (tmp_path / "instruct").mkdir()
    (tmp_path / "instruct" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "tokenizer_config.json").write_text("{}")
    assert has_chat_template(tmp_path / "instruct") and not has_chat_template(tmp_path / "plain")
    assert not has_chat_template(None) and not has_chat_template(tmp_path / "missing")
    assert _verify_defaults("causal-ablation", 3, tmp_path / "instruct") == {"targets_per_cell": 3, "score": "auto"}
    assert _verify_defaults("causal-ablation", 3, tmp_path / "plain") == {"targets_per_cell": 3}


def test_transferred_skills_are_the_unattributed_ones_the_target_does_better_than_the_base() -> None:
    """On SmolLM2 a merge of sort + uppercase answered 75 % of the JSON prompts (base 0 %): removing
    uppercase took JSON down with it, and the attribution of uppercase was 'refuted' for a skill nobody
    merged. Such a transferred skill is left out of "the others hold"; an attributed skill, or one at its
    base level, still counts."""
    from unmerge_plugins.metrics.causal_ablation import transferred_skills

    target = {"sort": 0.4, "uppercase": 0.5, "json": 0.75, "markdown": 1.0, "pirate": 0.1}
    base = {"sort": 0.0, "uppercase": 0.0, "json": 0.0, "markdown": 0.95, "pirate": 0.0}
    assert transferred_skills(target, base, {"sort", "uppercase"}, 0.15) == {"json"}
    assert transferred_skills(target, base, {"sort", "uppercase", "json"}, 0.15) == set()
    assert transferred_skills(target, base, set(), 0.15) == {"sort", "uppercase", "json"}
    params = CausalParams(score="checker")
    others_with_json = [0.0, 0.625]          # sort held, json fell
    own = np.array([1.0] * 8 + [0.0] * 8)    # uppercase: 8 of 16 prompts lost, none gained
    assert judge_checker(own, others_with_json, params).verdict == "refuted"
    assert judge_checker(own, others_with_json[:1], params).verdict == "confirmed"


def test_a_removal_specific_to_its_skill_confirms_when_another_skill_moves_a_little() -> None:
    """On SmolLM2's TSV-M merge removing markdown-row lost 15 of 16 of its prompts while word-problem fell
    by 0.31 (5 prompts): 'inconclusive' under a fixed 0.15 tolerance. The own skill falling by at least
    min_drop more than any other is specific; falling less than another is not."""
    p = CausalParams(score="checker")
    markdown = np.r_[np.ones(15), np.zeros(1)]
    assert judge_checker(markdown, [0.31, 0.0], p).verdict == "confirmed"
    assert judge_checker(markdown, [0.75], p).verdict == "inconclusive"   # margin 0.19 < min_drop
    uppercase = np.r_[np.ones(4), np.zeros(12)]
    assert judge_checker(uppercase, [0.31], p).verdict == "refuted"       # another skill fell more


# --------------------------------------------------------------------------------------------------
# not-performed: a skill the target does not do cannot be confirmed or refuted by removing it
# --------------------------------------------------------------------------------------------------


def test_performs_needs_the_gain_over_the_base_and_a_significant_mcnemar_test() -> None:
    """On SmolLM2 6 of 19 checks were 'inconclusive' for skills the merge barely performs (checker 0.00-0.38
    on 16 prompts, the base at 0): markdown-row at 6 of 16 lost all 6, p = 0.016 > alpha."""
    from unmerge_plugins.metrics.causal_ablation import performs

    p = CausalParams(score="checker")
    zero = np.zeros(16, dtype=bool)
    six = np.r_[np.ones(6), np.zeros(10)].astype(bool)
    markdown = performs(six, zero, p)
    assert (markdown.gain, markdown.won, markdown.lost) == (0.375, 6, 0)
    assert markdown.p_value == pytest.approx(0.5 ** 6) and not markdown.performed  # 0.0156 ≥ alpha = 0.01
    assert performs(np.r_[np.ones(7), np.zeros(9)].astype(bool), zero, p).performed  # 0.5**7 = 0.0078
    assert not performs(zero, zero, p).performed  # pirate at 0.00
    assert not performs(np.r_[np.ones(4), np.zeros(12)].astype(bool), zero, p).performed  # sort at 0.25
    # significant but small: a removal that only went back to the base could not drop by min_drop
    many = np.r_[np.ones(20), np.zeros(80)].astype(bool)
    small = performs(many, np.zeros(100, dtype=bool), CausalParams(score="checker", performed_gain=0.25))
    assert small.p_value < 1e-5 and not small.performed
    assert performs(many, np.zeros(100, dtype=bool), CausalParams(score="checker", performed_gain=0.2)).performed
    # the base already does it: the target at 1.0 against 0.9 is no measurable gain
    base = np.r_[np.ones(29), np.zeros(3)].astype(bool)
    assert not performs(np.ones(32, dtype=bool), base, p).performed
    # the rule is paired: the same score on other prompts is no gain
    assert performs(np.r_[np.ones(16), np.zeros(16)].astype(bool),
                    np.r_[np.zeros(16), np.ones(16)].astype(bool), p).gain == 0.0
    assert performs(zero, zero, CausalParams(score="checker", performed_gain=None)).performed  # rule off
    with pytest.raises(ValueError, match="differ in number"):
        performs(zero, np.zeros(8, dtype=bool), p)


def test_an_attributed_skill_the_target_does_not_perform_is_not_performed(chat_adapters, tmp_path) -> None:
    """The target is 1.0·pirate + 0.5·json; uppercase attributed at 0.3 is a skill neither the target nor
    the base does: removing it cannot show anything (before: 'refuted', counted against the decomposer)."""
    ctx = chat_context(chat_adapters, tmp_path)
    metric = CausalAblation(CausalParams(**CHECKER, random_control=False, null_atoms=0),
                            checker_for=stand_in_checkers)
    out = metric.compute(chat_evaluation(ctx, [1.0, 0.5, 0.3]))
    rows = {r["atom"]: r for r in rows_of(tmp_path, "exact", "known-linear-00") if r["kind"] == "attributed"}
    upper, pirate = rows["uppercase"], rows["pirate-dialect"]
    assert upper["verdict"] == "not-performed" and upper["performed"] is False
    assert upper["own_checker_before"] - upper["own_checker_base"] == pytest.approx(upper["performed_gain"])
    assert upper["performed_gain"] < 0.25 and upper["performed_p"] >= 0.01
    assert pirate["verdict"] == "confirmed" and pirate["performed"] is True and pirate["performed_p"] < 0.01
    assert out["causal_verdict[uppercase]"] == 0.0 and out["causal_performed[uppercase]"] == 0.0
    assert out["causal_performed[pirate-dialect]"] == 1.0
    # both denominators: shares of every attributed atom add up to 1; the rate over performed skills
    assert out["causal_n_attributed"] == 3.0
    n_performed = sum(r["performed"] for r in rows.values())
    assert out["causal_n_performed"] == float(n_performed) and 1 <= n_performed <= 2
    assert out["causal_not_performed"] == pytest.approx((3 - n_performed) / 3)
    shares = [out[c] for c in ("causal_confirmed", "causal_refuted", "causal_inconclusive", "causal_not_performed")]
    assert sum(shares) == pytest.approx(1.0)
    confirmed = sum(r["verdict"] == "confirmed" for r in rows.values())
    assert out["causal_confirmed"] == pytest.approx(confirmed / 3)
    assert out["causal_confirmed_performed"] == pytest.approx(confirmed / n_performed)


def test_the_not_performed_rule_is_off_under_the_loss_score_and_by_parameter(adapters, chat_adapters, tmp_path) -> None:
    loss = CausalAblation(CausalParams(**FAST, null_atoms=0, random_control=False))
    out = loss.compute(evaluation(context(adapters, tmp_path / "loss"), [0.5, 0.5, 0.0]))
    assert out["causal_not_performed"] is None and out["causal_confirmed_performed"] is None
    assert out["causal_n_performed"] is None and out["causal_n_attributed"] == 2.0
    assert not any(k.startswith("causal_performed[") for k in out)
    off = CausalAblation(CausalParams(**CHECKER, random_control=False, null_atoms=0, performed_gain=None),
                         checker_for=stand_in_checkers)
    out = off.compute(chat_evaluation(chat_context(chat_adapters, tmp_path / "off"), [1.0, 0.5, 0.3]))
    assert out["causal_not_performed"] == 0.0 and out["causal_n_performed"] == 3.0
    rows = rows_of(tmp_path / "off", "exact", "known-linear-00")
    assert all(r["verdict"] != "not-performed" for r in rows)


# --------------------------------------------------------------------------------------------------
# autocast: greedy decoding in bf16 where the CPU computes it natively
# --------------------------------------------------------------------------------------------------


def test_bf16_autocast_is_refused_in_one_line_on_a_cpu_without_bf16(chat_adapters, tmp_path, monkeypatch) -> None:
    from unmerge_core import UnmergeError
    from unmerge_plugins.lib import training

    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: False)
    loaded = []
    monkeypatch.setattr("unmerge_plugins.metrics.causal_ablation.load_causal_lm", lambda *a: loaded.append(a))
    metric = CausalAblation(CausalParams(**CHECKER, autocast="bf16", device="cpu"), checker_for=stand_in_checkers)
    with pytest.raises(UnmergeError) as info:
        metric.compute(chat_evaluation(chat_context(chat_adapters, tmp_path), [1.0, 0.5, 0.0]))
    assert str(info.value) == ("causal-ablation: autocast = 'bf16' needs a CPU with native bf16 (avx512_bf16, AMX "
                               "or Arm bf16) and this one has none; set autocast = 'off'")
    assert not loaded  # refused before the model is loaded


@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_greedy_answers_run_under_the_asked_precision(chat_adapters, tmp_path, monkeypatch, autocast) -> None:
    from unmerge_plugins.lib import generation
    from unmerge_plugins.lib.training import cpu_supports_bf16

    if autocast == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    seen: set[tuple[bool, torch.dtype]] = set()
    answers = generation.GenerationSet.answers

    def recording(self, model, device="cpu", tasks=None):  # type: ignore[no-untyped-def]
        seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return answers(self, model, device, tasks)

    monkeypatch.setattr(generation.GenerationSet, "answers", recording)
    metric = CausalAblation(CausalParams(**CHECKER, autocast=autocast, device="cpu", null_atoms=0),
                            checker_for=stand_in_checkers)
    out = metric.compute(chat_evaluation(chat_context(chat_adapters, tmp_path), [1.0, 0.5, 0.0]))
    assert {enabled for enabled, _ in seen} == {autocast == "bf16"}
    if autocast == "bf16":
        assert {dtype for _, dtype in seen} == {torch.bfloat16}
        assert all(p.dtype == torch.float32 for p in metric._model.parameters())  # edits stay exact in float32
    assert out["causal_verdict[pirate-dialect]"] == 1.0  # the tiny model's clear case holds in both
