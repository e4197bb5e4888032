"""Evaluate a folder of predicted label images against a folder of reference label images.

Each case is read with :func:`~threedino_pipe.raw_data.image_io.read_image` (``X x Y x Z``), its
geometry checked against the reference (size exact; spacing, origin, direction within 1e-4), and
Dice/HD95 computed per label and region (:mod:`.segmentation_metrics`). One unreadable or
misplaced prediction fails that case only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from threedino_pipe.artifacts.evaluation_summary import CaseFailure
from threedino_pipe.evaluation.evaluated_files import list_label_images
from threedino_pipe.evaluation.segmentation_metrics import case_metrics, hd95_near_empty
from threedino_pipe.raw_data.image_io import Geometry, read_image
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.progress import track

log = logging.getLogger(__name__)
GEOMETRY_TOLERANCE = 1e-4
COLUMNS = ["case_id", "label", "label_values", "dice", "hd95_mm", "hd95_near_empty", "ref_voxels",
           "pred_voxels", "ref_volume_ml", "pred_volume_ml"]


@dataclass
class SegmentationResult:
    """Per-case metrics of one prediction folder.

    Attributes:
        per_case: one row per (case, label) with :data:`COLUMNS`.
        labels: label name -> values evaluated.
        missing: reference cases without a prediction.
        failed: the predictions that could not be evaluated (case, file, problem).
        ignored: predictions without a reference.
        evaluated: cases whose metrics are in ``per_case``.
    """

    per_case: pd.DataFrame
    labels: dict[str, tuple[int, ...]]
    evaluated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: list[CaseFailure] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def geometry_mismatch(reference: Geometry, prediction: Geometry, tol: float = GEOMETRY_TOLERANCE) -> str | None:
    """A sentence describing how ``prediction`` is placed differently from ``reference``, or None."""
    if tuple(reference.size) != tuple(prediction.size):
        return f"size {list(prediction.size)} differs from the reference's {list(reference.size)}"
    for name in ("spacing", "origin", "direction"):
        ref, pred = np.asarray(getattr(reference, name)), np.asarray(getattr(prediction, name))
        if not np.allclose(ref, pred, rtol=0.0, atol=tol):
            return (f"{name} {np.round(pred, 6).tolist()} differs from the reference's "
                    f"{np.round(ref, 6).tolist()} (tolerance {tol})")
    return None


def _as_labels(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return array
    return np.rint(array).astype(np.int32)


def _inferred_labels(reference: np.ndarray, prediction: np.ndarray) -> dict[str, tuple[int, ...]]:
    values = sorted((set(np.unique(reference).tolist()) | set(np.unique(prediction).tolist())) - {0})
    return {f"label_{v}": (int(v),) for v in values}


def evaluate_case(case_id: str, reference_path: Path, prediction_path: Path,
                  labels: Mapping[str, tuple[int, ...]] | None) -> tuple[list[dict], CaseFailure | None, list[int]]:
    """Metrics of one case.

    Args:
        labels: label name -> values; None infers ``label_<v>`` from the values present.

    Returns:
        (rows, failure or None, label values present in the images but not in ``labels``).
    """
    try:
        reference, ref_geometry = read_image(reference_path)
    except UserError as exc:
        return [], CaseFailure(case_id=case_id, file=str(reference_path), problem=exc.problem), []
    try:
        prediction, pred_geometry = read_image(prediction_path)
    except UserError as exc:
        return [], CaseFailure(case_id=case_id, file=str(prediction_path), problem=exc.problem), []
    mismatch = geometry_mismatch(ref_geometry, pred_geometry)
    if mismatch:
        return [], CaseFailure(case_id=case_id, file=str(prediction_path),
                               problem=f"prediction does not lie on its reference: {mismatch}"), []
    reference, prediction = _as_labels(reference), _as_labels(prediction)
    undeclared: list[int] = []
    if labels is None:
        labels = _inferred_labels(reference, prediction)
    else:
        declared = {v for values in labels.values() for v in values} | {0}
        undeclared = sorted(set(np.unique(prediction).tolist()) - declared)
    rows = case_metrics(reference, prediction, ref_geometry.spacing, labels)
    return [{"case_id": case_id, **row} for row in rows], None, undeclared


def _evaluate_star(args: tuple) -> tuple[list[dict], CaseFailure | None, list[int]]:
    return evaluate_case(*args)


def match_cases(references: dict[str, Path], predictions: dict[str, Path],
                prediction_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """(cases with both, reference cases without prediction, predictions without reference).

    Raises:
        UserError: when no prediction matches any reference case.
    """
    paired = [c for c in references if c in predictions]
    missing = [c for c in references if c not in predictions]
    ignored = [c for c in predictions if c not in references]
    if not paired:
        raise UserError(f"none of the {len(predictions)} predictions matches a reference case (e.g. "
                        f"'{next(iter(predictions))}' vs '{next(iter(references))}')", file=prediction_dir,
                        fix="predictions must be named {case}{ending} like the reference label files")
    for case in ignored:
        log.warning("warning: prediction '%s' has no reference; ignored", case)
    return paired, missing, ignored


def evaluate_folder(reference_dir: Path, prediction_dir: Path, labels: Mapping[str, tuple[int, ...]] | None, *,
                    num_processes: int = 1, references: dict[str, Path] | None = None) -> SegmentationResult:
    """Evaluate every prediction of ``prediction_dir`` that has a reference in ``reference_dir``.

    Args:
        labels: name -> values from dataset.json, or None to evaluate every value found (``label_<v>``).
        num_processes: worker processes (1 = in this process).
        references: the already listed reference files (skips listing ``reference_dir`` again).
    """
    references = references or list_label_images(reference_dir, "reference folder")
    predictions = list_label_images(prediction_dir, "prediction folder")
    paired, missing, ignored = match_cases(references, predictions, prediction_dir)
    for case in missing:
        log.warning("warning: case '%s' has no prediction in %s", case, prediction_dir)
    jobs = [(c, references[c], predictions[c], None if labels is None else dict(labels)) for c in paired]
    description = f"evaluate {prediction_dir.name}"
    if num_processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs))) as pool:
            results = list(track(pool.map(_evaluate_star, jobs), description, total=len(jobs)))
    else:
        results = [evaluate_case(*job) for job in track(jobs, description, total=len(jobs))]
    rows, failed, undeclared, evaluated = [], [], set(), []
    for case, (case_rows, failure, extra) in zip(paired, results, strict=True):
        rows += case_rows
        undeclared.update(extra)
        if failure:
            log.error("error: case '%s': %s (%s)", failure.case_id, failure.problem, failure.file)
            failed.append(failure)
        else:
            evaluated.append(case)
    if undeclared:
        log.warning("warning: predictions hold label values %s that dataset.json does not declare; not evaluated",
                    sorted(undeclared))
    per_case = pd.DataFrame(rows, columns=COLUMNS)
    if labels is None:
        labels = {name: tuple(int(v) for v in values.split("+")) for name, values in
                  sorted(set(zip(per_case["label"], per_case["label_values"], strict=True)),
                         key=lambda item: [int(v) for v in item[1].split("+")])}
        per_case = fill_absent_labels(per_case, labels, evaluated)
        if not labels and evaluated:
            log.warning("warning: every reference and prediction is background only: no label to evaluate "
                        "(pass -d to evaluate the dataset's labels)")
    return SegmentationResult(per_case=per_case, labels=dict(labels), evaluated=evaluated, missing=missing,
                              failed=failed, ignored=ignored)


def fill_absent_labels(per_case: pd.DataFrame, labels: Mapping[str, tuple[int, ...]],
                       cases: list[str] | None = None) -> pd.DataFrame:
    """Add rows (Dice and HD95 NaN, no voxels) for labels absent from both images of a case.

    Args:
        cases: the cases to complete (default: those in ``per_case``).
    """
    have = set(zip(per_case["case_id"], per_case["label"], strict=True))
    extra = [{"case_id": case, "label": name, "label_values": "+".join(map(str, values)), "dice": np.nan,
              "hd95_mm": np.nan, "hd95_near_empty": False, "ref_voxels": 0, "pred_voxels": 0, "ref_volume_ml": 0.0,
              "pred_volume_ml": 0.0}
             for case in (cases if cases is not None else dict.fromkeys(per_case["case_id"]))
             for name, values in labels.items() if (case, name) not in have]
    if extra:
        per_case = pd.concat([per_case, pd.DataFrame(extra, columns=COLUMNS)], ignore_index=True)
    order = {name: i for i, name in enumerate(labels)}
    per_case = per_case.assign(_o=per_case["label"].map(order))
    return per_case.sort_values(["case_id", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def with_near_empty_flags(per_case: pd.DataFrame) -> pd.DataFrame:
    """``per_case`` with its ``hd95_near_empty`` column, derived from the voxel counts where a
    ``per_case.csv`` written before the flag existed lacks it."""
    if "hd95_near_empty" in per_case.columns:
        return per_case
    flags = hd95_near_empty(per_case["ref_voxels"].to_numpy(), per_case["pred_voxels"].to_numpy())
    return per_case.assign(hd95_near_empty=np.asarray(flags, dtype=bool) & per_case["hd95_mm"].notna().to_numpy())
