"""A DICOM storage node with pynetdicom: C-STORE (every storage SOP class, as sent) and C-ECHO.

Each received instance is written atomically to ``place(StudyInstanceUID) / <SOPInstanceUID>.dcm``
before the C-STORE is answered, so an acknowledged file is on disk; a file that cannot be written
is answered "out of resources" (0xA700) and the sender keeps it. When an association that stored
files ends (released, aborted or dropped), ``on_association_end(calling AE title, {study UID:
files})`` is called. Received files are named by UID only: nothing of the patient reaches a name
or a log line. pynetdicom runs each association in its own thread; the callbacks must be thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from threedino_pipe.dicom.pacs import TRANSFER_SYNTAXES, instance_file_name, no_delay
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


class StorageServer:
    """A storage SCP listening on ``bind:port`` as ``ae_title``.

    Args:
        place: the folder of a study's files (called with its StudyInstanceUID, before each file).
        on_association_end: called with the calling AE title and the files per study of an association.
        allowed_callers: when given, only these calling AE titles may associate.
    """

    def __init__(self, ae_title: str, bind: str, port: int, *, place: Callable[[str], Path],
                 on_association_end: Callable[[str, dict[str, int]], None],
                 allowed_callers: Sequence[str] = ()) -> None:
        self.ae_title, self.bind, self.port = ae_title, bind, port
        self.place = place
        self.on_association_end = on_association_end
        self.allowed_callers = list(allowed_callers)
        self._counts: dict[int, Counter[str]] = {}
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> None:
        """Listen (in background threads).

        Raises:
            UserError: the address cannot be bound (in use, or not an address of this machine).
        """
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.allowed_callers:
            ae.require_calling_aet = self.allowed_callers
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_CLOSE, self._on_close),
                    (evt.EVT_CONN_OPEN, lambda event: no_delay(event.assoc))]
        try:
            self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise UserError(f"cannot listen on {self.bind}:{self.port} ({exc.strerror or exc})",
                            fix="choose another --port (or --bind), or stop the program that holds it") from None

    def stop(self) -> None:
        """Stop listening and close every association."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event) -> int:
        try:
            study_uid = str(event.dataset.StudyInstanceUID)
            sop_uid = str(event.request.AffectedSOPInstanceUID)
        except Exception:  # noqa: BLE001 - a dataset we cannot decode is the sender's problem, answered as such
            log.warning("a received instance without a readable StudyInstanceUID was refused")
            return CANNOT_UNDERSTAND
        try:
            path = self.place(study_uid) / instance_file_name(sop_uid)
            with atomic_path(path) as tmp:
                tmp.write_bytes(event.encoded_dataset(include_meta=True))
        except OSError as exc:
            log.error("cannot write a received instance (%s); answered out of resources", exc.strerror or exc)
            return OUT_OF_RESOURCES
        with self._lock:
            self._counts.setdefault(id(event.assoc), Counter())[study_uid] += 1
        return 0x0000

    def _on_close(self, event) -> None:
        with self._lock:
            counts = self._counts.pop(id(event.assoc), None)
        if counts:
            calling = str(getattr(event.assoc.requestor, "ae_title", "") or "").strip()
            self.on_association_end(calling, dict(counts))
