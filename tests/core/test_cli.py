"""The ``unmerge`` command line around the pipelines: a full disk in ``run`` and ``attribute``, and what
``attribute`` does with its output folder (``~``, replacing an earlier report)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from helpers import write_lora
from unmerge_core.cli import main

MODULES = {"model.layers.0.q": (16, 12), "model.layers.0.k": (8, 12)}


@pytest.fixture
def small(tmp_path: Path) -> dict[str, Path]:
    """A dictionary of three LoRA adapters and a target adapter equal to one of them (seconds to attribute)."""
    for i, name in enumerate(("add", "json", "other")):
        write_lora(tmp_path / "dict" / name, MODULES, seed=i)
    return {"dict": tmp_path / "dict", "target": write_lora(tmp_path / "tgt", MODULES, seed=0)}


def attribute(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["attribute", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(rc: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("warning:", "note:", "unmerge: running"))]
    assert rc != 0 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()
        return False


def full_disk(monkeypatch) -> None:
    """Every binary file opened with os.fdopen (the store's atomic writes) finds the disk full."""
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        fh = real(fd, mode, *args, **kwargs)
        return _FullDisk(fh) if "w" in mode and "b" in mode else fh

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_full_disk_in_attribute_is_one_line_naming_the_file_and_the_space(small, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    """Issue 20, item 13: ENOSPC ended in 'internal error (OSError …)' without the file or the space needed."""
    full_disk(monkeypatch)
    rc, _, err = attribute(capsys, "--dictionary", str(small["dict"]), "--output-dir", str(tmp_path / "out"),
                           str(small["target"]))
    line = one_error_line(rc, err)
    assert line.startswith(f"error: no space left on device writing {tmp_path / 'out' / 'attribution.json'} "
                           "(it needed "), line
    assert "free there" in line and "internal error" not in line and rc == 1


def test_a_full_disk_in_run_is_one_line_naming_the_file_and_the_space(write_manifest, workdir, capsys,
                                                                        monkeypatch) -> None:
    import unmerge_core.io.store as store

    def save_file(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "save_file", save_file)
    rc = main(["run", str(write_manifest()), "--no-progress", "--no-plots"])
    line = one_error_line(rc, capsys.readouterr().err)
    assert line.startswith(f"error: no space left on device writing {workdir / 'runs' / 'synthetic-test'}"), line
    assert "(it needed " in line and "free there" in line


def test_attribute_output_dir_expands_tilde(small, tmp_path, capsys, monkeypatch) -> None:
    """Issue 20, item 15: --output-dir ~/x made a folder named '~' in the current folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    rc, out, err = attribute(capsys, "--dictionary", str(small["dict"]), "--output-dir", "~/out", str(small["target"]))
    assert rc == 0, err
    assert (tmp_path / "home" / "out" / "attribution.json").is_file() and not (tmp_path / "~").exists()
    assert f"report written to {tmp_path / 'home' / 'out'}" in out


def test_attribute_says_when_it_replaces_an_earlier_report(small, tmp_path, capsys, monkeypatch) -> None:
    """Issue 20, item 21: a second `unmerge attribute` replaced runs/attribute-<name> silently."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = attribute(capsys, "--dictionary", str(small["dict"]), str(small["target"]))
    assert rc == 0, err
    assert "replaced" not in err
    rc, _, err = attribute(capsys, "--dictionary", str(small["dict"]), str(small["target"]))
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "replaced" in line]
    assert len(notes) == 1 and notes[0].startswith("note: replaced the earlier report in runs/attribute-tgt (")


def test_library_errors_saying_the_disk_is_full_are_recognised() -> None:
    """safetensors reports ENOSPC as its own error type (the os error in its text), not as an OSError."""
    from unmerge_core.errors import disk_full_line

    rust = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" })')
    assert disk_full_line(rust).startswith("no space left on device: free some space")
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/tmp/x/y.json")
    assert disk_full_line(quota).startswith("disk quota exceeded writing /tmp/x/y.json (")
    assert disk_full_line(ValueError("no")) is None and disk_full_line(OSError(errno.EACCES, "denied")) is None


@pytest.mark.parametrize("where", ["x" * 300, "/proc/unmerge-out"])
def test_attribute_and_run_refuse_an_output_dir_that_cannot_be_made(small, write_manifest, tmp_path, capsys,
                                                                    monkeypatch, where) -> None:
    """Issue 20, item 13: a 300-character --output-dir (ENAMETOOLONG) or one under /proc ended in a traceback
    or an internal error after the work."""
    if where.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs a /proc file system")
    manifest = write_manifest()
    monkeypatch.chdir(tmp_path)
    rc, _, err = attribute(capsys, "--dictionary", str(small["dict"]), "--output-dir", where, str(small["target"]))
    assert one_error_line(rc, err).startswith(f"error: --output-dir {where}: ") and rc == 2
    rc = main(["run", str(manifest), "--output-dir", where])
    assert one_error_line(rc, capsys.readouterr().err).startswith(f"error: --output-dir {where}: ") and rc == 2
