"""DICOM studies written from example volumes, for the tests, the benchmarks and demonstrations.

:func:`series_datasets` turns a 3D SimpleITK image into classic single-frame CT or MR datasets
with proper UIDs, positions, orientations and pixel spacings; :func:`build_example_studies`
writes real MNI152 resamplings (:func:`threedino_pipe.demo.examples.mni_case`) as the studies a
PACS export holds (an axial series, a localizer, a reformat, an SR, an RTDOSE, an enhanced
multi-frame series, compressed transfer syntaxes, arbitrary file names and nesting), and
:func:`build_broken_corpus` the bad input of issue 14 (truncated file, missing slice, mixed
pixel spacing, 3 slices, inconsistent multi-frame positions, a localizer-only CT study, two
equally good series). Patient identities are fictitious and deliberately distinctive so that
tests can check they never leak into file names or logs.

DICOM has no left-handed volumes: slices are stacked along row x column. An image whose direction
matrix is left-handed is first flipped along k (:func:`right_handed`), which places every voxel
at the same physical point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pydicom.valuerep import DSfloat

from threedino_pipe.dicom.uids import derive_uid
from threedino_pipe.raw_data.image_io import Geometry, to_array
from threedino_pipe.runtime.atomic_files import atomic_path

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
CT_HU_OFFSET = 1024  # CT stored values are HU + 1024 (RescaleIntercept -1024, slope 1)


@dataclass(frozen=True)
class Identity:
    """A fictitious patient and study (PatientName and PatientID are what must never leak)."""

    patient_name: str = "Zebulon^Quixotic^Test"
    patient_id: str = "ZQX-7741-PID"
    birth_date: str = "19470311"
    sex: str = "O"
    study_uid: str = field(default_factory=lambda: derive_uid("example-study", "default"))
    study_date: str = "20260115"
    study_time: str = "101500"
    accession: str = "ACCZQX0991"
    study_id: str = "S0991"
    referring: str = "Referrer^Quentin"
    institution: str = "Quasar Example Hospital"


def _ds(values: Sequence[float]) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in values]


def right_handed(image: sitk.Image) -> sitk.Image:
    """``image`` flipped along k when its direction matrix is left-handed (same physical voxels)."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if np.linalg.det(direction) > 0:
        return image
    array = sitk.GetArrayFromImage(image)[::-1]  # numpy axis 0 is k
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint([0, 0, image.GetSize()[2] - 1]))
    direction[:, 2] *= -1
    flipped.SetDirection(direction.flatten().tolist())
    return flipped


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _base(identity: Identity, sop_class: str, sop_instance: str, modality: str, series_uid: str,
          series_number: int, description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.PatientName, ds.PatientID = identity.patient_name, identity.patient_id
    ds.PatientBirthDate, ds.PatientSex = identity.birth_date, identity.sex
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = identity.study_uid, identity.study_date, identity.study_time
    ds.AccessionNumber, ds.StudyID = identity.accession, identity.study_id
    ds.ReferringPhysicianName = identity.referring
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, series_number
    ds.SeriesDescription = description
    ds.Manufacturer, ds.InstitutionName = "threedino-pipe examples", identity.institution
    ds.StationName, ds.OperatorsName = "QSTATION7", "Operator^Quill"
    ds.BodyPartExamined = "HEAD"
    ds.ContentDate, ds.ContentTime = identity.study_date, identity.study_time
    return ds


def _plane_attributes(ds: Dataset, geometry: Geometry, k: int, rows: int, columns: int) -> None:
    """ImagePlane attributes of slice ``k`` of a volume placed by ``geometry`` (i along rows, j down columns)."""
    direction = np.asarray(geometry.direction).reshape(3, 3)
    spacing = np.asarray(geometry.spacing)
    position = np.asarray(geometry.origin) + direction @ (spacing * np.array([0.0, 0.0, float(k)]))
    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(np.concatenate([direction[:, 0], direction[:, 1]]))
    ds.PixelSpacing = _ds([spacing[1], spacing[0]])
    ds.SliceThickness = DSfloat(float(spacing[2]), auto_format=True)
    ds.Rows, ds.Columns = rows, columns


def _pixel_attributes(ds: Dataset, plane: np.ndarray) -> None:
    """Signed 16-bit MONOCHROME2 pixels from a ``rows x columns`` array."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(plane, dtype="<i2").tobytes()
    ds.WindowCenter, ds.WindowWidth = 40, 400


def stored_values(image: sitk.Image, modality: str) -> np.ndarray:
    """The ``X x Y x Z`` int16 values a series of ``image`` stores (CT: HU rounded + 1024)."""
    array = np.rint(to_array(image).astype(np.float64))
    if modality == "CT":
        array = array + CT_HU_OFFSET
    return np.clip(array, -32768, 32767).astype(np.int16)


def series_datasets(image: sitk.Image, identity: Identity, *, series_uid: str, series_number: int,
                    modality: str = "MR", description: str = "T1 AX",
                    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
                    frame_of_reference_uid: str | None = None) -> list[Dataset]:
    """Classic single-frame CT or MR datasets, one per slice k, from a right-handed 3D image.

    Pixel values: rounded to integers; CT stores HU + 1024 with RescaleIntercept -1024 (the read
    back equals the rounded image). SOPInstanceUIDs derive from the series UID and k.
    """
    if np.linalg.det(np.asarray(image.GetDirection()).reshape(3, 3)) < 0:
        raise ValueError("DICOM slices stack along row x column: pass right_handed(image)")
    geometry = Geometry.of(image)
    values = stored_values(image, modality)
    columns, rows, slices = values.shape
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    frame_of_reference = frame_of_reference_uid or derive_uid("example-for", identity.study_uid)
    out = []
    for k in range(slices):
        ds = _base(identity, sop_class, derive_uid("example-sop", series_uid, str(k)), modality, series_uid,
                   series_number, description)
        ds.ImageType = list(image_type)
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        _plane_attributes(ds, geometry, k, rows, columns)
        _pixel_attributes(ds, values[:, :, k].T)
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -CT_HU_OFFSET, 1, "HU"
            ds.KVP, ds.AcquisitionNumber = 120, 1
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
            ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "3D", 3.0, 8.0
            ds.EchoTrainLength, ds.MagneticFieldStrength = 1, 3.0
        out.append(ds)
    return out


def plane_datasets(image: sitk.Image, identity: Identity, *, series_uid: str, series_number: int,
                   planes: Sequence[tuple[int, int]], modality: str = "MR", description: str = "LOCALIZER",
                   frame_of_reference_uid: str | None = None) -> list[Dataset]:
    """A localizer-like series: one image per (row axis, column axis) pair of index axes through the centre.

    ``planes=[(1, 2), (0, 2), (0, 1)]`` gives a three-plane localizer (sagittal, coronal, axial
    for an axial volume); ImageType is ORIGINAL\\PRIMARY\\LOCALIZER.
    """
    values = stored_values(image, modality)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    out = []
    for number, (a, b) in enumerate(planes):
        c = 3 - a - b
        index = [0, 0, 0]
        index[c] = values.shape[c] // 2
        plane = np.take(values, index[c], axis=c)  # axes (a, b) in increasing order
        plane = plane if a < b else plane.T
        ds = _base(identity, sop_class, derive_uid("example-sop", series_uid, str(number)), modality, series_uid,
                   series_number, description)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.InstanceNumber = number + 1
        ds.FrameOfReferenceUID = frame_of_reference_uid or derive_uid("example-for", identity.study_uid)
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = _ds(image.TransformIndexToPhysicalPoint(index))
        ds.ImageOrientationPatient = _ds(np.concatenate([direction[:, a], direction[:, b]]))
        ds.PixelSpacing = _ds([spacing[b], spacing[a]])
        ds.SliceThickness = DSfloat(float(spacing[c]), auto_format=True)
        ds.Rows, ds.Columns = plane.shape[1], plane.shape[0]
        _pixel_attributes(ds, plane.T)
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -CT_HU_OFFSET, 1, "HU"
            ds.KVP, ds.AcquisitionNumber = 120, 1
        out.append(ds)
    return out


def text_sr(identity: Identity, *, series_uid: str, text: str = "No acute findings.") -> Dataset:
    """A Basic Text SR document (a non-image object a study export often holds)."""
    sop = derive_uid("example-sr", series_uid)
    ds = _base(identity, BASIC_TEXT_SR, sop, "SR", series_uid, 900, "Report")
    ds.InstanceNumber = 1
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121070", "DCM", "Findings"
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", text
    item.ConceptNameCodeSequence = DicomSequence([concept])
    ds.ContentSequence = DicomSequence([item])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    return ds


def rt_dose(image: sitk.Image, identity: Identity, *, series_uid: str) -> Dataset:
    """An RTDOSE grid (multi-frame, GridFrameOffsetVector, no functional groups) on ``image``'s grid."""
    geometry = Geometry.of(image)
    columns, rows, frames = geometry.size
    sop = derive_uid("example-dose", series_uid)
    ds = _base(identity, RT_DOSE_STORAGE, sop, "RTDOSE", series_uid, 800, "Dose")
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = derive_uid("example-for", identity.study_uid)
    _plane_attributes(ds, geometry, 0, rows, columns)
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = pydicom.tag.Tag("GridFrameOffsetVector")
    ds.GridFrameOffsetVector = _ds(np.arange(frames) * geometry.spacing[2])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType, ds.DoseGridScaling = "GY", "PHYSICAL", "PLAN", 0.001
    ds.PixelData = np.full((frames, rows, columns), 1000, "<u2").tobytes()
    return ds


def compress(ds: Dataset, transfer_syntax: str) -> Dataset:
    """``ds`` with its pixel data re-encoded losslessly (RLE, JPEG-LS or JPEG 2000); UIDs kept."""
    ds.compress(transfer_syntax, generate_instance_uid=False)
    return ds


def gdcm_jpeg_lossless(path: str | Path) -> None:
    """Re-encode a DICOM file in place as JPEG Lossless SV1 (process 14), the usual CT archive syntax, with GDCM."""
    import gdcm
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise ValueError(f"GDCM cannot read {path}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise ValueError(f"GDCM cannot re-encode {path}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise ValueError(f"GDCM cannot write {path}")


def write_datasets(datasets: Sequence[Dataset], folder: str | Path, *, names: str = "instance",
                   rng: np.random.Generator | None = None) -> list[Path]:
    """Write datasets as DICOM Part 10 files.

    Args:
        names: ``"instance"`` (IM00001, ...), or ``"random"`` (meaningless hex names, as exports
            often have; needs ``rng``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets, start=1):
        name = f"IM{number:05d}" if names == "instance" else f"{int(rng.integers(0, 2**40)):010x}"
        path = folder / name
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def legacy_multiframe(datasets: Sequence[Dataset], *, series_uid: str, modality: str) -> Dataset:
    """One legacy-converted enhanced multi-frame object (highdicom) from classic single-frame datasets."""
    import highdicom as hd
    cls = hd.legacy.LegacyConvertedEnhancedCTImage if modality == "CT" else hd.legacy.LegacyConvertedEnhancedMRImage
    out = cls(list(datasets), series_instance_uid=series_uid, series_number=int(datasets[0].SeriesNumber),
              sop_instance_uid=derive_uid("example-multiframe", series_uid), instance_number=1)
    for keyword in ("InstitutionName", "StationName", "OperatorsName", "BodyPartExamined", "SeriesDescription"):
        if keyword in datasets[0]:
            setattr(out, keyword, datasets[0].get(keyword))
    return out


@dataclass
class ExampleStudy:
    """A written study: where it is, what it holds, and the volumes it was made from.

    Attributes:
        series: role -> SeriesInstanceUID (role names such as ``"axial"``, ``"localizer"``).
        image: the right-handed source volume (float32, rounded values as stored; CT in HU).
        label: the grey/white matter label map on the same grid (0, 1, 2).
        expect: for the broken corpus, the stack problem code or reason the study must fail with.
    """

    name: str
    folder: Path
    identity: Identity
    series: dict[str, str]
    image: sitk.Image | None = None
    label: sitk.Image | None = None
    expect: str = ""


def _rounded(image: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(np.rint(sitk.GetArrayFromImage(image)).astype(np.float32))
    out.CopyInformation(image)
    return out


def _mni_cases(count: int, seed: int, max_size: int) -> list[tuple[sitk.Image, sitk.Image]]:
    from threedino_pipe.demo.examples import mni_case, mni_images
    t1, label = mni_images()
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        image, seg = mni_case(t1, label, rng, max_size)
        cases.append((_rounded(right_handed(image)), right_handed(seg)))
    return cases


def _identity(name: str, index: int) -> Identity:
    return Identity(patient_name=f"Zebulon^Quixotic{index}^Test", patient_id=f"ZQX-{7741 + index}-PID",
                    study_uid=derive_uid("example-study", name), accession=f"ACCZQX{991 + index}")


def build_example_studies(root: str | Path, *, seed: int = 0, max_size: int = 48) -> dict[str, ExampleStudy]:
    """Write good studies from real MNI152 resamplings into ``root`` (a PACS-export-like tree).

    Studies (keys of the result):
        ``mr``: an axial T1 series (random file names, nested folders), a three-plane localizer,
        a DERIVED coronal reformat and a Basic Text SR;
        ``ct``: the same anatomy stored as CT (HU with RescaleIntercept), a one-image CT
        localizer and an RTDOSE;
        ``multiframe``: one legacy-converted enhanced MR multi-frame object;
        ``compressed``: an axial MR series whose slices cycle through RLE, JPEG-LS, JPEG 2000
        lossless and JPEG Lossless SV1 (the last encoded by GDCM).
    Every study also gets a README.txt (not DICOM) beside its files.
    """
    root = Path(root)
    rng = np.random.default_rng(seed + 1000)
    cases = _mni_cases(4, seed, max_size)
    studies: dict[str, ExampleStudy] = {}

    identity = _identity("mr", 0)
    image, label = cases[0]
    folder = root / "export_0001"
    series = {role: derive_uid("example-series", "mr", role) for role in ("axial", "localizer", "reformat", "sr")}
    axial = series_datasets(image, identity, series_uid=series["axial"], series_number=3, description="T1 MPRAGE AX")
    write_datasets(axial, folder / "DIR000" / "A1B2", names="random", rng=rng)
    write_datasets(plane_datasets(image, identity, series_uid=series["localizer"], series_number=1,
                                  planes=[(1, 2), (0, 2), (0, 1)]), folder / "DIR000" / "LOC", names="random", rng=rng)
    reformat = _reformat(image)
    write_datasets(series_datasets(reformat, identity, series_uid=series["reformat"], series_number=4,
                                   description="T1 COR REFORMAT", image_type=("DERIVED", "SECONDARY", "REFORMATTED")),
                   folder / "DIR001", names="random", rng=rng)
    write_datasets([text_sr(identity, series_uid=series["sr"])], folder / "DIR002", names="random", rng=rng)
    (folder / "README.txt").write_text("exported by a PACS viewer\n")
    studies["mr"] = ExampleStudy("mr", folder, identity, series, image, label)

    identity = _identity("ct", 1)
    image, label = cases[1]
    folder = root / "export_0002"
    series = {role: derive_uid("example-series", "ct", role) for role in ("axial", "localizer", "dose")}
    write_datasets(series_datasets(image, identity, series_uid=series["axial"], series_number=2, modality="CT",
                                   description="HEAD 3mm"), folder / "S2", names="random", rng=rng)
    write_datasets(plane_datasets(image, identity, series_uid=series["localizer"], series_number=1, modality="CT",
                                  planes=[(0, 2)], description="SCOUT"), folder / "S1", names="random", rng=rng)
    write_datasets([rt_dose(image, identity, series_uid=series["dose"])], folder / "S9", names="random", rng=rng)
    studies["ct"] = ExampleStudy("ct", folder, identity, series, image, label)

    identity = _identity("multiframe", 2)
    image, label = cases[2]
    folder = root / "export_0003"
    series = {"axial": derive_uid("example-series", "multiframe", "axial")}
    classic = series_datasets(image, identity, series_uid=series["axial"], series_number=5, description="T1 3D MF")
    write_datasets([legacy_multiframe(classic, series_uid=series["axial"], modality="MR")], folder, names="random",
                   rng=rng)
    studies["multiframe"] = ExampleStudy("multiframe", folder, identity, series, image, label)

    identity = _identity("compressed", 3)
    image, label = cases[3]
    folder = root / "export_0004" / "nested" / "deeper"
    series = {"axial": derive_uid("example-series", "compressed", "axial")}
    syntaxes = (RLELossless, JPEGLSLossless, JPEG2000Lossless, None)
    slices = [compress(ds, syntaxes[k % 4]) if syntaxes[k % 4] else ds for k, ds in enumerate(
        series_datasets(image, identity, series_uid=series["axial"], series_number=6, description="T1 AX LOSSLESS"))]
    for k, path in enumerate(write_datasets(slices, folder, names="random", rng=rng)):
        if syntaxes[k % 4] is None:
            gdcm_jpeg_lossless(path)
    studies["compressed"] = ExampleStudy("compressed", folder, identity, series, image, label)
    return studies


def _reformat(image: sitk.Image) -> sitk.Image:
    """``image`` resliced coronally (index axes (i, k, j) -> a right-handed grid) by nearest neighbour."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    new = np.column_stack([direction[:, 0], direction[:, 2], -direction[:, 1]])
    spacing = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    ref = sitk.Image([int(size[0]), int(size[2]), int(size[1])], sitk.sitkFloat32)
    ref.SetSpacing([float(spacing[0]), float(spacing[2]), float(spacing[1])])
    ref.SetDirection(new.flatten().tolist())
    ref.SetOrigin(tuple(float(v) for v in np.asarray(image.GetOrigin()) + direction[:, 1] * spacing[1] * (size[1] - 1)))
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)


def build_broken_corpus(root: str | Path, *, seed: int = 5, max_size: int = 32) -> dict[str, ExampleStudy]:
    """Write one study per kind of bad input of issue 14 into ``root``.

    Keys and what each study must fail with (``ExampleStudy.expect``):
        ``truncated``: an MR series one of whose files is cut in its pixel data (``truncated``);
        ``missing_slice``: an MR series without one middle slice (``missing_slices``);
        ``mixed_spacing``: an MR series one slice of which has another pixel spacing
        (``mixed_pixel_spacing``);
        ``three_slices``: an MR series of 3 slices (``too_few_slices``);
        ``multiframe_positions``: a multi-frame MR object one frame of which sits half a slice
        off (``uneven_spacing``);
        ``localizer_only``: a CT study holding only a localizer and an RTDOSE (``no_usable_series``);
        ``two_equal``: two equally good axial MR series (``ambiguous``).
    The root also gets a non-DICOM file and a file cut inside its header.
    """
    root = Path(root)
    cases = _mni_cases(2, seed, max_size)
    image, label = cases[0]
    out: dict[str, ExampleStudy] = {}

    def study(name: str, index: int, expect: str, roles: Sequence[str]) -> tuple[Identity, dict[str, str], Path]:
        identity = _identity(f"broken-{name}", 10 + index)
        series = {role: derive_uid("example-series", f"broken-{name}", role) for role in roles}
        folder = root / f"case_{index:02d}"
        out[name] = ExampleStudy(name, folder, identity, series, image, label, expect)
        return identity, series, folder

    identity, series, folder = study("truncated", 0, "truncated", ["axial"])
    paths = write_datasets(series_datasets(image, identity, series_uid=series["axial"], series_number=2), folder)
    victim = paths[len(paths) // 2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size - 500])

    identity, series, folder = study("missing_slice", 1, "missing_slices", ["axial"])
    paths = write_datasets(series_datasets(image, identity, series_uid=series["axial"], series_number=2), folder)
    paths[len(paths) // 2].unlink()

    identity, series, folder = study("mixed_spacing", 2, "mixed_pixel_spacing", ["axial"])
    datasets = series_datasets(image, identity, series_uid=series["axial"], series_number=2)
    datasets[3].PixelSpacing = _ds([float(datasets[3].PixelSpacing[0]) * 1.5, float(datasets[3].PixelSpacing[1])])
    write_datasets(datasets, folder)

    identity, series, folder = study("three_slices", 3, "too_few_slices", ["axial"])
    short = sitk.Extract(image, [image.GetSize()[0], image.GetSize()[1], 3], [0, 0, image.GetSize()[2] // 2])
    write_datasets(series_datasets(short, identity, series_uid=series["axial"], series_number=2), folder)

    identity, series, folder = study("multiframe_positions", 4, "uneven_spacing", ["axial"])
    multi = legacy_multiframe(series_datasets(image, identity, series_uid=series["axial"], series_number=2),
                              series_uid=series["axial"], modality="MR")
    frame = multi.PerFrameFunctionalGroupsSequence[len(multi.PerFrameFunctionalGroupsSequence) // 2]
    position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
    normal = np.cross(*np.asarray(multi.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                                  .ImageOrientationPatient, float).reshape(2, 3))
    frame.PlanePositionSequence[0].ImagePositionPatient = _ds(position + 0.5 * image.GetSpacing()[2] * normal)
    write_datasets([multi], folder)

    identity, series, folder = study("localizer_only", 5, "no_usable_series", ["localizer", "dose"])
    write_datasets(plane_datasets(image, identity, series_uid=series["localizer"], series_number=1, modality="CT",
                                  planes=[(0, 2)], description="SCOUT"), folder / "scout")
    write_datasets([rt_dose(image, identity, series_uid=series["dose"])], folder / "dose")

    identity, series, folder = study("two_equal", 6, "ambiguous", ["first", "second"])
    for number, role in enumerate(("first", "second"), start=2):
        write_datasets(series_datasets(image, identity, series_uid=series[role], series_number=number,
                                       description=f"T1 AX run {number}"), folder / role)

    (root / "notes.txt").write_text("not a DICOM file\n")
    header_cut = root / "cut_in_header.dcm"
    other = series_datasets(cases[1][0], _identity("broken-header", 20),
                            series_uid=derive_uid("example-series", "broken-header"), series_number=1)[0]
    other.save_as(header_cut, enforce_file_format=True)
    header_cut.write_bytes(header_cut.read_bytes()[:300])
    return out


def synthetic_ct_volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], labels: int,
                        seed: int = 0) -> tuple[sitk.Image, np.ndarray]:
    """A generated CT-like volume (HU, float32) and a label map of ``labels`` ellipsoids (``X x Y x Z`` uint8).

    Built slice by slice (no full-size coordinate grids), so a 512 x 512 x 300 case needs little
    more than its own arrays; for benchmarks.
    """
    rng = np.random.default_rng(seed)
    spacing_arr = np.asarray(spacing, float)
    half = np.asarray(shape) * spacing_arr / 2
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    ellipsoids = []
    for value in range(1, labels + 1):
        angle = 2 * math.pi * value / labels
        centre = np.array([math.cos(angle) * half[0] * 0.45, math.sin(angle) * half[1] * 0.45,
                           rng.uniform(-0.3, 0.3) * half[2]])
        ellipsoids.append((value, centre, half * rng.uniform(0.1, 0.2, size=3)))
    label = np.zeros(shape, np.uint8)
    hu = np.empty(shape, np.float32)
    x2 = (axes[0][:, None] / (half[0] * 0.9)) ** 2
    y2 = (axes[1][None, :] / (half[1] * 0.9)) ** 2
    for k, z in enumerate(axes[2]):
        body = x2 + y2 + (z / (half[2] * 0.9)) ** 2 <= 1
        plane = label[:, :, k]
        for value, centre, radii in ellipsoids:
            dz = ((z - centre[2]) / radii[2]) ** 2
            if dz > 1:
                continue
            inside = ((axes[0][:, None] - centre[0]) / radii[0]) ** 2 + \
                ((axes[1][None, :] - centre[1]) / radii[1]) ** 2 + dz <= 1
            plane[inside] = value
        hu[:, :, k] = np.where(body, 40.0, -1000.0) + 30.0 * (plane > 0) + rng.normal(0, 10, shape[:2])
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(v) for v in spacing))
    return image, label
