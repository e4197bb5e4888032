"""Helpers shared by the benchmark scripts: timed runs with process-tree peak memory, machine info, JSON.

Memory is read from ``/proc`` (Linux only; psutil is not a dependency):

- ``rss``: the sum of the resident set sizes of the process and all its descendants
  (``/proc/<pid>/statm``). Pages shared between processes (libraries mapped by every worker,
  copy-on-write pages after ``fork``) count once per process, so this over-states what the
  tree really holds; it is the usual figure ``top`` and ``/usr/bin/time`` show.
- ``pss``: the sum of proportional set sizes (``/proc/<pid>/smaps_rollup``): a page shared by n
  processes counts 1/n in each, so the sum is what the tree holds. Reading it walks the page
  tables (about 8 ms for a 1.7 GB process), so it is sampled only every ``pss_every``-th time.

The peak is the largest sum seen over samples taken every ``interval`` seconds (default 50 ms);
a spike shorter than the interval (``interval * pss_every`` for PSS) can be missed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def _parent_map() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may hold spaces: split after its last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants (scanning /proc for parent pids)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_map().items():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size of one process in bytes (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process in bytes (0 when it has gone or the kernel lacks smaps_rollup)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeMemorySampler:
    """Samples the memory of a process tree in a background thread; keeps the peaks.

    Use as a context manager around the lifetime of the root process::

        with TreeMemorySampler(proc.pid) as sampler:
            proc.wait()
        sampler.peak_rss, sampler.peak_pss  # bytes

    ``interval`` is in seconds; PSS is read every ``pss_every``-th sample (0: never).
    """

    def __init__(self, pid: int, interval: float = 0.05, pss_every: int = 5) -> None:
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        tree = process_tree(self.pid)
        self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in tree))
        if self.pss_every and self.samples % self.pss_every == 0:
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in tree))
        self.peak_processes = max(self.peak_processes, len(tree))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measurement:
    """One command's wall time (s), peak tree memory (bytes) and exit status."""

    command: list[str]
    wall_s: float
    peak_rss: int
    peak_pss: int
    peak_processes: int
    samples: int
    returncode: int
    output_tail: str = field(default="", repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def run_measured(command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 interval: float = 0.05, pss_every: int = 5, tail_chars: int = 4000) -> Measurement:
    """Run ``command`` to completion, timing it and sampling its process tree's memory.

    stdout and stderr go to a temporary file (not a pipe, so a chatty command never blocks);
    the last ``tail_chars`` characters are kept in the result.
    """
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(list(command), env=dict(env) if env is not None else None, cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with TreeMemorySampler(proc.pid, interval=interval, pss_every=pss_every) as sampler:
            returncode = proc.wait()
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
    return Measurement(list(command), wall, sampler.peak_rss, sampler.peak_pss, sampler.peak_processes,
                       sampler.samples, returncode, text[-tail_chars:])


def machine_info() -> dict:
    """CPU model, core counts, memory, OS and Python of this machine."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu_model": model or platform.processor(), "nproc": len(os.sched_getaffinity(0)),
            "cpu_count": os.cpu_count(), "memory_total_bytes": mem_total, "platform": platform.platform(),
            "python": sys.version.split()[0], "load_average_at_start": load}


def median(values: Sequence[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    return float(statistics.median(values))


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (floats printed with 3 decimals)."""
    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
