"""One DICOM file's header, read without its pixels: what the index keeps, or why the file is left out.

Two readers fill the same :class:`InstanceHeader`:

- :func:`read_with_pydicom`: ``pydicom.dcmread(..., stop_before_pixels=True, specific_tags=...)``,
  the reference, for every kind of file (enhanced multi-frame objects with their functional groups,
  deflated or big-endian transfer syntaxes, unusual character sets, damaged headers);
- :func:`threedino_pipe.dicom.header_scan.scan_header`: a byte-level scan of the top-level elements
  of the common case (a Part 10 file in implicit or explicit VR little endian, the header in its
  first 64 KiB, no functional groups, ASCII/Latin-1/UTF-8 text), about six times faster; it
  declines (returns None) whatever it does not handle, and the pydicom reader takes over.

:func:`read_instance_header` tries the scan first. Both go through :func:`build_header`, so a file
gives the same result either way (the tests compare them on every fixture file). The pixel data
element is checked against the file size (its declared length, or for encapsulated data the
closing sequence delimiter), so a file cut short is recorded as truncated. This module imports
only the standard library at load time, so the index's worker processes start quickly.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DEFLATED = "1.2.840.10008.1.2.1.99"
PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"}
# The top-level elements the index reads (the file meta is always read).
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "ImageType",
    "SeriesDescription", "SeriesNumber", "InstanceNumber", "FrameOfReferenceUID", "Rows", "Columns",
    "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SamplesPerPixel", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
]


@dataclass(frozen=True)
class Plane:
    """One 2D plane as its header places it.

    Attributes:
        position: ImagePositionPatient (mm).
        orientation: ImageOrientationPatient (row x, y, z then column x, y, z).
        pixel_spacing: PixelSpacing (mm between rows, mm between columns).
        rows: Rows (pixels along the column direction, j).
        columns: Columns (pixels along the row direction, i).
    """

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int


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
        enhanced: the geometry comes from functional groups (enhanced or legacy-converted multi-frame).
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
    enhanced: bool = False


def _values(value) -> list:
    """A header value as a list (one value or several; none for None or "")."""
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes | int | float):
        return [value]
    return list(value)


def floats(value, count: int) -> tuple[float, ...] | None:
    """``count`` finite floats from a DS value (a string, a number or a list of them), else None."""
    try:
        out = tuple(float(v) for v in _values(value))
    except (TypeError, ValueError):
        return None
    return out if len(out) == count and all(math.isfinite(v) for v in out) else None


def integer(value) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def text(value) -> str:
    return "" if value is None else str(value).strip()


def build_header(path: str, get: Callable[[str], object], transfer_syntax: str, has_pixels: bool,
                 truncated: str, header_ends_file: bool,
                 enhanced_planes: Callable[[int, int, int], tuple[tuple[Plane, ...], str]] | None = None
                 ) -> InstanceHeader | SkippedFile:
    """The index entry of one file from its top-level values (``get(keyword)``), by either reader.

    Args:
        header_ends_file: the file ends where the header reading stopped (no pixel data follows).
        enhanced_planes: for a file with functional groups, ``(rows, columns, frames) -> (planes, problem)``.
    """
    study, series = text(get("StudyInstanceUID")), text(get("SeriesInstanceUID"))
    if truncated:
        return SkippedFile(path, truncated, study, series)
    if not study or not series or not text(get("SOPInstanceUID")):
        why = " (the file ends inside its header: truncated)" if header_ends_file else ""
        return SkippedFile(path, f"no StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID{why}", study, series)
    rows, columns = integer(get("Rows")) or 0, integer(get("Columns")) or 0
    if rows and columns and not has_pixels and header_ends_file:
        return SkippedFile(path, "truncated: the header states Rows and Columns but the file ends before its pixel "
                           "data", study, series)
    frames = integer(get("NumberOfFrames"))
    planes: tuple[Plane, ...] = ()
    problem = ""
    if has_pixels and rows and columns:
        frames = frames or 1
        if enhanced_planes is not None:
            planes, problem = enhanced_planes(rows, columns, frames)
        else:
            position = floats(get("ImagePositionPatient"), 3)
            orientation = floats(get("ImageOrientationPatient"), 6)
            spacing = floats(get("PixelSpacing"), 2)
            if frames > 1:
                problem = "a multi-frame object without per-frame functional groups"
            elif position is None or orientation is None or spacing is None:
                problem = "no ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
            else:
                planes = (Plane(position, orientation, spacing, rows, columns),)
    else:
        frames = 0
    thickness = floats(get("SliceThickness"), 1)
    return InstanceHeader(
        path=path, study_uid=study, series_uid=series, sop_class_uid=text(get("SOPClassUID")),
        sop_instance_uid=text(get("SOPInstanceUID")), modality=text(get("Modality")).upper(),
        image_type=tuple(text(v).upper() for v in _values(get("ImageType"))),
        series_description=text(get("SeriesDescription")), series_number=integer(get("SeriesNumber")),
        instance_number=integer(get("InstanceNumber")), frame_of_reference_uid=text(get("FrameOfReferenceUID")),
        transfer_syntax_uid=transfer_syntax, rows=rows, columns=columns,
        samples_per_pixel=integer(get("SamplesPerPixel")) or 1, number_of_frames=frames, has_pixel_data=has_pixels,
        planes=planes, geometry_problem=problem, slice_thickness_mm=thickness[0] if thickness else None,
        enhanced=enhanced_planes is not None)


def pixel_data_state(fp, size: int, implicit: bool, little: bool) -> tuple[bool, str]:
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


def functional_group_value(item, shared, group: str, inner: str):
    """``group[0].inner`` of a multi-frame object: from the frame's item (PerFrameFunctionalGroupsSequence
    item) first, else from the shared item (SharedFunctionalGroupsSequence[0]); None when neither has it."""
    for source in (item, shared):
        if source is not None and source.get(group):
            value = source[group][0].get(inner)
            if value is not None:
                return value
    return None


def _enhanced_planes(ds) -> Callable[[int, int, int], tuple[tuple[Plane, ...], str]]:
    """Planes of a multi-frame object from its shared and per-frame functional groups."""
    def planes_of(rows: int, columns: int, frames: int) -> tuple[tuple[Plane, ...], str]:
        shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        if len(per_frame) != frames:
            return (), f"PerFrameFunctionalGroupsSequence holds {len(per_frame)} items for {frames} frames"
        planes = []
        for number, item in enumerate(per_frame, start=1):
            def value(group: str, inner: str, count: int, item=item) -> tuple[float, ...] | None:
                return floats(functional_group_value(item, shared, group, inner), count)
            position = value("PlanePositionSequence", "ImagePositionPatient", 3)
            orientation = value("PlaneOrientationSequence", "ImageOrientationPatient", 6)
            spacing = value("PixelMeasuresSequence", "PixelSpacing", 2)
            if position is None or orientation is None or spacing is None:
                missing = [n for n, v in (("position", position), ("orientation", orientation),
                                          ("pixel spacing", spacing)) if v is None]
                return (), f"frame {number} states no {' or '.join(missing)}"
            planes.append(Plane(position, orientation, spacing, rows, columns))
        return tuple(planes), ""
    return planes_of


def read_with_pydicom(path: str | Path) -> InstanceHeader | SkippedFile:
    """Read one file's header with pydicom (never its pixels)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    path = str(path)
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            meta = getattr(ds, "file_meta", None)
            transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
                return SkippedFile(path, "a DICOMDIR (an index of the media, not an object)")
            implicit, little = ds.original_encoding
            stopped_at = fp.tell()
            has_pixels, truncated = (False, "")
            if transfer_syntax != DEFLATED:
                has_pixels, truncated = pixel_data_state(fp, size, bool(implicit), bool(little))
    except InvalidDicomError:
        return SkippedFile(path, "not a DICOM file (no DICM marker)")
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        return SkippedFile(path, f"unreadable or truncated DICOM header ({type(exc).__name__})")
    enhanced = _enhanced_planes(ds) if "PerFrameFunctionalGroupsSequence" in ds else None
    return build_header(path, ds.get, transfer_syntax, has_pixels, truncated, stopped_at >= size, enhanced)


def read_instance_header(path: str | Path) -> InstanceHeader | SkippedFile:
    """One file's index entry: the fast scan when it can, else pydicom (see the module docstring)."""
    from threedino_pipe.dicom.header_scan import scan_header
    try:
        scanned = scan_header(str(path))
    except OSError as exc:
        return SkippedFile(str(path), f"unreadable or truncated DICOM header ({type(exc).__name__})")
    return scanned if scanned is not None else read_with_pydicom(path)


def read_chunk(paths: Sequence[str]) -> list[InstanceHeader | SkippedFile]:
    """:func:`read_instance_header` of each path (the unit of work of the index's worker processes)."""
    return [read_instance_header(p) for p in paths]


def read_text_elements(path: str | Path, keywords: Sequence[str]) -> dict[str, str]:
    """Top-level text values of ``keywords`` in one file (pydicom, never its pixels); "" for an absent one.

    For values the index leaves out on purpose: the PatientID that ``--keep-patient-names`` names
    outputs by, the SOPInstanceUID of a written result object.

    Raises:
        OSError: the file cannot be read; ``pydicom.errors.InvalidDicomError``: it is not DICOM.
    """
    import pydicom
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=list(keywords))
    return {keyword: text(ds.get(keyword)) for keyword in keywords}
