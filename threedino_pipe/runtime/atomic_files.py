"""Atomic file writing: temporary name in the target folder, then rename; JSON read and write.

Every artifact is written to a temporary name in the target folder and renamed, so a killed
process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from threedino_pipe.runtime.errors import UserError


def _file_mode() -> int:
    """``0o666`` less the process's umask: the mode ``open()`` would give a new file.

    Read from ``/proc/self/status`` where Linux offers it, so the process umask is never changed.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read the mask by setting it, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps ``path``'s full suffix (e.g. ``.nii.gz``) so writers that pick a
    format from the extension work unchanged. ``mode``: the file's permission bits (default: the
    usual umask-based mode; ``0o600`` for a private file, which is never readable by others, not
    even for a moment).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".partial{suffix}",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode() if mode is None else mode)  # mkstemp makes 0600 files
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, data: Any, *, mode: int | None = None) -> None:
    """Write ``data`` as indented, key-ordered-as-given JSON, atomically (``mode``: see :func:`atomic_path`)."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", file=path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"not valid JSON ({exc})", file=path, fix="repair or regenerate the file") from None


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` (created when missing) in one write, flushed to disk.

    One ``write`` on a file opened with ``O_APPEND`` lands whole at the end, even with other
    appenders. A file whose last line was cut short (a crash inside an earlier write) first gets a
    newline, so the new line starts on its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _file_mode())
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
