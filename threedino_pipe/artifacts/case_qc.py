"""``.qc/<case>.json``: what ``3dino predict``'s QC measured of one predicted case (docs/predict.md, *QC*).

Written (atomically) after each case, beside a three-plane thumbnail ``.qc/<case>.png``, so that
``qc.csv`` and ``qc_report.html`` can be rebuilt at the end of every batch from the cases
predicted in it and those predicted before (``--continue``, other ranks). The flags are not
stored: they are computed from these measures when the batch files are built, with that run's
``--qc-min-confidence`` and the model card's volume ranges.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record

QC_FOLDER = ".qc"


class StructureQc(Record):
    """The measures of one structure (a label, or a region of a sigmoid model) of one case."""

    name: str
    label_values: list[int] = Field(min_length=1)
    voxels: int = Field(ge=0)
    volume_ml: float = Field(ge=0.0)
    components: int = Field(ge=0)
    border_share: float = Field(ge=0.0, le=1.0)
    mean_confidence: float | None = Field(default=None, ge=0.0, le=1.0)


class CaseQc(Artifact):
    """The whole ``.qc/<case>.json``."""

    KIND = "case_qc"
    SCHEMA_VERSION = 1
    WRITER = "3dino predict"
    PATTERN = ".qc/<case>.json"

    case_id: str
    weights_checksum: str
    spacing_mm: list[float] = Field(min_length=3, max_length=3)
    series_ranks: list[int] = []
    structures: list[StructureQc]
    thumbnail: str | None = None

    @staticmethod
    def path(output_dir: str | Path, case_id: str) -> Path:
        """``output_dir/.qc/<case_id>.json``."""
        return Path(output_dir) / QC_FOLDER / f"{case_id}.json"

    @staticmethod
    def thumbnail_path(output_dir: str | Path, case_id: str) -> Path:
        """``output_dir/.qc/<case_id>.png``, the case's three-plane thumbnail."""
        return Path(output_dir) / QC_FOLDER / f"{case_id}.png"
