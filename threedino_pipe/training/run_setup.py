"""What every training stage does before its loop: plans of the datasets, the batch, the run folder."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import Plans, RunRecord, open_run_folder, run_differences
from threedino_pipe.runtime import paths
from threedino_pipe.runtime.distributed import DistInfo, barrier
from threedino_pipe.runtime.errors import UserError
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


RUN_NAME_FIX = "pass a plain folder name with --run (letters, digits, '.', '_', '-'), e.g. --run second"


def run_folder(parent: Path, name: str | None, default: str) -> Path:
    """``parent/<name>``, or ``parent/<default>`` when ``name`` (``--run``) is None; the name is checked.

    Every training command (pretrain, adapt-highres, finetune) starts a second run beside the first
    the same way: ``--run NAME``.

    Raises:
        UserError: ``name`` is not a plain folder name (a path, ``.``, ``..``, empty, or odd characters).
    """
    if name is None:
        return Path(parent) / default
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._+-]*", name) or name in (".", ".."):
        raise UserError(f"--run {name!r} is not a plain folder name", file=Path(parent), fix=RUN_NAME_FIX)
    return Path(parent) / name


def new_run_fix(folder: Path) -> str:
    """The refusal's fix for a rerun with other options: a second run beside ``folder`` with ``--run``."""
    return f"pass --run NAME to start a second run beside {Path(folder).name} (e.g. --run {Path(folder).name}__2)"


def run_beside(folder: Path, record: RunRecord, limit: int = 100) -> Path:
    """``folder`` when it is free or holds the run of ``record``, else the first such ``<folder>__K`` (K >= 2).

    Raises:
        UserError: ``limit`` folders beside it all hold other runs.
    """
    for k in range(1, limit + 1):
        candidate = folder if k == 1 else folder.with_name(f"{folder.name}__{k}")
        if not run_differences(candidate, record):
            return candidate
    raise UserError(f"{limit} runs with other options stand beside this one already", file=folder,
                    fix="pass --run NAME, or delete runs you no longer need")


def run_lock(folder: Path, dist: DistInfo) -> contextlib.AbstractContextManager:
    """Rank 0 holds the run folder's lock for the whole run (a second command into it refuses at once)."""
    return TargetLock(folder, "run folder") if dist.is_main else contextlib.nullcontext()


def open_run(folder: Path, record: RunRecord, *, restart: bool, dist: DistInfo) -> bool:
    """Rank 0 creates or checks the run folder first (:func:`open_run_folder`), then the other ranks;
    returns True when the run resumes. A folder made with other options is refused with
    :func:`new_run_fix` (``--run NAME``) or ``--restart``."""
    fix = new_run_fix(folder)
    resume = False
    if dist.is_main:
        resume = open_run_folder(folder, record, restart=restart, new_run_fix=fix)
    barrier()
    if not dist.is_main:
        resume = open_run_folder(folder, record, new_run_fix=fix)
    return resume
