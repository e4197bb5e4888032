"""A label map on a source series' grid -> one RT Structure Set (RTSTRUCT), written with pydicom.

One ROI per label value named in ``labels`` (ROIName = the label's name, ROINumber = the label
value, RTROIInterpretedType ORGAN, ROIGenerationAlgorithm AUTOMATIC). On every slice k the label's
mask is traced with scikit-image's marching squares (``find_contours`` at level 0.5 on the
zero-padded mask; foreground pixels touching only at a corner become separate contours), which
puts each contour through the midpoints between inside and outside pixel centres; collinear
points are dropped (no change of the outline). Every traced outline, outer boundaries and hole
boundaries alike, is written as one CLOSED_PLANAR contour on that slice (patient coordinates,
mm), referencing the source image (and frame) it lies on. Read back with the even-odd rule of
:mod:`threedino_pipe.dicom.rtstruct_raster` this gives the mask again: no pixel centre lies on
such a contour, every centre inside the mask is enclosed by an odd number of contours, every
centre outside by an even number.

The model is identified in the General Equipment module (ManufacturerModelName = model name,
SoftwareVersions = threedino-pipe and model versions, DeviceSerialNumber = first 16 hex digits of
the checksum), in StructureSetDescription (name, version, backbone tag, full weights checksum)
and in each ROI's ROIGenerationDescription. Patient and study identity are copied from the
source as for the SEG (:data:`threedino_pipe.dicom.seg_writer.IDENTITY_KEYWORDS`), nothing else.
UIDs: :func:`threedino_pipe.dicom.uids.result_uids` with kind ``"RTSTRUCT"``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from threedino_pipe import __version__
from threedino_pipe.dicom.seg_writer import ModelIdentity, ResultObject, check_label_map
from threedino_pipe.dicom.uids import result_uids
from threedino_pipe.dicom.volume import SeriesVolume, source_datasets
from threedino_pipe.raw_data.image_io import Geometry
from threedino_pipe.runtime.atomic_files import atomic_path

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # the SOP class conventionally named for a study reference
RTSTRUCT_SERIES_NUMBER = 9802
CONTOUR_DATA = Tag("ContourData")
# Copied from the source as the patient and general study modules require; nothing else is.
COPIED_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                   "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195))


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """A closed polygon (n x 2, first point not repeated) without the points where it goes straight on."""
    if len(points) < 4:
        return points
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2D ``X x Y`` (i, j) mask as ``n x 2`` arrays of (i, j) index coordinates.

    The mask is cropped to its bounding box plus one pixel of zeros before tracing (same contours,
    less work). Outer and hole boundaries are both returned.
    """
    from skimage.measure import find_contours

    if not mask.any():
        return []
    i_any, j_any = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    i0, i1, j0, j1 = i_any[0], i_any[-1] + 1, j_any[0], j_any[-1] + 1
    padded = np.zeros((i1 - i0 + 2, j1 - j0 + 2), np.float32)
    padded[1:-1, 1:-1] = mask[i0:i1, j0:j1]
    out = []
    for contour in find_contours(padded, 0.5):
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour) < 3:
            continue
        out.append(_drop_collinear(contour) + np.array([i0 - 1, j0 - 1]))
    return out


def to_patient_mm(points_ij: np.ndarray, k: int, geometry: Geometry) -> np.ndarray:
    """(i, j) index coordinates on slice ``k`` -> ``n x 3`` patient coordinates (mm)."""
    direction = np.asarray(geometry.direction).reshape(3, 3)
    index = np.column_stack([points_ij, np.full(len(points_ij), float(k))])
    return np.asarray(geometry.origin) + (index * np.asarray(geometry.spacing)) @ direction.T


def _contour_data_element(points_mm: np.ndarray) -> RawDataElement:
    """ContourData as a pre-encoded DS element (3 decimals, i.e. micrometres; no per-value objects)."""
    flat = points_mm.ravel()
    text = ("\\".join(["%.3f"] * len(flat)) % tuple(flat.tolist())).encode("ascii")
    if len(text) % 2:
        text += b" "
    return RawDataElement(CONTOUR_DATA, "DS", len(text), text, 0, False, True)


def _image_reference(sop_class: str, sop_instance: str, frame: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
    if frame:
        item.ReferencedFrameNumber = frame
    return item


def _identity_from(source: Dataset, ds: Dataset) -> None:
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in COPIED_IDENTITY:
        setattr(ds, keyword, source.get(keyword, ""))


def _trace(label_map: np.ndarray, values: set[int], volume: SeriesVolume) -> dict[int, list[Dataset]]:
    """ContourSequence items of every label value, slice by slice (each slice copied once, contiguous)."""
    geometry = volume.geometry
    out: dict[int, list[Dataset]] = {value: [] for value in values}
    for k in range(label_map.shape[2]):
        plane = np.ascontiguousarray(label_map[:, :, k])
        present = [int(v) for v in np.unique(plane) if int(v) in values]
        frame = volume.frames[k]
        for value in present:
            for outline in slice_contours(plane == value):
                item = Dataset()
                item.ContourImageSequence = [_image_reference(frame.sop_class_uid, frame.sop_instance_uid,
                                                              frame.frame_number)]
                item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", len(outline)
                item.ContourNumber = len(out[value]) + 1
                item[CONTOUR_DATA] = _contour_data_element(to_patient_mm(outline, k, geometry))
                out[value].append(item)
    return out


def build_rtstruct(label_map: np.ndarray, labels: Mapping[int, str], volume: SeriesVolume, model: ModelIdentity,
                   *, headers: Sequence[Dataset] | None = None, now: datetime.datetime | None = None) -> Dataset:
    """The RTSTRUCT dataset for ``label_map`` (``X x Y x Z`` integers on ``volume``'s grid).

    Args:
        labels: label value -> name (background 0 is never an ROI; absent labels get an ROI without contours).
        headers: the source files' headers in ``volume.instance_paths`` order (the first is read when None).
        now: the creation time written (default: now).
    """
    values = check_label_map(label_map, labels, volume)
    source = headers[0] if headers else source_datasets(volume)[0]
    uids = result_uids("RTSTRUCT", volume.study_uid, [volume.series_uid], model.weights_checksum,
                       [f.sop_instance_uid for f in volume.frames])
    date, time = (now or datetime.datetime.now()).strftime("%Y%m%d %H%M%S").split()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = uids["instance"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    _identity_from(source, ds)
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, uids["instance"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", uids["series"], RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription, ds.OperatorsName = f"3dino {model.name}"[:64], ""
    ds.Manufacturer, ds.ManufacturerModelName = "threedino-pipe", model.name[:64]
    ds.SoftwareVersions = [f"threedino-pipe {__version__}"[:64], model.version[:64]]
    ds.DeviceSerialNumber = model.weights_checksum[:16]
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel, ds.StructureSetName = "THREEDINO", model.name[:64]
    ds.StructureSetDescription = (f"automatic contours by model {model.name} version {model.version}, backbone "
                                  f"{model.backbone_tag}, weights sha256 {model.weights_checksum}")
    ds.StructureSetDate, ds.StructureSetTime = date, time

    series_item = Dataset()
    series_item.SeriesInstanceUID = volume.series_uid
    series_item.ContourImageSequence = [_image_reference(f.sop_class_uid, f.sop_instance_uid, f.frame_number)
                                        for f in volume.frames]
    study_item = Dataset()
    study_item.ReferencedSOPClassUID, study_item.ReferencedSOPInstanceUID = DETACHED_STUDY_MANAGEMENT, volume.study_uid
    study_item.RTReferencedSeriesSequence = [series_item]
    for_item = Dataset()
    for_item.FrameOfReferenceUID = volume.frame_of_reference_uid
    for_item.RTReferencedStudySequence = [study_item]
    ds.ReferencedFrameOfReferenceSequence = [for_item]

    generation = f"3dino {model.name} {model.weights_checksum[:16]}"[:64]
    roi_items, contour_items, observation_items = [], [], []
    contours_of = _trace(label_map, set(values), volume)
    for number, value in enumerate(values, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = value, volume.frame_of_reference_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = str(labels[value])[:64], "AUTOMATIC"
        roi.ROIGenerationDescription = generation
        roi_items.append(roi)
        contours = contours_of[value]
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = value
        roi_contour.ROIDisplayColor = list(COLOURS[(number - 1) % len(COLOURS)])
        if contours:
            roi_contour.ContourSequence = contours
        contour_items.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = value, value
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        observation_items.append(observation)
    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observation_items
    for roi_contour in contour_items:  # let pydicom write the pre-encoded ContourData as it is
        for item in roi_contour.get("ContourSequence", []):
            item.set_original_encoding(False, True, item._character_set)
    return ds


def write_rtstruct(label_map: np.ndarray, labels: Mapping[int, str], volume: SeriesVolume, model: ModelIdentity,
                   path: str | Path, *, headers: Sequence[Dataset] | None = None) -> ResultObject:
    """Build the RTSTRUCT (:func:`build_rtstruct`) and write it to ``path`` atomically."""
    ds = build_rtstruct(label_map, labels, volume, model, headers=headers)
    with atomic_path(path) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    return ResultObject(Path(path), RT_STRUCTURE_SET_STORAGE, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                        volume.study_uid, volume.series_uid)
