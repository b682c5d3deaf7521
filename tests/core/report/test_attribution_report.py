"""The attribution report a person reads: one sentence per target, a truth column only when truth
says something, a short legend on the terminal, a warning when a null control confirmed too."""

from __future__ import annotations

from pathlib import Path

from unmerge_core.config.targets import Truth
from unmerge_core.report.attribution import (
    AtomScore,
    Attribution,
    TargetReport,
    format_reports,
    target_sentence,
    write_report,
)

TRUTH_METRICS = {"sparsity": 2.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "recon_error": 0.077}


def attribution(atoms=(("chat-json-person", 0.603, "exact"), ("chat-pirate", 0.408, "exact")),
                verdict="partly-explained", remainder=0.0768, metrics=None, decomposer="skill-fdr",
                absent=("chat-sort",)) -> Attribution:
    scores = [AtomScore(n, c, True, 1.0, claim=claim) for n, c, claim in atoms]
    scores += [AtomScore(n, 0.0, False, 0.0) for n in absent]
    return Attribution(decomposer, scores, 0.077, verdict, "decomposer", "decomposer: 1 − p-value",
                       dict(metrics if metrics is not None else TRUTH_METRICS), {}, remainder)


def report(name="merged", attributions=None, truth=True) -> TargetReport:
    t = Truth(("chat-json-person", "chat-pirate"), (0.6, 0.4), "merge.yml") if truth else None
    return TargetReport(name, Path(name), "model", "known" if truth else "external", t,
                        attributions=attributions or [attribution()])


def prose_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith(("|", "-" * 5))]


def test_each_target_opens_with_one_plain_sentence() -> None:
    assert target_sentence(report()) == (
        "merged: made of chat-json-person (0.60, this exact adapter) and chat-pirate (0.41, this exact "
        "adapter); 8 % of its change is not explained by the dictionary (partly-explained).")
    out = format_reports([report()])
    assert out.startswith("merged: made of chat-json-person (0.60, this exact adapter)")
    assert out.index("(partly-explained).") < out.index("decomposer")
    assert all(len(line) <= 100 for line in out[:out.index("\n\n")].splitlines())


def test_the_sentence_says_each_claim_level_and_that_a_relative_is_no_claim() -> None:
    sentence = target_sentence(report(attributions=[attribution(
        atoms=(("json1", 0.25, "retrained"), ("add", 0.07, "relative")))]))
    assert "json1 (0.25, another training of it) and add (0.07, or a close relative of it)" in sentence
    assert "no claim of the skill itself: add may not be in it" in sentence
    none = target_sentence(report(attributions=[attribution(atoms=(), verdict="not-explained", remainder=1.0)]))
    assert none == ("merged: not made of any dictionary skill; 100 % of its change is not explained by the "
                    "dictionary (not-explained).")


def test_the_sentence_uses_the_first_decomposer_and_names_it_when_there_are_several() -> None:
    r = report(attributions=[attribution(), attribution(atoms=(("chat-sort", 1.0, None),), decomposer="nnls",
                                                        verdict="explained", remainder=0.0)])
    sentence = target_sentence(r)
    assert sentence.startswith("merged (by skill-fdr): made of chat-json-person") and "chat-sort" not in sentence


def test_the_markdown_report_opens_with_the_sentences(tmp_path) -> None:
    write_report(tmp_path, [report(), report("other", truth=False)], ["chat-json-person", "chat-pirate", "chat-sort"], {}, [])
    md = (tmp_path / "attribution.md").read_text()
    assert md.index("- merged: made of chat-json-person") < md.index("- other: made of") < md.index("| target")
    assert all(len(line) <= 100 for line in prose_lines(md) if not line.startswith("Dictionary:"))
    assert "- coef: the skill's weight" in md


def test_no_truth_metrics_column_without_truth() -> None:
    no_truth = {"sparsity": 2.0, "precision": None, "recall": None, "f1": None, "recon_error": 0.077}
    for reports in ([report(truth=False, attributions=[attribution(metrics=no_truth)])],
                    [report(attributions=[attribution(metrics=no_truth)])]):  # truth, but every metric n/a
        for fmt in ("simple", "github"):
            out = format_reports(reports, fmt)
            assert "vs truth" not in out and "precision" not in out and "n/a" not in out, out
    out = format_reports([report(), report("other", truth=False)])
    assert "merged vs truth: precision=1" in out and "other vs truth" not in out


def test_the_terminal_shows_a_short_legend() -> None:
    out = format_reports([report()])
    legend = out[out.rindex("\n\n") + 2:].splitlines()
    assert 3 <= len(legend) <= 10 and all(len(line) <= 100 for line in legend), legend
    text = " ".join(line.strip() for line in legend)
    for term in ("coef:", "claim:", "1−p:", "unique:", "recon err:", "verdict:"):
        assert term in text
    assert "coef:" not in format_reports([report()], "github")  # the markdown has its own, longer legend


def test_a_confirmed_null_control_warns_that_the_confirmations_are_not_specific() -> None:
    causal = {**TRUTH_METRICS, "causal_confirmed": 1.0, "causal_null_confirmed": 0.5}
    out = format_reports([report(attributions=[attribution(metrics=causal)]), report("clean")])
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: merged (skill-fdr): a null control")
    assert "the confirmations of this target are not specific" in out.replace("\n  ", " ")
    assert out.index("warning:") < out.index("decomposer")
    quiet = {**TRUTH_METRICS, "causal_confirmed": 1.0, "causal_null_confirmed": 0.0}
    assert "warning:" not in format_reports([report(attributions=[attribution(metrics=quiet)])])


def test_a_decomposer_without_claim_levels_is_not_said_to_find_exact_adapters() -> None:
    """The core reads an attributed atom of a decomposer that states no claims as 'exact' (for counting);
    the sentence said "this exact adapter" for paper-nnls' small spurious coefficients too."""
    a = attribution(atoms=(("chat-sort", 0.51, "exact"), ("chat-pirate", 0.01, "exact")), decomposer="paper-nnls",
                    verdict="explained", remainder=0.0)
    a.claims_given = False
    sentence = target_sentence(report(attributions=[a]))
    assert "chat-sort (0.51) and chat-pirate (0.01)" in sentence and "exact" not in sentence


def test_confidence_has_one_meaning_per_column() -> None:
    """The decomposer's own confidence (skill-fdr: 1 − p) and the unique share are two named columns;
    a decomposer without its own leaves the first empty (it read 0.08 for a true constituent before,
    under the same header as skill-fdr's 1 − p)."""
    fdr = attribution()
    for atom, share in zip(fdr.atoms, (0.45, 0.08)):
        atom.unique_share = share
    nnls = attribution(decomposer="nnls", verdict="explained", remainder=0.0)
    nnls.confidence_source, nnls.claims_given = "unique-share metric", False
    for atom, share in zip(nnls.atoms, (0.5, 0.08)):
        atom.unique_share = atom.confidence = share
    out = format_reports([report(attributions=[fdr, nnls])])
    header = next(line for line in out.splitlines() if line.startswith("target"))
    assert header.split() == ["target", "decomposer", "skill", "claim", "coef", "1−p", "unique", "verdict"]
    assert "confidence" not in header
    rows = [line.split() for line in out.splitlines() if "chat-pirate" in line and "0.408" in line]
    assert rows[0][-4:-1] == ["1.00", "0.08", "8"] or rows[0][2:6] == ["exact", "0.408", "1.00", "0.08"]
    assert rows[1][1:4] == ["—", "0.408", "0.08"]  # nnls: no 1−p, its unique share under "unique"


def test_tables_fit_100_columns_with_long_names_several_decomposers_and_notes(tmp_path) -> None:
    long = attribution(atoms=(("a-rather-long-skill-name-for-a-dictionary-adapter", 0.6, "retrained"),
                              ("chat-pirate", 0.4, "relative")))
    long.notes = ["the split between the two skills may be confounded by a skill not in the dictionary " * 2]
    other = attribution(decomposer="paper-nnls")
    reports = [report("a-merged-model-with-a-long-name-from-the-hub-v2", attributions=[long, other]),
               report("short", truth=False)]
    out = format_reports(reports)
    assert all(len(line) <= 100 for line in out.splitlines()), max(out.splitlines(), key=len)
    write_report(tmp_path, reports, ["a-rather-long-skill-name-for-a-dictionary-adapter", "chat-json-person",
                                     "chat-pirate", "chat-sort"], {}, [])
    md = (tmp_path / "attribution.md").read_text()
    assert all(len(line) <= 100 for line in md.splitlines()), \
        max(md.splitlines(), key=len)
    assert "note on a-merged-model-with-a-long-name-from-the-hub-v2 (skill-fdr): the split" in out.replace("\n  ", " ")


def test_a_skill_the_target_does_not_perform_reads_not_performed_not_inconclusive() -> None:
    """causal-ablation writes 0 for both an inconclusive and a not-performed check; the report read every
    0 as 'inconclusive' although causal_performed[atom] = 0 says the target does not perform the skill."""
    from unmerge_core.report.attribution import _causal_word

    assert _causal_word(0.0, 0.0) == "not-performed"
    assert _causal_word(0.0, 1.0) == "inconclusive" and _causal_word(0.0) == "inconclusive"
    assert _causal_word(1.0, 0.0) == "confirmed" and _causal_word(-1.0, 1.0) == "refuted"
    assert _causal_word(None, 0.0) is None
