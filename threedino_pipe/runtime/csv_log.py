"""The training log: one CSV row per logged iteration, resumable."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from threedino_pipe.runtime.atomic_files import atomic_path


class CsvLog:
    """Append rows of metrics to ``log.csv``; on resume, keep only rows up to the checkpoint.

    The header is fixed by the first row written; later rows may not add columns.
    """

    def __init__(self, path: str | Path, resume_iteration: int | None = None) -> None:
        self.path = Path(path)
        self.fields: list[str] | None = None
        if self.path.is_file():
            if resume_iteration is None:
                self.path.unlink()
            else:
                self._truncate(resume_iteration)

    def _truncate(self, iteration: int) -> None:
        with self.path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames
            rows = [r for r in reader if r.get("iteration", "").isdigit() and int(r["iteration"]) <= iteration]
        if not fields:
            self.path.unlink()
            return
        self.fields = list(fields)
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (values formatted with repr-precision floats)."""
        new = self.fields is None
        if new:
            self.fields = list(row)
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
