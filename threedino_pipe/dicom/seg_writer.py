"""A label map on a source series' grid -> one DICOM Segmentation (SEG) object, written with highdicom.

The SEG is BINARY (one bit per pixel and segment, which every validator and viewer reads), one
segment per label value present in ``labels`` (SegmentLabel = the label's name, numbered 1..N in
order of label value), each segment carrying the algorithm identification (model name, version,
backbone tag and weights checksum, AlgorithmFamily "Artificial Intelligence"). Frames lie on the
source slices and reference them (SOP instance, and frame number for a multi-frame source), so the
geometry is the source's exactly; empty frames are left out.

Identity: the patient and general study modules (PatientName, PatientID, PatientBirthDate,
PatientSex, StudyInstanceUID, StudyDate, StudyTime, ReferringPhysicianName, StudyID,
AccessionNumber) are copied from the source, as the standard requires for the result to file
under the same patient and study; :func:`check_copied_identity` verifies that nothing else of the
source header (institution, station, operators, series description, ...) was carried over.
SeriesInstanceUID, SOPInstanceUID and DimensionOrganizationUID come from
:func:`threedino_pipe.dicom.uids.result_uids` (source study, series and instances, model checksum).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from threedino_pipe import __version__
from threedino_pipe.dicom.uids import derive_uid, result_uids
from threedino_pipe.dicom.volume import SeriesVolume, source_datasets
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

SEG_SERIES_NUMBER = 9801
LOCAL_SCHEME = "99TDINO"  # a private coding scheme ("99" prefix) for label names without a standard code
# Attributes a result object may share with its source: identity of patient and study, the frame
# of reference, and the UIDs it references. Everything else in the source stays out.
IDENTITY_KEYWORDS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "SpecificCharacterSet", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "IssuerOfPatientID", "PatientAge", "OtherPatientIDs",
})


@dataclass(frozen=True)
class ModelIdentity:
    """The model a result comes from (written into every result object).

    Attributes:
        name: the model's name (e.g. its finetune run folder name).
        version: the model's version string (e.g. ``"threedino-pipe 0.1.0"``).
        backbone_tag: the backbone it was finetuned from (``model.json``'s backbone tag).
        weights_checksum: hex checksum of the weights (SHA-256), part of every result UID.
    """

    name: str
    version: str
    backbone_tag: str
    weights_checksum: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-fA-F]{8,128}", self.weights_checksum or ""):
            raise ValueError(f"weights_checksum must be hex digits, got {self.weights_checksum!r}")


@dataclass(frozen=True)
class ResultObject:
    """A written result object and the UIDs it got."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_uid: str
    source_series_uid: str


def check_label_map(label_map: np.ndarray, labels: Mapping[int, str], volume: SeriesVolume) -> list[int]:
    """The label values to write (sorted, background 0 excluded); raise a UserError on a mismatch."""
    size = tuple(volume.geometry.size)
    if tuple(label_map.shape) != size:
        raise UserError(f"the label map has shape {tuple(label_map.shape)}, the source series "
                        f"{volume.series_uid} {size}", fix="give the label map on the source series' grid")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise UserError(f"the label map must hold integers, not {label_map.dtype}", fix="cast it to uint8/uint16")
    present = {int(v) for v in np.unique(label_map)} - {0}
    unknown = sorted(present - set(labels))
    if unknown:
        raise UserError(f"the label map holds values {unknown} without a name", fix="name every label in `labels`")
    values = sorted(v for v in labels if v != 0)
    for value in values:
        if not str(labels[value]).strip():
            raise UserError(f"label {value} has an empty name", fix="name every label")
    return values


def local_coding_scheme() -> pydicom.Dataset:
    """The CodingSchemeIdentificationSequence item that declares the private scheme of label codes."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "threedino-pipe model labels"
    item.CodingSchemeResponsibleOrganization = "threedino-pipe"
    return item


def _segment_descriptions(values: Sequence[int], labels: Mapping[int, str], model: ModelIdentity,
                          study_uid: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name[:64], family=codes.cid7162.ArtificialIntelligence, version=model.version[:64],
        source="threedino-pipe",
        parameters={"backbone": model.backbone_tag, "weights_sha256": model.weights_checksum})
    out = []
    for number, value in enumerate(values, start=1):
        name = str(labels[value])
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(value=f"L{value}", scheme_designator=LOCAL_SCHEME,
                                                       meaning=name[:64]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_id=name[:64], tracking_uid=derive_uid("SEG-segment", study_uid, model.weights_checksum, name)))
    return out


def build_seg(label_map: np.ndarray, labels: Mapping[int, str], volume: SeriesVolume, model: ModelIdentity,
              *, headers: Sequence[pydicom.Dataset] | None = None) -> pydicom.Dataset:
    """The SEG dataset for ``label_map`` (``X x Y x Z`` integers on ``volume``'s grid).

    Args:
        labels: label value -> name (background 0 is never a segment).
        headers: the source files' headers in ``volume.instance_paths`` order (read when None).
    """
    import highdicom as hd

    values = check_label_map(label_map, labels, volume)
    lut = np.zeros(max([*values, int(label_map.max()), 0]) + 1, np.uint8 if len(values) < 256 else np.uint16)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    frames = lut[label_map].transpose(2, 1, 0)  # k x rows (j) x columns (i)
    headers = list(headers) if headers is not None else source_datasets(volume)
    if volume.is_multiframe:
        if len(headers) != 1:
            raise UserError(f"series {volume.series_uid} spreads its frames over {len(headers)} multi-frame "
                            "files; a SEG can reference one", fix="write an RTSTRUCT or NIfTI for this series")
        order = np.array([f.frame_number - 1 for f in volume.frames])
        stored = np.empty_like(frames)
        stored[order] = frames
        frames = stored
    uids = result_uids("SEG", volume.study_uid, [volume.series_uid], model.weights_checksum,
                       [f.sop_instance_uid for f in volume.frames])
    if not values:
        raise UserError(f"no labels to write for series {volume.series_uid}", fix="name the labels of the model")
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(values, labels, model, volume.study_uid),
        series_instance_uid=uids["series"], series_number=SEG_SERIES_NUMBER, sop_instance_uid=uids["instance"],
        instance_number=1, manufacturer="threedino-pipe", manufacturer_model_name=model.name[:64],
        software_versions=f"threedino-pipe {__version__}"[:64], device_serial_number=model.weights_checksum[:16],
        content_description=f"automatic segmentation by {model.name}"[:64], content_label="THREEDINO",
        omit_empty_frames=bool(frames.any()))
    seg.SeriesDescription = f"3dino {model.name}"[:64]
    seg.CodingSchemeIdentificationSequence = [local_coding_scheme()]
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = uids["dimension_organization"]
    return seg


def write_seg(label_map: np.ndarray, labels: Mapping[int, str], volume: SeriesVolume, model: ModelIdentity,
              path: str | Path, *, headers: Sequence[pydicom.Dataset] | None = None) -> ResultObject:
    """Build the SEG (:func:`build_seg`) and write it to ``path`` atomically."""
    seg = build_seg(label_map, labels, volume, model, headers=headers)
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return ResultObject(Path(path), str(seg.SOPClassUID), str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID),
                        volume.study_uid, volume.series_uid)


def copied_from_source(result: pydicom.Dataset, source: pydicom.Dataset) -> list[str]:
    """Top-level keywords whose non-empty value ``result`` shares with ``source`` beyond IDENTITY_KEYWORDS."""
    shared = []
    for element in source:
        keyword = element.keyword
        if not keyword or keyword in IDENTITY_KEYWORDS or element.VR == "SQ" or keyword == "PixelData":
            continue
        if keyword in result and element.value not in (None, "", b"") and result[keyword].value == element.value:
            shared.append(keyword)
    return shared


def check_copied_identity(result: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Raise ValueError when ``result`` carries source attributes other than patient and study identity.

    Attributes that merely coincide by the standard's fixed values (e.g. ``Modality`` differs, so it
    never matches; ``SOPClassUID`` likewise) are not an issue; sharing a free-text or
    equipment value is.
    """
    allowed = {"BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel", "PhotometricInterpretation",
               "PixelRepresentation", "Rows", "Columns", "ContentDate", "ContentTime", "ImageType",
               "InstanceNumber", "PixelSpacing", "SliceThickness", "ImageOrientationPatient"}
    extra = [k for k in copied_from_source(result, source) if k not in allowed]
    if extra:
        raise ValueError(f"the result carries source attributes beyond patient/study identity: {extra}")
