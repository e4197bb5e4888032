"""Run folders: record the options, resume a rerun of the same command, refuse a different one.

A run folder holds ``run.json`` (kind ``run``): the options that define the run. A rerun with the
same options resumes from ``checkpoint_latest.pt``; one whose options differ refuses and says to
pass a new ``--run`` name or ``--restart`` (DESIGN.md principle 4). Options that do not change
the result (``stop_after``, worker counts, progress display) are listed in ``volatile`` and not
compared.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from threedino_pipe import __version__
from threedino_pipe.errors import UserError
from threedino_pipe.jsonio import read_json, write_json

RUN_SCHEMA_VERSION = 1


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_run_folder(folder: Path, options: dict[str, Any], *, restart: bool = False,
                       volatile: tuple[str, ...] = (), extra: dict | None = None,
                       command: str = "the same command") -> bool:
    """Create or reopen a run folder; returns True when an existing run should be resumed.

    Args:
        folder: the run folder.
        options: the options that define the run (JSON-serialisable).
        restart: delete the folder's previous content and start over.
        volatile: option names that may differ between a run and its resumption.
        extra: further fields recorded in run.json (datasets, plans used, ...).
        command: how to name the command in messages.

    Raises:
        UserError: the folder holds a run made with other options.
    """
    folder = Path(folder)
    run_json = folder / "run.json"
    if restart and folder.exists():
        shutil.rmtree(folder)
    stable = {k: v for k, v in options.items() if k not in volatile}
    if run_json.is_file():
        for stale in folder.glob(".*.partial*"):  # temp files of a killed process (atomic_path)
            stale.unlink(missing_ok=True)
        recorded = read_json(run_json)
        old = {k: v for k, v in recorded.get("options", {}).items() if k not in volatile}
        diffs = _differences(old, stable)
        if diffs:
            raise UserError("this run folder was made with other options (" + "; ".join(diffs[:6]) + ")",
                            file=folder, fix="pass a new --run name to start another run, or --restart to "
                            "discard this one")
        return (folder / "checkpoint_latest.pt").is_file()
    folder.mkdir(parents=True, exist_ok=True)
    record = {"kind": "run", "schema_version": RUN_SCHEMA_VERSION, "version": __version__, "options": options}
    record.update(extra or {})
    write_json(run_json, record)
    return False
