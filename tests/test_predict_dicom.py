"""`3dino predict` on DICOM studies as a PACS exports them (issue 14, integration steps 1 to 3).

Studies are written from real MNI152 resamplings (threedino_pipe.demo.dicom_examples): an MR
study with a localizer, a reformat and an SR; a CT study with a localizer and an RTDOSE; an
enhanced multi-frame MR; a compressed MR; and the broken corpus (a truncated file, a missing
slice, mixed spacings, 3 slices, uneven multi-frame positions, a CT study whose only CT is a
localizer, two equally good series). The model is test_predict's tiny random network, as an MR
model and (its card's channel renamed) as a CT model. Every run is the real command (subprocess).
"""

from __future__ import annotations

import csv
import gzip
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import run_3dino
from test_dicom_results import dciodvfy_errors
from test_predict import _copy_run, one_thread, project  # noqa: F401 - fixtures: one torch thread; plans, runs and scans

from threedino_pipe.artifacts import StudyKeys
from threedino_pipe.demo.dicom_examples import build_broken_corpus, build_example_studies
from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.rtstruct_raster import rasterise_rtstruct
from threedino_pipe.dicom.seg_reader import read_seg_on_source
from threedino_pipe.dicom.volume import read_series
from threedino_pipe.raw_data.image_io import read_image

pytestmark = pytest.mark.e2e

ENV = {"OMP_NUM_THREADS": "1"}
LABEL_NAMES = {1: "body", 2: "lesion"}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _identities(*groups: dict) -> list[str]:
    """Every patient name part, ID and accession number of the studies: none may leak."""
    out = []
    for group in groups:
        for study in group.values():
            out += [p for p in study.identity.patient_name.split("^") if len(p) > 4]  # not "Test" (pytest paths)
            out += [study.identity.patient_id, study.identity.accession]
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dicom_predict")
    good = build_example_studies(root / "in", max_size=40)
    broken = build_broken_corpus(root / "in" / "broken")
    return {"root": root, "good": good, "broken": broken}


@pytest.fixture(scope="module")
def mr_batch(tree, project) -> tuple:  # noqa: F811 - the fixture
    out = tree["root"] / "out_mr"
    proc = run_3dino("predict", "-i", str(tree["root"] / "in"), "-o", str(out), "-m", str(project["run_a"]),
                     "--output-format", "nifti,dicom-seg", "--output-format", "rtstruct", "--num-workers", "0",
                     "--no-progress", env=ENV)
    keys = StudyKeys.read(StudyKeys.in_folder(out))
    by_study = {entry.study_uid: key for key, entry in keys.studies.items()}
    return proc, out, by_study


def test_the_right_series_is_chosen_and_bad_studies_fail_alone(tree, mr_batch):
    proc, out, key_of = mr_batch
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    good, broken = tree["good"], tree["broken"]
    rows = {r["series_uid"]: r for r in _rows(out / "series_selection.csv")}
    mr = good["mr"].series
    assert rows[mr["axial"]]["status"] == "chosen" and rows[mr["axial"]]["channel"] == "MR"
    assert rows[mr["localizer"]]["status"] == "skipped" and "localizer" in rows[mr["localizer"]]["reason"]
    assert rows[mr["reformat"]]["status"] == "candidate"
    assert rows[mr["sr"]]["status"] == "skipped" and "not an image series" in rows[mr["sr"]]["reason"]
    for name in ("multiframe", "compressed"):
        assert rows[good[name].series["axial"]]["status"] == "chosen"
    failures = {r["case"]: r for r in _rows(out / "failures.csv")}
    expected = {key_of[s.identity.study_uid] for s in broken.values()} | {key_of[good["ct"].identity.study_uid]}
    assert set(failures) == expected
    truncated = failures[key_of[broken["truncated"].identity.study_uid]]
    assert broken["truncated"].series["axial"] in truncated["file"] and "truncated" in truncated["error"]
    assert "broken/case_00/" in truncated["error"]  # the file named relative to the input
    assert "equally good" in failures[key_of[broken["two_equal"].identity.study_uid]]["error"]
    for name in ("mr", "multiframe", "compressed"):
        key = key_of[good[name].identity.study_uid]
        for ending in (".nii.gz", "_seg.dcm", "_rtstruct.dcm"):
            assert (out / f"{key}{ending}").is_file(), (name, ending)
    keys_file = StudyKeys.in_folder(out)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["mr", "multiframe", "compressed"])
def test_seg_and_rtstruct_give_back_the_nifti_output(tree, mr_batch, name):
    proc, out, key_of = mr_batch
    study = tree["good"][name]
    key = key_of[study.identity.study_uid]
    index = index_folder(study.folder, processes=1)
    volume = read_series(index.studies[study.identity.study_uid].series[study.series["axial"]])
    labels, geo = read_image(out / f"{key}.nii.gz")
    assert geo.size == volume.geometry.size
    np.testing.assert_allclose(geo.origin, volume.geometry.origin, atol=1e-3)
    assert "3dino run_a sha256:" in nib.load(out / f"{key}.nii.gz").header["descrip"].tobytes().decode()
    labels = labels.astype(np.uint16)
    assert labels.any()
    back = read_seg_on_source(out / f"{key}_seg.dcm", volume, LABEL_NAMES)
    np.testing.assert_array_equal(back, labels)
    seg = pydicom.dcmread(out / f"{key}_seg.dcm")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "run_a" and "none" in algorithm.AlgorithmParameters  # backbone tag
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series["axial"]
    assert dciodvfy_errors(out / f"{key}_seg.dcm") == []
    voxel_ml = float(np.prod(geo.spacing)) / 1000.0
    masks = rasterise_rtstruct(out / f"{key}_rtstruct.dcm", volume.geometry)
    for value, label_name in LABEL_NAMES.items():
        truth = labels == value
        if truth.sum() * voxel_ml < 1.0:
            continue
        mask = masks[label_name]
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice >= 0.95, (label_name, dice)


def test_no_patient_name_or_id_in_any_file_but_the_result_objects(tree, mr_batch):
    proc, out, _ = mr_batch
    secrets = _identities(tree["good"], tree["broken"])
    assert secrets
    for path in out.rglob("*"):
        assert not any(s.lower() in path.name.lower() for s in secrets), path
        if path.suffix == ".dcm" or path.is_dir():  # SEG and RTSTRUCT carry the patient, as the standard requires
            continue
        data = path.read_bytes()
        for text in (data, data if path.suffix != ".gz" else gzip.decompress(data)):
            assert not any(s.encode().lower() in text.lower() for s in secrets), path
    for text in (proc.stdout, proc.stderr):
        assert not any(s.lower() in text.lower() for s in secrets)


def test_a_ct_model_chooses_the_axial_ct_and_fails_the_localizer_only_study(tree, project, tmp_path):  # noqa: F811
    run = _copy_run(project["run_a"], tmp_path / "ct_run", channel_names={"0": "CT"})
    inputs = tmp_path / "in"
    ct, localizer_only = tree["good"]["ct"], tree["broken"]["localizer_only"]
    for study, name in ((ct, "a"), (localizer_only, "b")):
        shutil.copytree(study.folder, inputs / name)
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(inputs), "-o", str(out), "-m", str(run), "--num-workers", "0",
                     "--no-progress", env=ENV)
    assert proc.returncode == 1, proc.stderr
    keys = {e.study_uid: k for k, e in StudyKeys.read(StudyKeys.in_folder(out)).studies.items()}
    rows = {r["series_uid"]: r for r in _rows(out / "series_selection.csv")}
    assert rows[ct.series["axial"]]["status"] == "chosen"
    assert "localizer" in rows[ct.series["localizer"]]["reason"]
    assert "RTDOSE" in rows[ct.series["dose"]]["reason"]
    failure, = _rows(out / "failures.csv")
    assert failure["case"] == keys[localizer_only.identity.study_uid]
    assert "no usable CT series" in failure["error"] and "localizer" in failure["error"]
    key = keys[ct.identity.study_uid]  # default formats for DICOM input: NIfTI and SEG
    assert sorted(p.name for p in out.glob(f"{key}*")) == [f"{key}.nii.gz", f"{key}_seg.dcm"]
    again = run_3dino("predict", "-i", str(inputs), "-o", str(out), "-m", str(run), "--num-workers", "0",
                      "--continue", "--no-progress", env=ENV)
    assert again.returncode == 1 and "1 already predicted" in again.stderr, again.stderr


def test_dicom_output_formats_are_refused_for_image_files(project, tmp_path):  # noqa: F811 - the fixture
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(project["scans"] / "patient_0000.nii.gz"), "-o", str(out), "-m",
                     str(project["run_a"]), "--output-format", "dicom-seg", "--no-progress", env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--output-format dicom-seg needs DICOM input" in proc.stderr
    assert not out.exists()
