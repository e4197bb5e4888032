"""``journal.jsonl``: what happened to each DICOM study, one line per event, never rewritten (docs/listen.md).

Written by ``3dino listen`` (its folder: every event of the node) and by ``3dino predict`` with
``--from-pacs`` / ``--send-to`` (its output folder: ``retrieved`` and ``sent``). Each line is one
:class:`JournalLine`, a whole JSON object with its ``kind`` and ``schema_version``, appended with
a single ``write`` on a file opened for appending and flushed to disk (``fsync``) before the
caller goes on: a crash leaves at most a torn last line, which :func:`read_journal` ignores and
:class:`Journal` cuts off before its first append. Lines hold study keys, UIDs of results and
node addresses, never patient data.

Test hook: with the environment variable ``THREEDINO_TEST_CRASH_AFTER=EVENT[:K]`` the process ends
at once (``os._exit(CRASH_EXIT_CODE)``, no clean-up, like a crash) right after writing its K-th
(default first) line of event EVENT. The tests use it to stop a node at a deterministic point.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.runtime.atomic_files import append_line
from threedino_pipe.runtime.errors import UserError

CRASH_HOOK = "THREEDINO_TEST_CRASH_AFTER"
CRASH_EXIT_CODE = 86
Event = Literal["received", "quiet", "started", "predicted", "sent", "send_failed", "done", "retrieved"]
OutputKind = Literal["dicom-seg", "rtstruct"]


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the millisecond (``2026-12-06T20:01:02.345+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class JournalOutput(Record):
    """One DICOM result of a study: its format, file (relative to the journal's folder) and SOPInstanceUID."""

    kind: OutputKind
    file: str
    sop: str


class JournalLine(Artifact):
    """One line of ``journal.jsonl``: an event of one study (by study key); fields per event in docs/listen.md."""

    KIND = "journal_line"
    SCHEMA_VERSION = 1
    WRITER = "3dino listen"
    FILE = "journal.jsonl"
    OMIT_WHEN_NONE = ("instances", "calling_ae", "source", "cycle", "outcome", "series_uids", "outputs", "error",
                      "to", "sop", "attempt", "retry_at")

    t: str
    event: Event
    study: str
    instances: int | None = None  # received: in this association; quiet: in all; retrieved: files
    calling_ae: str | None = None  # received: who sent them
    source: str | None = None  # retrieved: the node or URL
    cycle: int | None = None  # started/predicted: the study's cycle (files after `done` start the next)
    outcome: Literal["ok", "failed"] | None = None  # predicted
    series_uids: dict[str, str] | None = None  # predicted: channel -> chosen series
    outputs: list[JournalOutput] | None = None  # predicted, done
    error: str | None = None  # predicted (failed), send_failed
    to: str | None = None  # sent, send_failed: the destination
    sop: str | None = None  # sent: the acknowledged SOPInstanceUID
    attempt: int | None = None  # send_failed: the round that failed (1, 2, ...)
    retry_at: str | None = None  # send_failed: when the next round starts (ISO time)


def read_journal(path: str | Path) -> list[JournalLine]:
    """Every complete line of a journal (none when the file does not exist); a torn last line is left out.

    Raises:
        UserError: a complete line that is not a valid journal line (named with its number).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    lines = []
    for number, raw in enumerate(complete.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise UserError(f"line {number} is not JSON", file=path,
                            fix="move the file away to start a new journal (studies are then handled again)") from None
        lines.append(JournalLine.from_data(parsed, f"{path}, line {number}"))
    return lines


class Journal:
    """Appends :class:`JournalLine` s to one file, one atomic write per line (safe across threads and processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._written: Counter[str] = Counter()
        self._crash = _crash_hook()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        """Remove a last line without its newline (a write a crash cut short), so the next line starts clean."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
                os.fsync(fh.fileno())

    def append(self, line: JournalLine) -> None:
        """Append ``line`` with one ``write`` and ``fsync``; then honour the test hook (module docstring)."""
        with self._lock:
            append_line(self.path, json.dumps(line.to_data(), separators=(",", ":")))
            self._written[line.event] += 1
            if self._crash is not None and self._crash == (line.event, self._written[line.event]):
                os._exit(CRASH_EXIT_CODE)

    def add(self, event: str, study: str, **fields) -> JournalLine:
        """Append a line of ``event`` for ``study`` stamped with the current time; returns it."""
        line = JournalLine(t=now_iso(), event=event, study=study, **fields)
        self.append(line)
        return line


def _crash_hook() -> tuple[str, int] | None:
    """``(event, k)`` from ``THREEDINO_TEST_CRASH_AFTER=EVENT[:K]``, or None when unset."""
    value = os.environ.get(CRASH_HOOK, "").strip()
    if not value:
        return None
    event, _, count = value.partition(":")
    return event, int(count or 1)
