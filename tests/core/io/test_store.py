"""check_output_dir: an output folder that cannot be made is refused before any work, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmerge_core.io.store import check_output_dir


def test_a_component_longer_than_a_file_name_may_be_is_refused(tmp_path) -> None:
    """Issue 20, item 13: 300 characters in one component (ENAMETOOLONG) passed validate."""
    problem = check_output_dir(tmp_path / ("x" * 300) / "run")
    assert problem is not None and "300" in problem and "255" in problem and "\n" not in problem
    assert check_output_dir(tmp_path / ("x" * 255) / "run") is None  # the longest name allowed is fine


def test_a_path_longer_than_path_max_is_refused(tmp_path) -> None:
    problem = check_output_dir(tmp_path.joinpath(*["y" * 200] * 25))
    assert problem is not None and "too long" in problem


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system")
@pytest.mark.parametrize("where", ["/proc/unmerge-runs", "/proc/unmerge/runs/x", "/sys/unmerge"])
def test_a_virtual_file_system_is_refused(where) -> None:
    """Under /proc the folder cannot be created, whatever the permission bits say (root may 'write' there)."""
    problem = check_output_dir(Path(where))
    assert problem is not None and "cannot create" in problem and "\n" not in problem


def test_a_writable_folder_passes_and_leaves_nothing_behind(tmp_path) -> None:
    assert check_output_dir(tmp_path / "runs" / "name") is None
    assert check_output_dir(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
