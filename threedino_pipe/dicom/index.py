"""Header-only index of a folder tree of DICOM files, grouped by study and series.

Any names and nesting are accepted; every regular file under the root is tried. Headers are read
in worker processes by :func:`threedino_pipe.dicom.header.read_instance_header` (a byte-level scan
for the common case, ``pydicom.dcmread(..., stop_before_pixels=True)`` for the rest), so no pixel
data is decoded. A file that is not DICOM, whose header cannot be parsed, or whose pixel data
element is cut short is recorded as a :class:`SkippedFile` with the reason, never fatal; when its
header was readable, the skipped file stays attached to its series so that selection can name it.

Per series the index keeps modality, ImageType, SeriesDescription, transfer syntaxes, the number
of instances and frames, and the geometry of every plane (classic single-frame images: one plane
per file; enhanced and legacy-converted multi-frame images: one plane per frame, from the
functional groups), analysed by :func:`threedino_pipe.dicom.geometry.analyse_stack` (orientation,
pixel spacing, slice positions, gaps). Nothing identifying the patient is read.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from threedino_pipe.dicom.geometry import Stack, analyse_stack, normal_of
from threedino_pipe.dicom.header import (  # noqa: F401 - InstanceHeader, read_instance_header: re-exported
    InstanceHeader,
    Plane,
    SkippedFile,
    read_chunk,
    read_instance_header,
)
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

IN_PROCESS_BELOW = 1000  # smaller trees are read in this process: starting a worker costs ~0.3 s, a file ~0.1 ms


@dataclass
class SeriesRecord:
    """One series of one study: its instances (sorted by path) and the files of it that were skipped."""

    study_uid: str
    series_uid: str
    instances: list[InstanceHeader] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def _common(self, attribute: str):
        values = Counter(getattr(i, attribute) for i in self.instances)
        return values.most_common(1)[0][0] if values else None

    @property
    def modality(self) -> str:
        return self._common("modality") or ""

    @property
    def image_type(self) -> tuple[str, ...]:
        return self._common("image_type") or ()

    @property
    def series_description(self) -> str:
        return self._common("series_description") or ""

    @property
    def series_number(self) -> int | None:
        return self._common("series_number")

    @property
    def sop_class_uids(self) -> tuple[str, ...]:
        return tuple(sorted({i.sop_class_uid for i in self.instances}))

    @property
    def transfer_syntaxes(self) -> tuple[str, ...]:
        return tuple(sorted({i.transfer_syntax_uid for i in self.instances}))

    @property
    def frame_of_reference_uids(self) -> tuple[str, ...]:
        return tuple(sorted({i.frame_of_reference_uid for i in self.instances if i.frame_of_reference_uid}))

    @property
    def number_of_frames(self) -> int:
        return sum(i.number_of_frames for i in self.instances)

    @property
    def is_image(self) -> bool:
        """True when every instance holds pixel data."""
        return bool(self.instances) and all(i.has_pixel_data and i.rows for i in self.instances)

    @property
    def geometry_problems(self) -> tuple[str, ...]:
        return tuple(sorted({i.geometry_problem for i in self.instances if i.geometry_problem}))

    @property
    def planes(self) -> list[Plane]:
        return [p for i in self.instances for p in i.planes]

    @cached_property
    def stack(self) -> Stack | None:
        """The planes' order and grid (None for a non-image series or one without geometry)."""
        planes = self.planes
        if not planes or self.geometry_problems:
            return None
        thickness = next((i.slice_thickness_mm for i in self.instances if i.slice_thickness_mm), None)
        return analyse_stack(planes, single_plane_spacing_mm=thickness or 1.0)

    @property
    def orientation_label(self) -> str:
        """AXIAL, CORONAL, SAGITTAL (normal within ~25 degrees of a patient axis) or OBLIQUE ("" without geometry)."""
        planes = self.planes
        if not planes:
            return ""
        normal = np.abs(normal_of(planes[0].orientation))
        axis = int(np.argmax(normal))
        return ("SAGITTAL", "CORONAL", "AXIAL")[axis] if normal[axis] > 0.9 else "OBLIQUE"

    def summary(self) -> dict:
        """Plain values for a CSV row or a log line (no patient identity)."""
        stack = self.stack
        planes = self.planes
        spacing = planes[0].pixel_spacing if planes else None
        return {
            "study_uid": self.study_uid, "series_uid": self.series_uid, "series_number": self.series_number,
            "modality": self.modality, "image_type": "\\".join(self.image_type),
            "series_description": self.series_description, "instances": len(self.instances),
            "frames": self.number_of_frames, "skipped_files": len(self.skipped),
            "orientation": self.orientation_label,
            "rows_columns": f"{planes[0].rows}x{planes[0].columns}" if planes else "",
            "pixel_spacing_mm": "x".join(f"{v:g}" for v in spacing) if spacing else "",
            "slice_spacing_mm": f"{stack.slice_spacing_mm:g}" if stack and stack.slice_spacing_mm else "",
            "geometry_problems": "; ".join(self.geometry_problems) or (stack.describe() if stack else ""),
            "transfer_syntaxes": " ".join(self.transfer_syntaxes),
        }


@dataclass
class StudyRecord:
    """One study: its series by SeriesInstanceUID."""

    study_uid: str
    series: dict[str, SeriesRecord] = field(default_factory=dict)


@dataclass
class DicomIndex:
    """Every study and series found under ``root``, and every file left out.

    Attributes:
        root: the folder indexed.
        studies: by StudyInstanceUID (in order of first appearance in the sorted walk).
        skipped: every file left out, with the reason.
        files: regular files tried.
        seconds: wall time of the indexing.
    """

    root: Path
    studies: dict[str, StudyRecord]
    skipped: list[SkippedFile]
    files: int
    seconds: float

    def iter_series(self) -> Iterator[SeriesRecord]:
        for study in self.studies.values():
            yield from study.series.values()

    def display_path(self, path: str | Path) -> str:
        """``path`` relative to the indexed root (the form used in messages)."""
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)


def iter_files(root: Path, exclude: Path | None = None) -> Iterator[str]:
    """Every regular file under ``root``, in a sorted walk (symbolic links to folders not followed).

    ``exclude``: a folder under ``root`` left out with everything in it (e.g. the output folder).
    """
    if root.is_file():
        yield str(root)
        return
    excluded = None if exclude is None else Path(exclude).resolve()
    for folder, dirs, files in os.walk(root):
        if excluded is not None:
            dirs[:] = [d for d in dirs if Path(folder, d).resolve() != excluded]
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                yield path


def list_files(root: Path) -> list[str]:
    """:func:`iter_files` as a list."""
    return list(iter_files(Path(root)))


def _chunks(paths: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for path in paths:
        chunk.append(path)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def index_folder(root: str | Path, *, processes: int = 2, chunk_size: int = 128,
                 exclude: str | Path | None = None) -> DicomIndex:
    """Index every DICOM file under ``root`` from headers only.

    Args:
        root: a folder (any nesting) or a single file.
        processes: worker processes reading headers (1: read in this process). Trees of fewer
            than 1,000 files are always read in this process (a worker's start-up would cost more).
        chunk_size: files handed to a worker at a time.
        exclude: a folder under ``root`` not to index (the output folder of a command).

    Raises:
        UserError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise UserError("the DICOM input folder does not exist", file=root, fix="check the path given to -i")
    started = time.perf_counter()
    walk = iter_files(root, None if exclude is None else Path(exclude))
    first = list(itertools.islice(walk, IN_PROCESS_BELOW))
    paths: list[str] = []
    if processes <= 1 or len(first) < IN_PROCESS_BELOW:
        paths = first + list(walk)
        results = read_chunk(paths)
    else:
        # spawn: a forked child of a process that runs threads (torch, OpenMP) can deadlock. Chunks are
        # handed out while the walk goes on, so the workers start up and read meanwhile.
        with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
            futures = []
            for chunk in _chunks(itertools.chain(first, walk), chunk_size):
                paths.extend(chunk)
                futures.append(pool.submit(read_chunk, chunk))
            results = [r for future in futures for r in future.result()]
    studies: dict[str, StudyRecord] = {}
    skipped: list[SkippedFile] = []
    seen: dict[str, str] = {}
    for result in results:
        if isinstance(result, SkippedFile):
            skipped.append(result)
            continue
        if result.sop_instance_uid in seen:
            skipped.append(SkippedFile(result.path, "the same SOPInstanceUID as another file (a duplicate copy)",
                                       result.study_uid, result.series_uid))
            continue
        seen[result.sop_instance_uid] = result.path
        study = studies.setdefault(result.study_uid, StudyRecord(result.study_uid))
        study.series.setdefault(result.series_uid, SeriesRecord(result.study_uid, result.series_uid)) \
            .instances.append(result)
    for item in skipped:  # a skipped file whose header named its series stays with that series
        if item.study_uid and item.series_uid:
            study = studies.setdefault(item.study_uid, StudyRecord(item.study_uid))
            study.series.setdefault(item.series_uid, SeriesRecord(item.study_uid, item.series_uid)) \
                .skipped.append(item)
    index = DicomIndex(root=root, studies=studies, skipped=skipped, files=len(paths),
                       seconds=time.perf_counter() - started)
    log.info("indexed %d files in %.2f s: %d studies, %d series, %d files skipped", len(paths), index.seconds,
             len(studies), sum(len(s.series) for s in studies.values()), len(skipped))
    return index
