"""Talking to a DICOM node over DIMSE with pynetdicom: C-ECHO, C-FIND, C-GET, C-MOVE, C-STORE.

A node is ``AET@host:port`` (:class:`DicomNode`). Every operation opens one association, retries
under a :class:`~threedino_pipe.dicom.retry.RetryPolicy` (connection refused or timed out, no
answer to the association request, a transient rejection, a connection dropped mid-transfer) and
fails with a :class:`~threedino_pipe.runtime.errors.UserError` that says which of these happened:

- *nothing accepts connections*: the host or port is wrong or the node is down;
- *rejected*: the node refused the association; a permanent rejection (e.g. unknown calling or
  called AE title) is not retried, and the message says which AE titles to register;
- *no answer*: the node took the TCP connection but did not answer within the ACSE timeout;
- *dropped*: the association was aborted or the connection closed mid-operation.

Retrieved files are written atomically, named by their SOPInstanceUID (never by patient data).
C-STORE sends each file once per call: a retry after a drop sends only the files the node has not
acknowledged, and ``skip`` lets a caller with a journal leave out what an earlier run sent. Result
objects have deterministic UIDs (:mod:`threedino_pipe.dicom.uids`), so a resend replaces rather
than duplicates. C-FIND answers carry only the keys asked for; by default no patient name or ID.
pynetdicom's own logger is kept at WARNING or above, since its debug output would print identifiers.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from threedino_pipe.dicom.retry import Attempts, PermanentError, RetryPolicy, TransientError, with_retries
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "THREEDINO"
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
LOSSLESS = [JPEGLosslessSV1, JPEG2000Lossless, JPEGLSLossless, RLELossless]
LOSSY = [JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless]
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGLosslessSV1,
                     JPEG2000Lossless, JPEGLSLossless, RLELossless, JPEG2000, JPEGLSNearLossless, JPEGBaseline8Bit,
                     JPEGExtended12Bit]
# Storage SOP classes proposed for C-GET when the node does not list a study's SOP classes.
DEFAULT_STORAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2",  # CT, enhanced
    "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4",  # MR, enhanced
    "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.128.1",  # PET
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3",  # SC, SEG, RTSTRUCT
    "1.2.840.10008.5.1.4.1.1.481.2", "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",  # RTDOSE, SR
    "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.20",
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.12.1",
]
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ModalitiesInStudy", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances")
SUCCESS_OR_WARNING = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}
SOP_CLASS_NOT_SUPPORTED = 0x0122
_NODE = re.compile(r"^(?P<aet>[^@\s\\]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class DicomNode:
    """A DICOM application entity: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DicomNode:
        """``AET@host:port`` -> DicomNode.

        Raises:
            UserError: anything else.
        """
        match = _NODE.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise UserError(f"{text!r} is not a DICOM node", fix="write it as AET@host:port, e.g. PACS@10.0.0.5:104")
        return cls(match["aet"], match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait: for the TCP connection, the association answer, a DIMSE reply, network silence."""

    connect_s: float = 10.0
    acse_s: float = 30.0
    dimse_s: float = 120.0
    network_s: float = 120.0


@dataclass
class RetrieveResult:
    """Files a C-GET/C-MOVE wrote, sub-operations the node reported as failed, and the tries it took."""

    files: list[Path] = field(default_factory=list)
    failed: int = 0
    attempts: int = 0


@dataclass
class StoreResult:
    """SOPInstanceUIDs the node acknowledged, those it refused (with status; 0x0122 when it accepted no
    presentation context for the file's SOP class), and the tries it took."""

    stored: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    attempts: int = 0


def _status(dataset: Dataset | None) -> int | None:
    return int(dataset.Status) if dataset is not None and "Status" in dataset else None


class DimseClient:
    """DIMSE service user for one remote node.

    Args:
        node: the remote node.
        calling_ae: our AE title (the node must know it for C-GET/C-MOVE, and for C-MOVE where to send).
        retry: retry policy of every operation.
        timeouts: network timeouts.
    """

    def __init__(self, node: DicomNode, *, calling_ae: str = DEFAULT_CALLING_AE, retry: RetryPolicy | None = None,
                 timeouts: Timeouts | None = None) -> None:
        self.node = node
        self.calling_ae = calling_ae
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()

    # --- association -------------------------------------------------------------------------
    def _ae(self):
        from pynetdicom import AE
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = self.timeouts.connect_s
        ae.acse_timeout = self.timeouts.acse_s
        ae.dimse_timeout = self.timeouts.dimse_s
        ae.network_timeout = self.timeouts.network_s
        return ae

    @contextmanager
    def _association(self, contexts: Sequence[tuple[str, Sequence[str]]], *, roles: Sequence = (),
                     handlers: Sequence = ()) -> Iterator:
        """An established association, or a TransientError/PermanentError saying why not."""
        from pynetdicom import evt
        ae = self._ae()
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, list(syntaxes))
        opened = threading.Event()

        def on_open(event) -> None:
            opened.set()
            no_delay(event.assoc)
        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title, ext_neg=list(roles) or None,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *handlers])
        if not assoc.is_established:
            primitive = getattr(assoc.acceptor, "primitive", None)
            if assoc.is_rejected and primitive is not None:
                why = f"{primitive.result_str}: {primitive.reason_str} (source: {primitive.source_str})"
                if primitive.result == 0x01:
                    raise PermanentError(
                        f"the node rejected the association permanently ({why})",
                        fix=f"check the called AE title {self.node.ae_title!r} and ask the node's administrator to "
                            f"accept calling AE title {self.calling_ae!r}")
                raise TransientError(f"the node rejected the association for now ({why})")
            if primitive is not None and primitive.result == 0x00:
                raise PermanentError("the node accepted none of the proposed presentation contexts",
                                     fix="check that the node supports this service and these SOP classes")
            if not opened.is_set():
                raise TransientError(f"nothing accepts connections at {self.node.host}:{self.node.port} "
                                     f"(refused or no answer within {self.timeouts.connect_s:g} s)")
            raise TransientError(f"the node took the connection but did not answer the association request "
                                 f"within {self.timeouts.acse_s:g} s")
        _keep_responses_for_the_sender(assoc)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _run(self, what: str, operation: Callable, fix: str, attempts: Attempts | None = None):
        return with_retries(operation, what=what, where=str(self.node), policy=self.retry, fix=fix,
                            attempts=attempts)

    # --- C-ECHO ------------------------------------------------------------------------------
    def echo(self) -> None:
        """C-ECHO (verification); raises UserError when the node cannot be reached."""
        from pynetdicom.sop_class import Verification

        def operation() -> None:
            with self._association([(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as assoc:
                status = _status(assoc.send_c_echo())
                if status is None:
                    raise TransientError("the connection dropped during C-ECHO")
                if status != 0x0000:
                    raise PermanentError(f"C-ECHO answered with status 0x{status:04X}")
        self._run("C-ECHO", operation, fix="check the node's address and AE title")

    # --- C-FIND ------------------------------------------------------------------------------
    def _find(self, level: str, query: dict, keys: Sequence[str]) -> list[dict]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FindModel
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for key in keys:
            setattr(identifier, key, "")
        for key, value in query.items():
            setattr(identifier, key, value)

        def operation() -> list[dict]:
            rows = []
            with self._association([(FindModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as assoc:
                for status_ds, answer in assoc.send_c_find(identifier, FindModel):
                    status = _status(status_ds)
                    if status is None:
                        raise TransientError(f"the connection dropped during C-FIND ({level} level)")
                    if status in (0xFF00, 0xFF01) and answer is not None:
                        rows.append({key: _plain(answer.get(key)) for key in keys})
                    elif status not in (0x0000,):
                        raise PermanentError(f"C-FIND answered with status 0x{status:04X}",
                                             fix="check the query keys and values")
            return rows
        return self._run(f"C-FIND ({level})", operation, fix="check the node is up and reachable, then run again")

    def find_studies(self, *, keys: Sequence[str] = STUDY_KEYS, **query: str) -> list[dict]:
        """Studies matching ``query`` (e.g. ``StudyInstanceUID=...``, ``StudyDate="20260101-"``).

        Returns one dict per study holding only ``keys`` (no patient name or ID unless asked for).
        """
        return self._find("STUDY", query, keys)

    def find_series(self, study_uid: str, *, keys: Sequence[str] = SERIES_KEYS) -> list[dict]:
        """Series of one study (each a dict of ``keys``)."""
        return self._find("SERIES", {"StudyInstanceUID": study_uid}, keys)

    def sop_classes_in_study(self, study_uid: str) -> list[str]:
        """SOPClassesInStudy as the node reports it (empty when it does not)."""
        rows = self._find("STUDY", {"StudyInstanceUID": study_uid}, ("StudyInstanceUID", "SOPClassesInStudy"))
        classes = []
        for row in rows:
            value = row.get("SOPClassesInStudy") or []
            classes.extend([value] if isinstance(value, str) else value)
        return sorted({c for c in classes if c})

    # --- C-GET -------------------------------------------------------------------------------
    def get(self, dest: str | Path, study_uid: str, series_uid: str | None = None) -> RetrieveResult:
        """Retrieve a study (or one of its series) with C-GET into ``dest`` (files named ``<SOPInstanceUID>.dcm``).

        The storage SOP classes proposed are those the node lists in SOPClassesInStudy, else a
        default list of CT/MR/PET/SEG/RT/SR classes; each in one context for uncompressed transfer
        syntaxes and one per lossless (and, room allowing, lossy) compressed syntax, so the node
        can send each file as stored.
        """
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GetModel
        dest = Path(dest)
        listed = self.sop_classes_in_study(study_uid)
        classes = listed or DEFAULT_STORAGE_CLASSES
        syntaxes = [UNCOMPRESSED, *([s] for s in LOSSLESS)]
        if listed:  # few classes: room for the lossy syntaxes too
            syntaxes += [[s] for s in LOSSY]
        per_class = max(1, 127 // max(1, len(classes)))
        identifier = _retrieve_identifier(study_uid, series_uid)
        attempts = Attempts()

        def operation() -> RetrieveResult:
            result = RetrieveResult()
            # one context per (class, syntax): the node picks one syntax per context, and a context
            # per stored syntax lets it send each file as stored, without transcoding
            contexts = [(GetModel, UNCOMPRESSED)]
            contexts += [(uid, ts) for uid in classes[:127] for ts in syntaxes[:per_class]]
            roles = [build_role(uid, scp_role=True) for uid in classes]
            handlers = [(evt.EVT_C_STORE, _store_handler(dest, result.files))]
            with self._association(contexts, roles=roles, handlers=handlers) as assoc:
                final = None
                for status_ds, _ in assoc.send_c_get(identifier, GetModel):
                    status = _status(status_ds)
                    if status is None:
                        raise TransientError(f"the connection dropped during C-GET after {len(result.files)} file(s)")
                    final = status_ds
                result.failed = int(final.get("NumberOfFailedSuboperations", 0) or 0) if final is not None else 0
                status = _status(final)
                if status not in SUCCESS_OR_WARNING:
                    raise PermanentError(f"C-GET answered with status 0x{status:04X}",
                                         fix="check the study UID and that the node lets this AE title retrieve")
            return result
        result = self._run(f"C-GET of study {study_uid}", operation,
                           fix="check the node is up and lets this AE title retrieve, then run again",
                           attempts=attempts)
        result.attempts = attempts.count
        log.info("C-GET of study %s: %d file(s), %d failed sub-operation(s), %d attempt(s)", study_uid,
                 len(result.files), result.failed, result.attempts)
        return result

    # --- C-MOVE ------------------------------------------------------------------------------
    def move(self, dest: str | Path, study_uid: str, *, listen: tuple[str, int], series_uid: str | None = None) -> \
            RetrieveResult:
        """Retrieve with C-MOVE: the node sends the study to our AE title, which listens on ``listen`` meanwhile.

        The node must know ``calling_ae`` as ``listen``'s host and port (its modality list).
        """
        from pynetdicom import AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MoveModel
        dest = Path(dest)
        identifier = _retrieve_identifier(study_uid, series_uid)
        attempts = Attempts()

        def operation() -> RetrieveResult:
            result = RetrieveResult()
            scp = self._ae()
            for context in AllStoragePresentationContexts:
                scp.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
            try:
                server = scp.start_server(listen, block=False, evt_handlers=[
                    (evt.EVT_C_STORE, _store_handler(dest, result.files)),
                    (evt.EVT_CONN_OPEN, lambda event: no_delay(event.assoc))])
            except OSError as exc:
                raise PermanentError(f"cannot listen on {listen[0]}:{listen[1]} for the C-MOVE ({exc})",
                                     fix="choose a free port for the storage node") from None
            try:
                with self._association([(MoveModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as assoc:
                    final = None
                    for status_ds, _ in assoc.send_c_move(identifier, self.calling_ae, MoveModel):
                        status = _status(status_ds)
                        if status is None:
                            raise TransientError("the connection dropped during C-MOVE")
                        final = status_ds
                    status = _status(final)
                    result.failed = int(final.get("NumberOfFailedSuboperations", 0) or 0) if final is not None else 0
                    if status == 0xA801:
                        raise PermanentError("the node does not know where to send to our AE title (0xA801)",
                                             fix=f"register {self.calling_ae} at {listen[0]}:{listen[1]} on the node")
                    if status not in SUCCESS_OR_WARNING:
                        raise PermanentError(f"C-MOVE answered with status 0x{status:04X}",
                                             fix="check the study UID and the node's modality list")
            finally:
                server.shutdown()
            return result
        result = self._run(f"C-MOVE of study {study_uid}", operation, fix="check the node is up, then run again",
                           attempts=attempts)
        result.attempts = attempts.count
        return result

    # --- C-STORE -----------------------------------------------------------------------------
    def store(self, paths: Iterable[str | Path], *, skip: Iterable[str] = (),
              on_stored: Callable[[str, Path], None] | None = None) -> StoreResult:
        """Send DICOM files with C-STORE, each once.

        Args:
            skip: SOPInstanceUIDs not to send (already acknowledged in an earlier run's journal).
            on_stored: called with (SOPInstanceUID, path) as the node acknowledges each file,
                e.g. to write a journal line.

        Raises:
            UserError: unreadable files, or the node cannot be reached after the retries.
        """
        items = []
        skip = set(skip)
        for path in paths:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
                raise UserError(f"cannot send a file that is not readable DICOM ({type(exc).__name__})",
                                file=path) from None
            uid = str(header.SOPInstanceUID)
            if uid not in skip:
                items.append((uid, Path(path), str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)))
        result = StoreResult()
        if not items:
            return result
        attempts = Attempts()
        done: set[str] = set()

        def operation() -> StoreResult:
            pending = [i for i in items if i[0] not in done and i[0] not in result.refused]
            if not pending:
                return result
            with self._association(_store_contexts(pending)) as assoc:
                accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
                for uid, path, sop_class, syntax in pending:
                    if not any((sop_class, ts) in accepted for ts in (syntax, *UNCOMPRESSED)):
                        result.refused[uid] = SOP_CLASS_NOT_SUPPORTED  # the node accepted no context for it
                        continue
                    if (sop_class, syntax) in accepted:
                        status = _status(assoc.send_c_store(path))
                    else:  # the node takes this SOP class only uncompressed: decode, pynetdicom re-encodes
                        dataset = pydicom.dcmread(path)
                        if dataset.file_meta.TransferSyntaxUID.is_compressed:
                            dataset.decompress()
                        status = _status(assoc.send_c_store(dataset))
                    if status is None:
                        raise TransientError(f"the connection dropped during C-STORE after {len(done)} of "
                                             f"{len(items)} file(s)")
                    if status in SUCCESS_OR_WARNING:
                        done.add(uid)
                        result.stored.append(uid)
                        if on_stored is not None:
                            on_stored(uid, path)
                    else:
                        result.refused[uid] = status
            return result
        self._run(f"C-STORE of {len(items)} file(s)", operation, fix="check the node is up, then run again",
                  attempts=attempts)
        result.attempts = attempts.count
        if result.refused:
            log.warning("C-STORE to %s: %d file(s) refused", self.node, len(result.refused))
        return result


def _store_contexts(items: Sequence[tuple[str, Path, str, str]]) -> list[tuple[str, list[str]]]:
    """Presentation contexts for C-STORE: per SOP class one uncompressed context (explicit and implicit
    little endian, the acceptor picks one), and one context per other transfer syntax its files have
    (each holding only that syntax, so a compressed file is sent as stored when the node accepts it)."""
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    for _, _, sop_class, syntax in items:
        contexts[(sop_class, tuple(uncompressed))] = None
        if syntax not in uncompressed:
            contexts[(sop_class, (syntax,))] = None
    if len(contexts) > 128:
        raise PermanentError(f"the files need {len(contexts)} presentation contexts, more than the 128 of one "
                             "association", fix="send the files in smaller groups (fewer SOP classes)")
    return [(sop_class, list(syntaxes)) for sop_class, syntaxes in contexts]


def _keep_responses_for_the_sender(assoc) -> None:
    """Stop this association's reactor thread from taking DIMSE *responses* off the queue.

    pynetdicom (3.0.4) pauses its reactor before each ``send_*`` by clearing a checkpoint and
    waiting for a ``_is_paused`` flag that can still be True from the reactor's previous loop; the
    reactor may then take the peer's response, log "Received unexpected C-STORE service message"
    and drop it, and the sender waits until the connection times out (seen here with fast local
    peers after a few dozen C-STOREs; pynetdicom issue 875 reports the same for C-FIND). Requests
    from the peer still go to the reactor; responses wait for the sender's blocking read.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False):
        if not block:
            _, message = dimse.peek_msg()
            if message is not None and not message.is_valid_request:
                return None, None
        return take(block)
    dimse.get_msg = get_msg


def no_delay(assoc) -> None:
    """Switch off Nagle's algorithm on an association's socket.

    pynetdicom writes a DIMSE command and its dataset as separate PDUs; with Nagle on, each
    exchange waits for the peer's delayed ACK (~40 ms per file on Linux).
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _plain(value):
    """A C-FIND answer value as plain Python (str, list of str, int, or None)."""
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        return [str(v) for v in value]
    if isinstance(value, int | float):
        return value
    return str(value)


def _retrieve_identifier(study_uid: str, series_uid: str | None) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    identifier.StudyInstanceUID = study_uid
    if series_uid:
        identifier.SeriesInstanceUID = series_uid
    return identifier


def _safe_name(uid: str) -> str:
    return re.sub(r"[^0-9.]", "_", uid)[:80] or "unnamed"


def instance_file_name(sop_instance_uid: str) -> str:
    """A received instance's file name: ``<SOPInstanceUID>.dcm`` (other characters than digits and dots as ``_``)."""
    return f"{_safe_name(sop_instance_uid)}.dcm"


def _store_handler(dest: Path, files: list[Path]) -> Callable:
    """An EVT_C_STORE handler writing each received dataset, as received, to ``dest/<SOPInstanceUID>.dcm``."""
    def handle(event) -> int:
        try:
            path = dest / instance_file_name(str(event.request.AffectedSOPInstanceUID))
            with atomic_path(path) as tmp:
                tmp.write_bytes(event.encoded_dataset(include_meta=True))
            files.append(path)
            return 0x0000
        except OSError:
            log.exception("cannot write a received file into %s", dest)
            return 0xA700  # out of resources
    return handle
