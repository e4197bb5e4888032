"""The per-case provenance of ``3dino predict``: one ``predict_log.jsonl`` line per case (docs/predict.md).

:class:`CaseLog` stamps a case when its reading starts and appends its line when it ends: the
inputs (the chosen SeriesInstanceUID per channel of a DICOM study, else the file per channel), the
models' checksums, the options, start and end time, the outcome and the files written, with the
SOPInstanceUID of each DICOM result object read back from the file. A DICOM study that failed
selection gets its line too. Nothing of a source header beyond UIDs is written, so the log holds no
patient name or ID (the case is named by its study key unless ``--keep-patient-names``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from threedino_pipe.artifacts import LoggedOutput, LoggedWindows, ModelIdentity, PredictLogLine, PredictOptions
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
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, case: InputCase) -> InputCase:
        """Stamp the start of ``case`` (its reading, possibly in a read-ahead thread); returns ``case``."""
        with self._lock:
            self._started[case.case_id] = utc_now()
        return case

    def done(self, case: InputCase, result: object | None, failure: Failure | None) -> None:
        """Append the line of a case that was predicted (``result``) or failed (``failure``)."""
        with self._lock:
            started = self._started.pop(case.case_id, None)
        outputs = [] if failure is not None else self._written(case)
        counts = getattr(result, "windows", None) if failure is None else None
        windows = None if counts is None else LoggedWindows(total=counts.total, skipped=counts.skipped,
                                                            skip_off=counts.note)
        self._append(case.case_id, self._inputs(case), started, failure, outputs, windows)

    def failed_before(self, failures: Sequence[Failure]) -> None:
        """Append a line per input that failed before any reading (a DICOM study without usable series)."""
        for failure in failures:
            self._append(failure.case, ({}, {}), None, failure, [])

    def _inputs(self, case: InputCase) -> tuple[dict[str, str], dict[str, str]]:
        """(channel -> SeriesInstanceUID, channel -> file) of a case."""
        if case.is_dicom:
            return {n: s.series_uid for n, s in zip(self.channel_names, case.series, strict=False)}, {}
        return {}, {n: str(f) for n, f in zip(self.channel_names, case.files, strict=False)}

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
                failure: Failure | None, outputs: list[LoggedOutput], windows: LoggedWindows | None = None) -> None:
        ended = utc_now()
        line = PredictLogLine(case_id=case, series_uids=inputs[0], files=inputs[1], models=self.models,
                              options=self.options, started=started or ended, ended=ended,
                              outcome="failed" if failure else "predicted",
                              error=failure.error if failure else None, error_file=failure.file if failure else None,
                              outputs=outputs, windows=windows)
        with self._lock:
            line.append(self.path)
