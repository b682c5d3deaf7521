"""The ``unmerge`` command line: ``run``, ``validate``, ``plan``, ``plugins`` and ``attribute``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from tabulate import tabulate

from unmerge_core import __version__
from unmerge_core.errors import UnmergeError, disk_full_line
from unmerge_core.io.hub import parse_hub_ref, resolve_model_ref
from unmerge_core.manager import PluginManager
from unmerge_core.pipeline.attribute import DEFAULT_DECOMPOSERS, DEFAULT_METRICS, AttributeRequest
from unmerge_core.pipeline.executor import Progress
from unmerge_core.pipeline import verify_recipe
from unmerge_core.pipeline.run_directory import REDO_STAGES
from unmerge_core.quiet import quiet_third_party
from unmerge_core.types import STAGE_NAMES


def main(argv: Sequence[str] | None = None) -> int:
    # A transformers 5.x deprecation notice raised inside PEFT on every model load; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with third_party_output(args):
            return int(args.func(args) or 0)
    except UnmergeError as exc:
        if args.debug:
            raise
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept and reused by the next run", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `unmerge plugins | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print("error: out of memory; finished artifacts are kept and reused by the next run", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug, not a user mistake: say so in one line
        if args.debug:
            raise
        if (full := disk_full_line(exc)) is not None:  # ENOSPC / EDQUOT: which file, how much it needed
            print(f"error: {full}", file=sys.stderr)
            return 1
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal error ({type(exc).__name__}: {first}); this is a bug in unmerge or a plugin, "
              "please report it; rerun with --debug for the traceback", file=sys.stderr)
        return 1


def third_party_output(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """Where a command loads models (``run``, ``attribute``): transformers' progress bars and warnings,
    FutureWarnings of transformers and PEFT and Ray's token notice are silenced unless ``--verbose``."""
    if not hasattr(args, "verbose"):  # validate, plan, plugins: nothing of theirs to silence
        return contextlib.nullcontext()
    return quiet_third_party(verbose=args.verbose)


def progress_mode(no_progress: bool, stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None) -> Progress:
    """How ``unmerge run`` shows progress on ``stream`` (standard error): tqdm bars on a terminal or
    with ``UNMERGE_PROGRESS`` set (to anything non-empty), plain one-line messages otherwise (a pipe,
    a log), nothing with ``--no-progress``."""
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    if no_progress:
        return False
    if environ.get("UNMERGE_PROGRESS") or stream.isatty():
        return "bar"
    return "lines"


class _OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (it prints the whole usage block before them otherwise)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


VERBOSE_HELP = ("also show third-party output: transformers' progress bars and warnings, FutureWarnings of "
                "transformers and PEFT, Ray's notices")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="unmerge", description="Which known skills is a merged model made of?")
    parser.add_argument("--version", action="version", version=f"unmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a manifest (train, mask, merge, decompose, score)")
    run.add_argument("manifest")
    run.add_argument("--no-progress", action="store_true",
                     help="hide progress (bars on a terminal, one-line messages otherwise)")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.add_argument("--no-plots", action="store_true", help="write the tables only (no PNG plots)")
    run.add_argument("--output-dir", help="override [output].dir of the manifest")
    run.add_argument("--redo", choices=["all", *REDO_STAGES], metavar="STAGE",
                     help="recompute this stage's cached work and every later stage's instead of reusing it: "
                          f"all, {', '.join(REDO_STAGES)} (cache keys already hold the plugins' code and parameters)")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a manifest and its plugins without running anything")
    validate.add_argument("manifest", nargs="+")
    validate.set_defaults(func=_cmd_validate)

    plan = sub.add_parser("plan", help="what a run of a manifest will download, store and compute (nothing runs)")
    plan.add_argument("manifest")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_cmd_plan)

    plugins = sub.add_parser("plugins", help="list installed plugins")
    plugins.add_argument("--stage", choices=STAGE_NAMES)
    plugins.add_argument("--json", action="store_true", help="print a JSON list")
    plugins.add_argument("--available", action="store_true",
                         help="also list first-party plugins from registry.toml that are not installed")
    plugins.add_argument("--registry", help="registry.toml to read with --available")
    plugins.add_argument("--strict", action="store_true", help="fail if a plugin cannot be loaded")
    plugins.set_defaults(func=_cmd_plugins)

    _add_attribute_parser(sub)
    verify_recipe.add_parser(sub)
    return parser


def _shown_path(path: Path) -> str:
    """``path`` as a person reads it: relative to the current folder when below it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _cmd_run(args: argparse.Namespace) -> int:
    from unmerge_core.config.manifest import load_manifest
    from unmerge_core.pipeline.runner import Runner

    manifest = load_manifest(args.manifest)
    if args.output_dir:
        from pathlib import Path

        from unmerge_core.io.store import check_output_dir

        problem = check_output_dir(Path(args.output_dir).expanduser() / manifest.name)
        if problem:
            raise UnmergeError(f"--output-dir {args.output_dir}: {problem}")
        manifest.file.output.dir = args.output_dir
    print(f"unmerge: running {manifest.name} -> {_shown_path(manifest.run_dir)}", file=sys.stderr)
    result = Runner(manifest, progress=progress_mode(args.no_progress), plots=not args.no_plots, redo=args.redo).run()
    print(screen_table(result.table.summary(("decomposer", "group"))))
    print("(means over each group's targets, all merge methods; per method and every column: summary.md)\n")
    timing_rows = [[t.stage, f"{t.seconds:.1f}", f"{t.cpu_seconds:.1f}", f"{t.peak_rss_mb:.0f}", t.jobs, t.reused]
                   for t in result.timings]
    print(tabulate(timing_rows, headers=["stage", "wall s", "cpu s", "peak RSS MB", "jobs", "reused"],
                   disable_numparse=True))
    print(f"\nresults written to {result.run_dir} (summary.md, summary.csv, per_target.csv, timings.json)")
    return 0


SCREEN_COLUMNS = ("decomposer", "group", "method", "n", "precision", "recall", "perfect_match", "sparsity",
                  "recon_error", "not_explained", "ood_flag", "causal_confirmed", "rank_auc")
"""The columns ``unmerge run`` prints, most important first (``method`` only in a per-method table)."""
SCREEN_WIDTH = 100


def compact(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """The columns that fit a terminal; summary.md / summary.csv keep every metric."""
    return [{k: r[k] for k in SCREEN_COLUMNS if k in r} for r in records]


def screen_table(records: list[dict[str, object]], width: int = SCREEN_WIDTH) -> str:
    """The summary table ``unmerge run`` prints: :data:`SCREEN_COLUMNS`, two decimals, headers broken at
    ``_`` onto two lines, columns dropped from the right (least important first) until it fits ``width``."""
    from unmerge_core.report.tables import tight_table

    rows = compact(records)
    columns = list(rows[0]) if rows else []
    if not rows:
        return "(no results)"

    def cell(value: object) -> str:
        return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    while True:
        text = tight_table([[cell(r[k]) for k in columns] for r in rows], [k.replace("_", "\n", 1) for k in columns])
        if len(columns) <= 3 or max(map(len, text.splitlines())) <= width:
            return text
        columns.pop()


def _cmd_validate(args: argparse.Namespace) -> int:
    from unmerge_core.config.manifest import load_manifest

    manager = PluginManager()
    failed = False
    for path in args.manifest:
        try:
            m = load_manifest(path, manager)
        except UnmergeError as exc:
            failed = True
            for line in str(exc).splitlines():
                print(f"error: {line}", file=sys.stderr)
            continue
        n_targets = len(m.protocol.groups) * m.protocol.targets_per_group + len(m.file.targets)
        print(f"{path}: ok ({len(m.known)} known + {len(m.unknown)} unknown tasks, {n_targets} targets, "
              f"{len(m.decomposers)} decomposers)")
    return 2 if failed else 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from unmerge_core.io.store import dumps_json
    from unmerge_core.pipeline.plan import format_plan, plan_manifest

    plan = plan_manifest(args.manifest)
    print(dumps_json(plan.to_dict()), end="") if args.json else print(format_plan(plan))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    manager = PluginManager(strict=args.strict)
    installed = manager.plugins(args.stage)
    records = [p.as_dict() for p in installed]
    for r in records:
        r["installed"] = True
    if args.available:
        records.extend(_available(args, {(r["stage"], r["name"]) for r in records}))
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        rows = [[r["name"], r["stage"], f"{r['distribution']} {r['version'] or ''}".strip(),
                 r["summary"] if r["installed"] else f"(not installed) {r['summary']}"] for r in records]
        print(tabulate(rows, headers=["name", "stage", "distribution", "summary"], disable_numparse=True))
        mergers = [r for r in records if r.get("methods")]
        if mergers:
            print("\nmerge methods (protocol.methods):")
            for r in mergers:
                print(f"  {r['name']}: {', '.join(r['methods'])}")  # type: ignore[arg-type]
    for broken in manager.broken:
        print(f"warning: {broken.error} [{broken.distribution}]", file=sys.stderr)
    for conflict in manager.conflicts:
        print(f"warning: {conflict.message}", file=sys.stderr)
    return 0


def _available(args: argparse.Namespace, have: set[tuple[str, str]]) -> list[dict[str, object]]:
    from pathlib import Path

    from unmerge_core.config.registry import Registry

    from unmerge_core.config.registry import packaged_registry

    path = Path(args.registry) if args.registry else Path("registry.toml")
    if not args.registry and not path.is_file():
        path = packaged_registry() or path  # outside the repository: the registry shipped with the package
    if not path.is_file():
        raise UnmergeError(f"--available needs a registry.toml (looked for {path}); pass --registry PATH")
    registry = Registry.load(path)
    out = []
    for name, entry in registry.data.plugins.items():
        if args.stage and entry.stage != args.stage:
            continue
        if (entry.stage, name) in have:
            continue
        out.append({"name": name, "stage": entry.stage, "distribution": entry.distribution, "version": None,
                    "summary": entry.summary, "installed": False})
    return out



def _add_attribute_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "attribute", help="attribute existing merged models or adapters to a dictionary of adapters",
        description="Decompose each TARGET (a full model directory, or a PEFT adapter directory) over the "
                    "dictionary adapters; print a table and write attribution.{json,md,csv}.")
    p.add_argument("targets", nargs="+", metavar="[NAME=]TARGET",
                   help="model or adapter to attribute: a directory or a Hub id owner/name[@revision]")
    p.add_argument("--base", help="base model (needed for full-model targets): a directory or a Hub id")
    p.add_argument("--dictionary", help="folder with one sub-folder per skill: a PEFT adapter, or a folder of several trainings of that skill")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="add one adapter of skill NAME: a directory or a Hub id (repeatable; a NAME given again adds another training of it)")
    p.add_argument("--kind", choices=["auto", "model", "adapter"], default="auto", help="what the targets are")
    p.add_argument("--masker", default="topk", help="masker plugin (default: topk)")
    p.add_argument("--budget", type=int, help="masker budget: total masked coordinates (topk default: 99904)")
    p.add_argument("--aggregate", help="masker aggregate of |ΔW| over the dictionary (topk: max, mean or l2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where the masker forms the dictionary's ΔW and takes its top-k (topk default: auto, "
                        "CUDA when present); the target is read at the mask coordinates only, on the CPU")
    p.add_argument("--decomposer", action="append", metavar="NAME",
                   help="decomposer plugin (repeatable; default: skill-fdr, the calibrated test; paper-nnls is the paper's baseline)")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="metric plugin (repeatable; default: support, reconstruction, unique-share); "
                        "truth-based values are n/a without --truth")
    p.add_argument("--param", action="append", metavar="NAME.KEY=VALUE",
                   help="plugin parameter; NAME is 'masker' (or its plugin name), a decomposer or a metric; "
                        "VALUE is JSON or a string")
    p.add_argument("--truth", action="append", metavar="[TARGET=]YAML",
                   help="ground truth from a mergekit YAML models: list (repeatable, one per target)")
    p.add_argument("--truth-json", action="append", metavar="[TARGET=]JSON",
                   help='ground truth {"tasks": [...], "weights": [...]} inline or as a file')
    p.add_argument("--emit-recipe", metavar="FILE",
                   help="write the recovered recipe as a mergekit YAML (task_arithmetic of the attributed adapters "
                        "with their coefficients; needs --base); several targets: FILE-NAME.yml each; check it "
                        "with unmerge verify-recipe")
    p.add_argument("--support-threshold", type=float, default=1e-3,
                   help="|coefficient| above this is attributed, for decomposers without their own support")
    p.add_argument("--ood-threshold", type=float, default=0.5,
                   help="out-of-dictionary when recon_error exceeds this, for decomposers without a verdict")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin checkpoints (with torch.load(weights_only=True))")
    p.add_argument("--verify", action="store_true",
                   help="check each attribution causally on the target itself: remove the attributed skill, score "
                        "its task and the others (needs --base and task data: a registry task per skill)")
    p.add_argument("--registry", help="registry.toml with the skills' tasks, for --verify (default: the nearest one "
                                      "upwards from the current directory)")
    p.add_argument("--task", action="append", metavar="SKILL=TASK",
                   help="for --verify: the registry task of a skill named otherwise (repeatable)")
    p.add_argument("--task-data", action="append", metavar="SKILL=FILE.jsonl",
                   help="for --verify: held-out examples of a skill, JSON lines with prompt and response (repeatable)")
    p.add_argument("--name", help="run name (default: the target's name)")
    p.add_argument("--output-dir", help="where to write the report (default: runs/attribute-<name>)")
    p.add_argument("--seed", type=int, default=0, help="seed for randomised decomposers")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=_cmd_attribute)


def _cmd_attribute(args: argparse.Namespace) -> int:
    from unmerge_core.pipeline.attribute import run_attribute
    from unmerge_core.report.attribution import format_reports

    request = request_from_args(args)
    earlier = _earlier_report(request.output_dir)
    result = run_attribute(request)
    print(format_reports(result.reports))
    if earlier:
        print(f"note: replaced the earlier report in {result.run_dir} ({earlier})", file=sys.stderr)
    print(f"\nreport written to {result.run_dir} (attribution.json, attribution.md, attribution.csv)")
    return 0


REPORT_FILES = ("attribution.json", "attribution.md", "attribution.csv")


def _earlier_report(folder: Path) -> str | None:
    """When ``folder`` holds a report of an earlier ``unmerge attribute``: when it was written and of what."""
    import datetime

    found = [folder / name for name in REPORT_FILES if os.path.isfile(folder / name)]  # never raises
    if not found:
        return None
    when = datetime.datetime.fromtimestamp(max(f.stat().st_mtime for f in found)).strftime("%Y-%m-%d %H:%M:%S")
    targets = []
    try:
        data = json.loads((folder / "attribution.json").read_text(encoding="utf-8"))
        targets = [str(t.get("name")) for t in data.get("targets", []) if isinstance(t, dict)]
    except (OSError, ValueError, AttributeError):
        pass
    of = f"of {', '.join(targets[:3])}{', …' if len(targets) > 3 else ''}, " if targets else ""
    return f"{of}written {when}"


# --------------------------------------------------------------------------------------------------
# Parsing of `unmerge attribute`
# --------------------------------------------------------------------------------------------------


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def split_named(value: str, option: str, *, required: bool) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> ``(NAME, VALUE)``; a bare value -> ``(None, value)`` unless ``required``."""
    if "=" in value:
        name, rest = value.split("=", 1)
        if _NAME_RE.fullmatch(name) and not Path(value).exists():
            return name, rest
    if required:
        raise UnmergeError(f"{option} {value}: expected NAME=PATH")
    return None, value


def parse_params(items: Sequence[str], known: Mapping[str, dict[str, Any]]) -> None:
    """Apply ``--param NAME.KEY=VALUE`` items to the params dicts in ``known`` (by plugin name).

    ``VALUE`` is read as JSON when it parses (numbers, booleans, lists, quoted strings), else taken as a
    plain string. ``KEY`` may be dotted to reach a nested table.
    """
    for item in items:
        head, sep, raw = item.partition("=")
        name, dot, key = head.partition(".")
        if not sep or not dot or not key:
            raise UnmergeError(f"--param {item}: expected NAME.KEY=VALUE (NAME: masker, a decomposer or a metric)")
        if name not in known:
            raise UnmergeError(f"--param {item}: '{name}' is not the masker or a chosen decomposer or metric "
                               f"(choose one of: {', '.join(known)})")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target = known[name]
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UnmergeError(f"--param {item}: '{part}' is not a table")
        target[leaf] = value


def request_from_args(args: Any) -> AttributeRequest:
    """Build an :class:`AttributeRequest` from the parsed ``unmerge attribute`` arguments."""
    targets = []
    for value in args.targets:
        name, path = split_named(value, "target", required=False)
        ref = parse_hub_ref(path)
        p = resolve_model_ref(path, "target", allow_pickle=args.allow_pickle)
        targets.append((name or (ref.name if ref else p.resolve().name), p))
    adapters = []
    for value in args.adapter or []:
        name, path = split_named(value, "--adapter", required=True)
        assert name is not None
        adapters.append((name, resolve_model_ref(path, f"--adapter {name}", allow_pickle=args.allow_pickle)))
    base = (resolve_model_ref(args.base, "--base", allow_pickle=args.allow_pickle, tokenizer=args.verify)
            if args.base else None)
    decomposer_names = list(args.decomposer or DEFAULT_DECOMPOSERS)
    metric_names = list(args.metric or DEFAULT_METRICS)
    if args.verify and "causal-ablation" not in metric_names:
        metric_names.append("causal-ablation")  # so that --param causal-ablation.KEY=VALUE can tune it
    masker_params: dict[str, Any] = {}
    if args.budget is not None:
        masker_params["budget"] = args.budget
    if args.aggregate is not None:
        masker_params["aggregate"] = args.aggregate
    if args.device is not None:
        from unmerge_core.devices import cuda_available, no_cuda_message

        if args.device == "cuda" and not cuda_available():
            raise UnmergeError(f"--device cuda: {no_cuda_message()}")
        masker_params["device"] = args.device
    params: dict[str, dict[str, Any]] = {"masker": masker_params}
    params.setdefault(args.masker, masker_params)  # --param topk.budget=… as well as masker.budget
    for n in [*decomposer_names, *metric_names]:
        params.setdefault(n, {})
    parse_params(args.param or [], params)

    def named(values: Sequence[str] | None, option: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for value in values or []:
            name, rest = split_named(value, option, required=False)
            if name is None:
                if len(targets) != 1:
                    raise UnmergeError(f"{option}: with several targets write {option} TARGET={value}")
                name = targets[0][0]
            out[name] = rest
        return out

    truth_yaml = {k: Path(v) for k, v in named(args.truth, "--truth").items()}
    truth_json = named(args.truth_json, "--truth-json")
    label = args.name or (targets[0][0] if len(targets) == 1 else "multi")
    output_dir = Path(args.output_dir).expanduser() if args.output_dir else Path("runs") / f"attribute-{label}"
    return AttributeRequest(
        targets=targets, output_dir=output_dir, base=base,
        dictionary=Path(args.dictionary) if args.dictionary else None, adapters=adapters, kind=args.kind,
        masker=args.masker, masker_params=masker_params,
        decomposers=[(n, params[n]) for n in decomposer_names], metrics=[(n, params[n]) for n in metric_names],
        truth_yaml=truth_yaml, truth_json=truth_json, support_threshold=args.support_threshold,
        ood_threshold=args.ood_threshold, allow_pickle=args.allow_pickle, seed=args.seed,
        verify=args.verify, registry=Path(args.registry) if args.registry else None,
        task_names=dict(_pairs(args.task, "--task")),
        task_data={k: Path(v) for k, v in _pairs(args.task_data, "--task-data")},
        emit_recipe=Path(args.emit_recipe).expanduser() if args.emit_recipe else None,
    )


def _pairs(values: Sequence[str] | None, option: str) -> list[tuple[str, str]]:
    out = []
    for value in values or []:
        name, rest = split_named(value, option, required=True)
        assert name is not None
        out.append((name, rest))
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
