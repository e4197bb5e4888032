"""The state of ``3dino listen``'s studies, rebuilt from its journal, and what one prediction left (docs/listen.md).

A study (by study key) goes through the phases of one *cycle*: ``receiving`` (files arrive),
``queued`` (quiet for the set time), ``predicting`` (a worker process runs ``3dino predict`` on
it), ``sending`` (results waiting for every destination's acknowledgement), then ``done`` or
``failed``. Files that arrive while a study is predicted or sent are counted for the next cycle,
which starts when this one ends; files for a ``done`` or ``failed`` study start the next cycle at
once. :func:`apply` is the one transition function: the node applies each journal line as it
writes it, and a restarted node replays the whole journal through it, so both agree.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from threedino_pipe.artifacts.journal import JournalLine, JournalOutput
from threedino_pipe.inference.case_outputs import SUFFIXES
from threedino_pipe.inference.dicom_cases import SELECTION_FILE
from threedino_pipe.inference.folder_runner import FAILURES, read_csv_rows
from threedino_pipe.inference.pacs_cases import sop_instance_uid
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

INCOMING, RESULTS = "incoming", "results"
WORKER_LOG = "predict.log"
ACTIVE = ("predicting", "sending")
FINISHED = ("done", "failed")


@dataclass
class StudyState:
    """One study's place in its cycle (module docstring)."""

    key: str
    cycle: int = 1
    phase: str = "receiving"
    instances: int = 0  # files of this cycle
    total: int = 0  # files journalled as received, all cycles
    more: int = 0  # files received while predicting or sending: the next cycle's
    outputs: list[JournalOutput] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # destination -> failed send rounds
    retry_at: dict[str, float] = field(default_factory=dict)  # destination -> next round (epoch s)
    queued_seq: int = 0  # order of the queue

    def _next_cycle(self, instances: int) -> None:
        self.cycle += 1
        self.phase, self.instances, self.more = "receiving", instances, 0
        self.outputs, self.attempts, self.retry_at = [], {}, {}

    def _finish(self, phase: str) -> None:
        self.phase = phase
        if self.more:
            self._next_cycle(self.more)

    def results_name(self) -> str:
        """The cycle's results folder name: the key, then ``<key>-<cycle>`` for later cycles."""
        return self.key if self.cycle == 1 else f"{self.key}-{self.cycle}"


def apply(states: dict[str, StudyState], line: JournalLine) -> StudyState:
    """Apply one journal line to the studies' states; returns the study's state."""
    state = states.setdefault(line.study, StudyState(line.study))
    event = line.event
    if event == "received":
        count = line.instances or 0
        state.total += count
        if state.phase in ACTIVE:
            state.more += count
        elif state.phase in FINISHED:
            state._next_cycle(count)
        else:
            state.phase, state.instances = "receiving", state.instances + count
    elif event == "quiet":
        state.phase, state.instances = "queued", line.instances or state.instances
    elif event == "started":
        state.phase, state.cycle = "predicting", line.cycle or state.cycle
    elif event == "predicted":
        if line.outcome == "ok":
            state.phase, state.outputs = "sending", list(line.outputs or [])
        else:
            state._finish("failed")
    elif event == "send_failed" and line.to:
        state.attempts[line.to] = line.attempt or 1
        state.retry_at[line.to] = datetime.fromisoformat(line.retry_at).timestamp() if line.retry_at else 0.0
    elif event == "done":
        state._finish("done")
    return state


def count_files(folder: Path) -> int:
    """Received files in a study folder (``*.dcm``, temporary files left by a crash not counted)."""
    return sum(1 for p in folder.glob("*.dcm") if not p.name.startswith(".")) if folder.is_dir() else 0


def remove_partial_files(incoming: Path) -> int:
    """Delete the temporary files a crash left in ``incoming/`` (never acknowledged: the sender still has them)."""
    removed = 0
    for path in incoming.glob("*/.*.partial*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


# The worker first asks Linux to kill it when the node dies (PR_SET_PDEATHSIG = 1, SIGKILL), so a node
# that crashes leaves no prediction running into a folder its restart will use; then it becomes `3dino`.
_BOOTSTRAP = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(3)
os.execv(sys.executable, [sys.executable, "-m", "threedino_pipe.cli", *sys.argv[2:]])
"""


def worker_command(incoming: Path, results: Path, predict_args: list[str]) -> list[str]:
    """The worker process of one study: ``3dino predict -i incoming -o results --continue`` with the node's options.

    It ends with the node (Linux: the parent-death signal), so it must be started from the node's main thread.
    """
    return [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), "predict", "-i", str(incoming), "-o", str(results),
            "--continue", "--num-workers", "0", "--no-progress", *predict_args]


@dataclass
class Outcome:
    """What a worker left: the result objects found, the chosen series, and why it failed ("" when it did not)."""

    outputs: list[JournalOutput]
    series_uids: dict[str, str]
    error: str


def collect(folder: Path, results: Path, key: str, formats: tuple[str, ...], returncode: int) -> Outcome:
    """Read a finished worker's results folder (``results``, inside the node ``folder``)."""
    outputs, error = [], ""
    for fmt in formats:
        path = results / f"{key}{SUFFIXES[fmt]}" if fmt in SUFFIXES else None
        if path is None or not path.is_file():
            continue
        try:
            outputs.append(JournalOutput(kind=fmt, file=str(path.relative_to(folder)), sop=sop_instance_uid(path)))
        except UserError as exc:
            error = exc.problem
    expected = sum(f in SUFFIXES for f in formats)
    if returncode != 0 or len(outputs) < expected:
        error = error or _worker_error(results, returncode)
    return Outcome(outputs, _chosen_series(results / SELECTION_FILE), error)


def _worker_error(results: Path, returncode: int) -> str:
    """Why a worker failed: its failures.csv row, else the last line it printed, else its exit code."""
    _, rows = read_csv_rows(results / FAILURES)
    if rows and len(rows[0]) >= 3:
        return rows[0][2]
    log_path = results / WORKER_LOG
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()] if log_path.is_file() else []
    problems = [ln for ln in lines if ln.startswith("error:")]
    last = problems[-1] if problems else next((ln for ln in reversed(lines) if ln), "")
    how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    return f"the prediction ended with {how}" + (f": {last[:300]}" if last else "")


def _chosen_series(path: Path) -> dict[str, str]:
    """Channel -> chosen SeriesInstanceUID from ``series_selection.csv`` (empty when there is none)."""
    header, rows = read_csv_rows(path)
    try:
        status, channel, series = (header.index(name) for name in ("status", "channel", "series_uid"))
    except ValueError:  # no file, or another layout
        return {}
    return {row[channel]: row[series] for row in rows if len(row) == len(header) and row[status] == "chosen"}
