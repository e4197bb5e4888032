"""One writer per target: an exclusive lock on a run folder, a preprocessed dataset or an output folder.

A second ``3dino`` command that would write into a target another command is writing refuses at
once, naming the holder (host, process id, start time, command). The lock is an OS file lock
(``filelock``: ``flock`` on Linux) on a hidden file beside the target, so the system releases it
when the holding process ends in any way, ``kill -9`` included: the next command simply takes it.
The holder's description sits in a second file, written by each new holder and removed when it
lets go (a killed holder's stays until the next holder replaces it).

On shared cluster file systems the lock holds across machines where the file system supports
POSIX locks: NFSv4, and Lustre mounted with ``-o flock`` (docs/cli.md). Where it does not
(NFSv3 without lockd, Lustre with ``-o localflock``), two machines can both take it; where
``flock`` fails outright (Lustre mounted without either option) the command refuses and names
``THREEDINO_LOCK_DIR``, a node-local folder for the lock files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)
#: the debug line (``-v``) printed just before the lock is tried: tests time the refusal from it
TRYING = "taking the lock of"
#: where lock files go instead of beside their targets (a node-local folder where the shared file system has no locks)
LOCK_DIR_VARIABLE = "THREEDINO_LOCK_DIR"
#: what ``flock`` answers on a file system without locks (Lustre without ``-o flock``, NFS without a lock manager)
_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}


def lock_paths(target: Path) -> tuple[Path, Path]:
    """The lock file and the holder description of ``target``: hidden files beside it, or, with
    ``THREEDINO_LOCK_DIR`` set, files in that folder named by the target's name and a hash of its path.
    ``target`` is resolved first, so ``-o .`` and ``-o ../out/`` lock the folder they name."""
    target = Path(target).resolve()
    lock_dir = os.environ.get(LOCK_DIR_VARIABLE)
    if lock_dir:
        stem = f"{target.name}-{hashlib.sha256(str(target).encode()).hexdigest()[:16]}"
        folder = Path(lock_dir)
    else:
        stem, folder = f".{target.name}", target.parent
    return folder / f"{stem}.3dino.lock", folder / f"{stem}.3dino.holder.json"


class TargetLock:
    """Exclusive write access to ``target`` for this process (a context manager).

    Args:
        target: the folder (or file) the command writes.
        what: how messages name the target (e.g. "run folder").
    """

    def __init__(self, target: Path, what: str = "folder") -> None:
        self.target, self.what = Path(target).resolve(), what
        self.path, self.holder_path = lock_paths(self.target)
        self.lock: FileLock | None = None

    def acquire(self) -> TargetLock:
        """Take the lock now or raise a UserError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log.debug("%s %s %s (%s)", TRYING, self.what, self.target, self.path)
        lock = FileLock(str(self.path), timeout=0, preserve_lock_file=True)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"another 3dino command is writing this {self.what}: {self._holder()}", file=self.target,
                            fix="wait for it to finish or stop it (a stopped or killed command's lock is released "
                            "by the system), or write to another folder") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            raise UserError(f"the file system holding the lock of this {self.what} does not support file locks "
                            f"({exc.strerror})", file=self.path,
                            fix=f"set {LOCK_DIR_VARIABLE} to a folder on a local disk (e.g. /tmp/$USER/3dino-locks: "
                            "the lock then keeps out commands on the same machine only, so give every job its own "
                            "target), or have the file system mounted with locks (Lustre: -o flock)") from None
        self.lock = lock
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": shlex.join(["3dino", *sys.argv[1:]])}
        self.holder_path.write_text(json.dumps(holder) + "\n")
        return self

    def release(self) -> None:
        """Give the lock back; the holder's description goes first, so no one reads a finished holder."""
        if self.lock is not None:
            self.holder_path.unlink(missing_ok=True)
            self.lock.release()
            self.lock = None

    def _holder(self) -> str:
        try:
            holder = json.loads(self.holder_path.read_text())
            return (f"process {holder['pid']} on {holder['host']}, started {holder['started']}: "
                    f"{holder['command']}")
        except (OSError, ValueError, KeyError):
            return "a process that has not described itself yet"

    def __enter__(self) -> TargetLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
