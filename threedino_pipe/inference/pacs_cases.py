"""DICOM studies from a PACS, results back to it: ``3dino predict --from-pacs/--send-to`` and ``3dino listen``.

A *peer* is a DICOM node (``AET@host:port``, DIMSE with pynetdicom) or a DICOMweb service (an
``http(s)://`` URL: QIDO-RS, WADO-RS, STOW-RS), both with retries and backoff
(:mod:`threedino_pipe.dicom.retry`). Retrieval writes each study into
``<output>/.retrieved/<study key>/`` (the salted key of :class:`~threedino_pipe.artifacts.StudyKeys`,
never a patient name or ID; files named by SOPInstanceUID); a study that cannot be retrieved is a
failure of that study only. Sending records every acknowledged SOPInstanceUID in the journal
(:class:`~threedino_pipe.artifacts.journal.Journal`) and leaves out, on every later send, what the
journal says a destination already acknowledged: a resumed run or a restarted node sends nothing
twice (and a result sent twice anyway is the same object: its UIDs are deterministic).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.errors

from threedino_pipe.artifacts import StudyKeys
from threedino_pipe.artifacts.journal import Journal, JournalLine, read_journal
from threedino_pipe.dicom.dicomweb import DicomWebClient
from threedino_pipe.dicom.pacs import DEFAULT_CALLING_AE, DicomNode, DimseClient
from threedino_pipe.dicom.retry import RetryPolicy
from threedino_pipe.inference.case_outputs import DICOM_FORMATS, SUFFIXES, parse_formats
from threedino_pipe.inference.folder_runner import Failure
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

RETRIEVED = ".retrieved"
_HOST_PORT = re.compile(r"^(?P<host>[^:\s]+):(?P<port>\d{1,5})$")
#: Study-level attributes ``--query`` may match on (C-FIND at STUDY level, QIDO-RS studies).
QUERY_KEYS = ("StudyDate", "StudyTime", "StudyDescription", "ModalitiesInStudy", "AccessionNumber", "StudyID",
              "ReferringPhysicianName", "PatientID")
_DATE_RANGE = re.compile(r"^(\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8})$")
_QUERY_HELP = ("StudyDate=20260101-20260131 (a date YYYYMMDD or a range), ModalitiesInStudy=CT, "
               "StudyDescription='*HEAD*' (* and ? are wildcards), AccessionNumber=..., PatientID=...")


def parse_query(texts: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--query KEY=VALUE`` values -> ((keyword, value), ...), each keyword one of :data:`QUERY_KEYS`.

    A value is never repeated in a message (it may be a PatientID).

    Raises:
        UserError: no ``=``, an unknown keyword (the nearest known one suggested), a keyword given twice,
            an empty value, or a StudyDate that is neither a date nor a range of dates.
    """
    query: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UserError("--query needs KEY=VALUE", fix=f"write e.g. --query {_QUERY_HELP.split(', ')[0]}")
        if key not in QUERY_KEYS:
            lower = {k.lower(): k for k in QUERY_KEYS}
            near = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)
            hint = f"did you mean {lower[near[0]]}? " if near else ""
            raise UserError(f"--query {key}: not a study-level key that studies are queried by",
                            fix=f"{hint}use one of {', '.join(QUERY_KEYS)}, e.g. {_QUERY_HELP}")
        if key in query:
            raise UserError(f"--query {key} is given twice", fix=f"give {key} once (for dates, as a range "
                            "YYYYMMDD-YYYYMMDD)")
        if not value:
            raise UserError(f"--query {key}= has no value", fix=f"give a value, or leave out --query {key}")
        if key == "StudyDate" and not _DATE_RANGE.match(value):
            raise UserError(f"--query StudyDate={value} is not a date YYYYMMDD or a range",
                            fix="write e.g. StudyDate=20260115, StudyDate=20260101-20260131 or StudyDate=20260101-")
        query[key] = value
    return tuple(query.items())


def asks_for_dicom(output_formats: Sequence[str] | None) -> bool:
    """True when ``--output-format`` names a DICOM format explicitly (the input must then go the DICOM route)."""
    return bool(output_formats) and bool(set(parse_formats(output_formats, dicom_input=True)) & set(DICOM_FORMATS))


@dataclass(frozen=True)
class Peer:
    """A DICOM node or a DICOMweb service, as the user wrote it (``text``)."""

    text: str
    node: DicomNode | None = None
    url: str | None = None

    @classmethod
    def parse(cls, text: str, option: str) -> Peer:
        """``AET@host:port`` or an ``http(s)://`` URL.

        Raises:
            UserError: anything else (naming ``option``).
        """
        text = text.strip()
        if text.startswith(("http://", "https://")):
            return cls(text, url=text.rstrip("/"))
        try:
            return cls(text, node=DicomNode.parse(text))
        except UserError as exc:
            raise UserError(f"{option} {exc.problem}", fix=f"{exc.fix}, or a DICOMweb URL "
                            "(http://host:8042/dicom-web)") from None

    def dimse(self, calling_ae: str, retry: RetryPolicy) -> DimseClient:
        """A DIMSE client for this node."""
        assert self.node is not None
        return DimseClient(self.node, calling_ae=calling_ae, retry=retry)

    def web(self, retry: RetryPolicy) -> DicomWebClient:
        """A DICOMweb client for this service."""
        assert self.url is not None
        return DicomWebClient(self.url, retry=retry)

    def check(self, calling_ae: str, retry: RetryPolicy) -> None:
        """C-ECHO the node (or a QIDO-RS search that matches nothing); raises UserError when it cannot be used."""
        if self.url:
            self.web(retry).find_studies(StudyInstanceUID="0")
        else:
            self.dimse(calling_ae, retry).echo()


def parse_listen_address(text: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); raises UserError naming ``option`` otherwise."""
    match = _HOST_PORT.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise UserError(f"{option} {text!r} is not HOST:PORT", fix=f"write it as e.g. {option} 0.0.0.0:11113")
    return match["host"], int(match["port"])


@dataclass(frozen=True)
class PacsLink:
    """What ``3dino predict`` asks of the network: the studies to retrieve from where, where to send results."""

    source: Peer | None = None
    studies: tuple[str, ...] = ()
    destinations: tuple[Peer, ...] = ()
    query: tuple[tuple[str, str], ...] = ()  # --query: (keyword, value); the matches join ``studies``
    calling_ae: str = DEFAULT_CALLING_AE
    move_listen: tuple[str, int] | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_options(cls, *, input_given: bool, from_pacs: str | None, studies: Sequence[str],
                     send_to: Sequence[str], calling_ae: str = DEFAULT_CALLING_AE,
                     move_listen: str | None = None, query: Sequence[str] = ()) -> PacsLink | None:
        """The link the options describe (None without ``--from-pacs`` and ``--send-to``).

        Raises:
            UserError: no input, both ``-i`` and ``--from-pacs``, ``--study``/``--query`` without
                ``--from-pacs`` (or neither with it), a bad ``--query`` (:func:`parse_query`),
                ``--move-listen`` with a DICOMweb source, malformed nodes or AE title.
        """
        if from_pacs and input_given:
            raise UserError("both -i and --from-pacs name the input", fix="pass either -i FOLDER or --from-pacs "
                            "NODE --study UID")
        if not from_pacs and not input_given:
            raise UserError("no input given", fix="pass -i FOLDER (scans or DICOM studies), or --from-pacs "
                            "AET@host:port --study UID")
        if bool(from_pacs) != bool(studies or query):
            raise UserError("--from-pacs needs --study or --query" if from_pacs else
                            f"{'--study' if studies else '--query'} needs --from-pacs",
                            fix="pass --from-pacs AET@host:port (or a DICOMweb URL) with one --study UID per study "
                            "and/or --query KEY=VALUE selecting the studies (e.g. --query StudyDate=20260115)")
        parsed = parse_query(query)
        if not 0 < len(calling_ae.strip()) <= 16 or "\\" in calling_ae:
            raise UserError(f"--ae-title {calling_ae!r} is not an AE title", fix="pass 1 to 16 characters, e.g. "
                            "THREEDINO")
        if not from_pacs and not send_to:
            return None
        source = Peer.parse(from_pacs, "--from-pacs") if from_pacs else None
        listen = parse_listen_address(move_listen, "--move-listen") if move_listen else None
        if listen and source is not None and source.url:
            raise UserError("--move-listen is for C-MOVE from a DICOM node, but --from-pacs is a DICOMweb URL",
                            fix="leave out --move-listen (WADO-RS needs no listening address)")
        return cls(source=source, studies=tuple(dict.fromkeys(s.strip() for s in studies)),
                   destinations=tuple(Peer.parse(t, "--send-to") for t in dict.fromkeys(send_to)),
                   calling_ae=calling_ae.strip(), move_listen=listen, query=parsed)

    def check(self) -> None:
        """Reach every peer once before anything is written (a refused association fails the command here)."""
        for peer in ([self.source] if self.source else []) + list(self.destinations):
            peer.check(self.calling_ae, self.retry)

    def with_query_matches(self) -> PacsLink:
        """This link with the studies ``--query`` matches at the source added to ``--study``'s (in order, each once).

        Raises:
            UserError: the query matches no study (or the source cannot be searched).
        """
        if not self.query or self.source is None:
            return self
        filters, keys = dict(self.query), ("StudyInstanceUID",)  # the answers carry the UID only
        if self.source.url:
            rows = self.source.web(self.retry).find_studies(keys=keys, **filters)
        else:
            rows = self.source.dimse(self.calling_ae, self.retry).find_studies(keys=keys, **filters)
        found = list(dict.fromkeys(str(r["StudyInstanceUID"]) for r in rows if r.get("StudyInstanceUID")))
        named = ", ".join(filters)
        if not found:
            raise UserError(f"--query ({named}) matches no study at {self.source.text}",
                            fix="widen the query (a StudyDate range YYYYMMDD-YYYYMMDD, wildcards * in "
                            "StudyDescription) or check the values; or pass --study UID")
        studies = tuple(dict.fromkeys([*self.studies, *found]))
        log.info("--query (%s): %d stud(ies) matched at %s; %d stud(ies) to retrieve in all", named, len(found),
                 self.source.text, len(studies))
        return dataclasses.replace(self, studies=studies)

    def check_formats(self, formats: Sequence[str]) -> None:
        """Refuse ``--send-to`` when no DICOM output is written (nothing to send)."""
        if self.destinations and not set(formats) & set(DICOM_FORMATS):
            raise UserError("--send-to sends DICOM results, but --output-format writes none",
                            fix="add --output-format dicom-seg (or rtstruct)")

    def sender(self, journal_path: Path, formats: Sequence[str]) -> ResultSender | None:
        """The sender of this run's results (None without ``--send-to``)."""
        if not self.destinations:
            return None
        return ResultSender(self.destinations, journal_path, calling_ae=self.calling_ae, retry=self.retry,
                            formats=tuple(formats))


def retrieve_studies(link: PacsLink, output_dir: Path, *, resume: bool) -> list[Failure]:
    """Retrieve every ``--study`` into ``output_dir/.retrieved/<study key>/``; one failure per study that failed.

    With ``resume`` a study the journal records as ``retrieved`` whose folder exists is not fetched again.
    """
    assert link.source is not None
    root = Path(output_dir) / RETRIEVED
    root.mkdir(parents=True, exist_ok=True)
    journal_path = JournalLine.in_folder(output_dir)
    before = {line.study for line in read_journal(journal_path) if line.event == "retrieved"} if resume else set()
    journal = Journal(journal_path)
    keys = StudyKeys.in_output(output_dir)
    failures = []
    for number, uid in enumerate(link.studies, start=1):
        key = keys.key_of(uid)
        keys.write(StudyKeys.in_folder(output_dir))  # the mapping before any file named by the key
        dest = root / key
        if key in before and dest.is_dir():
            log.info("study %s (%d of %d): retrieved before (--continue)", key, number, len(link.studies))
            continue
        try:
            count = _retrieve_one(link, uid, dest)
        except UserError as exc:
            failures.append(Failure(key, f"study {uid}", exc.problem))
            log.warning("study %s (%d of %d) failed: %s", key, number, len(link.studies), exc.problem)
            continue
        journal.add("retrieved", key, instances=count, source=link.source.text)
        log.info("study %s (%d of %d): %d file(s) retrieved from %s", key, number, len(link.studies), count,
                 link.source.text)
    return failures


def _retrieve_one(link: PacsLink, uid: str, dest: Path) -> int:
    """Files retrieved of study ``uid`` into ``dest``; UserError when the study cannot be had."""
    source = link.source
    assert source is not None
    missing = UserError(f"{source.text} has no study {uid}", fix="check the StudyInstanceUID (a search at the "
                        "node finds no such study)")
    if source.url:
        web = source.web(link.retry)
        if not web.find_studies(StudyInstanceUID=uid):
            raise missing
        files, failed = web.retrieve(dest, uid).files, 0
    else:
        client = source.dimse(link.calling_ae, link.retry)
        if not client.find_studies(StudyInstanceUID=uid):
            raise missing
        result = client.move(dest, uid, listen=link.move_listen) if link.move_listen else client.get(dest, uid)
        files, failed = result.files, result.failed
    if not files:
        raise UserError(f"{source.text} sent no file of study {uid}", fix="check that the node lets AE title "
                        f"{link.calling_ae} retrieve (and, for C-MOVE, knows where to send)")
    if failed:
        log.warning("%s: %d file(s) of the study could not be sent (the study goes on with %d)", source.text,
                    failed, len(files))
    return len(files)


def sop_instance_uid(path: Path) -> str:
    """The SOPInstanceUID of a DICOM file (header only); UserError when the file is missing or not DICOM."""
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except (OSError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
        raise UserError(f"cannot read the result to send ({type(exc).__name__})", file=path,
                        fix="predict the case again (without --continue)") from None


@dataclass
class ResultSender:
    """Sends the DICOM results of studies to every destination, each object once per destination (journal)."""

    destinations: Sequence[Peer]
    journal_path: Path
    calling_ae: str = DEFAULT_CALLING_AE
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    formats: tuple[str, ...] = DICOM_FORMATS
    sent: dict[str, set[str]] = field(default_factory=dict)  # destination -> acknowledged SOPInstanceUIDs
    on_sent: Callable[[JournalLine], None] | None = None  # called with each ``sent`` line once it is journalled

    def __post_init__(self) -> None:
        self.journal = Journal(self.journal_path)
        for line in read_journal(self.journal_path):
            if line.event == "sent" and line.to and line.sop:
                self.sent.setdefault(line.to, set()).add(line.sop)

    def paths(self, output_dir: Path, case_id: str) -> list[Path]:
        """The DICOM result files of a case, in write order."""
        return [Path(output_dir) / f"{case_id}{SUFFIXES[f]}" for f in self.formats if f in SUFFIXES]

    def pending(self, peer: Peer, paths: Sequence[Path]) -> list[Path]:
        """The files ``peer`` has not acknowledged yet."""
        done = self.sent.get(peer.text, set())
        return [p for p in paths if sop_instance_uid(p) not in done]

    def send_to(self, peer: Peer, study: str, paths: Sequence[Path]) -> int:
        """Send to one destination what it has not acknowledged; returns how many it acknowledged now.

        Raises:
            UserError: the destination cannot be reached after the retries, or refused an object.
        """
        done = self.sent.setdefault(peer.text, set())
        todo = self.pending(peer, paths)
        if not todo:
            return 0

        def acknowledged(uid: str, _path: Path | None = None) -> None:
            line = self.journal.add("sent", study, to=peer.text, sop=uid)
            done.add(uid)
            if self.on_sent is not None:
                self.on_sent(line)
        if peer.url:
            stored = set(peer.web(self.retry).store(todo))
            for uid in sorted(stored):
                acknowledged(uid)
            refused = {uid: 0 for uid in map(sop_instance_uid, todo) if uid not in stored}
        else:
            refused = peer.dimse(self.calling_ae, self.retry).store(todo, skip=done, on_stored=acknowledged).refused
        if refused:
            codes = ", ".join(f"0x{code:04X}" for code in sorted(set(refused.values())))
            raise UserError(f"{peer.text} refused {len(refused)} result object(s) (status {codes})",
                            fix="check the destination's log; it must accept Segmentation and RT Structure Set "
                            "storage from this AE title")
        log.info("%s: %d object(s) sent to %s", study, len(todo), peer.text)
        return len(todo)

    def send_case(self, output_dir: Path, case_id: str) -> None:
        """Send a finished case's DICOM results to every destination (UserError when any send failed)."""
        paths = self.paths(output_dir, case_id)
        for peer in self.destinations:
            self.send_to(peer, case_id, paths)

    def catch_up(self, output_dir: Path, case_ids: Sequence[str]) -> list[Failure]:
        """Send what earlier runs predicted but did not get acknowledged (``--continue``); one failure per case."""
        failures = []
        for case_id in case_ids:
            try:
                self.send_case(output_dir, case_id)
            except UserError as exc:
                failures.append(Failure(case_id, exc.file or case_id, exc.problem))
                log.warning("%s: %s", case_id, exc.problem)
        return failures
