"""The documentation's generated reference covers the code (no mkdocs build here: `make docs` does that).

- every `unmerge` subcommand and every option of every command is on the page docs/gen_cli.py renders,
  and in the committed docs/cli.md;
- every hook specification and every public name of `unmerge_core.api` has a docstring, and
  docs/hooks.md renders both modules with mkdocstrings;
- every page mkdocs.yml's nav names exists, and every page in docs/ is in the nav;
- README.md is at most 200 lines and its relative links resolve.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from unmerge_core import api, hookspecs
from unmerge_core.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands() -> dict:
    """Every command's parser: the top level ('') and each subcommand."""
    parser = _parser()
    return {"": parser, **_gen_cli().subcommands(parser)}


def test_the_cli_has_the_subcommands_the_docs_expect():
    # guards the generator's subparser lookup: an empty mapping would make the checks below vacuous
    assert {"run", "validate", "plan", "plugins", "attribute", "verify-recipe"} <= set(_commands())


@pytest.mark.parametrize("page", ["rendered", "committed"])
def test_every_subcommand_and_option_is_in_the_cli_reference(page):
    text = _gen_cli().render() if page == "rendered" else (DOCS / "cli.md").read_text()
    missing = []
    for name, parser in _commands().items():
        heading = f"## `unmerge {name}`" if name else "## `unmerge`"
        if heading not in text:
            missing.append(f"subcommand {name!r} (heading {heading})")
            continue
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", section):
                    missing.append(f"unmerge {name} {option}".replace("  ", " "))
    hint = " (run `make docs` or `python docs/gen_cli.py` to regenerate docs/cli.md)" if page == "committed" else ""
    assert not missing, f"not in the {page} CLI reference{hint}: {', '.join(missing)}"


def _hookspec_functions() -> dict:
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, f"{hookspecs.PROJECT}_spec")}


def test_every_hookspec_and_public_api_name_has_a_docstring():
    hooks = _hookspec_functions()
    assert len(hooks) >= 5, f"hook specifications not found: {sorted(hooks)}"
    undocumented = [f"hookspecs.{name}" for name, fn in hooks.items() if not (fn.__doc__ or "").strip()]
    undocumented += [f"api.{name}" for name in api.__all__ if not (getattr(api, name).__doc__ or "").strip()]
    assert not undocumented, f"no docstring, so no entry in docs/hooks.md: {', '.join(undocumented)}"


def test_the_hooks_page_renders_the_hookspecs_and_the_api():
    text = (DOCS / "hooks.md").read_text()
    for module in ("unmerge_core.hookspecs", "unmerge_core.api"):
        assert re.search(rf"^::: {re.escape(module)}\s*$", text, re.M), f"docs/hooks.md does not render {module}"


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    nav = re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = {p.name for p in DOCS.glob("*.md")}
    assert set(nav) - pages == set(), f"mkdocs.yml names missing pages: {sorted(set(nav) - pages)}"
    assert pages - set(nav) == set(), f"pages not in mkdocs.yml's nav: {sorted(pages - set(nav))}"


def test_the_readme_stays_one_screen_and_its_links_into_the_docs_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200, "README.md is over 200 lines: move the material to a page of docs/"
    broken = [link for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
              if "://" not in link and not (ROOT / link).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


def test_every_manifest_field_has_a_meaning_in_the_generated_reference():
    """A manifest field without a description, or missing from docs/manifest-fields.md, fails here (the page
    is generated from the pydantic models by docs/gen_manifest.py and committed)."""
    spec = importlib.util.spec_from_file_location("gen_manifest", DOCS / "gen_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = module.render()
    assert (DOCS / "manifest-fields.md").read_text() == page, "docs/manifest-fields.md is stale: run make docs"
    for where, model in module.tables():
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} ({where}) has no description"
            assert f"| `{field.alias or name}` |" in page
