"""``run.json``: the options that define a training run, and what it depends on.

Written by ``pretrain``, ``adapt-highres`` and ``finetune`` into their run folder when the run
starts. A rerun compares its options and the plans fields it depends on with the recorded ones,
field by field: equal -> resume, different -> refuse naming the field (docs/architecture.md, "The stage contract").
Fields that do not change the result (worker counts, checkpoint cadence) are listed in
``volatile`` and never compared. ``decisions`` holds values a stage chose for the run (the
self-configured SSL recipe, a measured step time) with their reasons.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.runtime.errors import UserError


class BudgetRecord(Record):
    """``--budget-hours``: the step time measured at the start of the run and the iterations it allows."""

    hours: float
    measured_step_seconds: float
    measured_steps: int
    iters: int


class RunRecord(Artifact):
    """The whole ``run.json``."""

    KIND = "run"
    SCHEMA_VERSION = 1
    WRITER = "the training command"
    FILE = "run.json"

    stage: str = ""
    options: dict[str, Any]
    volatile: list[str] = []
    plans: dict[str, dict[str, Any]] = {}
    decisions: dict[str, Any] = {}
    budget: BudgetRecord | None = None

    OMIT_WHEN_NONE = ("budget",)

    def compared(self) -> dict[str, Any]:
        """The values a resume must find unchanged: options (less the volatile ones) and the plans' fields."""
        return {"options": {k: v for k, v in self.options.items() if k not in self.volatile}, "plans": self.plans}


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two JSON-like values, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{name}: {old.get(key)!r} -> {new.get(key)!r}")
            else:
                out.extend(differences(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


# Options added to the run record after runs were made without them: the value an older run used.
# before --augment-device every run augmented with MONAI; before --method every pretrain run was 3DINO
OPTIONS_ADDED_LATER = {"augment_device": "cpu-monai", "method": "dino", "intensity_prob": 0.8}


def run_differences(folder: Path, record: RunRecord) -> list[str]:
    """The fields in which the run of ``folder`` (its ``run.json``) differs from ``record``, volatile options
    left out; empty when the folder holds no run yet or the same run (``finetune``'s runs beside each other)."""
    path = Path(folder) / RunRecord.FILE
    if not path.is_file():
        return []
    recorded = RunRecord.read(path, rerun="the same command with --restart")
    volatile = set(record.volatile) | set(recorded.volatile)
    recorded_options = {**{k: v for k, v in OPTIONS_ADDED_LATER.items() if k in record.options},
                        **recorded.options}
    old = {"options": {k: v for k, v in recorded_options.items() if k not in volatile}, "plans": recorded.plans}
    new = {"options": {k: v for k, v in record.options.items() if k not in volatile}, "plans": record.plans}
    return differences(old, new)


def open_run_folder(folder: Path, record: RunRecord, *, restart: bool = False,
                    new_run_fix: str = "pass a new --run name to start another run") -> bool:
    """Create or reopen a run folder; returns True when an existing run should be resumed.

    Args:
        folder: the run folder.
        record: this invocation's run record (options, volatile names, plans dependencies).
        restart: delete the folder's previous content and start over.
        new_run_fix: how the refusal tells the user to start a second run beside this one.

    Raises:
        UserError: the folder holds a run made with other options or other plans, naming each field.
    """
    folder = Path(folder)
    path = folder / RunRecord.FILE
    if restart and folder.exists():
        shutil.rmtree(folder)
    if path.is_file():
        for stale in folder.glob(".*.partial*"):  # temporary files of a killed process (atomic_path)
            stale.unlink(missing_ok=True)
        diffs = run_differences(folder, record)
        if diffs:
            raise UserError("this run folder was made with other options or plans (" + "; ".join(diffs[:6])
                            + (f"; +{len(diffs) - 6} more" if len(diffs) > 6 else "") + ")",
                            file=folder, fix=f"{new_run_fix}, or --restart to discard this one")
        return (folder / "checkpoint_latest.pt").is_file()
    folder.mkdir(parents=True, exist_ok=True)
    record.write(path)
    return False
