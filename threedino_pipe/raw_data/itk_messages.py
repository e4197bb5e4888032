"""ITK's and SimpleITK's messages as threedino-pipe's own warnings, naming the file being read.

ITK prints its warnings through its "output window" straight to stderr, as
``WARNING: In /path/of/the/ITK/build/itkNiftiImageIO.cxx, line 2008`` followed by
``NiftiImageIO (0x55...): <text>`` (e.g. an ``sform`` that is not a rotation, or a DICOM series
with a missing slice: "Non uniform sampling or missing slices detected"). SimpleITK lets a
:class:`SimpleITK.LoggerBase` subclass replace that window for the whole process
(``SetAsGlobalITKLogger``); ours is installed on the first read and keeps the texts of the
thread that reads (:func:`collected`), or logs them at once where no read is under way.
:func:`warnings_of` turns the texts of one read into ``warning: <file>: <text>`` log lines.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import SimpleITK as sitk

log = logging.getLogger(__name__)
_LOCATION = re.compile(r"^(WARNING|ERROR|Debug): In .*, line \d+$")  # where in ITK's sources: not for users
_SENDER = re.compile(r"^[A-Za-z0-9_:]+ \(0x[0-9a-fA-F]+\): ")  # "NiftiImageIO (0x55...): "
_local = threading.local()
_installed: list = []  # the logger and the window it replaced: kept alive for the whole process
_install_lock = threading.Lock()


def clean(text: str) -> str:
    """ITK's message without the source location and the sender's class and address, on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _LOCATION.match(line.strip())]
    return " ".join(_SENDER.sub("", " ".join(lines)).split())


def about(path: str | Path, message: str) -> str:
    """``message`` with the full ``path`` it repeats (ITK often names the file) cut to the file's name."""
    return message.replace(str(path), Path(path).name)


class _Logger(sitk.LoggerBase):
    """Receives every ITK/SimpleITK message of the process (SimpleITK calls these methods)."""

    def DisplayWarningText(self, text: str) -> None:  # noqa: N802 (SimpleITK's method names)
        _receive(text)

    def DisplayText(self, text: str) -> None:  # noqa: N802
        _receive(text)

    def DisplayGenericOutputText(self, text: str) -> None:  # noqa: N802
        _receive(text)

    def DisplayErrorText(self, text: str) -> None:  # noqa: N802
        log.debug("ITK error text (it also raises): %s", clean(text))  # the exception reaches the reader

    def DisplayDebugText(self, text: str) -> None:  # noqa: N802
        log.debug("ITK: %s", clean(text))


def _receive(text: str) -> None:
    message = clean(text)
    if not message:
        return
    pending = getattr(_local, "messages", None)
    if pending is None:  # no read under way in this thread (a filter, or one of ITK's own threads)
        log.warning("warning: ITK: %s", message)
    else:
        pending.append(message)


def install() -> None:
    """Route ITK's output window to this module, once per process (each worker process installs its own)."""
    with _install_lock:
        if not _installed:
            logger = _Logger()
            _installed.extend([logger, logger.SetAsGlobalITKLogger()])


@contextlib.contextmanager
def collected() -> Iterator[list[str]]:
    """Yield the list that receives the ITK messages of this thread while the block runs (each once)."""
    install()
    outer = getattr(_local, "messages", None)
    _local.messages = []
    found: list[str] = []
    try:
        yield found
    finally:
        found.extend(dict.fromkeys(_local.messages))
        _local.messages = outer


@contextlib.contextmanager
def warnings_of(path: str | Path) -> Iterator[None]:
    """Log the ITK messages of the block as ``warning: <path>: <text>`` (also when the read fails)."""
    found: list[str] = []
    try:
        with collected() as found:
            yield
    finally:
        for message in found:
            log.warning("warning: %s: %s", path, about(path, message))
