"""What every training stage does before its loop: plans of the datasets, the batch, the run folder."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import Plans, RunRecord, open_run_folder
from threedino_pipe.runtime import paths
from threedino_pipe.runtime.distributed import DistInfo, barrier
from threedino_pipe.runtime.locks import TargetLock


def dataset_plans(spec: str) -> tuple[Path, Plans]:
    """Preprocessed folder and plans of dataset ``spec`` (id or name)."""
    folder = paths.resolve_preprocessed(spec)
    return folder, Plans.of_dataset(folder)


def batch_for_device(planned: int, requested: int | None, dist: DistInfo, cpu_cap: int, console: Console,
                     what: str = "volumes") -> int:
    """``requested`` (``--batch-size``), else the ``planned`` batch (planned for a GPU memory target),
    capped at ``cpu_cap`` on a CPU."""
    if requested is not None:
        return requested
    if dist.device.type == "cpu" and planned > cpu_cap:
        console.print(f"note: running on the CPU: batch per process capped at {cpu_cap} {what} (plans.json says "
                      f"{planned} for a GPU); pass --batch-size to override")
        return cpu_cap
    return planned


def run_lock(folder: Path, dist: DistInfo) -> contextlib.AbstractContextManager:
    """Rank 0 holds the run folder's lock for the whole run (a second command into it refuses at once)."""
    return TargetLock(folder, "run folder") if dist.is_main else contextlib.nullcontext()


def open_run(folder: Path, record: RunRecord, *, restart: bool, dist: DistInfo,
             new_run_fix: str = "pass a new --run name to start another run") -> bool:
    """Rank 0 creates or checks the run folder first (:func:`open_run_folder`), then the other ranks;
    returns True when the run resumes."""
    resume = False
    if dist.is_main:
        resume = open_run_folder(folder, record, restart=restart, new_run_fix=new_run_fix)
    barrier()
    if not dist.is_main:
        resume = open_run_folder(folder, record, new_run_fix=new_run_fix)
    return resume
