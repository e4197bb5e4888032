"""`3dino predict --from-pacs ... --send-to ...` against a real Orthanc (issue 14, integration step 4).

The study is uploaded to Orthanc over its REST API, retrieved by the command (C-GET, or WADO-RS
for a DICOMweb URL), predicted with test_predict's tiny MR model, and the SEG is sent back; Orthanc's
REST API then finds it under the study, referencing the axial series. A resumed run predicts and
sends nothing again; a node that refuses the association stops the command before anything is written.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import run_3dino
from test_dicom_pacs import identifiers, seg_instances, study_files
from test_predict import one_thread, project  # noqa: F401 - fixtures: one torch thread; plans, runs and scans
from typer.testing import CliRunner

from threedino_pipe.artifacts import PredictLogLine, StudyKeys, read_journal
from threedino_pipe.artifacts.journal import CRASH_EXIT_CODE, CRASH_HOOK, JournalLine
from threedino_pipe.cli import app
from threedino_pipe.runtime.errors import UserError

pytestmark = pytest.mark.e2e

ENV = {"OMP_NUM_THREADS": "1"}
MISSING_STUDY = "1.2.826.0.1.3680043.8.498.99999999"


def upload(orthanc, study) -> int:
    """Store every file of ``study`` in Orthanc through its REST API; returns how many."""
    files = study_files(study)
    for path in files:
        requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), timeout=30).raise_for_status()
    return len(files)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_nothing_identifies_the_patient(out: Path, study, *texts: str) -> None:
    secrets = [s for s in identifiers(study) if s != "Test"]  # not pytest's folder names
    for path in out.rglob("*"):
        assert not any(s in path.name for s in secrets), path
        if path.is_file() and path.suffix != ".dcm":  # the DICOM files carry the patient, as the standard requires
            data = path.read_bytes()
            data = gzip.decompress(data) if path.suffix == ".gz" else data
            assert not any(s.encode() in data for s in secrets), path
    for text in texts:
        assert not any(s in text for s in secrets)


def _predict(source: str, dest: str, out: Path, model: Path, *extra: str, env: dict | None = None):
    return run_3dino("predict", "--from-pacs", source, "--study", extra[0], *extra[1:], "-o", str(out), "-m",
                     str(model), "--output-format", "nifti,dicom-seg", "--send-to", dest, "--num-workers", "0",
                     "--no-progress", env={**ENV, **(env or {})})


def _mr_study_in_orthanc(orthanc, dicom_studies) -> tuple:
    """Orthanc emptied and given the example MR study; returns (study, its UID, Orthanc's DIMSE node)."""
    orthanc.clear()
    study = dicom_studies[1]["mr"]
    upload(orthanc, study)
    return study, study.identity.study_uid, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"


def test_from_pacs_to_pacs_round_trip_and_resume(orthanc, dicom_studies, project, tmp_path):  # noqa: F811
    study, uid, node = _mr_study_in_orthanc(orthanc, dicom_studies)
    out = tmp_path / "out"
    proc = _predict(node, node, out, project["run_a"], uid, "--study", MISSING_STUDY)
    assert proc.returncode == 1, proc.stderr  # the missing study fails alone; the other is predicted and sent
    assert "Traceback" not in proc.stderr
    keys = {entry.study_uid: key for key, entry in StudyKeys.read(StudyKeys.in_folder(out)).studies.items()}
    key = keys[uid]
    assert sorted(p.name for p in (out / ".retrieved").iterdir()) == [key]
    failure, = _rows(out / "failures.csv")
    assert failure["case"] == keys[MISSING_STUDY] and "has no study" in failure["error"]
    rows = {r["series_uid"]: r for r in _rows(out / "series_selection.csv")}
    assert rows[study.series["axial"]]["status"] == "chosen"

    seg = pydicom.dcmread(out / f"{key}_seg.dcm", stop_before_pixels=True)
    found = seg_instances(orthanc, uid)
    assert len(found) == 1
    tags = orthanc.rest(f"/instances/{found[0]['ID']}/tags?simplify")
    assert tags["SOPInstanceUID"] == seg.SOPInstanceUID and tags["StudyInstanceUID"] == uid
    assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == study.series["axial"]
    journal = read_journal(JournalLine.in_folder(out))
    assert [(j.event, j.study, j.sop, j.to) for j in journal if j.event == "sent"] == [
        ("sent", key, str(seg.SOPInstanceUID), node)]
    assert [(j.study, j.instances) for j in journal if j.event == "retrieved"] == [(key, len(study_files(study)))]
    lines = {line.case_id: line for line in PredictLogLine.read_lines(PredictLogLine.in_folder(out))}
    assert lines[key].outcome == "predicted" and lines[keys[MISSING_STUDY]].outcome == "failed"
    sent, = lines[key].sends  # the SEG Orthanc holds, acknowledged by the node as given
    assert (sent.to, sent.sop_instance_uid) == (node, tags["SOPInstanceUID"])
    assert sent.time == next(j.t for j in journal if j.event == "sent") and lines[keys[MISSING_STUDY]].sends == []

    again = _predict(node, node, out, project["run_a"], uid, "--study", MISSING_STUDY, "--continue")
    assert again.returncode == 1 and "1 already predicted" in again.stderr, again.stderr
    assert "retrieved before (--continue)" in again.stderr
    journal = read_journal(JournalLine.in_folder(out))
    assert sum(j.event == "sent" for j in journal) == 1  # nothing sent twice
    assert [len(line.sends) for line in PredictLogLine.read_lines(PredictLogLine.in_folder(out))] == [0, 1, 0]
    assert len(seg_instances(orthanc, uid)) == 1
    _assert_nothing_identifies_the_patient(out, study, proc.stderr, again.stderr)


def test_a_crash_after_an_acknowledgement_loses_no_send_in_the_log(orthanc, dicom_studies, project,  # noqa: F811
                                                                    tmp_path):
    study, uid, node = _mr_study_in_orthanc(orthanc, dicom_studies)
    out = tmp_path / "out"
    crashed = _predict(node, node, out, project["run_a"], uid, env={CRASH_HOOK: "sent"})  # ends right after
    # journalling the acknowledged SEG, before the case's predict_log line
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert PredictLogLine.read_lines(PredictLogLine.in_folder(out)) == []  # the case's line was never written
    again = _predict(node, node, out, project["run_a"], uid, "--continue")
    assert again.returncode == 0 and "1 already predicted" in again.stderr, again.stderr
    sent, = [j for j in read_journal(JournalLine.in_folder(out)) if j.event == "sent"]  # nothing sent again
    line, = PredictLogLine.read_lines(PredictLogLine.in_folder(out))
    assert line.outcome == "predicted" and [(s.to, s.sop_instance_uid, s.time) for s in line.sends] == [
        (node, sent.sop, sent.t)]
    assert [o.sop_instance_uid for o in line.outputs if o.output_format == "dicom-seg"] == [sent.sop]


def test_dicomweb_source_and_destination(orthanc, dicom_studies, project, tmp_path):  # noqa: F811
    if not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    orthanc.clear()
    study = dicom_studies[1]["mr"]
    uid = study.identity.study_uid
    upload(orthanc, study)
    out = tmp_path / "out"
    proc = _predict(orthanc.dicomweb_url, orthanc.dicomweb_url, out, project["run_a"], uid, "--query",
                    "ModalitiesInStudy=MR", "--query", "StudyDate=-20261231")  # QIDO-RS: the same study
    assert proc.returncode == 0, proc.stderr
    assert "1 stud(ies) matched" in proc.stderr and "1 stud(ies) to retrieve in all" in proc.stderr
    key, = StudyKeys.read(StudyKeys.in_folder(out)).studies
    seg = pydicom.dcmread(out / f"{key}_seg.dcm", stop_before_pixels=True)
    found = seg_instances(orthanc, uid)
    assert len(found) == 1 and orthanc.rest(f"/instances/{found[0]['ID']}/tags?simplify")["SOPInstanceUID"] == \
        seg.SOPInstanceUID
    sent = [j for j in read_journal(JournalLine.in_folder(out)) if j.event == "sent"]
    assert [(j.sop, j.to) for j in sent] == [(str(seg.SOPInstanceUID), orthanc.dicomweb_url)]


def test_query_selects_the_studies_to_retrieve(orthanc, dicom_studies, project, tmp_path):  # noqa: F811
    orthanc.clear()
    study, other = dicom_studies[1]["mr"], dicom_studies[1]["multiframe"]  # two MR studies, two patients
    upload(orthanc, study)
    for path in study_files(other):  # the other study moved to 2019: a StudyDate range tells them apart
        ds = pydicom.dcmread(path)
        ds.StudyDate = "20190304"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        requests.post(f"{orthanc.url}/instances", data=buffer.getvalue(), timeout=30).raise_for_status()
    uid = study.identity.study_uid
    node = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    out = tmp_path / "out"
    common = ("-m", str(project["run_a"]), "--output-format", "dicom-seg", "--send-to", node, "--num-workers", "0",
              "--no-progress")
    proc = run_3dino("predict", "--from-pacs", node, "--query", "StudyDate=20260101-20261231", "--query",
                     "ModalitiesInStudy=MR", "--study", uid, "-o", str(out), *common, env=ENV)  # --study: the same
    assert proc.returncode == 0, proc.stderr
    assert "--query (StudyDate, ModalitiesInStudy): 1 stud(ies) matched" in proc.stderr
    assert "1 stud(ies) to retrieve in all" in proc.stderr  # the union holds the study once
    key, = StudyKeys.read(StudyKeys.in_folder(out)).studies
    assert [p.name for p in (out / ".retrieved").iterdir()] == [key] and (out / f"{key}_seg.dcm").is_file()
    assert len(seg_instances(orthanc, uid)) == 1 and seg_instances(orthanc, other.identity.study_uid) == []
    line, = PredictLogLine.read_lines(PredictLogLine.in_folder(out))
    assert line.case_id == key and len(line.sends) == 1

    # a PatientID may be queried by, and is then written nowhere; a query that matches nothing writes nothing
    nothing = tmp_path / "nothing"
    proc = run_3dino("predict", "--from-pacs", node, "--query", f"PatientID={other.identity.patient_id}",
                     "--query", "StudyDate=20260101-", "-o", str(nothing), *common, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--query (PatientID, StudyDate) matches no study" in proc.stderr and "fix:" in proc.stderr
    assert not nothing.exists()
    _assert_nothing_identifies_the_patient(out, study, proc.stderr)
    _assert_nothing_identifies_the_patient(out, other, proc.stderr)


def test_bad_query_options_are_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    proc = run_3dino("predict", "--from-pacs", "PACS@127.0.0.1:1", "--query", "StudyDat=20260115", "-o", str(out),
                     "-m", str(tmp_path / "model"), env=ENV)  # the real command: exit code 2, no traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--query StudyDat: not a study-level key" in proc.stderr and "fix:" in proc.stderr, proc.stderr
    pacs = ("--from-pacs", "PACS@127.0.0.1:1")
    for args, message in [((*pacs, "--query", "StudyDate=2026"), "is not a date YYYYMMDD or a range"),
                          ((*pacs, "--query", "Modality"), "--query needs KEY=VALUE"),
                          (pacs, "--from-pacs needs --study or --query"),
                          ((*pacs, "--query", "studydate=20260115"), "did you mean StudyDate?"),
                          (("--query", "ModalitiesInStudy=CT", "-i", str(tmp_path)), "--query needs --from-pacs")]:
        refused = CliRunner().invoke(app, ["predict", *args, "-o", str(out), "-m", str(tmp_path / "model")], env=ENV)
        assert isinstance(refused.exception, UserError), (args, refused.output)
        assert message in refused.exception.render() and refused.exception.fix, refused.exception.render()
    assert not out.exists()


def test_c_move_retrieval(orthanc, dicom_studies, project, tmp_path):  # noqa: F811
    orthanc.clear()
    study = dicom_studies[1]["mr"]
    upload(orthanc, study)
    node = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"  # Orthanc knows THREEDINO at 127.0.0.1:move_port
    out = tmp_path / "out"
    proc = _predict(node, node, out, project["run_a"], study.identity.study_uid, "--move-listen",
                    f"127.0.0.1:{orthanc.move_port}")
    assert proc.returncode == 0, proc.stderr
    key, = StudyKeys.read(StudyKeys.in_folder(out)).studies
    assert len(list((out / ".retrieved" / key).glob("*.dcm"))) == len(study_files(study))
    assert len(seg_instances(orthanc, study.identity.study_uid)) == 1


def test_a_node_refusing_the_association_stops_the_command_clearly(orthanc, project, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = run_3dino("predict", "--from-pacs", f"NOT_ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--study", "1.2.3",
                     "-o", str(out), "-m", str(project["run_a"]), "--no-progress", env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "rejected the association permanently" in proc.stderr and "NOT_ORTHANC" in proc.stderr
    assert "fix:" in proc.stderr and not out.exists()
    proc = run_3dino("predict", "--study", "1.2.3", "-o", str(out), "-m", str(project["run_a"]), env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no input given" in proc.stderr and not out.exists()
