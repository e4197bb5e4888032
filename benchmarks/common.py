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

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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
                 interval: float = 0.05, pss_every: int = 5, tail_chars: int = 4000,
                 sample_memory: bool = True) -> Measurement:
    """Run ``command`` to completion, timing it and sampling its process tree's memory.

    stdout and stderr go to a temporary file (not a pipe, so a chatty command never blocks);
    the last ``tail_chars`` characters are kept in the result. ``sample_memory=False`` only times
    the command (peaks 0): the sampler itself uses CPU (about a fifth of a core while it reads the
    PSS of a 4 GB process every 250 ms), which slows a command that needs every core.
    """
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(list(command), env=dict(env) if env is not None else None, cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = TreeMemorySampler(proc.pid, interval=interval, pss_every=pss_every)
        if sample_memory:
            with sampler:
                returncode = proc.wait()
        else:
            returncode = proc.wait()
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
    return Measurement(list(command), wall, sampler.peak_rss, sampler.peak_pss, sampler.peak_processes,
                       sampler.samples, returncode, text[-tail_chars:])


def invocation(argv: Sequence[str] | None = None) -> str:
    """The command line that ran this script, for the JSON (``python benchmarks/x.py ...``; ``argv``
    when ``main(argv)`` was called directly)."""
    return shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)


def gflop(value: float) -> str:
    """FLOPs (or FLOP/s) in units of 1e9, one decimal."""
    return f"{value / 1e9:.1f}"


def openmp_like_3dino() -> None:
    """Re-execute this script with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set.

    Every ``3dino`` command sets it before torch loads (``threedino_pipe/openmp.py``: idle OpenMP
    threads sleep instead of spinning), so a benchmark that compares in-process work with a
    ``3dino`` subprocess, or stands for a ``3dino`` command, must run under the same policy.
    libgomp reads the variable once, when torch is imported: a script that has imported torch
    has to start again. Call it first thing under ``if __name__ == "__main__":``.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.argv])


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
            "python": sys.version.split()[0], "load_average_at_start": load,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def median(values: Sequence[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    return float(statistics.median(values))


def dated_result_path(name: str, quick: bool = False) -> Path:
    """``benchmarks/results/<UTC date>/<name>.json`` (``<name>_quick.json`` for a ``--quick`` run)."""
    from datetime import datetime, timezone
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return Path(__file__).resolve().parent / "results" / date / f"{name}{'_quick' if quick else ''}.json"


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

# --------------------------------------------------------------------------- torch: FLOPs and matmul peak


def add_torch_options(parser: argparse.ArgumentParser) -> None:
    """The options every torch benchmark shares: the matmul peak (``--matmul-*``), ``--threads``,
    ``--device`` and ``--seed``."""
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-loops", type=int, default=4,
                        help="products per timed matmul repeat (at most; fewer when one product takes over 1 s)")
    parser.add_argument("--matmul-repeats", type=int, default=5, help="timed matmul repeats (at most)")
    parser.add_argument("--matmul-budget", type=float, default=20.0,
                        help="seconds per matmul layout after which no further repeat starts (2 repeats at least)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)


def torch_device(requested: str | None = None, threads: int | None = None) -> torch.device:
    """``requested``, else CUDA when available, else the CPU; sets torch's threads to ``threads``
    or the cores this process may use."""
    import torch
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def register_cpu_attention_flops() -> None:
    """Teach FlopCounterMode the CPU flash-attention kernels (torch 2.13 counts only the CUDA ones).

    Same formulas as torch's own for ``_scaled_dot_product_flash_attention`` (forward: two batched
    products; backward: the four of the gradient), so attention FLOPs are counted on every device.
    """
    import torch
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

    def forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    if forward is not None and forward not in fc.flop_registry:
        fc.register_flop_formula(forward)(forward_flops)
    if backward is not None and backward not in fc.flop_registry:
        fc.register_flop_formula(backward)(backward_flops)


def counted_flops(run: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts while ``run()`` runs, and its result.

    The counter counts matrix products, convolutions and attention (the CPU flash-attention kernels
    too, see :func:`register_cpu_attention_flops`); element-wise work, norms, ``grid_sample`` and
    optimiser steps add nothing.
    """
    from torch.utils.flop_counter import FlopCounterMode
    register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        result = run()
    return int(counter.get_total_flops()), result


def time_products(product, loops: int, repeats: int, budget_s: float, device: torch.device) -> list[float]:
    """Seconds of ``repeats`` runs of ``loops`` products (fewer repeats once ``budget_s`` is spent, at least 2)."""
    times: list[float] = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < budget_s):
        start = time.perf_counter()
        for _ in range(loops):
            product()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, loops: int, repeats: int,
                budget_s: float = 20.0, probe: int = 512) -> dict[str, Any]:
    """Best FLOP/s of ``size x size`` matrix products of ``dtype``: up to ``repeats`` runs of up to ``loops``
    products (fewer when one product takes over a second, or once ``budget_s`` is spent), best run.

    Two layouts: ``a @ b.T`` (``linear``, as ``nn.Linear`` calls it) and ``a @ b`` (``mm``). On a CPU
    without native bf16 the ``mm`` layout in bf16 is ~10x slower than ``linear`` (minutes for one
    2048^3 product): each layout is first timed at ``probe``^3, and one whose probe reaches less than
    a quarter of the best probe is not run at full size (it cannot be the peak). The peak is the
    best layout.
    """
    import torch
    g = torch.Generator(device=device).manual_seed(0)
    result: dict[str, Any] = {"size": size}
    probes: dict[str, float] = {}
    for name in ("linear", "mm"):
        def make(n: int, name: str = name):
            a = torch.randn(n, n, generator=g, device=device).to(dtype)
            b = torch.randn(n, n, generator=g, device=device).to(dtype)
            return (lambda: torch.nn.functional.linear(a, b)) if name == "linear" else (lambda: torch.mm(a, b))
        small = make(probe)
        small()
        probes[name] = 2 * probe ** 3 / min(time_products(small, 1, 3, 1.0, device))
        if probes[name] < 0.25 * max(probes.values()):
            result[name] = {"probe_size": probe, "probe_flops_per_s": probes[name],
                            "skipped": "probe under a quarter of the best layout's"}
            continue
        product = make(size)
        start = time.perf_counter()
        product()  # warm-up, also sizes the loop
        sync(device)
        one = time.perf_counter() - start
        n_loops = max(1, min(loops, round(1.0 / max(one, 1e-9))))
        times = time_products(product, n_loops, repeats, budget_s, device)
        flops = 2 * size ** 3 * n_loops
        result[name] = {"probe_size": probe, "probe_flops_per_s": probes[name], "loops": n_loops, "seconds": times,
                        "best_flops_per_s": flops / min(times), "median_flops_per_s": flops / median(times)}
    result["best_flops_per_s"] = max(v["best_flops_per_s"] for v in result.values()
                                     if isinstance(v, dict) and "best_flops_per_s" in v)
    return result
