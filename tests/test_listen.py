"""`3dino listen` as a hospital runs it (issue 14, integration step 7): a real storage node in a subprocess.

Two studies are sent to the node with C-STORE: an MR study, which test_predict's tiny MR model
predicts, and a CT study, which it cannot (no MR series): that study is journalled failed and the
node goes on. The node is killed at a deterministic point, right after the first result object
was acknowledged by Orthanc and journalled (the test hook ``THREEDINO_TEST_CRASH_AFTER=sent:1``:
the process exits at once, like a crash), restarted, and must finish the study without sending
anything twice: Orthanc then holds exactly one SEG and one RTSTRUCT of the MR study. SIGTERM then
stops the node cleanly. Every wait is bounded.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import THREEDINO
from dicom_fixtures import free_port
from test_dicom_pacs import identifiers, seg_instances, study_files
from test_predict import _copy_run, one_thread, project  # noqa: F401 - fixtures: one torch thread; plans, runs, scans

from threedino_pipe.artifacts import StudyKeys, read_journal
from threedino_pipe.artifacts.journal import CRASH_EXIT_CODE, CRASH_HOOK, JournalLine
from threedino_pipe.dicom.pacs import DicomNode, DimseClient
from threedino_pipe.dicom.retry import RetryPolicy

pytestmark = pytest.mark.e2e

ENV = {"OMP_NUM_THREADS": "1"}
NODE_AET = "LISTENER"


def _start(folder: Path, port: int, model: Path | list[str], send_to: str, log: Path, crash: str | None = None,
           env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """The node as a subprocess; ``model`` a run folder (-m) or the model options themselves (-d/-f ...)."""
    env = {**os.environ, **ENV, **(env_extra or {})}
    env.pop(CRASH_HOOK, None)
    if crash:
        env[CRASH_HOOK] = crash
    models = ["-m", str(model)] if isinstance(model, Path) else model
    command = [*THREEDINO, "listen", "-o", str(folder), *models, "--ae-title", NODE_AET, "--port", str(port),
               "--quiet-seconds", "2", "--send-to", send_to, "--retry-seconds", "1", "--output-format",
               "dicom-seg,rtstruct", "--device", "cpu"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("ab"), env=env)


def _diagnostics(folder: Path, log: Path) -> str:
    """The node's stderr, journal and workers' logs (tails), for a failure message."""
    parts = [log.read_text(errors="replace")[-3000:] if log.exists() else ""]
    journal = JournalLine.in_folder(folder)
    parts.append(journal.read_text(errors="replace")[-3000:] if journal.exists() else "(no journal)")
    parts += [p.read_text(errors="replace")[-1500:] for p in sorted(folder.glob("results/*/predict.log"))]
    return "\n----\n".join(parts)


def _broken(folder: Path) -> bool:
    """True when the journal shows what this test does not expect: a send failed, or the MR study failed."""
    failed = [j for j in _events(folder, "predicted") if j.outcome == "failed"
              and "no usable MR series" not in (j.error or "")]
    return bool(failed or _events(folder, "send_failed"))


def _wait_for(condition, deadline_s: float, what: str, process: subprocess.Popen, folder: Path, log: Path):
    """Poll ``condition`` until it holds; fail early when the node ended or the journal shows a failure."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None or _broken(folder):
            break
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {deadline_s} s\n{_diagnostics(folder, log)}")


def _events(folder: Path, event: str, study: str | None = None) -> list[JournalLine]:
    return [j for j in read_journal(JournalLine.in_folder(folder)) if j.event == event
            and (study is None or j.study == study)]


def _stop(process: subprocess.Popen, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


def test_listen_killed_mid_study_and_restarted_sends_each_result_once(orthanc, dicom_studies, project,  # noqa: F811
                                                                       tmp_path):
    orthanc.clear()
    mr, ct = dicom_studies[1]["mr"], dicom_studies[1]["ct"]
    folder, port, log = tmp_path / "node", free_port(), tmp_path / "listen_stderr.log"
    destination = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    # the model chosen as predict's `-d 995 -f 0` would; probabilities kept in the results folder, not sent
    results = tmp_path / "results"
    _copy_run(project["run_a"], results / "Dataset995_Bodies" / "finetune__linear__none__pct100__fold0__seed0")
    models = ["-d", "995", "-f", "0", "--save-probabilities"]
    env = {"THREEDINO_RESULTS": str(results)}
    node = _start(folder, port, models, destination, log, crash="sent:1", env_extra=env)
    try:
        client = DimseClient(DicomNode(NODE_AET, "127.0.0.1", port), retry=RetryPolicy(480, 0.25, 1.0, 0.25))
        client.echo()  # waits (bounded: 480 tries, 2 min) until the node listens
        sent = client.store(study_files(mr) + study_files(ct))
        assert len(sent.stored) == len(study_files(mr)) + len(study_files(ct)) and not sent.refused
        deadline = time.monotonic() + 300  # the hook ends the node after the first acknowledged result
        while node.poll() is None and not _broken(folder) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert node.poll() == CRASH_EXIT_CODE, _diagnostics(folder, log)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=10)
    keys = {e.study_uid: k for k, e in StudyKeys.read(StudyKeys.in_folder(folder)).studies.items()}
    mr_key, ct_key = keys[mr.identity.study_uid], keys[ct.identity.study_uid]
    assert len(_events(folder, "sent", mr_key)) == 1 and not _events(folder, "done", mr_key)
    assert orthanc.rest("/statistics")["CountInstances"] == 1  # the first result object only

    node = _start(folder, port, models, destination, log, env_extra=env)
    try:
        _wait_for(lambda: _events(folder, "done", mr_key) and _events(folder, "predicted", ct_key), 300,
                  "the MR study's `done` and the CT study's `predicted`", node, folder, log)
        assert _stop(node) == 0, _diagnostics(folder, log)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=10)

    assert len(seg_instances(orthanc, mr.identity.study_uid)) == 1
    rtstructs = orthanc.rest("/tools/find", "POST", {"Level": "Instance", "Query": {
        "StudyInstanceUID": mr.identity.study_uid, "Modality": "RTSTRUCT"}})
    assert len(rtstructs) == 1 and orthanc.rest("/statistics")["CountInstances"] == 2
    tags = orthanc.rest(f"/instances/{seg_instances(orthanc, mr.identity.study_uid)[0]['ID']}/tags?simplify")
    assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == mr.series["axial"]
    sent = _events(folder, "sent")
    assert len(sent) == 2 and len({(j.to, j.sop) for j in sent}) == 2  # nothing sent twice
    predicted = _events(folder, "predicted", mr_key)
    assert [p.outcome for p in predicted] == ["ok"]  # the restart did not predict again
    assert {o.sop for o in predicted[0].outputs} == {j.sop for j in sent}
    assert predicted[0].series_uids == {"MR": mr.series["axial"]}
    failed, = _events(folder, "predicted", ct_key)  # predicted once (before or after the restart), failed, and
    assert failed.outcome == "failed" and "no usable MR series" in failed.error  # the node went on
    text = (folder / "listen.log").read_text()
    assert f"study {mr_key}: done" in text and "stopped" in text
    assert len(list((folder / "results" / mr_key).glob("*_probabilities.npz"))) == 1
    secrets = [s for s in identifiers(mr) + identifiers(ct) if s != "Test"]  # not pytest's folder names
    for path in folder.rglob("*"):
        assert not any(s in path.name for s in secrets), path
        if path.is_file() and path.suffix != ".dcm":
            data = path.read_bytes()
            data = gzip.decompress(data) if path.suffix == ".gz" else data
            assert not any(s.encode() in data for s in secrets), path


def test_listen_refuses_to_start_when_the_destination_refuses_the_association(orthanc, project, tmp_path):  # noqa: F811
    log = tmp_path / "stderr.log"
    node = _start(tmp_path / "node", free_port(), project["run_a"], f"NOT_ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                  log)
    try:
        code = node.wait(timeout=120)
    finally:
        if node.poll() is None:
            node.kill()
    text = log.read_text()
    assert code == 2 and "Traceback" not in text, text
    assert "rejected the association permanently" in text and "NOT_ORTHANC" in text


def test_journal_replay_cycles_and_a_torn_last_line(tmp_path):
    from threedino_pipe.artifacts import Journal, JournalOutput
    from threedino_pipe.inference.listen_node import apply

    path = JournalLine.in_folder(tmp_path)
    journal = Journal(path)
    live: dict = {}
    output = JournalOutput(kind="dicom-seg", file="results/k/k_seg.dcm", sop="2.25.1")
    for event, fields in [("received", {"instances": 3, "calling_ae": "PACS"}), ("quiet", {"instances": 3}),
                          ("started", {"cycle": 1}), ("received", {"instances": 2}),  # while predicting: next cycle
                          ("predicted", {"cycle": 1, "outcome": "ok", "outputs": [output]}),
                          ("sent", {"to": "PACS@h:104", "sop": "2.25.1"}), ("done", {"outputs": [output]})]:
        apply(live, journal.add(event, "k", **fields))
    state = live["k"]
    assert (state.cycle, state.phase, state.instances, state.total, state.outputs) == (2, "receiving", 2, 5, [])
    with path.open("ab") as fh:  # a crash in the middle of a write
        fh.write(b'{"kind":"journal_line","schema_ver')
    replayed: dict = {}
    for line in read_journal(path):  # the torn line is left out
        apply(replayed, line)
    assert replayed == live
    Journal(path).add("quiet", "k", instances=5)  # the next writer cuts the torn line off first
    lines = read_journal(path)
    assert len(lines) == 8 and lines[-1].event == "quiet" and path.read_bytes().endswith(b"\n")
    apply(replayed, lines[-1])
    assert replayed["k"].phase == "queued"
    apply(replayed, Journal(path).add("started", "k", cycle=2))
    apply(replayed, Journal(path).add("predicted", "k", cycle=2, outcome="failed", error="no usable MR series"))
    assert replayed["k"].phase == "failed" and replayed["k"].results_name() == "k-2"


def test_listen_refuses_a_half_or_double_model_selection_before_starting(project, tmp_path):  # noqa: F811
    """-d/-f choose the node's models as for predict; a wrong selection stops it before it listens or writes."""
    from typer.testing import CliRunner

    from threedino_pipe.cli import app
    for args, text in ((["-f", "0"], "pass -d DATASET"), (["-d", "995"], "needs -f"),
                       (["-m", str(project["run_a"]), "-d", "995", "-f", "0"], "either -m"), ([], "no model given")):
        result = CliRunner().invoke(app, ["listen", "-o", str(tmp_path / "node"), "--port", str(free_port()), *args])
        assert result.exit_code != 0 and text in result.exception.render(), (args, result.output)
    assert not (tmp_path / "node").exists()
