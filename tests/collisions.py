"""Two identical `3dino` commands started together on one target (docs/cli.md, "One command per target").

:func:`race` starts both with ``-v``, finds the winner by the process id in the lock's holder
description, stops it (SIGSTOP: it keeps its lock) as soon as its work has visibly started, and
waits for the loser, recording when each of the loser's stderr lines arrived. The test then kills
the winner with SIGKILL and reruns the command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import THREEDINO

from threedino_pipe.runtime.locks import TRYING, lock_paths


@dataclass
class Contender:
    """One of the two commands and its stderr lines with their arrival times (``time.monotonic()``)."""

    proc: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, text: str) -> float:
        """When the first line containing ``text`` arrived."""
        return next(t for t, line in self.lines if text in line)


@dataclass
class Race:
    winner: Contender
    loser: Contender
    files_at_stop: dict[str, int]  # every file under the watched folder (relative name: size) once the winner stopped

    def refusal_seconds(self) -> float:
        """From the loser's attempt at the lock (its debug line) to its printed refusal."""
        return self.loser.first("error:") - self.loser.first(TRYING)

    def kill_winner(self) -> None:
        self.winner.proc.send_signal(signal.SIGKILL)
        self.winner.proc.wait(timeout=60)
        self.winner.reader.join(timeout=10)


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _holder_pid(target: Path) -> int | None:
    try:
        return int(json.loads(lock_paths(target)[1].read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def race(args: list[str], env: dict[str, str], target: Path, started: Callable[[], bool], watched: Path,
         timeout: float = 300.0) -> Race:
    """Start ``3dino ARGS -v`` twice at once on ``target``; stop the lock holder when ``started()``; wait for
    the other to end. ``watched`` is the folder whose files are listed at the stop."""
    procs = [subprocess.Popen([*THREEDINO, *args, "-v"], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    contenders = [Contender(p) for p in procs]
    try:
        deadline = time.monotonic() + timeout
        while (pid := _holder_pid(target)) not in {p.pid for p in procs} or not started():
            assert time.monotonic() < deadline, "no command took the lock and started"
            assert all(p.poll() is None for p in procs if p.pid == pid), "the winner ended before it was stopped"
            assert any(p.poll() is None for p in procs), "both commands ended: neither held the lock while working"
            time.sleep(0.002)
        winner, loser = sorted(contenders, key=lambda c: c.proc.pid != pid)
        os.kill(pid, signal.SIGSTOP)
        files = listing(watched)
        loser.proc.wait(timeout=timeout)
        loser.reader.join(timeout=10)
        return Race(winner, loser, files)
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise


def assert_refused(race_: Race, what: str, target: Path) -> None:
    """The loser exited non-zero within 2 s of trying the lock, naming the stopped winner; no traceback."""
    loser, winner = race_.loser, race_.winner
    assert loser.proc.returncode != 0 and "Traceback" not in loser.stderr, loser.stderr
    assert f"another 3dino command is writing this {what}" in loser.stderr
    assert f"process {winner.proc.pid} on {socket.gethostname()}, started " in loser.stderr, loser.stderr
    assert str(target.resolve()) in loser.stderr
    assert race_.refusal_seconds() < 2.0
