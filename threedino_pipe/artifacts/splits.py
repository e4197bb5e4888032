"""``splits.json``: cross-validation folds, a held-out test list and nested label subsets (docs/schemas.md).

Written by ``3dino preprocess`` for labelled datasets (``threedino_pipe.training_data.splits.make_splits``);
``finetune --pct P --fold F --seed S`` takes the first round(P % of the fold's training cases) of
``folds[F].subset_order[S]``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.runtime.atomic_files import read_json
from threedino_pipe.runtime.errors import UserError

NNUNET_SPLITS_FORMAT = ('nnU-Net\'s splits_final.json is a list with one object per fold: '
                       '[{"train": ["case_000", ...], "val": ["case_004", ...]}, ...]')


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


class ImportedFold(Record):
    """One fold of nnU-Net's ``splits_final.json`` (``plan --splits-from``): training and validation case ids."""

    train: list[str] = Field(min_length=1)
    val: list[str] = Field(min_length=1)

    @classmethod
    def read_nnunet(cls, path: str | Path) -> list[ImportedFold]:
        """The folds of an nnU-Net ``splits_final.json`` (a list of ``{"train": [...], "val": [...]}``).

        Raises:
            UserError: the file is missing, not JSON, not such a list, or a fold lacks a list of ids.
        """
        data = read_json(path)
        if not isinstance(data, list) or not data:
            raise UserError("not a list of folds", file=path, fix=NNUNET_SPLITS_FORMAT)
        folds = []
        for index, item in enumerate(data):
            try:
                folds.append(cls.model_validate(item))
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"]) or "(the fold)"
                raise UserError(f"fold {index}: '{where}' {error['msg'].lower()}", file=path,
                                fix=NNUNET_SPLITS_FORMAT) from None
        return folds
