"""DICOM SEG and RTSTRUCT results on real source series: read back voxel for voxel (SEG) or by the
stated rasterisation rule (RTSTRUCT), valid by dciodvfy, deterministic UIDs, identity copied only."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.rtstruct_raster import rasterise_contours, rasterise_rtstruct
from threedino_pipe.dicom.rtstruct_writer import build_rtstruct, slice_contours, to_patient_mm, write_rtstruct
from threedino_pipe.dicom.seg_reader import read_seg_on_source
from threedino_pipe.dicom.seg_writer import ModelIdentity, build_seg, check_copied_identity, write_seg
from threedino_pipe.dicom.volume import read_series
from threedino_pipe.raw_data.image_io import Geometry, to_array
from threedino_pipe.runtime.errors import UserError

LABELS = {1: "grey_matter", 2: "white_matter"}
MODEL = ModelIdentity("finetune__adapter__tiny__pct25", "threedino-pipe 0.1.0", "pretrain_tiny_501", "3f" * 32)
UID_RE = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$")
SOURCE_ONLY = ("InstitutionName", "StationName", "OperatorsName", "BodyPartExamined")


@pytest.fixture(scope="module")
def volumes(dicom_studies):
    root, studies = dicom_studies
    index = index_folder(root, processes=1)
    out = {}
    for name in ("mr", "multiframe", "ct"):
        study = studies[name]
        volume = read_series(index.studies[study.identity.study_uid].series[study.series["axial"]])
        out[name] = (volume, to_array(study.label).astype(np.uint8), study)
    return out


def dciodvfy_errors(path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("name", ["mr", "multiframe"])
def test_seg_reads_back_voxel_for_voxel(tmp_path, volumes, name):
    volume, label, study = volumes[name]
    assert set(np.unique(label)) == {0, 1, 2}
    result = write_seg(label, LABELS, volume, MODEL, tmp_path / "seg.dcm")
    back = read_seg_on_source(result.path, volume, LABELS)
    np.testing.assert_array_equal(back, label)
    assert dciodvfy_errors(result.path) == []
    seg = pydicom.dcmread(result.path)
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["grey_matter", "white_matter"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == MODEL.name and algorithm.AlgorithmVersion == MODEL.version
    assert MODEL.weights_checksum in algorithm.AlgorithmParameters
    assert MODEL.backbone_tag in algorithm.AlgorithmParameters
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series["axial"]
    assert referenced == {f.sop_instance_uid for f in volume.frames}
    frames = seg.PerFrameFunctionalGroupsSequence
    positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in frames], float)
    slices = np.array([volume.image.TransformIndexToPhysicalPoint([0, 0, k]) for k in range(volume.geometry.size[2])])
    distance = np.linalg.norm(positions[:, None, :] - slices[None, :, :], axis=2).min(axis=1)
    assert distance.max() < 1e-4  # frames lie on the source slices


@pytest.mark.parametrize("name", ["mr", "multiframe"])
def test_rtstruct_rasterises_back(tmp_path, volumes, name):
    volume, label, study = volumes[name]
    result = write_rtstruct(label, LABELS, volume, MODEL, tmp_path / "rtstruct.dcm")
    assert dciodvfy_errors(result.path) == []
    masks = rasterise_rtstruct(result.path, volume.geometry)
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    for value, name_ in LABELS.items():
        reference = label == value
        assert reference.sum() * voxel_ml >= 1.0  # structures of at least 1 mL
        dice = 2 * (reference & masks[name_]).sum() / (reference.sum() + masks[name_].sum())
        assert dice >= 0.95
        assert dice == 1.0  # by the stated rule the traced contours give the mask back exactly
    ds = pydicom.dcmread(result.path)
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == study.series["axial"]
    images = {(i.ReferencedSOPInstanceUID, int(i.get("ReferencedFrameNumber", 0))) for i in series.ContourImageSequence}
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            item = contour.ContourImageSequence[0]
            assert (item.ReferencedSOPInstanceUID, int(item.get("ReferencedFrameNumber", 0))) in images
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
    assert MODEL.weights_checksum in ds.StructureSetDescription


def test_uids_are_deterministic(volumes):
    volume, label, _ = volumes["mr"]
    first, again = build_seg(label, LABELS, volume, MODEL), build_seg(label, LABELS, volume, MODEL)
    other_model = ModelIdentity(MODEL.name, MODEL.version, MODEL.backbone_tag, "40" * 32)
    other = build_seg(label, LABELS, volume, other_model)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        assert first[keyword].value == again[keyword].value != other[keyword].value
        assert UID_RE.match(first[keyword].value) and len(first[keyword].value) <= 64
    assert first.DimensionOrganizationSequence[0].DimensionOrganizationUID == \
        again.DimensionOrganizationSequence[0].DimensionOrganizationUID
    rt, rt_again = build_rtstruct(label, LABELS, volume, MODEL), build_rtstruct(label, LABELS, volume, MODEL)
    assert rt.SOPInstanceUID == rt_again.SOPInstanceUID != first.SOPInstanceUID
    other_source = build_seg(volumes["ct"][1], LABELS, volumes["ct"][0], MODEL)
    assert other_source.SOPInstanceUID != first.SOPInstanceUID


def test_only_patient_and_study_identity_are_copied(volumes):
    volume, label, study = volumes["ct"]
    source = pydicom.dcmread(volume.frames[0].path, stop_before_pixels=True)
    for result in (build_seg(label, LABELS, volume, MODEL), build_rtstruct(label, LABELS, volume, MODEL)):
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "AccessionNumber", "StudyDate", "ReferringPhysicianName"):
            assert result[keyword].value == source[keyword].value
        assert result.PatientName == study.identity.patient_name
        for keyword in SOURCE_ONLY:
            assert source.get(keyword) and result.get(keyword) in (None, "")
        assert result.SeriesDescription != source.SeriesDescription
        check_copied_identity(result, source)


def test_label_map_problems_are_user_errors(volumes):
    volume, label, _ = volumes["mr"]
    with pytest.raises(UserError, match="the label map has shape"):
        build_seg(label[:-1], LABELS, volume, MODEL)
    with pytest.raises(UserError, match="must hold integers"):
        build_rtstruct(label.astype(np.float32), LABELS, volume, MODEL)
    with pytest.raises(UserError, match=r"values \[2\] without a name"):
        build_seg(label, {1: "grey_matter"}, volume, MODEL)


def test_empty_and_absent_labels(tmp_path, volumes):
    volume, label, _ = volumes["mr"]
    only_grey = np.where(label == 1, 1, 0).astype(np.uint8)
    seg = write_seg(only_grey, LABELS, volume, MODEL, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_seg_on_source(seg.path, volume, LABELS), only_grey)
    empty = np.zeros_like(label)
    seg = write_seg(empty, LABELS, volume, MODEL, tmp_path / "empty_seg.dcm")
    np.testing.assert_array_equal(read_seg_on_source(seg.path, volume, LABELS), empty)
    rt = write_rtstruct(empty, LABELS, volume, MODEL, tmp_path / "empty_rt.dcm")
    assert all(not m.any() for m in rasterise_rtstruct(rt.path, volume.geometry).values())
    assert len(pydicom.dcmread(rt.path).StructureSetROISequence) == 2


def test_rasterisation_rule_on_holes_islands_and_corners():
    mask = np.zeros((20, 16), bool)
    mask[2:15, 2:13] = True
    mask[5:12, 5:10] = False  # a hole
    mask[7:9, 7:8] = True  # an island in the hole
    mask[16, 14] = mask[17, 15] = True  # two pixels touching at a corner only
    mask[19, 0:3] = True  # touching the border
    geometry = Geometry(size=(20, 16, 3), spacing=(0.7, 0.9, 2.5), origin=(-10.0, 4.0, 30.0),
                        direction=tuple(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).flatten()))
    contours = [to_patient_mm(c, 1, geometry) for c in slice_contours(mask)]
    assert len(contours) == 6  # outer, hole, island, one per corner-touching pixel, the run at the border
    volume = rasterise_contours(contours, geometry)
    np.testing.assert_array_equal(volume[:, :, 1], mask)
    assert not volume[:, :, 0].any() and not volume[:, :, 2].any()
    normal = np.asarray(geometry.direction).reshape(3, 3)[:, 2]
    off_slice = [contours[0] + 0.4 * geometry.spacing[2] * normal]
    with pytest.raises(UserError, match="does not lie on one slice"):
        rasterise_contours(off_slice, geometry)


def test_result_uids_follow_every_input():
    from threedino_pipe.dicom.uids import derive_uid, result_uids
    base = result_uids("SEG", "1.2.3", ["1.2.3.4"], "ab" * 32, ["1.2.3.4.1", "1.2.3.4.2"])
    assert base == result_uids("SEG", "1.2.3", ["1.2.3.4"], "ab" * 32, ["1.2.3.4.2", "1.2.3.4.1"])  # order ignored
    others = [result_uids("RTSTRUCT", "1.2.3", ["1.2.3.4"], "ab" * 32, ["1.2.3.4.1", "1.2.3.4.2"]),
              result_uids("SEG", "1.2.9", ["1.2.3.4"], "ab" * 32, ["1.2.3.4.1", "1.2.3.4.2"]),
              result_uids("SEG", "1.2.3", ["1.2.3.5"], "ab" * 32, ["1.2.3.4.1", "1.2.3.4.2"]),
              result_uids("SEG", "1.2.3", ["1.2.3.4"], "cd" * 32, ["1.2.3.4.1", "1.2.3.4.2"]),
              result_uids("SEG", "1.2.3", ["1.2.3.4"], "ab" * 32, ["1.2.3.4.1"])]
    uids = {base["instance"], *(o["instance"] for o in others), base["series"]}
    assert len(uids) == 7  # every input changes the UIDs; series and instance UIDs differ
    assert all(UID_RE.match(u) and len(u) <= 64 for u in uids)
    assert derive_uid("a", "b") == derive_uid("a", "b") != derive_uid("b", "a")
