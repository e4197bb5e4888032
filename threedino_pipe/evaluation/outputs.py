"""Atomic writers for evaluation outputs (CSV, PNG, HTML, summary.json)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from threedino_pipe import __version__
from threedino_pipe.runtime.atomic_files import atomic_path, read_artifact, write_json

SUMMARY_KIND = "evaluation_summary"
SUMMARY_SCHEMA_VERSION = 1
SUMMARY_FILE = "summary.json"
PER_CASE_FILE = "per_case.csv"


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats turned into None (strict JSON ``null``) and numpy scalars into Python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_header(mode: str, task: str) -> dict:
    """The common head of ``summary.json``."""
    return {"kind": SUMMARY_KIND, "schema_version": SUMMARY_SCHEMA_VERSION, "version": __version__,
            "mode": mode, "task": task}


def read_summary(folder: Path) -> dict:
    """``summary.json`` of an earlier evaluation (kind and schema version checked)."""
    return read_artifact(folder / SUMMARY_FILE, SUMMARY_KIND, SUMMARY_SCHEMA_VERSION, "3dino evaluate")


def is_result_folder(path: Path) -> bool:
    """True when ``path`` is a folder written by ``3dino evaluate`` (summary.json + per_case.csv)."""
    return path.is_dir() and (path / SUMMARY_FILE).is_file() and (path / PER_CASE_FILE).is_file()


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
                  summary: dict) -> None:
    """Write CSVs, PNGs and report.html, then summary.json last (its presence marks a complete evaluation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_csv(table, out_dir / name)
    for name, png in figures.items():
        write_bytes(png, out_dir / name)
    write_text(report, out_dir / "report.html")
    write_json(out_dir / SUMMARY_FILE, json_safe(summary))
