"""The ``unmerge`` command line: ``run``, ``validate`` and ``plugins``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from tabulate import tabulate

from . import __version__
from .errors import UnmergeError
from .manager import PluginManager
from .types import STAGE_NAMES


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unmerge", description="Which known skills is a merged model made of?")
    parser.add_argument("--version", action="version", version=f"unmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a manifest (train, mask, merge, decompose, score)")
    run.add_argument("manifest")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--output-dir", help="override [output].dir of the manifest")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a manifest and its plugins without running anything")
    validate.add_argument("manifest", nargs="+")
    validate.set_defaults(func=_cmd_validate)

    plugins = sub.add_parser("plugins", help="list installed plugins")
    plugins.add_argument("--stage", choices=STAGE_NAMES)
    plugins.add_argument("--json", action="store_true", help="print a JSON list")
    plugins.add_argument("--available", action="store_true",
                         help="also list first-party plugins from registry.toml that are not installed")
    plugins.add_argument("--registry", help="registry.toml to read with --available")
    plugins.add_argument("--strict", action="store_true", help="fail if a plugin cannot be loaded")
    plugins.set_defaults(func=_cmd_plugins)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .manifest import load_manifest
    from .results import format_table
    from .runner import Runner

    manifest = load_manifest(args.manifest)
    if args.output_dir:
        manifest.file.output.dir = args.output_dir
    print(f"unmerge: running {manifest.name} -> {manifest.run_dir}", file=sys.stderr)
    result = Runner(manifest, progress=not args.no_progress and sys.stderr.isatty() or bool(os.environ.get("UNMERGE_PROGRESS"))).run()
    print(format_table(result.table.summary()))
    print()
    timing_rows = [[t.stage, f"{t.seconds:.1f}", f"{t.peak_rss_mb:.0f}", t.jobs, t.reused] for t in result.timings]
    print(tabulate(timing_rows, headers=["stage", "wall s", "peak RSS MB", "jobs", "reused"], disable_numparse=True))
    print(f"\nresults written to {result.run_dir} (summary.md, summary.csv, per_target.csv, timings.json)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .manifest import load_manifest

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
        n_targets = len(m.protocol.groups) * m.protocol.targets_per_group
        print(f"{path}: ok ({len(m.known)} known + {len(m.unknown)} unknown tasks, {n_targets} targets, "
              f"{len(m.decomposers)} decomposers)")
    return 2 if failed else 0


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
    for broken in manager.broken:
        print(f"warning: {broken.error} [{broken.distribution}]", file=sys.stderr)
    return 0


def _available(args: argparse.Namespace, have: set[tuple[str, str]]) -> list[dict[str, object]]:
    from pathlib import Path

    from .registry import Registry

    path = Path(args.registry) if args.registry else Path("registry.toml")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
