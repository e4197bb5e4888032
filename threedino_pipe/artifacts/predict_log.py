"""``predict_log.jsonl``: one line per case ``3dino predict`` handled, appended, never rewritten (docs/predict.md).

Each line is one JSON object (kind ``predict_log_line``): the case, its inputs (the chosen
SeriesInstanceUID per channel for a DICOM study, the file per channel for image files; for a
DICOM channel whose chosen series could not be read, ``series_fallbacks`` says why and which series
was read instead, or on a failed case's line that none could be), the
models' checksums, the options, start and end time (UTC, ISO 8601), the outcome (``predicted`` or
``failed`` with the message), the files written and, for DICOM results, their SOPInstanceUIDs;
``sends`` lists the result objects acknowledged by a destination; ``windows`` counts a segmented case's
sliding windows and those skipped as air (and, with ``--coarse``, by the coarse pass). No patient name or ID: a DICOM
case is named by its study key (by its PatientID only with ``--keep-patient-names``).

A line is appended with one ``write`` on a file opened for appending and flushed to disk
(:func:`threedino_pipe.runtime.atomic_files.append_line`), so a line that exists is whole; a last
line cut short by a crash (no newline) is skipped when reading. Under torchrun each rank appends to
``predict_log_rank<r>.jsonl``, which rank 0 appends to ``predict_log.jsonl`` at the end.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.artifacts.predict_args import ModelIdentity, PredictOptions
from threedino_pipe.runtime.atomic_files import append_line
from threedino_pipe.runtime.errors import UserError


def utc_now() -> str:
    """The current time, UTC, ISO 8601 with milliseconds (``2026-12-06T18:00:00.123+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class LoggedOutput(Record):
    """One file a case wrote: its name in the output folder, its format and, for DICOM objects, its UID."""

    file: str
    output_format: str
    sop_instance_uid: str | None = None

    OMIT_WHEN_NONE = ("sop_instance_uid",)


class LoggedWindows(Record):
    """The sliding windows of a segmented case: all of them, those skipped as air outside the body, and why
    none was skipped (``skip_off``; empty when skipping ran, or with ``--no-skip``). With ``--coarse``:
    ``coarse_windows`` the windows the coarse pass ran (on the downsampled case), ``coarse_skipped`` the
    full-resolution windows skipped as far from anything it found (beyond those skipped as air), and
    ``coarse_off`` why none was (empty when its mask was used)."""

    total: int = Field(ge=0)
    skipped: int = Field(ge=0)
    skip_off: str = ""
    coarse_windows: int | None = Field(default=None, ge=0)
    coarse_skipped: int | None = Field(default=None, ge=0)
    coarse_off: str | None = None

    OMIT_WHEN_NONE = ("coarse_windows", "coarse_skipped", "coarse_off")

    @classmethod
    def of(cls, counts) -> LoggedWindows:
        """From predict's ``WindowCounts`` (``inference/air_windows``; its ``coarse`` part when the coarse pass ran)."""
        coarse = counts.coarse
        return cls(total=counts.total, skipped=counts.skipped, skip_off=counts.note,
                   coarse_windows=None if coarse is None else coarse.total,
                   coarse_skipped=None if coarse is None else coarse.skipped,
                   coarse_off=None if coarse is None else coarse.note)


class SentObject(Record):
    """One result object acknowledged by a destination (``AET@host:port`` or a DICOMweb URL)."""

    to: str
    sop_instance_uid: str
    time: str


class SeriesFallback(Record):
    """A channel's series that could not be read (``series_uid``, ``reason``: the problem, UIDs but no patient
    data) and the series read instead (``read_instead``, of rank ``rank`` among the study's usable series of
    its modality; ``""`` and null on a failed case's line, when no usable series of the channel could be
    read)."""

    channel: str
    series_uid: str
    reason: str
    read_instead: str = ""
    rank: int | None = Field(default=None, ge=2)


class PredictLogLine(Artifact):
    """One line of ``predict_log.jsonl``: what happened to one case, with what, when."""

    KIND = "predict_log_line"
    SCHEMA_VERSION = 1
    WRITER = "3dino predict"
    FILE = "predict_log.jsonl"

    case_id: str
    series_uids: dict[str, str] = {}  # DICOM: channel name -> SeriesInstanceUID read (after a fallback: that one)
    series_fallbacks: list[SeriesFallback] = []  # DICOM: series that could not be read, and what was instead
    files: dict[str, str] = {}  # image files: channel name -> path as given
    models: list[ModelIdentity] = Field(min_length=1)
    options: PredictOptions
    started: str
    ended: str
    outcome: Literal["predicted", "failed"]
    error: str | None = None
    error_file: str | None = None
    outputs: list[LoggedOutput] = []
    sends: list[SentObject] = []
    windows: LoggedWindows | None = None  # segmented cases that were predicted

    OMIT_WHEN_NONE = ("error", "error_file", "windows")

    def append(self, path: str | Path) -> Path:
        """Append this line to the JSONL file ``path`` (created when missing); returns ``path``."""
        append_line(path, json.dumps(self.to_data(), separators=(",", ":")))
        return Path(path)

    @classmethod
    def read_lines(cls, path: str | Path) -> list[PredictLogLine]:
        """Every whole line of the JSONL file ``path`` (none when it does not exist), validated.

        Raises:
            UserError: a line that is not JSON or not a valid line, named by its number.
        """
        path = Path(path)
        if not path.is_file():
            return []
        text = path.read_text()
        lines = text.split("\n")
        if not text.endswith("\n"):
            lines = lines[:-1]  # a last line cut short by a crash: never written whole
        out = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"line {number} is not JSON ({exc})", file=path,
                                fix="remove the line (the other lines stay valid)") from None
            out.append(cls.from_data(data, f"{path}, line {number}"))
        return out

    @classmethod
    def rank_part(cls, folder: str | Path, rank: int, world_size: int) -> Path:
        """The file rank ``rank`` appends to: ``predict_log.jsonl`` alone, else ``predict_log_rank<r>.jsonl``."""
        if world_size == 1:
            return cls.in_folder(folder)
        return Path(folder) / f"{Path(cls.FILE).stem}_rank{rank}.jsonl"

    @classmethod
    def merge_parts(cls, folder: str | Path, world_size: int) -> int:
        """Append every rank's part to ``predict_log.jsonl`` and remove the parts; returns the lines moved."""
        moved = 0
        if world_size == 1:
            return moved
        for rank in range(world_size):
            part = cls.rank_part(folder, rank, world_size)
            for line in cls.read_lines(part):
                line.append(cls.in_folder(folder))
                moved += 1
            part.unlink(missing_ok=True)
        return moved
