"""Metric summaries of one evaluation: per label (segmentation) or per class (classification).

Segmentation entries: ``{"mean", "median", "ci95": [lo, hi], "n", "n_nan", "ci_unreliable"}`` over
cases, HD95 entries with ``n_near_empty`` (cases whose HD95 is flagged ``hd95_near_empty``).
Classification entries: ``{"value", "ci95": [lo, hi], "n", "n_undefined_resamples",
"ci_unreliable"}``, the value on all cases and a bootstrap CI over cases. ``ci_unreliable``: fewer
than :data:`~.statistics.MIN_CASES_FOR_CI` cases.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from threedino_pipe.evaluation.classification import ClassificationResult
from threedino_pipe.evaluation.classification_metrics import fast_metrics
from threedino_pipe.evaluation.statistics import bootstrap_statistic_ci, ci_unreliable, summarize

SEGMENTATION_METRICS = ("dice", "hd95_mm")
NEAR_EMPTY_COLUMN = "hd95_near_empty"


def foreground_mean(per_case: pd.DataFrame, metric: str) -> pd.Series:
    """Per case, the mean of ``metric`` over its labels (NaNs skipped; NaN if all are NaN)."""
    return per_case.groupby("case_id", sort=False)[metric].mean()


def near_empty_cases(flags: pd.Series, hd95: pd.Series) -> int:
    """How many finite HD95 values (aligned with ``flags``) are flagged as computed on a near-empty mask."""
    return int((flags.fillna(False).astype(bool) & hd95.notna()).sum())


def segmentation_metrics_summary(per_case: pd.DataFrame, labels: list[str], *, seed: int = 0,
                                 num_resamples: int = 1000) -> tuple[dict, dict]:
    """(``{metric: {label: entry}}``, ``{metric: entry}`` of the per-case mean over labels).

    HD95 entries also count ``n_near_empty``: per label the flagged cases, over labels the cases
    with a flagged label.
    """
    metrics, mean_over_labels = {}, {}
    for metric in SEGMENTATION_METRICS:
        metrics[metric] = {name: summarize(per_case.loc[per_case["label"] == name, metric].to_numpy(),
                                           num_resamples=num_resamples, seed=seed) for name in labels}
        mean_over_labels[metric] = summarize(foreground_mean(per_case, metric).to_numpy(),
                                             num_resamples=num_resamples, seed=seed)
    for name in labels:
        rows = per_case[per_case["label"] == name]
        metrics["hd95_mm"][name]["n_near_empty"] = near_empty_cases(rows[NEAR_EMPTY_COLUMN], rows["hd95_mm"])
    flagged = per_case[NEAR_EMPTY_COLUMN].fillna(False).astype(bool) & per_case["hd95_mm"].notna()
    mean_over_labels["hd95_mm"]["n_near_empty"] = int(flagged.groupby(per_case["case_id"]).any().sum())
    return metrics, mean_over_labels


def _flatten(metrics: dict[str, dict[str, float]]) -> list[tuple[str, str, float]]:
    return [(m, k, v) for m, entries in metrics.items() for k, v in entries.items()]


def classification_metrics_summary(result: ClassificationResult, *, seed: int = 0,
                                   num_resamples: int = 1000) -> dict:
    """``{metric: {class | "macro" | "all": entry}}`` with a bootstrap CI over cases."""
    point = _flatten(result.metrics())

    def statistic(index: np.ndarray) -> np.ndarray:
        values = fast_metrics(result.y_true[index], result.y_pred[index], result.probs[index], result.class_names)
        return np.array([v for _, _, v in _flatten(values)])

    cis, undefined = bootstrap_statistic_ci(len(result.case_ids), statistic, num_resamples=num_resamples, seed=seed)
    out: dict[str, dict] = {}
    for (metric, key, value), ci, n_undefined in zip(point, cis, undefined, strict=True):
        out.setdefault(metric, {})[key] = {"value": value, "ci95": ci, "n": len(result.case_ids),
                                           "n_undefined_resamples": n_undefined,
                                           "ci_unreliable": ci_unreliable(len(result.case_ids))}
    return out
