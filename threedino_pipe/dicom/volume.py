"""A chosen series read into a SimpleITK image with exact geometry.

The planes (single-frame files or the frames of multi-frame objects) are sorted by position
along the slice normal (row x column), as the index analysed them; the image's index axes are
i = along a row (ImageOrientationPatient's first vector), j = down a column (its second),
k = along the normal, its origin the position of the first sorted plane, spacing (mm) the
column spacing, the row spacing and the median step between planes. A series that does not form
one regular grid (missing slices, mixed orientation, pixel spacing or size, duplicate or uneven
positions, inconsistent multi-frame positions, sheared stacks) is refused with a
:class:`~threedino_pipe.runtime.errors.UserError` naming the study, the series and a file.

Pixels are decoded by pydicom (compressed transfer syntaxes through the installed handlers:
RLE by pydicom itself, JPEG 2000 by pylibjpeg-openjpeg, JPEG-LS by pyjpegls, the JPEG processes by
GDCM) and rescaled by RescaleSlope and
RescaleIntercept (per frame for multi-frame objects, from PixelValueTransformationSequence), so
CT comes out in HU. The voxels are float32 ``X x Y x Z``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
import SimpleITK as sitk

from threedino_pipe.dicom.header import InstanceHeader, functional_group_value
from threedino_pipe.dicom.index import SeriesRecord
from threedino_pipe.raw_data.image_io import Geometry, from_array, to_array
from threedino_pipe.runtime.errors import UserError

DECODER_FIX = ("install the decoders (pip install pylibjpeg pylibjpeg-openjpeg pyjpegls python-gdcm), "
               "or re-export the series uncompressed")


@dataclass(frozen=True)
class SourceFrame:
    """Where slice k of a volume came from.

    Attributes:
        frame_number: 1-based frame of a multi-frame object; 0 for a single-frame image.
    """

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int
    path: str


@dataclass
class SeriesVolume:
    """A series as a 3D image and the source of each slice.

    Attributes:
        image: float32 SimpleITK image (CT in HU; other modalities in rescaled stored values).
        frames: ``frames[k]`` is the source plane of slice k.
        units: ``"HU"`` for CT, else ``"rescaled stored value"``.
    """

    image: sitk.Image
    study_uid: str
    series_uid: str
    modality: str
    frame_of_reference_uid: str
    frames: tuple[SourceFrame, ...]
    units: str

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.image)

    def array(self) -> np.ndarray:
        """The voxels as ``X x Y x Z`` (i, j, k)."""
        return to_array(self.image)

    @property
    def instance_paths(self) -> list[str]:
        """Every source file once, in slice order."""
        return list(dict.fromkeys(f.path for f in self.frames))

    @property
    def is_multiframe(self) -> bool:
        return any(f.frame_number for f in self.frames)


def _refuse(series: SeriesRecord, problem: str, file: str, fix: str) -> UserError:
    return UserError(f"study {series.study_uid}, series {series.series_uid}: {problem}", file=file, fix=fix)


def check_readable(series: SeriesRecord, display: Callable[[str], str] = str) -> None:
    """Raise a :class:`UserError` unless ``series`` forms one regular grid of readable planes."""
    if not series.instances:
        raise _refuse(series, "no readable file in this series",
                      display(series.skipped[0].path) if series.skipped else "", "re-export the series")
    first = display(series.instances[0].path)
    if series.skipped:
        bad = series.skipped[0]
        raise _refuse(series, f"{len(series.skipped)} file(s) of the series are unusable ({bad.reason})",
                      display(bad.path), "re-export or copy the series again")
    if not series.is_image:
        raise _refuse(series, f"not an image series ({series.modality})", first, "choose an image series")
    if series.geometry_problems:
        raise _refuse(series, "; ".join(series.geometry_problems), first, "choose a series that states its geometry")
    stack = series.stack
    if stack is None or not stack.ok:
        raise _refuse(series, stack.describe() if stack else "no slice geometry", first,
                      "choose a complete series with one orientation and even slice spacing")
    if any(i.samples_per_pixel != 1 for i in series.instances):
        raise _refuse(series, "colour images (SamplesPerPixel > 1)", first, "choose a greyscale series")


def _rescale(ds: pydicom.Dataset, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame slope and intercept (length ``frames``)."""
    slopes, intercepts = np.ones(frames), np.zeros(frames)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
        for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            slope = functional_group_value(item, shared, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = functional_group_value(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            slopes[f] = float(slope) if slope not in (None, "") else 1.0
            intercepts[f] = float(intercept) if intercept not in (None, "") else 0.0
    else:
        slopes[:] = float(ds.get("RescaleSlope", 1) or 1)
        intercepts[:] = float(ds.get("RescaleIntercept", 0) or 0)
    return slopes, intercepts


def _decode(instance: InstanceHeader, series: SeriesRecord, display: Callable[[str], str]) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """(frames x rows x columns stored values, slopes, intercepts) of one file."""
    try:
        ds = pydicom.dcmread(instance.path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise _refuse(series, f"the file cannot be read again ({type(exc).__name__}: {str(exc)[:120]})",
                      display(instance.path), "re-export or copy the series again") from None
    if str(ds.get("SOPInstanceUID", "")) != instance.sop_instance_uid or \
            int(ds.get("NumberOfFrames", 1) or 1) != instance.number_of_frames:
        raise _refuse(series, "the file changed since the folder was indexed", display(instance.path),
                      "run again on a folder nobody writes to")
    if "ModalityLUTSequence" in ds:
        raise _refuse(series, "a Modality LUT Sequence instead of RescaleSlope/Intercept is not supported",
                      display(instance.path), "re-export the series with rescale slope and intercept")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        syntax = pydicom.uid.UID(instance.transfer_syntax_uid)
        raise _refuse(series, f"cannot decode the pixel data ({syntax.name}: {str(exc)[:160]})",
                      display(instance.path), DECODER_FIX) from None
    frames = instance.number_of_frames
    pixels = pixels.reshape(frames, instance.rows, instance.columns)
    slopes, intercepts = _rescale(ds, frames)
    return pixels, slopes, intercepts


def read_series(series: SeriesRecord, *, display: Callable[[str], str] = str) -> SeriesVolume:
    """Read ``series`` (as indexed) into a float32 image with exact geometry.

    Args:
        series: a series of a :class:`~threedino_pipe.dicom.index.DicomIndex`.
        display: turns a file path into the form shown in messages.

    Raises:
        UserError: unusable files, no regular grid (see :func:`check_readable`), a file that
            changed since it was indexed, or pixel data that cannot be decoded.
    """
    check_readable(series, display)
    stack = series.stack
    geometry = stack.geometry
    k_of_plane = np.empty(len(stack.order), int)
    k_of_plane[list(stack.order)] = np.arange(len(stack.order))
    array = np.empty(geometry.size, np.float32)
    sources: list[SourceFrame | None] = [None] * len(stack.order)
    plane = 0
    for instance in series.instances:
        pixels, slopes, intercepts = _decode(instance, series, display)
        for f in range(instance.number_of_frames):
            k = int(k_of_plane[plane])
            values = pixels[f].astype(np.float64) * slopes[f] + intercepts[f]
            array[:, :, k] = values.T
            sources[k] = SourceFrame(instance.sop_class_uid, instance.sop_instance_uid,
                                     f + 1 if instance.enhanced else 0, instance.path)
            plane += 1
    modality = series.modality
    return SeriesVolume(
        image=from_array(array, geometry), study_uid=series.study_uid, series_uid=series.series_uid,
        modality=modality, frame_of_reference_uid=(series.frame_of_reference_uids or ("",))[0],
        frames=tuple(sources), units="HU" if modality == "CT" else "rescaled stored value")


def source_datasets(volume: SeriesVolume) -> list[pydicom.Dataset]:
    """The headers (no pixels) of the files behind ``volume``, in slice order, for the result writers."""
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in volume.instance_paths]
