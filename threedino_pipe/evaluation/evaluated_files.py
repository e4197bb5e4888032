"""Finding and reading evaluation inputs: label-image folders and classification CSVs.

- A label-image folder holds one file per case, ``{case}{ending}`` with a SimpleITK format
  (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``); other files (JSON, CSV,
  probabilities) and sub-folders are ignored.
- A classification reference is a ``case_id,label`` CSV (label = class name or class index).
- Classification predictions are ``predictions.csv`` (``case_id``, ``predicted_class``,
  ``prob_<class>`` per class; docs/schemas.md), or a folder holding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from threedino_pipe.artifacts import DatasetJson
from threedino_pipe.runtime.errors import UserError

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PREDICTIONS_CSV = "predictions.csv"


def require_folder(path: Path, what: str) -> Path:
    """``path`` if it is an existing folder, else a :class:`UserError`."""
    if not path.exists():
        raise UserError(f"{what} not found", file=path, fix="check the path")
    if not path.is_dir():
        raise UserError(f"{what} must be a folder", file=path, fix="pass the folder that holds the files")
    return path


def _case_of(name: str) -> str | None:
    lower = name.lower()
    for ending in IMAGE_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def list_label_images(folder: Path, what: str) -> dict[str, Path]:
    """Case id -> label image of a folder (sorted by case id).

    Raises:
        UserError: the folder is missing, holds no label image, or holds one case twice.
    """
    require_folder(folder, what)
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        case = _case_of(entry.name)
        if case is None:
            continue
        if case in found:
            raise UserError(f"case '{case}' has two files: {found[case].name} and {entry.name}", file=folder,
                            fix="keep one file per case")
        found[case] = entry
    if not found:
        raise UserError(f"{what} holds no label image ({', '.join(IMAGE_ENDINGS)})", file=folder,
                        fix="pass the folder that holds one label image per case")
    return dict(sorted(found.items()))


def dataset_labels(spec: DatasetJson) -> dict[str, tuple[int, ...]]:
    """Labels and regions of a dataset.json to evaluate: name -> values (background excluded)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, value in spec.labels.items():
        values = tuple(value) if isinstance(value, list) else (int(value),)
        if values != (0,):
            out[name] = values
    return out


def _read_csv(path: Path, what: str, required: tuple[str, ...], fix: str) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{what} not found", file=path, fix=fix)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} is not a readable CSV ({str(exc).strip()[:120]})", file=path, fix=fix) from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise UserError(f"{what} lacks column(s) {', '.join(missing)} (columns: {', '.join(table.columns)})",
                        file=path, fix=fix)
    if table.empty:
        raise UserError(f"{what} has no rows", file=path, fix=fix)
    table["case_id"] = table["case_id"].str.strip()
    duplicated = sorted(set(table["case_id"][table["case_id"].duplicated()]))
    if duplicated:
        raise UserError(f"{what} lists case(s) more than once: {', '.join(duplicated[:5])}", file=path,
                        fix="keep one row per case")
    return table


def class_index(value: str, class_names: list[str], path: Path, case: str) -> int:
    """A class given by name or index -> its index, else a :class:`UserError` naming the row."""
    value = value.strip()
    if value in class_names:
        return class_names.index(value)
    if value.isdigit() and int(value) < len(class_names):
        return int(value)
    raise UserError(f"case '{case}': class '{value}' is not one of {', '.join(class_names)} (or an index 0.."
                    f"{len(class_names) - 1})", file=path, fix="use a declared class name or index")


def prediction_csv_path(path: Path) -> Path:
    """``predictions.csv`` inside a folder, or the file itself."""
    if not path.exists():
        raise UserError("predictions not found", file=path, fix="check the path")
    return path / PREDICTIONS_CSV if path.is_dir() else path


@dataclass
class Predictions:
    """Parsed ``predictions.csv``: ``case_ids`` (n,), ``predicted`` (n,) class indices, ``probs`` (n, K)."""

    path: Path
    class_names: list[str]
    case_ids: list[str]
    predicted: np.ndarray
    probs: np.ndarray


def read_predictions(path: Path, class_names: list[str] | None) -> Predictions:
    """Read ``predictions.csv``; classes come from ``class_names`` or, if None, the ``prob_*`` columns.

    Raises:
        UserError: missing file or column, unknown class, non-numeric probability.
    """
    path = prediction_csv_path(path)
    fix = "write case_id,predicted_class and one prob_<class> column per class (docs/schemas.md)"
    table = _read_csv(path, "predictions.csv", ("case_id", "predicted_class"), fix)
    prob_columns = [c for c in table.columns if c.startswith("prob_")]
    if class_names is None:
        if len(prob_columns) < 2:
            raise UserError("predictions.csv needs one prob_<class> column per class (found "
                            f"{len(prob_columns)})", file=path, fix=fix)
        class_names = [c[len("prob_"):] for c in prob_columns]
    missing = [f"prob_{c}" for c in class_names if f"prob_{c}" not in table.columns]
    if missing:
        raise UserError(f"predictions.csv lacks column(s) {', '.join(missing)}", file=path, fix=fix)
    try:
        probs = table[[f"prob_{c}" for c in class_names]].astype(np.float64).to_numpy()
    except ValueError as exc:
        raise UserError(f"a probability is not a number ({exc})", file=path, fix=fix) from None
    if not np.isfinite(probs).all():
        raise UserError("a probability is missing, NaN or infinite", file=path, fix=fix)
    predicted = np.array([class_index(v, class_names, path, c) for c, v in zip(table["case_id"],
                                                                              table["predicted_class"], strict=True)])
    return Predictions(path=path, class_names=list(class_names), case_ids=list(table["case_id"]),
                       predicted=predicted, probs=probs)


def read_reference_csv(path: Path, class_names: list[str]) -> dict[str, int]:
    """Case id -> reference class index from a ``case_id,label`` CSV."""
    table = _read_csv(path, "reference CSV", ("case_id", "label"),
                      "give a CSV whose first line is case_id,label (label = class name or index)")
    return {c: class_index(v, class_names, path, c) for c, v in zip(table["case_id"], table["label"], strict=True)}
