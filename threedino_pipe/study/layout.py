"""Where a study's files go: ``<results>/<DatasetNNN_Name>/study__<NAME>/`` (docs/study.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts.study import StudyCell, StudyRecord


@dataclass(frozen=True)
class StudyLayout:
    """The study folder and the paths in it."""

    folder: Path

    @classmethod
    def of(cls, dataset_results: Path, name: str) -> StudyLayout:
        return cls(Path(dataset_results) / f"study__{name}")

    @property
    def record(self) -> Path:
        return StudyRecord.in_folder(self.folder)

    def cell(self, cell: str) -> Path:
        return self.folder / "cells" / cell

    def cell_record(self, cell: str) -> Path:
        return StudyCell.in_folder(self.cell(cell))

    def predictions(self, cell: str) -> Path:
        return self.cell(cell) / "predictions"

    def evaluation(self, cell: str) -> Path:
        return self.cell(cell) / "evaluation"

    @property
    def test_list(self) -> Path:
        """The test cases' images, one per line (splits.json's test list or the validation cases)."""
        return self.folder / "test_cases.txt"

    @property
    def reference(self) -> Path:
        """Links to the test cases' reference labels (splits.json's test list or the validation cases)."""
        return self.folder / "reference"

    @property
    def reference_csv(self) -> Path:
        """The test cases' reference classes, ``case_id,label`` (a classification study's evaluate reference)."""
        return self.folder / "reference.csv"

    def out(self, name: str) -> Path:
        return self.folder / name
