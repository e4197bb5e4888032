"""Rich progress bars that switch themselves off when not on a terminal or when asked."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on or off for this process (``--no-progress``)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    """True when bars are wanted and stderr is a terminal."""
    return _enabled and sys.stderr.isatty()


class _StatusColumn(ProgressColumn):
    """The task's ``status`` field (e.g. a training run's latest loss), empty when it has none."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("status", "")), style="cyan")


def stderr_console(quiet: bool = False) -> Console:
    """A rich console on stderr (silent with ``quiet``). Off a terminal (a batch log) a message stays on one line
    however long its paths: rich would otherwise wrap it at 80 columns, splitting a path across lines of the log."""
    return Console(stderr=True, soft_wrap=not sys.stderr.isatty(), quiet=quiet)


def make_progress() -> Progress:
    """A progress display with count, elapsed time, ETA and a status text, drawn on stderr."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), _StatusColumn(), console=stderr_console(),
                    disable=not enabled(), transient=False)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar (a no-op wrapper when bars are off)."""
    if not enabled():
        yield from items
        return
    with make_progress() as progress:
        yield from progress.track(items, total=total, description=description)
