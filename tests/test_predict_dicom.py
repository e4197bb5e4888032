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

from threedino_pipe.artifacts import PredictArgs, PredictLogLine, StudyKeys
from threedino_pipe.demo.dicom_examples import build_broken_corpus, build_example_studies
from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.rtstruct_raster import rasterise_rtstruct
from threedino_pipe.dicom.seg_reader import read_seg_on_source
from threedino_pipe.dicom.uids import derive_uid
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


def _leaks(out: Path, proc, secrets: list[str]) -> list[str]:
    """Where a secret appears: a file name under ``out``, a file's bytes (gzip files also unpacked; SEG and
    RTSTRUCT objects left out: they carry the patient, as the standard requires), stdout or stderr."""
    found = []
    for path in out.rglob("*"):
        found += [f"name {path.name}: {s}" for s in secrets if s.lower() in path.name.lower()]
        if not path.is_file() or path.name.endswith(("_seg.dcm", "_rtstruct.dcm")):
            continue
        data = path.read_bytes()
        for text in (data, data if not path.name.endswith(".gz") else gzip.decompress(data)):
            found += [f"bytes of {path.name}: {s}" for s in secrets if s.encode().lower() in text.lower()]
    for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        found += [f"{name}: {s}" for s in secrets if s.lower() in text.lower()]
    return found


def test_no_patient_name_or_id_in_any_file_but_the_result_objects(tree, mr_batch):
    proc, out, _ = mr_batch
    secrets = _identities(tree["good"], tree["broken"])
    assert secrets and all(len(s) > 4 for s in secrets)
    assert (out / "predict_log.jsonl").is_file() and (out / "series_selection.csv").is_file()
    assert _leaks(out, proc, secrets) == []
    for key in mr_batch[2].values():  # ...while the result objects do carry the patient
        seg = out / f"{key}_seg.dcm"
        if seg.is_file():
            assert pydicom.dcmread(seg, stop_before_pixels=True).PatientID.startswith("ZQX-")


def test_predict_log_has_a_line_per_study(tree, mr_batch):
    proc, out, key_of = mr_batch
    lines = {line.case_id: line for line in PredictLogLine.read_lines(out / "predict_log.jsonl")}
    assert set(lines) == set(key_of.values())  # every study once: predicted or failed
    args = PredictArgs.read(PredictArgs.in_folder(out))
    failures = {r["case"]: r for r in _rows(out / "failures.csv")}
    for name in ("mr", "multiframe", "compressed"):
        study = tree["good"][name]
        line = lines[key_of[study.identity.study_uid]]
        assert line.outcome == "predicted" and line.error is None
        assert line.series_uids == {"MR": study.series["axial"]} and line.files == {}
        assert [(m.model_json_sha256, m.weights_sha256) for m in line.models] == args.identity()
        assert line.options == args.options and line.started <= line.ended
        assert line.started.endswith("+00:00")
        formats = {o.output_format: o for o in line.outputs}
        assert sorted(formats) == ["dicom-seg", "nifti", "rtstruct"]
        for fmt in ("dicom-seg", "rtstruct"):
            written = pydicom.dcmread(out / formats[fmt].file, stop_before_pixels=True)
            assert formats[fmt].sop_instance_uid == written.SOPInstanceUID
        assert formats["nifti"].sop_instance_uid is None and line.sends == []
    for key, failure in failures.items():
        assert lines[key].outcome == "failed" and lines[key].error == failure["error"]
        assert lines[key].outputs == [] and lines[key].series_uids == {}


def test_bad_studies_are_named_and_leave_nothing_behind(tree, mr_batch):
    """The issue's bad input in one tree with good studies: each failure names its series and the problem."""
    proc, out, key_of = mr_batch
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    failures = {r["case"]: r for r in _rows(out / "failures.csv")}
    expected = {"truncated": "truncated", "missing_slice": "missing slice", "mixed_spacing": "mixed pixel spacing",
                "three_slices": "3 slice(s), fewer than the minimum of 10", "multiframe_positions": "uneven slice",
                "two_equal": "equally good"}
    for name, message in expected.items():
        study = tree["broken"][name]
        row = failures[key_of[study.identity.study_uid]]
        assert message in row["error"], (name, row)
        assert all(uid in row["file"] + row["error"] for uid in study.series.values()), (name, row)
        assert key_of[study.identity.study_uid] in proc.stderr  # logged by key
    failed = set(failures)
    assert not [p.name for p in out.iterdir() if p.name.split("_")[0].split(".")[0] in failed]
    assert not [p.name for p in out.rglob("*") if ".partial" in p.name]


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


def _restudy(study, dest: Path, tag: str, edit=None, study_tag: str | None = None) -> tuple[str, str]:
    """A copy of ``study``'s axial series as a new study (UIDs derived from ``tag``; study and frame of reference
    from ``study_tag`` when given, so that two copies form one study; same patient), each dataset passed
    through ``edit(k, ds)``; returns (study UID, series UID)."""
    index = index_folder(study.folder, processes=1)
    series = index.studies[study.identity.study_uid].series[study.series["axial"]]
    study_uid, series_uid = derive_uid(study_tag or tag, "study"), derive_uid(tag, "series")
    dest.mkdir(parents=True)
    for k, instance in enumerate(sorted(series.instances, key=lambda i: i.instance_number or 0)):
        ds = pydicom.dcmread(instance.path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derive_uid(tag, ds.SOPInstanceUID)
        ds.FrameOfReferenceUID = derive_uid(study_tag or tag, "for")
        if edit is not None:
            edit(k, ds)
        ds.save_as(dest / f"slice{k:03d}", enforce_file_format=True)
    return study_uid, series_uid


def _tilt(k: int, ds) -> None:
    """Slice 4 turned by about 3 degrees about the column direction: a series of mixed orientations."""
    if k == 4:
        row = np.asarray(ds.ImageOrientationPatient[:3], float)
        column = np.asarray(ds.ImageOrientationPatient[3:], float)
        normal = np.cross(row, column)
        turned = np.cos(0.05) * row + np.sin(0.05) * normal
        ds.ImageOrientationPatient = [float(f"{v:.6f}") for v in (*turned, *column)]


def test_mixed_orientations_and_stray_files_in_a_series(tree, project, tmp_path):  # noqa: F811 - the fixture
    """A series with a tilted slice fails alone, naming it; files that are not DICOM, or DICOM cut inside the
    header, in a good series' folder are left out and the study is predicted."""
    inputs = tmp_path / "in"
    good = tree["good"]["mr"]
    shutil.copytree(good.folder, inputs / "good")
    axial_folder = inputs / "good" / "DIR000" / "A1B2"  # build_example_studies' folder of the axial series
    head = sorted(axial_folder.iterdir())[0].read_bytes()[:200]
    (axial_folder / "notes.txt").write_text("scanned on the new coil\n")
    (axial_folder / "junk.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (axial_folder / "cut.dcm").write_bytes(head)  # DICOM cut inside its file meta: no study to attach it to
    bad_study, bad_series = _restudy(good, inputs / "tilted", "tilted", _tilt)
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(inputs), "-o", str(out), "-m", str(project["run_a"]), "--num-workers", "0",
                     "--output-format", "nifti,dicom-seg,rtstruct", "--no-progress", env=ENV)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    keys = {e.study_uid: k for k, e in StudyKeys.read(StudyKeys.in_folder(out)).studies.items()}
    good_key, bad_key = keys[good.identity.study_uid], keys[bad_study]
    assert sorted(p.name for p in out.glob(f"{good_key}*")) == [f"{good_key}.nii.gz", f"{good_key}_rtstruct.dcm",
                                                                   f"{good_key}_seg.dcm"]
    failure, = _rows(out / "failures.csv")
    assert failure["case"] == bad_key and bad_series in failure["file"] + failure["error"]
    assert "orientation" in failure["error"], failure
    rows = {r["series_uid"]: r for r in _rows(out / "series_selection.csv")}
    assert rows[bad_series]["status"] == "skipped" and "orientation" in rows[bad_series]["reason"]
    assert rows[good.series["axial"]]["status"] == "chosen"
    assert not list(out.glob(f"{bad_key}*")) and not [p for p in out.rglob("*") if ".partial" in p.name]
    outcomes = {line.case_id: line.outcome for line in PredictLogLine.read_lines(out / "predict_log.jsonl")}
    assert outcomes == {good_key: "predicted", bad_key: "failed"}


def _cut_pixels(k: int, ds) -> None:
    """Slice 3's pixel data cut to half, as a whole element: the header index cannot tell, decoding fails."""
    if k == 3:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _derived(k: int, ds) -> None:
    """A DERIVED/SECONDARY copy of the series: usable, ranked below the ORIGINAL/PRIMARY one."""
    ds.ImageType, ds.SeriesNumber, ds.SeriesDescription = ["DERIVED", "SECONDARY", "AXIAL"], 7, "HEAD 3mm copy"


def test_a_chosen_series_that_cannot_be_read_falls_back_to_the_next(tree, project, tmp_path):  # noqa: F811
    """The top-ranked CT series has a slice whose pixels cannot be decoded: the study is predicted from the
    second, series_selection.csv and predict_log.jsonl say so, and QC flags series_ranked_second; a study with
    nothing to fall back to fails, naming its series, and both files mark that series unreadable."""
    run = _copy_run(project["run_a"], tmp_path / "ct_run", channel_names={"0": "CT"})
    ct, inputs = tree["good"]["ct"], tmp_path / "in"
    study_uid, first = _restudy(ct, inputs / "s" / "a", "fallback-first", _cut_pixels, study_tag="fallback")
    _, second = _restudy(ct, inputs / "s" / "b", "fallback-second", _derived, study_tag="fallback")
    lone_study, lone = _restudy(ct, inputs / "t", "fallback-alone", _cut_pixels)
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(inputs), "-o", str(out), "-m", str(run), "--num-workers", "0",
                     "--no-progress", env=ENV)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    keys = {e.study_uid: k for k, e in StudyKeys.read(StudyKeys.in_folder(out)).studies.items()}
    key = keys[study_uid]
    rows = {r["series_uid"]: r for r in _rows(out / "series_selection.csv")}
    assert rows[first]["status"] == "unreadable" and "cannot decode the pixel data" in rows[first]["reason"]
    assert f"series {second} was read instead" in rows[first]["reason"]
    assert rows[second]["status"] == "chosen" and f"read instead of series {first}" in rows[second]["reason"]
    lines = {line.case_id: line for line in PredictLogLine.read_lines(out / "predict_log.jsonl")}
    line = lines[key]
    assert line.outcome == "predicted" and line.series_uids == {"CT": second}
    fallback, = line.series_fallbacks
    assert (fallback.channel, fallback.series_uid, fallback.read_instead, fallback.rank) == ("CT", first, second, 2)
    assert "cannot decode the pixel data" in fallback.reason
    seg = pydicom.dcmread(out / f"{key}_seg.dcm", stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == second
    qc = [r for r in _rows(out / "qc.csv") if r["case_id"] == key]
    assert qc and {r["series_ranked_second"] for r in qc} == {"1"}
    failure, = _rows(out / "failures.csv")  # nothing else to read: the study fails as before
    assert failure["case"] == keys[lone_study] and lone in failure["error"]
    assert "cannot decode the pixel data" in failure["error"] and lines[keys[lone_study]].outcome == "failed"
    assert rows[lone]["status"] == "unreadable" and "cannot decode the pixel data" in rows[lone]["reason"]
    assert "no usable series of the channel can be read, so the study failed" in rows[lone]["reason"]
    tried, = lines[keys[lone_study]].series_fallbacks  # the failed line names the series tried, none read instead
    assert (tried.channel, tried.series_uid, tried.read_instead, tried.rank) == ("CT", lone, "", None)


def test_keep_patient_names_names_outputs_by_patient_id(tree, project, tmp_path):  # noqa: F811 - the fixture
    """The converse of the privacy test: with --keep-patient-names the PatientID names the outputs (a patient
    with two studies gets the study key's first digits too), also of a failed study; without, it appears nowhere."""
    inputs = tmp_path / "in"
    mr, ct = tree["good"]["mr"], tree["good"]["ct"]
    shutil.copytree(mr.folder, inputs / "a")
    second, _ = _restudy(mr, inputs / "b", "second-visit")
    shutil.copytree(ct.folder, inputs / "c")  # an MR model: no usable series, a failure named by PatientID
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(inputs), "-o", str(out), "-m", str(project["run_a"]), "--num-workers", "0",
                     "--output-format", "nifti,dicom-seg,rtstruct", "--keep-patient-names", "--no-progress", env=ENV)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    keys = StudyKeys.read(StudyKeys.in_folder(out))
    names = {e.study_uid: e.name for e in keys.studies.values()}
    key_of = {e.study_uid: k for k, e in keys.studies.items()}
    patient = mr.identity.patient_id
    for study_uid in (mr.identity.study_uid, second):
        assert names[study_uid] == f"{patient}_{key_of[study_uid][:8]}"
        for ending in (".nii.gz", "_seg.dcm", "_rtstruct.dcm"):
            assert (out / f"{names[study_uid]}{ending}").is_file()
    assert names[ct.identity.study_uid] == ct.identity.patient_id
    failure, = _rows(out / "failures.csv")
    assert failure["case"] == ct.identity.patient_id
    lines = {line.case_id: line.outcome for line in PredictLogLine.read_lines(out / "predict_log.jsonl")}
    assert lines == {names[mr.identity.study_uid]: "predicted", names[second]: "predicted",
                     ct.identity.patient_id: "failed"}
    assert PredictArgs.read(PredictArgs.in_folder(out)).options.keep_patient_names is True
    assert _leaks(out, proc, [patient, ct.identity.patient_id])  # the converse: they are there now

    plain = tmp_path / "plain"  # the same input without the option: no ID anywhere, names are study keys
    proc = run_3dino("predict", "-i", str(inputs), "-o", str(plain), "-m", str(project["run_a"]), "--num-workers",
                     "0", "--output-format", "nifti,dicom-seg,rtstruct", "--no-progress", env=ENV)
    assert proc.returncode == 1
    assert _leaks(plain, proc, _identities({"mr": mr, "ct": ct})) == []
    assert all(e.name is None for e in StudyKeys.read(StudyKeys.in_folder(plain)).studies.values())


def test_series_rules_stored_with_the_model_and_overridden(tree, project, tmp_path):  # noqa: F811 - the fixture
    """model.json's series_rules (from dataset.json) settle two equally good series; --series-rule overrides."""
    study = tree["broken"]["two_equal"]
    inputs = tmp_path / "in"
    shutil.copytree(study.folder, inputs / "s")
    run = _copy_run(project["run_a"], tmp_path / "ruled", series_rules={"MR": "run 3$"})

    def chosen(out: Path, *more: str) -> str:
        proc = run_3dino("predict", "-i", str(inputs), "-o", str(out), "-m", str(run), "--num-workers", "0",
                         "--no-progress", *more, env=ENV)
        assert proc.returncode == 0, proc.stderr
        line, = PredictLogLine.read_lines(out / "predict_log.jsonl")
        return line.series_uids["MR"]

    assert chosen(tmp_path / "stored") == study.series["second"]
    assert chosen(tmp_path / "override", "--series-rule", "MR=run 2$") == study.series["first"]
    rows = {r["series_uid"]: r for r in _rows(tmp_path / "override" / "series_selection.csv")}
    assert "run 2$" in rows[study.series["second"]]["reason"]

    bad = _copy_run(project["run_a"], tmp_path / "bad_rule", series_rules={"MR": "run (3"})
    proc = run_3dino("predict", "-i", str(inputs), "-o", str(tmp_path / "none"), "-m", str(bad), "--no-progress",
                     env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.json" in proc.stderr and "'MR'" in proc.stderr and "does not compile" in proc.stderr
    assert not (tmp_path / "none").exists()


def test_predict_log_of_image_files(project, tmp_path):  # noqa: F811 - the fixture
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("patient-0000.nii.gz", "patient-0003.nii.gz"):  # the second is truncated
        shutil.copy(project["scans"] / name, inputs / name)
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(inputs), "-o", str(out), "-m", str(project["run_a"]), "--num-workers", "0",
                     "--no-progress", env=ENV)
    assert proc.returncode == 1
    lines = {line.case_id: line for line in PredictLogLine.read_lines(out / "predict_log.jsonl")}
    good, bad = lines["patient-0000"], lines["patient-0003"]
    assert good.outcome == "predicted" and good.files == {"MR": str(inputs / "patient-0000.nii.gz")}
    assert [(o.file, o.output_format) for o in good.outputs] == [("patient-0000.nii.gz", "nifti")]
    assert bad.outcome == "failed" and "truncated" in bad.error.lower() and bad.outputs == []
    assert good.started <= good.ended <= bad.started <= bad.ended
