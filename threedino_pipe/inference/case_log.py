"""The per-case provenance of ``3dino predict``: one ``predict_log.jsonl`` line per case (docs/predict.md).

:class:`CaseLog` stamps a case when its reading starts and appends its line when it ends: the
inputs (the chosen SeriesInstanceUID per channel of a DICOM study, else the file per channel), the
models' checksums, the options, start and end time, the outcome and the files written, with the
SOPInstanceUID of each DICOM result object read back from the file, and the result objects a
``--send-to`` destination acknowledged (``sends``: each ``sent`` line of ``journal.jsonl`` is handed
to :meth:`CaseLog.sent` as it is journalled; a case's line is appended after its sends). A DICOM
study that failed selection gets its line too. With ``--continue``, sends the journal holds but no
line does (a run that ended between an acknowledgement and its case's line) go into the next line
of their case, and a case an earlier run predicted whose results are sent now gets a line of its own.
Nothing of a source header beyond UIDs is written, so the log holds no
patient name or ID (the case is named by its study key unless ``--keep-patient-names``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from threedino_pipe.artifacts import (
    LoggedOutput,
    LoggedWindows,
    ModelIdentity,
    PredictLogLine,
    PredictOptions,
    SentObject,
    SeriesFallback,
)
from threedino_pipe.artifacts.journal import JournalLine, read_journal
from threedino_pipe.artifacts.predict_log import utc_now
from threedino_pipe.dicom.header import read_text_elements
from threedino_pipe.inference.case_outputs import CaseOutputs
from threedino_pipe.inference.folder_runner import PREDICTIONS, Failure
from threedino_pipe.inference.input_cases import InputCase
from threedino_pipe.inference.predictor import PROBABILITIES

log = logging.getLogger(__name__)


@dataclass
class CaseLog:
    """Appends the ``predict_log.jsonl`` lines of one process's cases to ``path``.

    Attributes:
        channel_names: the model's channel names in channel order (the keys of a line's inputs).
        classification: cases write a row of ``predictions.csv`` instead of files of their own.
    """

    path: Path
    models: list[ModelIdentity]
    options: PredictOptions
    channel_names: Sequence[str]
    outputs: CaseOutputs
    output_dir: Path
    classification: bool = False
    _started: dict[str, str] = field(default_factory=dict)
    _sends: dict[str, list[SentObject]] = field(default_factory=dict)  # case -> acknowledged, not yet logged
    _read: dict[str, InputCase] = field(default_factory=dict)  # case -> as read (:meth:`read`)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, case: InputCase) -> InputCase:
        """Stamp the start of ``case`` (its reading, possibly in a read-ahead thread); returns ``case``."""
        with self._lock:
            self._started[case.case_id] = utc_now()
        return case

    def read(self, case: InputCase) -> None:
        """Note ``case`` as read (after a read fallback its series are others than those chosen) for its line."""
        with self._lock:
            self._read[case.case_id] = case

    def done(self, case: InputCase, result: object | None, failure: Failure | None) -> None:
        """Append the line of a case that was predicted (``result``) or failed (``failure``)."""
        with self._lock:
            started = self._started.pop(case.case_id, None)
            case = self._read.pop(case.case_id, case)
        outputs = [] if failure is not None else self._written(case)
        counts = getattr(result, "windows", None) if failure is None else None
        windows = None if counts is None else LoggedWindows.of(counts)
        self._append(case.case_id, self._inputs(case), started, failure, outputs, self._fallbacks(case), windows)

    def failed_before(self, failures: Sequence[Failure]) -> None:
        """Append a line per input that failed before any reading (a DICOM study without usable series)."""
        for failure in failures:
            self._append(failure.case, ({}, {}), None, failure, [])

    def sent(self, line: JournalLine) -> None:
        """Keep one acknowledged result object (a ``sent`` journal line) for the next line of its case."""
        with self._lock:
            self._sends.setdefault(line.study, []).append(
                SentObject(to=line.to or "", sop_instance_uid=line.sop or "", time=line.t))

    def carry_over(self, journal_path: Path, case_ids: Sequence[str]) -> None:
        """``--continue``: keep the sends of ``case_ids`` that ``journal_path`` holds and no line logged yet."""
        logs = {self.path, PredictLogLine.in_folder(self.output_dir)}
        logged = {(line.case_id, s.to, s.sop_instance_uid) for path in logs
                  for line in PredictLogLine.read_lines(path) for s in line.sends}
        wanted = set(case_ids)
        for line in read_journal(journal_path):
            if line.event == "sent" and line.study in wanted and (line.study, line.to, line.sop) not in logged:
                self.sent(line)

    def sent_earlier_results(self, cases: Sequence[InputCase]) -> None:
        """Append a ``predicted`` line for each of ``cases`` (predicted by an earlier run) with sends to log; its
        inputs as the case's last line says they were read (without such a line: the series chosen)."""
        pending = [case for case in cases if case.case_id in self._sends]
        if not pending:
            return
        last = {line.case_id: line for line in PredictLogLine.read_lines(PredictLogLine.in_folder(self.output_dir))
                if line.series_uids or line.files}
        for case in pending:
            before = last.get(case.case_id)
            inputs = (before.series_uids, before.files) if before else self._inputs(case)
            fallbacks = before.series_fallbacks if before else self._fallbacks(case)
            self._append(case.case_id, inputs, None, None, self._written(case), fallbacks)

    def _inputs(self, case: InputCase) -> tuple[dict[str, str], dict[str, str]]:
        """(channel -> SeriesInstanceUID, channel -> file) of a case."""
        if case.is_dicom:
            return {n: s.series_uid for n, s in zip(self.channel_names, case.series, strict=False)}, {}
        return {}, {n: str(f) for n, f in zip(self.channel_names, case.files, strict=False)}

    def _fallbacks(self, case: InputCase) -> list[SeriesFallback]:
        """The case's read fallbacks, channels by name."""
        return [SeriesFallback(channel=self.channel_names[f.channel], series_uid=f.dropped, reason=f.problem,
                               read_instead=f.used, rank=f.rank) for f in case.fallbacks]

    def _written(self, case: InputCase) -> list[LoggedOutput]:
        """The files ``case`` wrote (a DICOM object with its SOPInstanceUID)."""
        if self.classification:
            return [LoggedOutput(file=PREDICTIONS, output_format="predictions")]
        out = []
        if self.options.save_probabilities:
            out.append(LoggedOutput(file=f"{case.case_id}{PROBABILITIES}", output_format="probabilities"))
        for fmt, name in zip(self.outputs.formats, self.outputs.names(case), strict=True):
            out.append(LoggedOutput(file=name, output_format=fmt, sop_instance_uid=self._sop_uid(name)
                                    if fmt != "nifti" else None))
        return out

    def _sop_uid(self, name: str) -> str | None:
        try:
            return read_text_elements(self.output_dir / name, ["SOPInstanceUID"])["SOPInstanceUID"] or None
        except Exception as exc:  # noqa: BLE001 - the log line must not fail the case that was written
            log.warning("cannot read the SOPInstanceUID of %s (%s)", name, type(exc).__name__)
            return None

    def _append(self, case: str, inputs: tuple[dict[str, str], dict[str, str]], started: str | None,
                failure: Failure | None, outputs: list[LoggedOutput],
                fallbacks: list[SeriesFallback] | None = None, windows: LoggedWindows | None = None) -> None:
        ended = utc_now()
        with self._lock:
            sends = self._sends.pop(case, [])
        line = PredictLogLine(case_id=case, series_uids=inputs[0], files=inputs[1], models=self.models,
                              options=self.options, started=started or ended, ended=ended,
                              outcome="failed" if failure else "predicted",
                              error=failure.error if failure else None, error_file=failure.file if failure else None,
                              outputs=outputs, sends=sends, series_fallbacks=fallbacks or [], windows=windows)
        with self._lock:
            line.append(self.path)


def logged_fallbacks(path: Path) -> list[tuple[str, str, str]]:
    """(series that could not be read, the problem, series read instead or ``""`` when none could be) of every
    case's last line in the ``predict_log.jsonl`` at ``path`` (for ``series_selection.csv``)."""
    last = {line.case_id: line for line in PredictLogLine.read_lines(path)}
    return [(f.series_uid, f.reason, f.read_instead) for line in last.values() for f in line.series_fallbacks]
