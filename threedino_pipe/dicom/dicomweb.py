"""Talking to a DICOMweb service with dicomweb-client: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Same contract as :mod:`threedino_pipe.dicom.pacs`: retries with backoff for what may pass
(connection refused, timeout, a connection dropped mid-response, HTTP 429/5xx), an immediate
:class:`~threedino_pipe.runtime.errors.UserError` for what will not (HTTP 4xx other than 429),
retrieved files written atomically and named by SOPInstanceUID, search answers reduced to the
keys asked for (no patient name or ID by default). dicomweb-client's own retrying is switched off
so that one policy governs.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from threedino_pipe.dicom.pacs import SERIES_KEYS, STUDY_KEYS
from threedino_pipe.dicom.retry import Attempts, PermanentError, RetryPolicy, TransientError, with_retries
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO lines name every request, per study


@dataclass
class WebRetrieveResult:
    """Files WADO-RS wrote and the tries it took."""

    files: list[Path] = field(default_factory=list)
    attempts: int = 0


def incomplete(ds: pydicom.Dataset) -> str:
    """Why a received dataset is incomplete ("" when it is not): no SOPInstanceUID, or pixel data
    shorter than Rows x Columns x frames x samples x bits, or encapsulated data without its fragments."""
    if "SOPInstanceUID" not in ds:
        return "no SOPInstanceUID"
    if "Rows" not in ds or "PixelData" not in ds:
        return ""
    data = ds.PixelData
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_encapsulated:
        return _items_problem(bytes(data))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16))
    expected = (int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1)) * bits + 7) // 8
    return f"{len(data)} of {expected} pixel data bytes" if len(data) < expected else ""


def _items_problem(data: bytes) -> str:
    """Why encapsulated pixel data is not a whole sequence of items ("" when it is): each item is the tag
    (FFFE,E000) and a 4-byte little-endian length followed by that many bytes; at least two items (the
    offset table and one fragment)."""
    position, items = 0, 0
    while position < len(data):
        if len(data) - position < 8:
            return "encapsulated pixel data cut inside an item header"
        group, element, length = struct.unpack("<HHI", data[position:position + 8])
        if (group, element) != (0xFFFE, 0xE000):
            return f"encapsulated pixel data with an unexpected tag ({group:04X},{element:04X})"
        position += 8 + length
        items += 1
    if position > len(data):
        return "encapsulated pixel data cut inside a fragment"
    return "" if items >= 2 else "encapsulated pixel data without fragments"


STUDY_UID_TAG = "0020000D"   # StudyInstanceUID in DICOM JSON
SERIES_UID_TAG = "0020000E"  # SeriesInstanceUID


def _uid(answer: dict, tag: str) -> str:
    """The UID ``tag`` of one DICOM JSON answer (the whole answer as text when it lacks one)."""
    values = answer.get(tag, {}).get("Value")
    return str(values[0]) if values else repr(sorted(answer.items()))


class DicomWebClient:
    """QIDO/WADO/STOW client for one DICOMweb root URL (e.g. ``http://127.0.0.1:8042/dicom-web``).

    Args:
        url: the service root.
        retry: retry policy of every operation.
        timeout_s: connect and read timeout of each HTTP request.
        page_size: matches asked for per QIDO-RS request; pages are read until one is short or brings nothing
            new, so every match is returned whatever page size the service itself enforces.
    """

    def __init__(self, url: str, *, retry: RetryPolicy | None = None, timeout_s: float = 30.0,
                 page_size: int = 100) -> None:
        from dicomweb_client.api import DICOMwebClient
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.page_size = page_size
        self._client = DICOMwebClient(url=self.url, timeout=(timeout_s, timeout_s))
        self._client.set_http_retry_params(retry=False)

    def _call(self, what: str, operation, attempts: Attempts | None = None):
        import requests

        def guarded():
            try:
                return operation()
            except requests.exceptions.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if code == 429 or code >= 500:
                    raise TransientError(f"HTTP {code} from the service") from None
                raise PermanentError(f"HTTP {code} from the service",
                                     fix="check the URL, the UIDs and the service's permissions") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                raise TransientError(f"no complete answer ({type(exc).__name__})") from None
        return with_retries(guarded, what=what, where=self.url, policy=self.retry,
                            fix="check the service is up and the URL is right, then run again", attempts=attempts)

    # --- QIDO-RS -----------------------------------------------------------------------------
    @staticmethod
    def _rows(answers: list[dict], keys: Sequence[str]) -> list[dict]:
        rows = []
        for answer in answers:
            ds = pydicom.Dataset.from_json(answer)
            row = {}
            for key in keys:
                value = ds.get(key)
                if isinstance(value, pydicom.multival.MultiValue):
                    value = [str(v) for v in value]
                elif value is not None and not isinstance(value, int | float):
                    value = str(value)
                row[key] = value if value != "" else None
            rows.append(row)
        return rows

    def find_studies(self, *, keys: Sequence[str] = STUDY_KEYS, **filters: str) -> list[dict]:
        """QIDO-RS studies matching ``filters`` (keyword -> value), each a dict of ``keys``; every page read."""
        answers = self._pages("QIDO-RS studies", STUDY_UID_TAG, lambda limit, offset: self._client.search_for_studies(
            fields=list(keys), search_filters=dict(filters), limit=limit, offset=offset))
        return self._rows(answers, keys)

    def find_series(self, study_uid: str, *, keys: Sequence[str] = SERIES_KEYS) -> list[dict]:
        """QIDO-RS series of one study, each a dict of ``keys``; every page read."""
        answers = self._pages(f"QIDO-RS series of study {study_uid}", SERIES_UID_TAG,
                              lambda limit, offset: self._client.search_for_series(
                                  study_instance_uid=study_uid, fields=list(keys), limit=limit, offset=offset))
        return self._rows(answers, keys)

    def _pages(self, what: str, uid_tag: str, search) -> list[dict]:
        """Every answer of a QIDO-RS search, read page by page (``search(limit, offset)``) until a page is short or
        brings nothing new: a service that ignores ``offset`` and repeats its answer ends the loop too."""
        answers: list[dict] = []
        seen: set[str] = set()
        while True:
            page = self._call(what, lambda: search(self.page_size, len(answers)))
            before = len(answers)
            for answer in page:
                uid = _uid(answer, uid_tag)
                if uid not in seen:
                    seen.add(uid)
                    answers.append(answer)
            if len(answers) == before or len(page) < self.page_size:
                return answers

    # --- WADO-RS -----------------------------------------------------------------------------
    def retrieve(self, dest: str | Path, study_uid: str, series_uid: str | None = None) -> WebRetrieveResult:
        """WADO-RS a study (or one series) into ``dest`` as ``<SOPInstanceUID>.dcm`` files.

        A response cut short can still look like a valid multipart message (a server that ends its
        answer by closing the connection), so completeness is checked: every instance QIDO-RS
        lists must arrive, each with its SOPInstanceUID and its whole pixel data; otherwise the
        retrieval is tried again.
        """
        dest = Path(dest)
        attempts = Attempts()

        def operation() -> list[Path]:
            listed = {str(row["SOPInstanceUID"]) for row in self._rows(self._client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=series_uid, fields=["SOPInstanceUID"],
                get_remaining=True), ["SOPInstanceUID"])}
            if series_uid:
                datasets = self._client.iter_series(study_instance_uid=study_uid, series_instance_uid=series_uid)
            else:
                datasets = self._client.iter_study(study_instance_uid=study_uid)
            files, received = [], set()
            try:
                for ds in datasets:
                    problem = incomplete(ds)
                    if problem:
                        raise TransientError(f"an incomplete instance in the response ({problem})")
                    path = dest / f"{re.sub(r'[^0-9.]', '_', str(ds.SOPInstanceUID))[:80]}.dcm"
                    with atomic_path(path) as tmp:
                        ds.save_as(tmp, enforce_file_format=True)
                    files.append(path)
                    received.add(str(ds.SOPInstanceUID))
            except (ValueError, EOFError, KeyError, AttributeError) as exc:
                raise TransientError(f"an undecodable response ({type(exc).__name__})") from None
            if not listed <= received:
                raise TransientError(f"the response held {len(listed & received)} of the {len(listed)} instances "
                                     "the service lists")
            return files
        what = f"WADO-RS of {'series ' + series_uid if series_uid else 'study ' + study_uid}"
        files = self._call(what, operation, attempts)
        log.info("%s: %d file(s), %d attempt(s)", what, len(files), attempts.count)
        return WebRetrieveResult(files, attempts.count)

    # --- STOW-RS -----------------------------------------------------------------------------
    def store(self, paths: Iterable[str | Path]) -> list[str]:
        """STOW-RS the files; returns the SOPInstanceUIDs the service stored.

        Raises:
            UserError: unreachable after the retries, or the service refused some instances.
        """
        datasets = [pydicom.dcmread(p) for p in paths]

        def operation():
            return self._client.store_instances(datasets=datasets)
        response = self._call(f"STOW-RS of {len(datasets)} instance(s)", operation)
        failed = [str(item.get("ReferencedSOPInstanceUID", "?")) for item in response.get("FailedSOPSequence", [])]
        if failed:
            raise UserError(f"STOW-RS at {self.url}: the service refused {len(failed)} instance(s): "
                            f"{', '.join(failed[:3])}", fix="check the service's log for the reason")
        return [str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])]
