"""Executors run independent units of work (train one task, form one target, decompose one target).

A job is a picklable callable plus a picklable argument; its result is returned in submission order.
The sequential executor is the default; a distributed executor only has to implement :meth:`map`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

Progress = bool | Literal["bar", "lines"]
"""How progress is shown: ``False`` not at all, ``True`` or ``"bar"`` tqdm bars (a terminal), ``"lines"``
plain one-line messages on standard error (a log or a pipe: :class:`PlainProgress`)."""

PLAIN_EVERY_S = 10.0
"""Plain lines: a line at least this often while units finish (and at every 10 % of the stage)."""
PLAIN_EACH_UP_TO = 100
"""Plain lines: a stage of at most this many units gets a line for each unit that took a second or more."""
PLAIN_SLOW_UNIT_S = 1.0


def progress_style(value: Progress | None) -> Literal["bar", "lines"] | None:
    """``"bar"``, ``"lines"`` or ``None`` (no progress) for a :data:`Progress` value."""
    if value == "lines":
        return "lines"
    return "bar" if value else None


def unit_name(job: object) -> str:
    """What a progress line calls a unit of work: its ``progress_name`` when it has one."""
    name = getattr(job, "progress_name", "")
    return name if isinstance(name, str) else ""


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], jobs: Sequence[T], *, desc: str) -> list[R]: ...


class SequentialExecutor:
    """Runs jobs one after another in this process, with a progress bar (or plain progress lines)."""

    def __init__(self, progress: Progress = True) -> None:
        self.progress = progress

    def map(self, fn: Callable[[T], R], jobs: Sequence[T], *, desc: str) -> list[R]:
        results: list[R] = []
        for job in progress(jobs, desc=desc, enabled=self.progress, name=unit_name):
            results.append(fn(job))
        return results


def progress(items: Iterable[Any], *, desc: str, enabled: Progress = True, total: int | None = None,
             name: Callable[[Any], str] = unit_name) -> Iterable[Any]:
    """A tqdm bar on stderr, plain progress lines (``enabled="lines"``), or the plain iterable when disabled.

    ``name`` says what a plain line calls an item."""
    style = progress_style(enabled)
    if style is None:
        return items
    if style == "lines":
        return _plain_lines(items, desc, total if total is not None else _length(items), name)
    return tqdm(items, desc=desc, total=total, unit="job", leave=False, dynamic_ncols=True)


def _length(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _plain_lines(items: Iterable[Any], desc: str, total: int | None, name: Callable[[Any], str]) -> Iterator[Any]:
    lines = PlainProgress(desc, total)
    for item in items:
        lines.start()
        yield item
        lines.done(name(item))


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


class PlainProgress:
    """Plain one-line progress messages for standard error that is not a terminal (a pipe, a log file).

    One line per finished unit that took a second or more in a stage of at most :data:`PLAIN_EACH_UP_TO`
    units (every adapter the trainer trains: ``train (peft-lora) 3/12 chat-pirate 41 s``); otherwise a line
    when :data:`PLAIN_EVERY_S` seconds have passed since the last one or at every 10 % of the stage (a stage
    of 1008 fast decompositions prints about ten); always one for the stage's last unit. A line is the
    stage, units finished / units, the unit's name, its seconds and, after the first, the stage's elapsed
    seconds.

    Args:
        desc: The stage as the progress bar names it.
        total: Units in the stage (``None``: unknown, no 10 % lines).
        write: Where a line goes (standard error by default).
        clock: Seconds (monotonic); tests pass a fake one.
        unit_seconds: Whether a line gives the unit's seconds (``False`` where units run at once: Ray).
    """

    def __init__(self, desc: str, total: int | None, *, write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, unit_seconds: bool = True) -> None:
        self.desc = desc
        self.total = total
        self.unit_seconds = unit_seconds
        self.write = write or _stderr
        self.clock = clock
        self.count = 0
        self.began = self.last_line = self._unit_start = clock()

    def start(self) -> None:
        """A unit begins (its seconds count from here; otherwise from the previous unit's end)."""
        self._unit_start = self.clock()

    def done(self, name: str = "") -> None:
        """A unit finished: print its line when it is due."""
        now = self.clock()
        self.count += 1
        took, self._unit_start = now - self._unit_start, now
        total = self.total
        if self._due(now, took, total):
            self.last_line = now
            counted = f"{self.count}/{total}" if total else str(self.count)
            took_part = f"{_seconds(took)} s" if self.unit_seconds else ""
            line = " ".join(part for part in (self.desc, counted, name, took_part) if part)
            if self.count > 1 or not self.unit_seconds:
                line += f" (elapsed {_seconds(now - self.began)} s)"
            self.write(line)

    def _due(self, now: float, took: float, total: int | None) -> bool:
        if total is not None and self.count >= total:
            return True
        if total is not None and total <= PLAIN_EACH_UP_TO and took >= PLAIN_SLOW_UNIT_S:
            return True
        if now - self.last_line >= PLAIN_EVERY_S:
            return True
        tenths = (self.count * 10 // total, (self.count - 1) * 10 // total) if total else (0, 0)
        return total is not None and total > PLAIN_EACH_UP_TO and tenths[0] > tenths[1]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
