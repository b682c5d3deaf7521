"""Scenarios outside the laboratory: targets made from other trainings of the tasks ([[variants]]),
several trainings of a skill in the dictionary, full fine-tunes, close relatives, a shared store."""

from __future__ import annotations

import json

import pytest
import torch
from unmerge_plugins.metrics.support import rank_auc

from unmerge_core import LoraAdapter
from unmerge_core.config.manifest import load_manifest
from unmerge_core.errors import UnmergeError
from unmerge_core.pipeline.runner import Runner

VARIANT = '''
[[variants]]
name = "other"
plugin = "synthetic"
params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, rank = 6, shared = 0.3 }
'''


def run(path):
    return Runner(load_manifest(path), progress=False, echo=lambda s: None).run()


def with_variant(write_manifest, protocol: str = "", tasks: str = "", name: str = "manifest.toml"):
    return write_manifest(name=name, **{
        "[merger]": VARIANT.strip() + "\n[merger]",
        "[protocol]": "[protocol]\n" + protocol,
        "[tasks]": "[tasks]\n" + tasks,
    })


def test_targets_made_from_a_variant_name_their_sources(write_manifest) -> None:
    result = run(with_variant(write_manifest, protocol='constituents = ["other"]'))
    targets = json.loads((result.run_dir / "targets.json").read_text())
    assert all(t["sources"] == ["other"] * len(t["tasks"]) for t in targets)
    adapters = json.loads((result.run_dir / "adapters.json").read_text())
    assert {k for k in adapters if "@" in k} == {f"{t}@other" for t in ("alpha", "beta", "gamma", "delta", "epsilon",
                                                                        "zeta", "eta")}
    # an independent training: same task, other seeds, so not the dictionary's atom
    a, b = LoraAdapter(adapters["alpha"]), LoraAdapter(adapters["alpha@other"])
    assert not torch.equal(a.delta("layers.0.q"), b.delta("layers.0.q"))
    rows = [r for r in result.table.rows if r.decomposer == "nnls" and r.group == "known"]
    assert rows and all(r.metrics["recall_other"] is not None for r in rows)
    assert all(r.metrics["recon_error"] > 1e-6 for r in rows if r.method == "linear")  # not exactly in the span


def test_without_constituents_the_dictionary_adapters_make_the_targets(write_manifest) -> None:
    result = run(with_variant(write_manifest))
    targets = json.loads((result.run_dir / "targets.json").read_text())
    assert all("sources" not in t for t in targets)  # and the targets' cache keys are unchanged


def test_several_trainings_of_a_skill_are_judged_as_one_skill(write_manifest) -> None:
    result = run(with_variant(write_manifest, protocol='constituents = ["other"]',
                              tasks='dictionary_variants = ["other"]'))
    atoms = result.table.atom_names
    assert len(atoms) == 10 and "alpha@other" in atoms
    for row in result.table.rows:
        if row.group == "known" and row.method == "linear" and row.decomposer == "nnls":
            # the targets are made of the very atoms "x@other": found exactly, as skills
            assert row.metrics["precision"] == 1.0 and row.metrics["recall"] == 1.0
            assert row.metrics["sparsity"] == len(row.true_tasks)


@pytest.mark.parametrize(("edit", "message"), [
    ('constituents = ["nope"]', "protocol.constituents: 'nope' is not a [[variants]] name; choose one of: other"),
])
def test_variant_names_are_checked(write_manifest, edit, message) -> None:
    with pytest.raises(UnmergeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_manifest(with_variant(write_manifest, protocol=edit))


def test_a_variant_of_an_unknown_task_is_refused(write_manifest) -> None:
    path = write_manifest(**{"[merger]": VARIANT.strip() + '\ntasks = ["omega"]\n[merger]'})
    with pytest.raises(UnmergeError, match=r"variants\[0\]\.tasks\[0\]: 'omega' is not a task of this manifest"):
        load_manifest(path)


def test_two_manifests_share_a_store(write_manifest, workdir) -> None:
    store = f'store = "{workdir / "store"}"'
    first = run(write_manifest(name="a.toml", **{'name = "synthetic-test"': 'name = "first"', "[output]": "[output]\n" + store}))
    second = run(write_manifest(name="b.toml", **{'name = "synthetic-test"': 'name = "second"', "[output]": "[output]\n" + store}))
    timings = {t.stage: t for t in second.timings}
    assert timings["trainer"].reused == timings["trainer"].jobs == 7
    assert not (first.run_dir / "cache").exists() and (workdir / "store" / "cache" / "adapters").is_dir()
    assert (second.run_dir / "summary.csv").read_text() == (first.run_dir / "summary.csv").read_text()


def test_rank_auc() -> None:
    assert rank_auc({"a": 0.9, "b": 0.1, "c": 0.5}, {"a", "c"}) == 1.0
    assert rank_auc({"a": 0.1, "b": 0.9}, {"a"}) == 0.0
    assert rank_auc({"a": 0.5, "b": 0.5}, {"a"}) == 0.5
    assert rank_auc({"a": 0.5}, {"a"}) is None and rank_auc({"a": 0.5}, set()) is None


def test_relatives_do_not_change_the_base_models_corpus() -> None:
    from unmerge_plugins.lib.tasks import GENERATORS, corpus_for_tokenizer
    from unmerge_plugins.lib.tasks.generators import PRETRAINING_TASKS

    assert {"pirate-dialect", "json-compact"} <= set(GENERATORS) and not {"pirate-dialect", "json-compact"} & set(
        PRETRAINING_TASKS)
    assert len(corpus_for_tokenizer(2)) == 2 * 16


def test_full_finetune_is_stored_exactly_as_a_full_rank_adapter(tmp_path) -> None:
    from unmerge_plugins.lib.tiny_model import TinyModelParams
    from unmerge_plugins.trainers.full_finetune import FullFinetuneParams, FullFinetuneTrainer

    from unmerge_core import TaskInfo, TrainJob

    tiny = TinyModelParams(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                           pretrain_steps=0)
    params = FullFinetuneParams(tiny=tiny, num_examples=16, epochs=1, batch_size=8, max_length=48)
    out = tmp_path / "out"
    out.mkdir()
    task = TaskInfo("reverse-words", "other", {"kind": "procedural", "generator": "reverse-words"})
    FullFinetuneTrainer(params).train(TrainJob(task, out, 3, tmp_path / "ws"))
    adapter = LoraAdapter(out)
    assert len(adapter.module_names) == 8  # 2 layers × q/k/v/o
    for module in adapter.module_names:
        n_out, n_in = adapter.modules[module].shape
        assert adapter.modules[module].rank == min(n_out, n_in) and adapter.scale(module) == 1.0
        delta = adapter.delta(module).double()
        assert torch.linalg.matrix_rank(delta) >= min(n_out, n_in) - 1  # dense, not low rank

    from unmerge_plugins.trainers.full_finetune import exact_factors

    dense = torch.randn(12, 20, dtype=torch.float64) * 1e-3  # a full-rank ΔW
    a, b = exact_factors(dense)
    assert a.shape == (12, 20) and b.shape == (12, 12)
    torch.testing.assert_close((b.double() @ a.double()), dense, rtol=1e-6, atol=1e-9)


def test_a_constituent_variant_with_other_module_shapes_is_one_line_naming_the_adapter(write_manifest) -> None:
    """Hostile audit 20.13: as constituents (not dictionary atoms, whose masker compares shapes), a variant
    trained with other module shapes ended in an IndexError."""
    path = write_manifest(**{"[merger]": VARIANT.strip().replace('"layers.0.q" = [24, 32]', '"layers.0.q" = [24, 16]')
                             + "\n[merger]", "[protocol]": '[protocol]\nconstituents = ["other"]'})
    with pytest.raises(UnmergeError) as info:
        run(path)
    message = str(info.value)
    assert message.startswith("adapter alpha@other (") and "\n" not in message, message
    assert "module 'layers.0.q' has shape (24, 16), but the mask (made from the dictionary adapters) has (24, 32)" \
        in message


# --------------------------------------------------------------------------------------------------
# experiments/realistic/summarize.py: claims, not supports; the budget sweep (issue 22)
# --------------------------------------------------------------------------------------------------


def summarize_module():
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("summarize", REPO / "experiments/realistic/summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scenarios_count_every_attributed_atom_except_relatives_as_claims() -> None:
    chosen = summarize_module()._chosen
    row = {"support": [True, True, True, False], "coefficients": [1, 1, 1, 0],
           "claims": ["exact", "retrained", "relative", None]}
    assert chosen(row, ["a", "b", "c", "d"]) == {"a", "b"}
    assert chosen({**row, "claims": None}, ["a", "b", "c", "d"]) == {"a", "b", "c"}  # no levels: every atom


def test_the_budget_sweep_counts_targets_whose_claims_and_verdict_do_not_move(tmp_path, capsys) -> None:
    module = summarize_module()

    def write(budget, claims_t2, verdict_t3):
        rows = [{"decomposer": "skill-fdr", "target_id": t, "support": None, "coefficients": [0, 0],
                 "claims": c, "info": {"verdict": v}}
                for t, c, v in (("t1", ["exact", None], "explained"), ("t2", claims_t2, "explained"),
                                ("t3", ["exact", None], verdict_t3))]
        path = tmp_path / f"realistic-budget-{budget}" / "per_target.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"atom_names": ["a", "b"], "rows": rows}))

    write(2048, ["exact", "relative"], "explained")
    write(4096, ["exact", None], "explained")           # a relative is no claim: t2 unchanged
    write(8192, ["exact", "retrained"], "partly-explained")  # t2's claims and t3's verdict move
    module.budget_stability(tmp_path)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == "| `skill-fdr` | 1/3 | 2/3 | 2/3 |"
