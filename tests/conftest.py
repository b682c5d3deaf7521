"""Shared fixtures: a small registry and manifest writer in a temporary directory."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SMALL_REGISTRY = """
[tasks.alpha]
category = "code"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.beta]
category = "style"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.gamma]
category = "reasoning"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.delta]
category = "structured"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.epsilon]
category = "other"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.zeta]
category = "code"
source = { kind = "procedural", generator = "reverse-words" }
[tasks.eta]
category = "style"
source = { kind = "procedural", generator = "reverse-words" }
"""

SYNTHETIC_MANIFEST = """
name = "synthetic-test"
seed = 7
[tasks]
known = ["alpha", "beta", "gamma", "delta", "epsilon"]
unknown = ["zeta", "eta"]
[protocol]
targets_per_group = 4
min_tasks = 2
max_tasks = 3
[trainer]
plugin = "synthetic"
params = { module_shapes = { "layers.0.q" = [24, 32], "layers.0.k" = [8, 32], "layers.1.q" = [24, 32] }, rank = 6, shared = 0.3 }
[merger]
plugin = "mergekit"
[masker]
plugin = "topk"
params = { budget = 300 }
[[decomposers]]
plugin = "nnls"
[[decomposers]]
plugin = "lasso"
[output]
dir = "{out}"
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "registry.toml").write_text(textwrap.dedent(SMALL_REGISTRY))
    return tmp_path


@pytest.fixture
def write_manifest(workdir: Path):
    """Write a manifest (default: the small synthetic one) and return its path."""

    def write(text: str = SYNTHETIC_MANIFEST, name: str = "manifest.toml", **replace: str) -> Path:
        text = textwrap.dedent(text).replace("{out}", str(workdir / "runs"))
        for old, new in replace.items():
            assert old in text, old
            text = text.replace(old, new)
        path = workdir / name
        path.write_text(text)
        return path

    return write
