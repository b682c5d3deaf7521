"""Issue 24, items 6 and 7: progress of `unmerge run` where standard error is not a terminal (plain
one-line messages), and third-party output (transformers' bars and warnings, Ray's token notice)
silenced unless --verbose."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings

import pytest

from unmerge_core.cli import _parser, main, progress_mode, third_party_output
from unmerge_core.pipeline.executor import PlainProgress, SequentialExecutor, progress
from unmerge_core.quiet import QUIET_ENVIRONMENT, quiet_third_party

hf_logging = pytest.importorskip("transformers.utils.logging")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- item 6: plain progress lines -------------------------------------------------------------------

def test_progress_is_bars_on_a_terminal_and_plain_lines_otherwise() -> None:
    assert progress_mode(False, _Tty(), {}) == "bar"
    assert progress_mode(False, io.StringIO(), {}) == "lines"  # a pipe, a log file
    assert progress_mode(False, io.StringIO(), {"UNMERGE_PROGRESS": "1"}) == "bar"  # bars forced
    assert progress_mode(False, io.StringIO(), {"UNMERGE_PROGRESS": ""}) == "lines"
    assert progress_mode(True, io.StringIO(), {}) is False
    assert progress_mode(True, _Tty(), {}) is False
    assert progress_mode(True, io.StringIO(), {"UNMERGE_PROGRESS": "1"}) is False  # the flag wins


def test_a_slow_unit_of_a_small_stage_gets_its_own_line() -> None:
    clock, lines = _Clock(), []
    plain = PlainProgress("trainer", 12, write=lines.append, clock=clock)
    for i, seconds in enumerate((41, 39.6, 2.25)):
        plain.start()
        clock.now += seconds
        plain.done(f"chat-{i}")
    assert lines == ["trainer 1/12 chat-0 41 s", "trainer 2/12 chat-1 40 s (elapsed 81 s)",
                     "trainer 3/12 chat-2 2.2 s (elapsed 83 s)"]


def test_a_stage_of_many_fast_units_prints_about_ten_lines() -> None:
    clock, lines = _Clock(), []
    plain = PlainProgress("decompose", 1008, write=lines.append, clock=clock)
    for i in range(1008):
        plain.start()
        clock.now += 0.005
        plain.done(f"t{i} nnls")
    assert 10 <= len(lines) <= 11, lines
    assert lines[0].startswith("decompose 101/1008 t100 nnls ")  # past 10 %
    assert lines[-1].startswith("decompose 1008/1008 t1007 nnls ")
    assert all(re.fullmatch(r"decompose \d+/1008 t\d+ nnls [\d.]+ s \(elapsed [\d.]+ s\)", line) for line in lines[1:])


def test_a_long_stage_of_many_units_prints_a_line_every_ten_seconds() -> None:
    clock, lines = _Clock(), []
    plain = PlainProgress("metrics", 1008, write=lines.append, clock=clock)
    for _ in range(50):  # 50 units of 2.5 s: 125 s, under 10 % of the stage
        plain.start()
        clock.now += 2.5
        plain.done()
    assert [line.split()[1] for line in lines] == [f"{4 * k}/1008" for k in range(1, 13)]  # every 10 s


def test_fast_units_of_a_small_stage_print_only_the_last_line() -> None:
    clock, lines = _Clock(), []
    plain = PlainProgress("task vectors", 12, write=lines.append, clock=clock)
    for i in range(12):
        plain.start()
        clock.now += 0.01
        plain.done(f"task-{i}")
    assert lines == ["task vectors 12/12 task-11 0.0 s (elapsed 0.1 s)"]


def test_the_sequential_executor_prints_plain_lines_naming_each_unit(capsys) -> None:
    class Unit:
        def __init__(self, name: str) -> None:
            self.progress_name = name

    out = SequentialExecutor(progress="lines").map(lambda u: u.progress_name.upper(), [Unit("a"), Unit("b")],
                                                   desc="train (x)")
    assert out == ["A", "B"]
    assert re.fullmatch(r"train \(x\) 2/2 b [\d.]+ s \(elapsed [\d.]+ s\)", capsys.readouterr().err.strip())
    assert _run_lines(lambda: SequentialExecutor(progress=False).map(str, [Unit("a")], desc="x"), capsys) == ""
    assert _run_lines(lambda: list(progress([1, 2], desc="x", enabled="lines", name=str)), capsys).startswith("x 2/2 2")


def _run_lines(fn, capsys) -> str:
    capsys.readouterr()
    fn()
    return capsys.readouterr().err


def test_a_piped_run_prints_plain_progress_lines_per_stage(write_manifest, capsys, monkeypatch) -> None:
    monkeypatch.delenv("UNMERGE_PROGRESS", raising=False)
    assert main(["run", str(write_manifest()), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^train \(synthetic\) (\d+)/\1 \S+ [\d.]+ s", err, re.M), err
    assert re.search(r"^merge \(\S+\) (\d+)/\1 ", err, re.M), err
    assert re.search(r"^decompose (\d+)/\1 ", err, re.M), err
    assert "\r" not in err and "it/s" not in err  # no tqdm bar


def test_no_progress_prints_no_progress_lines(write_manifest, capsys, monkeypatch) -> None:
    monkeypatch.setenv("UNMERGE_PROGRESS", "1")
    assert main(["run", str(write_manifest()), "--no-plots", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not re.search(r"^(train|merge|decompose) .*\d+/\d+", err, re.M), err
    assert "it/s" not in err and "job/s" not in err


# -- item 7: third-party output silenced unless --verbose ---------------------------------------------

@pytest.fixture
def transformers_defaults():
    """Transformers' bars and verbosity as they were, whatever a test leaves."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


@pytest.mark.parametrize("command", [["run", "m.toml"], ["attribute", "--dictionary", "d", "t"]])
def test_without_verbose_transformers_bars_and_warnings_are_off(command, transformers_defaults,
                                                                 monkeypatch) -> None:
    for name in QUIET_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    with third_party_output(_parser().parse_args(command)):
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == logging.ERROR
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for Ray workers and subprocesses
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        token = logging.getLogger("ray._private.authentication.authentication_token_setup")
        assert not token.isEnabledFor(logging.WARNING)
        with warnings.catch_warnings(record=True) as caught:
            for module in ("transformers.modeling_utils", "peft.tuners.lora", "unmerge_core.x"):
                warnings.warn_explicit("deprecated", FutureWarning, "f.py", 1, module=module)
        assert [w.filename for w in caught] == ["f.py"]  # only unmerge's own
    # every setting is back afterwards
    assert hf_logging.is_progress_bar_enabled()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and "TRANSFORMERS_VERBOSITY" not in os.environ
    assert logging.getLogger("ray._private.authentication.authentication_token_setup").isEnabledFor(logging.WARNING)


@pytest.mark.parametrize("command", [["run", "m.toml", "--verbose"],
                                     ["attribute", "--dictionary", "d", "t", "--verbose"]])
def test_verbose_leaves_third_party_output_alone(command, transformers_defaults, monkeypatch) -> None:
    for name in QUIET_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    verbosity = hf_logging.get_verbosity()
    with third_party_output(_parser().parse_args(command)):
        assert hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == verbosity
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit("deprecated", FutureWarning, "f.py", 1, module="transformers.modeling_utils")
        assert len(caught) == 1


def test_a_variable_the_user_set_keeps_its_value(transformers_defaults, monkeypatch) -> None:
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    with quiet_third_party():
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"


def test_the_cli_silences_transformers_while_a_run_runs(transformers_defaults, monkeypatch) -> None:
    import unmerge_core.cli as cli

    seen = {}

    def fake_run(args) -> int:
        seen[args.verbose] = hf_logging.is_progress_bar_enabled()
        return 0

    monkeypatch.setattr(cli, "_cmd_run", fake_run)
    assert main(["run", "m.toml"]) == 0 and main(["run", "m.toml", "--verbose"]) == 0
    assert seen == {False: False, True: True}
    assert hf_logging.is_progress_bar_enabled()
