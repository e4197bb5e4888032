"""Atomic writers for evaluation outputs (CSV, PNG, HTML, ``summary.json``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from threedino_pipe.artifacts import EvaluationSummary
from threedino_pipe.runtime.atomic_files import atomic_path

PER_CASE_FILE = "per_case.csv"


def is_result_folder(path: Path) -> bool:
    """True when ``path`` is a folder written by ``3dino evaluate`` (summary.json + per_case.csv)."""
    return path.is_dir() and EvaluationSummary.in_folder(path).is_file() and (path / PER_CASE_FILE).is_file()


def write_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g", na_rep="")


def write_bytes(data: bytes, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_outputs(out_dir: Path, *, tables: dict[str, pd.DataFrame], figures: dict[str, bytes], report: str,
                  summary: EvaluationSummary) -> None:
    """Write CSVs, PNGs and report.html, then summary.json last (its presence marks a complete evaluation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_csv(table, out_dir / name)
    for name, png in figures.items():
        write_bytes(png, out_dir / name)
    write_text(report, out_dir / "report.html")
    summary.write(EvaluationSummary.in_folder(out_dir))
