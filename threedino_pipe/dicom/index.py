"""Header-only index of a folder tree of DICOM files, grouped by study and series.

Any names and nesting are accepted; every regular file under the root is tried. Headers are read
with ``pydicom.dcmread(..., stop_before_pixels=True, specific_tags=...)`` in worker processes, so
no pixel data is decoded. A file that is not DICOM, whose header cannot be parsed, or whose pixel
data element is cut short (checked from the element's declared length against the file size, or
for encapsulated data from the closing delimiter) is recorded as a :class:`SkippedFile` with the
reason, never fatal; when its header was readable, the skipped file stays attached to its series
so that selection can name it.

Per series the index keeps modality, ImageType, SeriesDescription, transfer syntaxes, the number
of instances and frames, and the geometry of every plane (classic single-frame images: one plane
per file; enhanced and legacy-converted multi-frame images: one plane per frame, from the
functional groups), analysed by :func:`threedino_pipe.dicom.geometry.analyse_stack` (orientation,
pixel spacing, slice positions, gaps). Nothing identifying the patient is read.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from threedino_pipe.dicom.geometry import Plane, Stack, analyse_stack, normal_of
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

# Only these top-level elements are parsed (the file meta is always read).
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "ImageType",
    "SeriesDescription", "SeriesNumber", "InstanceNumber", "FrameOfReferenceUID", "Rows", "Columns",
    "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "SamplesPerPixel", "BitsAllocated", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"}
IN_PROCESS_BELOW = 256  # smaller trees are read without worker processes (start-up would dominate)


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of the index, and why (study and series UIDs when its header named them)."""

    path: str
    reason: str
    study_uid: str = ""
    series_uid: str = ""


@dataclass(frozen=True)
class InstanceHeader:
    """What the index keeps of one DICOM object (no patient identity, no pixels).

    Attributes:
        planes: the placement of each frame (one for a classic image), in stored frame order;
            empty when the object states no geometry (``geometry_problem`` says what is missing).
        number_of_frames: frames in the object (1 for classic images, 0 for non-image objects).
    """

    path: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    image_type: tuple[str, ...]
    series_description: str
    series_number: int | None
    instance_number: int | None
    frame_of_reference_uid: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    samples_per_pixel: int
    number_of_frames: int
    has_pixel_data: bool
    planes: tuple[Plane, ...]
    geometry_problem: str = ""
    slice_thickness_mm: float | None = None
    enhanced: bool = False  # geometry from functional groups (enhanced or legacy-converted multi-frame)


def _floats(value, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str)
                                          else [value]))
    except (TypeError, ValueError):
        return None
    return values if len(values) == count and all(np.isfinite(values)) else None


def _int(value) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def functional_group_value(item, shared, group: str, inner: str):
    """An attribute of a functional group: the frame's own item first, else the shared one."""
    for source in (item, shared):
        if source is not None and source.get(group):
            value = source[group][0].get(inner)
            if value is not None:
                return value
    return None


def _enhanced_planes(ds, rows: int, columns: int, frames: int) -> tuple[tuple[Plane, ...], str]:
    """Planes of a multi-frame object from its shared and per-frame functional groups."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        return (), f"PerFrameFunctionalGroupsSequence holds {len(per_frame)} items for {frames} frames"
    planes = []
    for number, item in enumerate(per_frame, start=1):
        def value(group: str, inner: str, count: int, item=item) -> tuple[float, ...] | None:
            return _floats(functional_group_value(item, shared, group, inner), count)
        position = value("PlanePositionSequence", "ImagePositionPatient", 3)
        orientation = value("PlaneOrientationSequence", "ImageOrientationPatient", 6)
        spacing = value("PixelMeasuresSequence", "PixelSpacing", 2)
        if position is None or orientation is None or spacing is None:
            missing = [n for n, v in (("position", position), ("orientation", orientation),
                                      ("pixel spacing", spacing)) if v is None]
            return (), f"frame {number} states no {' or '.join(missing)}"
        planes.append(Plane(position, orientation, spacing, rows, columns))
    return tuple(planes), ""


def _pixel_data_state(fp, size: int, implicit: bool, little: bool) -> tuple[bool, str]:
    """(has pixel data, why it is truncated or "") from the element at the file's current position."""
    start = fp.tell()
    if start >= size:
        return False, ""
    head = fp.read(12)
    order = "<" if little else ">"
    if len(head) < 8:
        return True, "truncated inside the pixel data element's header"
    group, element = struct.unpack(order + "HH", head[:4])
    if (group, element) not in PIXEL_TAGS:
        return False, ""
    if implicit:
        length, header = struct.unpack(order + "I", head[4:8])[0], 8
    elif head[4:6] in LONG_VRS:
        if len(head) < 12:
            return True, "truncated inside the pixel data element's header"
        length, header = struct.unpack(order + "I", head[8:12])[0], 12
    else:
        length, header = struct.unpack(order + "H", head[6:8])[0], 8
    if length == 0xFFFFFFFF:
        fp.seek(size - 8)
        if fp.read(8) != struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0):
            return True, "truncated: the encapsulated pixel data has no closing delimiter"
        return True, ""
    if start + header + length > size:
        return True, f"truncated: {size - start - header} of {length} pixel data bytes present"
    return True, ""


def read_instance_header(path: str | Path) -> InstanceHeader | SkippedFile:
    """Read one file's header (never its pixels); a file that cannot be used comes back as SkippedFile."""
    path = str(path)
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            meta = getattr(ds, "file_meta", None)
            transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            if str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
                return SkippedFile(path, "a DICOMDIR (an index of the media, not an object)")
            implicit, little = ds.original_encoding
            fp_end = fp.tell()
            has_pixels, truncated = (False, "")
            if transfer_syntax != DeflatedExplicitVRLittleEndian:
                has_pixels, truncated = _pixel_data_state(fp, size, bool(implicit), bool(little))
    except InvalidDicomError:
        return SkippedFile(path, "not a DICOM file (no DICM marker)")
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        return SkippedFile(path, f"unreadable or truncated DICOM header ({type(exc).__name__})")
    study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    if truncated:
        return SkippedFile(path, truncated, study, series)
    at_end = fp_end >= size
    if not study or not series or not ds.get("SOPInstanceUID"):
        why = " (the file ends inside its header: truncated)" if at_end else ""
        return SkippedFile(path, f"no StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID{why}", study, series)
    rows, columns = _int(ds.get("Rows")) or 0, _int(ds.get("Columns")) or 0
    if rows and columns and not has_pixels and at_end:
        return SkippedFile(path, "truncated: the header states Rows and Columns but the file ends before its pixel "
                           "data", study, series)
    frames = _int(ds.get("NumberOfFrames"))
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    planes: tuple[Plane, ...] = ()
    problem = ""
    if has_pixels and rows and columns:
        frames = frames or 1
        if enhanced:
            planes, problem = _enhanced_planes(ds, rows, columns, frames)
        else:
            position = _floats(ds.get("ImagePositionPatient"), 3)
            orientation = _floats(ds.get("ImageOrientationPatient"), 6)
            spacing = _floats(ds.get("PixelSpacing"), 2)
            if frames > 1:
                problem = "a multi-frame object without per-frame functional groups"
            elif position is None or orientation is None or spacing is None:
                problem = "no ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
            else:
                planes = (Plane(position, orientation, spacing, rows, columns),)
    else:
        frames = 0
    thickness = _floats(ds.get("SliceThickness"), 1)
    return InstanceHeader(
        path=path, study_uid=study, series_uid=series, sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.SOPInstanceUID), modality=str(ds.get("Modality", "")).upper(),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or [])),
        series_description=str(ds.get("SeriesDescription", "")), series_number=_int(ds.get("SeriesNumber")),
        instance_number=_int(ds.get("InstanceNumber")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")), transfer_syntax_uid=transfer_syntax,
        rows=rows, columns=columns, samples_per_pixel=_int(ds.get("SamplesPerPixel")) or 1,
        number_of_frames=frames, has_pixel_data=has_pixels, planes=planes, geometry_problem=problem,
        slice_thickness_mm=thickness[0] if thickness else None, enhanced=enhanced)


def _read_chunk(paths: list[str]) -> list[InstanceHeader | SkippedFile]:
    return [read_instance_header(p) for p in paths]


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
    def plane_sources(self) -> list[tuple[InstanceHeader, int]]:
        """(instance, 1-based frame number or 0 for a classic image) of every plane, matching :attr:`planes`."""
        out = []
        for instance in self.instances:
            if instance.planes and instance.enhanced:
                out.extend((instance, n) for n in range(1, len(instance.planes) + 1))
            elif instance.planes:
                out.append((instance, 0))
        return out

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


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` (sorted walk, symbolic links to folders not followed)."""
    if root.is_file():
        return [str(root)]
    out: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        out.extend(os.path.join(folder, f) for f in sorted(files) if os.path.isfile(os.path.join(folder, f)))
    return out


def index_folder(root: str | Path, *, processes: int = 2, chunk_size: int = 128) -> DicomIndex:
    """Index every DICOM file under ``root`` from headers only.

    Args:
        root: a folder (any nesting) or a single file.
        processes: worker processes reading headers (1: read in this process). Trees of fewer
            than 256 files are always read in this process.
        chunk_size: files handed to a worker at a time.

    Raises:
        UserError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise UserError("the DICOM input folder does not exist", file=root, fix="check the path given to -i")
    started = time.perf_counter()
    paths = list_files(root)
    chunks = [paths[i:i + chunk_size] for i in range(0, len(paths), chunk_size)]
    if processes <= 1 or len(paths) < IN_PROCESS_BELOW:
        results = [r for chunk in chunks for r in _read_chunk(chunk)]
    else:
        # spawn: a forked child of a process that runs threads (torch, OpenMP) can deadlock
        with ProcessPoolExecutor(max_workers=min(processes, len(chunks)), mp_context=get_context("spawn")) as pool:
            results = [r for part in pool.map(_read_chunk, chunks) for r in part]
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
