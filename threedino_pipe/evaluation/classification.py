"""Evaluate classification predictions (``predictions.csv``) against a ``case_id,label`` CSV."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from threedino_pipe.evaluation.classification_metrics import classification_metrics
from threedino_pipe.evaluation.evaluated_files import read_predictions, read_reference_csv
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ClassificationResult:
    """Reference and prediction of every case that has both.

    Attributes:
        class_names: K class names (index = class id).
        case_ids: the n evaluated cases.
        y_true, y_pred: (n,) class indices.
        probs: (n, K) predicted probabilities.
        missing: reference cases without a prediction; ignored: predictions without a reference.
    """

    class_names: list[str]
    case_ids: list[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def per_case(self) -> pd.DataFrame:
        """``case_id, reference, predicted_class, correct, prob_<class>...`` (class names, not indices)."""
        table = pd.DataFrame({"case_id": self.case_ids,
                              "reference": [self.class_names[i] for i in self.y_true],
                              "predicted_class": [self.class_names[i] for i in self.y_pred],
                              "correct": self.y_true == self.y_pred})
        for c, name in enumerate(self.class_names):
            table[f"prob_{name}"] = self.probs[:, c]
        return table

    def metrics(self) -> dict[str, dict[str, float]]:
        """Point estimates on all evaluated cases (see :func:`classification_metrics`)."""
        return classification_metrics(self.y_true, self.y_pred, self.probs, self.class_names)


def evaluate_csv(reference_csv: Path, predictions: Path, class_names: list[str] | None) -> ClassificationResult:
    """Match ``predictions.csv`` (a file or a folder holding it) with the reference CSV.

    Args:
        class_names: from dataset.json, or None to take them from the ``prob_<class>`` columns.

    Raises:
        UserError: bad CSVs, or no prediction matching any reference case.
    """
    pred = read_predictions(predictions, class_names)
    reference = read_reference_csv(reference_csv, pred.class_names)
    index = {c: i for i, c in enumerate(pred.case_ids)}
    paired = [c for c in reference if c in index]
    missing = [c for c in reference if c not in index]
    ignored = [c for c in pred.case_ids if c not in reference]
    if not paired:
        raise UserError(f"none of the {len(pred.case_ids)} predicted cases is in the reference CSV", file=pred.path,
                        fix=f"check that case_id values match those of {reference_csv}")
    for case in ignored:
        log.warning("warning: prediction '%s' has no reference; ignored", case)
    for case in missing:
        log.warning("warning: case '%s' has no prediction in %s", case, pred.path)
    rows = [index[c] for c in paired]
    return ClassificationResult(class_names=pred.class_names, case_ids=paired,
                                y_true=np.array([reference[c] for c in paired], dtype=np.int64),
                                y_pred=pred.predicted[rows].astype(np.int64), probs=pred.probs[rows],
                                missing=missing, ignored=ignored)
