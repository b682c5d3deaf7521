"""Property-based fuzzing of every input a user hands the toolkit (hypothesis).

Properties:

- a mutated manifest (any level of the shipped manifests and of the test manifest: a value replaced
  by any TOML value, a key removed or added, a list entry duplicated), or a manifest file with
  damaged bytes, either validates or fails with :class:`UnmergeError`, one line per problem, each
  naming the file — never another exception;
- a validated mutation of the small synthetic manifest runs to the end;
- every protocol that validates generates its targets, with unique ids;
- a mutated ``adapter_config.json`` or damaged ``adapter_model.safetensors`` either reads (and then
  gives finite numbers of the right shapes) or fails in one line naming the file.

``make test`` runs a few hundred examples in all; ``make fuzz`` (``UNMERGE_FUZZ_EXAMPLES``) thousands.
"""

from __future__ import annotations

import copy
import json
import math
import os
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import SMALL_REGISTRY, SYNTHETIC_MANIFEST
from helpers import write_lora
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.errors import UnmergeError
from unmerge_core.manager import PluginManager
from unmerge_core.config.manifest import load_manifest, manifest_from_data
from unmerge_core.pipeline.protocol import generate_targets
from unmerge_core.pipeline.runner import Runner

from helpers import REPO  # noqa: E402
EXAMPLES = int(os.environ.get("UNMERGE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
MANAGER = PluginManager()

# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 3, 7, 24, 10**6, 10**15, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, -0.5, 1e-300, 1e300, 64.5]),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", ".", "..", "a/b", "nnls", "linear", "known", "synthetic", "\x00", "../../etc", "/dev/null"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def paths_of(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a node of a parsed TOML tree (dict keys and list indices)."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += paths_of(v, prefix + (i,))
    return out


@st.composite
def mutated(draw: st.DrawFn, tree: dict) -> dict:
    """``tree`` with one to three mutations at random places."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_of(tree)))
        if not path:
            continue
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        if action == "replace":
            parent[key] = draw(VALUES)
        elif action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    return tree


def shipped() -> dict[str, dict]:
    out = {p.name: tomllib.loads(p.read_text()) for p in sorted((REPO / "experiments").glob("*.toml"))}
    return out


def small(workdir: Path) -> dict:
    return tomllib.loads(textwrap.dedent(SYNTHETIC_MANIFEST).replace("{out}", str(workdir / "runs")))


def check_error(exc: UnmergeError, where: Path) -> None:
    lines = str(exc).splitlines()
    assert lines, "empty error"
    for line in lines:
        assert line.startswith(str(where)) or "registry" in line, line
        assert len(line) < 600, line


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    return root


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(shipped()))
def test_mutated_shipped_manifests_validate_or_fail_in_one_line_per_problem(name: str) -> None:
    original = shipped()[name]
    path = REPO / "experiments" / name

    @FUZZ
    @given(mutated(original))
    def check(tree: dict) -> None:
        try:
            manifest_from_data(tree, path, MANAGER)
        except UnmergeError as exc:
            check_error(exc, path)

    check()


def test_mutated_small_manifest_validates_or_fails_in_one_line(fuzz_dir: Path) -> None:
    path = fuzz_dir / "manifest.toml"

    @FUZZ
    @given(mutated(small(fuzz_dir)))
    def check(tree: dict) -> None:
        try:
            m = manifest_from_data(tree, path, MANAGER)
        except UnmergeError as exc:
            check_error(exc, path)
            return
        specs = generate_targets(m)  # a validated protocol always generates
        assert len({s.target_id for s in specs}) == len(specs)

    check()


FEATURES = """
[tasks]
dictionary_variants = ["re"]

[protocol]
constituents = ["re", "part"]

[[variants]]
name = "re"
plugin = "synthetic"
params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, rank = 6, shared = 0.3, seed = 1 }

[[variants]]
name = "part"
plugin = "synthetic"
tasks = ["alpha", "zeta"]
params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, rank = 4 }

[[merger]]
plugin = "mergekit"
params = { density = 0.5 }

[[merger]]
plugin = "tsv-m"

[executor]
kind = "local"
"""


def featured(workdir: Path) -> dict:
    """The small manifest with every feature a manifest can name besides the stages: [[variants]] (as
    constituents and as dictionary atoms), several [[merger]] entries, a shared store, an executor."""
    tree = small(workdir)
    extra = tomllib.loads(FEATURES)
    tree["tasks"].update(extra["tasks"])
    tree["protocol"].update(extra["protocol"])
    tree["protocol"]["methods"] = ["ties", "tsv-m"]
    del tree["merger"]
    tree.update({k: v for k, v in extra.items() if k not in ("tasks", "protocol")})
    tree["output"]["store"] = str(workdir / "store")
    return tree


def test_the_featured_manifest_is_valid(fuzz_dir: Path) -> None:
    """The base of the next fuzz test validates (else every mutation would be an error, testing nothing)."""
    m = manifest_from_data(featured(fuzz_dir), fuzz_dir / "manifest.toml", MANAGER)
    assert [v.name for v in m.variants] == ["re", "part"] and len(m.mergers) == 2
    assert m.file.executor.kind == "local" and m.store_dir == fuzz_dir / "store"


def test_mutated_manifest_with_variants_mergers_store_and_executor_validates_or_fails_in_one_line(
        fuzz_dir: Path) -> None:
    path = fuzz_dir / "manifest.toml"

    @FUZZ
    @given(mutated(featured(fuzz_dir)))
    def check(tree: dict) -> None:
        try:
            m = manifest_from_data(tree, path, MANAGER)
        except UnmergeError as exc:
            check_error(exc, path)
            return
        specs = generate_targets(m)
        assert len({s.target_id for s in specs}) == len(specs)

    check()


@FUZZ
@given(data=st.data())
def test_damaged_manifest_bytes_fail_in_one_line(fuzz_dir: Path, data: st.DataObject) -> None:
    text = textwrap.dedent(SYNTHETIC_MANIFEST).replace("{out}", str(fuzz_dir / "runs")).encode()
    raw = bytearray(text)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    path = fuzz_dir / "damaged.toml"
    path.write_bytes(bytes(raw))
    try:
        load_manifest(path, MANAGER)
    except UnmergeError as exc:
        check_error(exc, path)


PROTOCOLS = st.fixed_dictionaries({
    "groups": st.lists(st.sampled_from(["known", "mixed", "unknown"]), max_size=4),
    "methods": st.lists(st.sampled_from(["linear", "ties", "dare_linear", "task_arithmetic", "breadcrumbs"]),
                        min_size=0, max_size=5),
    "targets_per_group": st.integers(0, 30),
    "min_tasks": st.integers(0, 8),
    "max_tasks": st.integers(0, 8),
    "weights": st.sampled_from(["uniform", "dirichlet"]),
})


@FUZZ
@given(protocol=PROTOCOLS, n_known=st.integers(1, 5), n_unknown=st.integers(0, 2))
def test_every_validated_protocol_generates_unique_targets(fuzz_dir: Path, protocol: dict, n_known: int,
                                                          n_unknown: int) -> None:
    tree = small(fuzz_dir)
    tree["protocol"] = protocol
    tree["tasks"] = {"known": ["alpha", "beta", "gamma", "delta", "epsilon"][:n_known],
                     "unknown": ["zeta", "eta"][:n_unknown]}
    try:
        m = manifest_from_data(tree, fuzz_dir / "manifest.toml", MANAGER)
    except UnmergeError as exc:
        check_error(exc, fuzz_dir / "manifest.toml")
        return
    specs = generate_targets(m)
    assert len(specs) == len(protocol["groups"]) * protocol["targets_per_group"]
    assert len({s.target_id for s in specs}) == len(specs)
    for s in specs:
        assert protocol["min_tasks"] <= len(s.tasks) <= protocol["max_tasks"]
        assert len(set(s.tasks)) == len(s.tasks) and math.isclose(sum(s.weights), 1.0)


SMALL_EDITS = st.sampled_from([
    ("protocol", "targets_per_group", [1, 2, 3, 4, 8]), ("protocol", "min_tasks", [1, 2, 3]),
    ("protocol", "max_tasks", [1, 2, 3, 5]), ("protocol", "weights", ["uniform", "dirichlet"]),
    ("protocol", "groups", [["known"], ["mixed", "unknown"], ["unknown"], []]),
    ("protocol", "methods", [["linear"], ["ties", "dare_ties"], ["breadcrumbs", "task_arithmetic"]]),
    ("masker", "params", [{"budget": 1}, {"budget": 5}, {"budget": 10**6}, {"aggregate": "l2"}]),
    ("merger", "params", [{"density": 1.0}, {"density": 0.01}, {"lambda": -1.0}, {"path": "dense"}]),
    ("trainer", "params", [{"module_shapes": {"a.0.q": [1, 1]}, "rank": 3},
                           {"module_shapes": {"a.0.q": [3, 70], "a.1.q": [70, 3]}, "rank": 4, "shared": 0.9}]),
    ("", "seed", [0, 1, 2**62]),
])


@settings(max_examples=max(8, EXAMPLES // 8), deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(SMALL_EDITS, st.integers(0, 4)), min_size=1, max_size=3))
def test_validated_small_mutations_run_to_the_end_or_fail_in_one_line(tmp_path_factory, edits) -> None:
    root = tmp_path_factory.mktemp("run")
    (root / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    tree = small(root)
    (root / "manifest.toml").write_text("# the run copies its manifest file; the mutated tree is validated below\n")
    for (table, key, options), pick in edits:
        target = tree if not table else tree.setdefault(table, {})
        target[key] = options[pick % len(options)]
    try:
        m = manifest_from_data(tree, root / "manifest.toml", MANAGER)
    except UnmergeError as exc:
        check_error(exc, root / "manifest.toml")
        return
    assume(len(m.protocol.groups) * m.protocol.targets_per_group <= 24)
    try:  # a value only the data can refuse (a budget below one coordinate per module) is one line too
        result = Runner(m, progress=False, echo=lambda s: None).run()
    except UnmergeError as exc:
        assert "\n" not in str(exc) and "budget" in str(exc) and len(str(exc)) < 600, exc
        return
    assert (result.run_dir / "summary.csv").is_file()
    for row in result.table.rows:
        assert all(v is None or math.isfinite(v) for v in row.metrics.values())


FEATURE_EDITS = st.sampled_from([
    ("tasks", "dictionary_variants", [[], ["re"], ["re", "part"], ["part"]]),
    ("protocol", "constituents", [[], ["re"], ["part"], ["part", "re"]]),
    ("protocol", "methods", [["ties", "tsv-m"], ["tsv-m"], ["linear"]]),
    ("executor", "kind", ["local"]),
    ("output", "store", [None, "shared-store"]),
])


@settings(max_examples=max(4, EXAMPLES // 15), deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(FEATURE_EDITS, st.integers(0, 4)), min_size=1, max_size=3))
def test_validated_featured_mutations_run_to_the_end_or_fail_in_one_line(tmp_path_factory, edits) -> None:
    root = tmp_path_factory.mktemp("featured")
    (root / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    (root / "manifest.toml").write_text("# the mutated tree is validated below\n")
    tree = featured(root)
    for (table, key, options), pick in edits:
        value = options[pick % len(options)]
        if key == "store" and value is not None:
            value = str(root / value)  # never a folder in the working directory
        if value is None:
            tree[table].pop(key, None)
        else:
            tree[table][key] = value
    try:
        m = manifest_from_data(tree, root / "manifest.toml", MANAGER)
    except UnmergeError as exc:
        check_error(exc, root / "manifest.toml")
        return
    result = Runner(m, progress=False, echo=lambda s: None, plots=False).run()
    assert (result.run_dir / "summary.csv").is_file()
    for row in result.table.rows:
        assert all(v is None or math.isfinite(v) for v in row.metrics.values())


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------

MODULES = {"model.layers.0.q": (6, 5), "model.layers.1.q": (6, 5)}
GOOD_CONFIG = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "rank_pattern": {}, "alpha_pattern": {},
               "use_rslora": False, "fan_in_fan_out": False, "target_modules": ["q"]}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return write_lora(tmp_path_factory.mktemp("adapter") / "a", MODULES, rank=3)


def read_whole(path: Path) -> None:
    adapter = LoraAdapter(path)
    for module in adapter.module_names:
        a, b = adapter.factors(module)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert a.shape[0] == b.shape[1] == adapter.modules[module].rank
        assert math.isfinite(adapter.scale(module))
        values = adapter.values_at(module, np.arange(3))
        assert np.isfinite(values).all()


@FUZZ
@given(config=mutated(GOOD_CONFIG))
def test_mutated_adapter_config_reads_or_fails_in_one_line(adapter_dir: Path, config: dict) -> None:
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    try:
        read_whole(adapter_dir)
    except UnmergeError as exc:
        assert "\n" not in str(exc) and str(adapter_dir) in str(exc), str(exc)
    except (ValueError, OverflowError) as exc:  # json.dumps of NaN writes NaN: that is a JSON error for us
        pytest.fail(f"{type(exc).__name__}: {exc}")


@FUZZ
@given(data=st.data())
def test_damaged_adapter_weights_read_or_fail_in_one_line(tmp_path_factory, data: st.DataObject) -> None:
    path = write_lora(tmp_path_factory.mktemp("w") / "a", MODULES, rank=3)
    weights = path / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip-header", "flip-data", "cut", "length"]))
        if op == "flip-header" and len(raw) > 8:
            i = data.draw(st.integers(8, min(8 + header, len(raw)) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "flip-data" and len(raw) > 8 + header:
            i = data.draw(st.integers(8 + header, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    weights.write_bytes(bytes(raw))
    try:
        read_whole(path)
    except UnmergeError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)


# -- what the fuzzing found (each failed before its fix) ----------------------------------------------

NEWLINE_CASES = {
    "a per-method mergekit key": lambda t: t["merger"][0].setdefault("params", {}).setdefault(
        "methods", {}).__setitem__("nearswap", {"t": 0.5, "bad\nkey": 1}),
    "a duplicated task name": lambda t: t["tasks"].__setitem__("known", [*t["tasks"]["known"], "x\n", "x\n"]),
    "an unknown top-level key": lambda t: t.__setitem__("0\n", 1),
}


@pytest.mark.parametrize("case", sorted(NEWLINE_CASES))
def test_a_newline_in_a_users_key_or_value_never_splits_an_error(case: str) -> None:
    path = REPO / "experiments" / "merge-methods.toml"
    tree = copy.deepcopy(shipped()["merge-methods.toml"])
    NEWLINE_CASES[case](tree)
    with pytest.raises(UnmergeError) as info:
        manifest_from_data(tree, path, MANAGER)
    check_error(info.value, path)


def test_names_and_hub_ids_with_a_final_newline_are_not_names() -> None:
    """A regex ending in "$" accepts a final newline with re.match."""
    from unmerge_core import PluginParams, PluginSpec, Stage
    from unmerge_core.io.hub import parse_hub_ref

    assert parse_hub_ref("owner/name\n") is None and parse_hub_ref("owner/name") is not None
    with pytest.raises(ValueError, match="plugin name"):
        PluginSpec("bad\n", Stage.METRIC, "x", "https://example.org", PluginParams, object)
