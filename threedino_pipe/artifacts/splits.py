"""``splits.json``: cross-validation folds, a held-out test list and nested label subsets (docs/schemas.md).

Written by ``3dino preprocess`` for labelled datasets (``threedino_pipe.training_data.splits.make_splits``);
``finetune --pct P --fold F --seed S`` takes the first round(P % of the fold's training cases) of
``folds[F].subset_order[S]``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.runtime.errors import UserError


class Fold(Record):
    """One fold: its training and validation case ids, the subset draw orders and standard subsets."""

    train: list[str]
    val: list[str]
    subset_order: dict[str, list[str]]          # subset seed -> the training cases in draw order
    subsets: dict[str, dict[str, list[str]]]    # subset seed -> pct -> case ids (sorted)


class Splits(Artifact):
    """The whole ``splits.json``."""

    KIND = "splits"
    SCHEMA_VERSION = 1
    WRITER = "3dino preprocess -d DATASET"
    FILE = "splits.json"

    seed: int
    test: list[str]
    folds: list[Fold] = Field(min_length=1)

    @classmethod
    def of_dataset(cls, folder: Path, dataset: str = "N") -> Splits:
        """``splits.json`` of a preprocessed dataset folder (``dataset``: the ``-d`` value named in errors)."""
        return cls.read(cls.in_folder(folder), rerun=f"3dino preprocess -d {dataset}")

    def fold(self, index: int, *, file: str | Path | None = None) -> Fold:
        """Fold ``index``; another number is a UserError listing the folds."""
        if not 0 <= index < len(self.folds):
            raise UserError(f"fold {index} does not exist (folds 0..{len(self.folds) - 1})", file=file,
                            fix=f"pass --fold between 0 and {len(self.folds) - 1}")
        return self.folds[index]
