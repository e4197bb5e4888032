"""A real PACS (Orthanc started by the tests): upload, find, retrieve, read, send a SEG back, find it
over REST; DICOMweb the same way; and the failures a hospital network produces (refused, rejected,
silent, dropped mid-transfer), each retried with backoff and then reported clearly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from dicom_fixtures import DroppingProxy, SilentServer, free_port

from threedino_pipe.dicom.dicomweb import DicomWebClient
from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.pacs import DicomNode, DimseClient, Timeouts
from threedino_pipe.dicom.retry import RetryPolicy
from threedino_pipe.dicom.rtstruct_writer import write_rtstruct
from threedino_pipe.dicom.seg_writer import ModelIdentity, write_seg
from threedino_pipe.dicom.selection import rules_for_channels, select_series
from threedino_pipe.dicom.volume import read_series
from threedino_pipe.raw_data.image_io import to_array
from threedino_pipe.runtime.errors import UserError

FAST = RetryPolicy(attempts=3, first_delay_s=0.05, factor=2.0)
MODEL = ModelIdentity("finetune__adapter__tiny__pct25", "threedino-pipe 0.1.0", "pretrain_tiny_501", "5e" * 32)
LABELS = {1: "grey_matter", 2: "white_matter"}


def study_files(study) -> list:
    return sorted(p for p in study.folder.rglob("*") if p.is_file() and p.name != "README.txt")


def identifiers(study) -> list[str]:
    """Strings that identify the fictitious patient (name parts, ID, accession)."""
    name = study.identity.patient_name
    return [*[part for part in name.split("^") if len(part) > 3], study.identity.patient_id, study.identity.accession]


def seg_instances(orthanc, study_uid: str) -> list[dict]:
    found = orthanc.rest("/tools/find", "POST", {"Level": "Instance", "Expand": True,
                                                 "Query": {"StudyInstanceUID": study_uid, "Modality": "SEG"}})
    return found


def test_dimse_round_trip(orthanc, dicom_studies, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    orthanc.clear()
    study = dicom_studies[1]["ct"]
    uid = study.identity.study_uid
    client = DimseClient(orthanc.node, retry=FAST)
    client.echo()
    files = study_files(study)
    sent = client.store(files)
    assert len(sent.stored) == len(files) and not sent.refused and sent.attempts == 1

    rows = client.find_studies(StudyInstanceUID=uid)
    assert [r["StudyInstanceUID"] for r in rows] == [uid]
    assert "PatientName" not in rows[0] and "PatientID" not in rows[0]
    assert {r["SeriesInstanceUID"] for r in client.find_series(uid)} == set(study.series.values())

    got = client.get(tmp_path / "retrieved", uid)
    assert len(got.files) == len(files) and got.failed == 0 and got.attempts == 1
    index = index_folder(tmp_path / "retrieved", processes=1)
    selection = select_series(index, rules_for_channels({"0": "CT"}))[0]
    assert selection.ok and selection.chosen["0"].series_uid == study.series["axial"]
    volume = read_series(selection.chosen["0"])
    np.testing.assert_array_equal(volume.array(), to_array(study.image))

    label = to_array(study.label).astype(np.uint8)
    seg = write_seg(label, LABELS, volume, MODEL, tmp_path / "out" / "seg.dcm")
    rtstruct = write_rtstruct(label, LABELS, volume, MODEL, tmp_path / "out" / "rtstruct.dcm")
    for _ in range(2):  # sent twice: the same object, not a duplicate
        assert client.store([seg.path, rtstruct.path]).stored == [seg.sop_instance_uid, rtstruct.sop_instance_uid]
    found = seg_instances(orthanc, uid)
    assert len(found) == 1
    tags = orthanc.rest(f"/instances/{found[0]['ID']}/tags?simplify")
    assert tags["SOPInstanceUID"] == seg.sop_instance_uid and tags["StudyInstanceUID"] == uid
    assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == study.series["axial"]
    assert tags["PatientID"] == study.identity.patient_id  # files under the same patient and study
    patients = orthanc.rest("/patients")
    assert len(patients) == 1  # the SEG and RTSTRUCT joined the source patient, no new one

    written = [p for p in tmp_path.rglob("*")]
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in identifiers(study):
        assert secret not in log_text
        assert not any(secret in p.name for p in written)


def test_dimse_move_compressed_study(orthanc, dicom_studies, tmp_path):
    orthanc.clear()
    study = dicom_studies[1]["compressed"]  # RLE, JPEG-LS, JPEG 2000 and JPEG Lossless slices
    client = DimseClient(orthanc.node, retry=FAST)
    assert len(client.store(study_files(study)).stored) == study.image.GetSize()[2]
    moved = client.move(tmp_path / "moved", study.identity.study_uid, listen=("127.0.0.1", orthanc.move_port),
                        series_uid=study.series["axial"])
    assert len(moved.files) == study.image.GetSize()[2] and moved.failed == 0
    got = client.get(tmp_path / "got", study.identity.study_uid)
    assert len(got.files) == study.image.GetSize()[2] and got.failed == 0
    for folder in ("moved", "got"):
        index = index_folder(tmp_path / folder, processes=1)
        series = index.studies[study.identity.study_uid].series[study.series["axial"]]
        assert len(series.transfer_syntaxes) == 4  # sent and received as stored, without transcoding
        np.testing.assert_array_equal(read_series(series).array(), to_array(study.image))


def test_dicomweb_round_trip(orthanc, dicom_studies, tmp_path, caplog):
    if not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    caplog.set_level(logging.DEBUG)
    orthanc.clear()
    study = dicom_studies[1]["mr"]
    uid = study.identity.study_uid
    web = DicomWebClient(orthanc.dicomweb_url, retry=FAST)
    files = study_files(study)
    assert len(web.store(files)) == len(files)
    assert [r["StudyInstanceUID"] for r in web.find_studies(StudyInstanceUID=uid)] == [uid]
    assert {r["SeriesInstanceUID"] for r in web.find_series(uid)} == set(study.series.values())
    got = web.retrieve(tmp_path / "wado", uid, study.series["axial"])
    assert len(got.files) == study.image.GetSize()[2] and got.attempts == 1
    index = index_folder(tmp_path / "wado", processes=1)
    volume = read_series(index.studies[uid].series[study.series["axial"]])
    np.testing.assert_array_equal(volume.array(), to_array(study.image))
    seg = write_seg(to_array(study.label).astype(np.uint8), LABELS, volume, MODEL, tmp_path / "seg.dcm")
    assert web.store([seg.path]) == [seg.sop_instance_uid]
    found = seg_instances(orthanc, uid)
    assert len(found) == 1
    tags = orthanc.rest(f"/instances/{found[0]['ID']}/tags?simplify")
    assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == study.series["axial"]
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(secret in log_text for secret in identifiers(study))
    with pytest.raises(UserError, match="HTTP 404") as caught:
        web.retrieve(tmp_path / "none", "1.2.3.4.5.6.7.8.9")
    assert "after" not in caught.value.problem  # a 4xx is not retried


def test_qido_reads_every_page(orthanc, dicom_studies):
    """A search with more matches than one page holds: every page is read (a service that answers in pages of
    its own size, or a --query matching hundreds of studies, loses none)."""
    if not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    orthanc.clear()
    studies = [dicom_studies[1][kind] for kind in ("mr", "ct", "compressed")]
    web = DicomWebClient(orthanc.dicomweb_url, retry=FAST, page_size=1)
    for study in studies:
        web.store(study_files(study))
    assert sorted(r["StudyInstanceUID"] for r in web.find_studies()) == sorted(s.identity.study_uid for s in studies)
    study = studies[0]
    assert {r["SeriesInstanceUID"] for r in web.find_series(study.identity.study_uid)} == set(study.series.values())
    assert len(study.series) >= 2  # so the series search needed more than one page too


def test_a_qido_service_that_ignores_offset_ends_the_paging():
    """A service that answers every page with the same studies (it ignores ``offset``, and here ``limit`` too): the
    search stops at the first page that brings nothing new instead of asking forever."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = [{"0020000D": {"vr": "UI", "Value": [uid]}} for uid in ("1.2.826.0.1.1", "1.2.826.0.1.2")]
    requests: list[str] = []

    class Repeating(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            requests.append(self.path)
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Repeating)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        web = DicomWebClient(f"http://127.0.0.1:{server.server_address[1]}/dicom-web", retry=FAST, page_size=1)
        rows = web.find_studies(keys=("StudyInstanceUID",))
    finally:
        server.shutdown()
        server.server_close()
    assert [r["StudyInstanceUID"] for r in rows] == ["1.2.826.0.1.1", "1.2.826.0.1.2"]
    assert len(requests) == 2 and "offset=2" in requests[1]


def test_wado_dropped_mid_response_is_retried(orthanc, dicom_studies, tmp_path):
    if not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    orthanc.clear()
    study = dicom_studies[1]["mr"]
    DimseClient(orthanc.node, retry=FAST).store(study_files(study))
    proxy = DroppingProxy(orthanc.http_port, after_bytes=50_000, drops=1)
    try:
        web = DicomWebClient(f"http://127.0.0.1:{proxy.port}/dicom-web", retry=FAST)
        got = web.retrieve(tmp_path / "wado", study.identity.study_uid, study.series["axial"])
    finally:
        proxy.close()
    assert proxy.cut == 1 and got.attempts == 2 and len(got.files) == study.image.GetSize()[2]


def test_connection_refused_is_retried_then_reported():
    client = DimseClient(DicomNode("ORTHANC", "127.0.0.1", free_port()), retry=FAST)
    with pytest.raises(UserError, match=r"C-ECHO at ORTHANC@127\.0\.0\.1:\d+ failed after 3 attempt\(s\): "
                                        r"nothing accepts connections"):
        client.echo()


def test_permanent_rejection_is_not_retried(orthanc, caplog):
    client = DimseClient(DicomNode("NOT_ORTHANC", "127.0.0.1", orthanc.dicom_port), retry=FAST)
    with pytest.raises(UserError, match="rejected the association permanently") as caught:
        client.echo()
    assert "NOT_ORTHANC" in caught.value.fix and "THREEDINO" in caught.value.fix
    assert not [r for r in caplog.records if "trying again" in r.getMessage()]


def test_a_silent_node_times_out():
    silent = SilentServer()
    try:
        client = DimseClient(DicomNode("ORTHANC", "127.0.0.1", silent.port), retry=RetryPolicy(2, 0.05),
                             timeouts=Timeouts(connect_s=2, acse_s=1, dimse_s=2, network_s=2))
        with pytest.raises(UserError, match="after 2 attempt.*did not answer the association request within 1 s"):
            client.echo()
        assert silent.connections == 2
    finally:
        silent.close()


def test_c_get_dropped_mid_transfer_is_retried(orthanc, dicom_studies, tmp_path):
    orthanc.clear()
    study = dicom_studies[1]["ct"]
    DimseClient(orthanc.node, retry=FAST).store(study_files(study))
    proxy = DroppingProxy(orthanc.dicom_port, after_bytes=60_000, drops=1)
    try:
        client = DimseClient(DicomNode("ORTHANC", "127.0.0.1", proxy.port), retry=FAST)
        got = client.get(tmp_path / "get", study.identity.study_uid)
        assert proxy.cut == 1 and got.attempts == 2
        assert len(got.files) == len(study_files(study))
    finally:
        proxy.close()
    proxy = DroppingProxy(orthanc.dicom_port, after_bytes=60_000, drops=99)
    try:
        client = DimseClient(DicomNode("ORTHANC", "127.0.0.1", proxy.port), retry=RetryPolicy(2, 0.05))
        with pytest.raises(UserError, match="failed after 2 attempt.*the connection dropped during C-GET"):
            client.get(tmp_path / "get2", study.identity.study_uid)
    finally:
        proxy.close()


def test_c_store_dropped_mid_transfer_sends_each_file_once(orthanc, dicom_studies):
    orthanc.clear()
    study = dicom_studies[1]["ct"]
    files = study_files(study)
    proxy = DroppingProxy(orthanc.dicom_port, after_bytes=3_000, drops=1)  # answers to a few C-STOREs, then cut
    acknowledged = []
    try:
        client = DimseClient(DicomNode("ORTHANC", "127.0.0.1", proxy.port), retry=FAST)
        sent = client.store(files, on_stored=lambda uid, path: acknowledged.append(uid))
    finally:
        proxy.close()
    assert proxy.cut == 1 and sent.attempts == 2
    assert sorted(sent.stored) == sorted(set(sent.stored)) == sorted(acknowledged) and len(sent.stored) == len(files)
    assert orthanc.rest("/statistics")["CountInstances"] == len(files)
    again = DimseClient(orthanc.node, retry=FAST).store(files, skip=sent.stored)
    assert again.stored == [] and again.attempts == 0  # a journal's acknowledged files are not sent again


def test_node_parsing():
    assert DicomNode.parse("PACS@10.0.0.5:104") == DicomNode("PACS", "10.0.0.5", 104)
    assert str(DicomNode.parse("ORTHANC@localhost:4242")) == "ORTHANC@localhost:4242"
    for bad in ("PACS:104", "PACS@host", "A_TITLE_LONGER_THAN_16@h:1", "PACS@h:0"):
        with pytest.raises(UserError, match="is not a DICOM node"):
            DicomNode.parse(bad)


def test_incomplete_instances_are_recognised(dicom_studies):
    import pydicom

    from threedino_pipe.dicom.dicomweb import incomplete
    for study in ("compressed", "mr"):
        for path in study_files(dicom_studies[1][study])[:4]:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds:
                continue
            assert incomplete(ds) == ""
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
            assert "cut inside" in incomplete(ds) or "pixel data bytes" in incomplete(ds)
    del ds.SOPInstanceUID
    assert incomplete(ds) == "no SOPInstanceUID"


def test_a_sop_class_the_node_refuses_is_reported_not_fatal(orthanc, dicom_studies, tmp_path):
    import pydicom

    orthanc.clear()
    good = study_files(dicom_studies[1]["mr"])[0]
    odd = pydicom.dcmread(good)
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.999"  # a private class
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.999.1"
    odd.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    sent = DimseClient(orthanc.node, retry=FAST).store([good, tmp_path / "odd.dcm"])
    assert len(sent.stored) == 1 and sent.refused == {"1.2.826.0.1.3680043.8.498.999.1": 0x0122}
    with pytest.raises(UserError, match="accepted none of the proposed presentation contexts"):
        DimseClient(orthanc.node, retry=FAST).store([tmp_path / "odd.dcm"])
