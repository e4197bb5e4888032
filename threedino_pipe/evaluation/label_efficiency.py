"""Label-efficiency statistics of a study: per backbone entry and label share (``pct``), over test cases.

The input is the study's ``per_case.csv`` as a DataFrame: one row per cell (``entry``, ``pct``,
``seed``, ``fold``), test case (``case_id``) and structure (``label``), with the metric columns
(``dice``, ``hd95_mm``). Each case's value is first averaged over the cell's replicates (seeds and
folds), so a case counts once; ``mean_over_labels`` is the per-case mean over the structures.

- :func:`summary_table`: mean and median over cases, 95 % percentile bootstrap CI of the mean over cases
  (``evaluation.statistics.summarize``).
- :func:`tests_table`: per metric, structure and pct, each entry against the reference entry: two-sided
  paired Wilcoxon signed-rank over the cases, matched-pairs rank-biserial effect size, Holm's correction over
  every comparison of one metric.
- :func:`labels_needed_table`: the smallest pct at which an entry's mean reaches the reference's mean at
  100 %, linear in log(pct) between grid points, with a bootstrap CI over cases.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from threedino_pipe.evaluation.statistics import CONFIDENCE, holm, paired_wilcoxon, rank_biserial, summarize

#: metric -> True when higher is better
METRICS = {"dice": True, "hd95_mm": False}
MEAN_LABEL = "mean_over_labels"
FULL_PCT = 100.0
SUMMARY_COLUMNS = ["metric", "label", "entry", "pct", "mean", "median", "ci95_lo", "ci95_hi", "n_cases", "n_nan",
                   "n_runs", "ci_unreliable"]


def case_means(per_case: pd.DataFrame, metrics: Sequence[str] = tuple(METRICS)) -> pd.DataFrame:
    """Long table ``entry, pct, label, metric, case_id, value, n_runs``: each case's value averaged over the
    cell's seeds and folds (NaNs left out), plus the rows of label :data:`MEAN_LABEL` (per run and case the
    mean over the structures, then averaged over the runs)."""
    runs = ["entry", "pct", "seed", "fold", "case_id"]
    mean_rows = per_case.groupby(runs, sort=False)[list(metrics)].mean().reset_index()
    mean_rows["label"] = MEAN_LABEL
    both = pd.concat([per_case[[*runs, "label", *metrics]], mean_rows], ignore_index=True)
    long = both.melt(id_vars=[*runs, "label"], value_vars=list(metrics), var_name="metric", value_name="value")
    keys = ["entry", "pct", "label", "metric", "case_id"]
    grouped = long.groupby(keys, sort=False)
    out = grouped["value"].mean().reset_index()
    out["n_runs"] = grouped["value"].size().to_numpy()
    return out


def summary_table(means: pd.DataFrame, *, num_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per metric, structure, entry and pct: ``mean``, ``median``, ``ci95_lo``, ``ci95_hi`` (bootstrap over
    cases of the seed-averaged values), ``n_cases`` (finite), ``n_nan``, ``n_runs`` (seeds x folds),
    ``ci_unreliable`` (fewer than 5 cases)."""
    rows = []
    for (metric, label, entry, pct), group in means.groupby(["metric", "label", "entry", "pct"], sort=False):
        stats = summarize(group["value"].to_numpy(), num_resamples=num_resamples, seed=seed)
        rows.append({"metric": metric, "label": label, "entry": entry, "pct": pct, "mean": stats["mean"],
                     "median": stats["median"], "ci95_lo": stats["ci95"][0], "ci95_hi": stats["ci95"][1],
                     "n_cases": stats["n"], "n_nan": stats["n_nan"], "n_runs": int(group["n_runs"].max()),
                     "ci_unreliable": stats["ci_unreliable"]})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _paired(means: pd.DataFrame, metric: str, label: str, pct: float, entry: str) -> pd.Series:
    rows = means[(means["metric"] == metric) & (means["label"] == label) & (means["pct"] == pct)
                 & (means["entry"] == entry)]
    return rows.set_index("case_id")["value"]


def tests_table(means: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Each entry against ``reference`` per metric, structure and pct (differences: entry - reference);
    ``p_holm`` is Holm-adjusted over all rows of one metric. Empty when there is nothing to compare."""
    rows = []
    keys = means[["metric", "label", "pct", "entry"]].drop_duplicates()
    for metric, label, pct, entry in keys.itertuples(index=False):
        if entry == reference:
            continue
        ref, other = _paired(means, metric, label, pct, reference), _paired(means, metric, label, pct, entry)
        cases = sorted(set(ref.index) & set(other.index))
        a, b = ref.reindex(cases).to_numpy(), other.reindex(cases).to_numpy()
        test = paired_wilcoxon(a, b)
        diff = b - a
        finite = diff[~np.isnan(diff)]
        rows.append({"metric": metric, "label": label, "pct": pct, "entry": entry, "reference": reference,
                     "n_pairs": test["n_pairs"],
                     "mean_difference": float(finite.mean()) if finite.size else math.nan,
                     "median_difference": float(np.median(finite)) if finite.size else math.nan,
                     "statistic": test["statistic"], "p_value": test["p_value"], "p_holm": math.nan,
                     "min_p_value": test["min_p_value"], "rank_biserial": rank_biserial(a, b),
                     "note": test["note"] or ""})
    table = pd.DataFrame(rows, columns=["metric", "label", "pct", "entry", "reference", "n_pairs",
                                        "mean_difference", "median_difference", "statistic", "p_value", "p_holm",
                                        "min_p_value", "rank_biserial", "note"])
    for metric in table["metric"].unique():
        where = table["metric"] == metric
        table.loc[where, "p_holm"] = holm(table.loc[where, "p_value"].to_numpy(dtype=float))
    return table


def labels_needed(pcts: Sequence[float], means: Sequence[float], target: float,
                  higher_better: bool = True) -> tuple[float, str]:
    """The smallest pct at which the curve ``means`` (over increasing ``pcts``) reaches ``target``.

    Between the grid points around the first crossing the curve is linear in log(pct). Returns
    ``(pct, status)``: ``interpolated``; ``at_or_below`` (already reached at the smallest pct: the answer
    is that pct or less); ``not_reached`` (NaN). Points with a NaN mean are skipped.
    """
    sign = 1.0 if higher_better else -1.0
    points = [(p, sign * m) for p, m in zip(pcts, means, strict=True) if not math.isnan(m)]
    goal = sign * target
    if math.isnan(goal) or not points:
        return math.nan, "not_reached"
    if points[0][1] >= goal:
        return float(points[0][0]), "at_or_below"
    for (p0, m0), (p1, m1) in zip(points, points[1:], strict=False):
        if m1 >= goal:
            fraction = (goal - m0) / (m1 - m0)
            return float(math.exp(math.log(p0) + fraction * (math.log(p1) - math.log(p0)))), "interpolated"
    return math.nan, "not_reached"


def _case_matrix(means: pd.DataFrame, metric: str, label: str, entry: str, pcts: Sequence[float],
                 cases: Sequence[str]) -> np.ndarray:
    """(cases, pcts) of the seed-averaged values of one entry (NaN where absent)."""
    rows = means[(means["metric"] == metric) & (means["label"] == label) & (means["entry"] == entry)]
    table = rows.pivot_table(index="case_id", columns="pct", values="value", aggfunc="mean", dropna=False)
    return table.reindex(index=list(cases), columns=list(pcts)).to_numpy(dtype=np.float64)


def _column_means(matrix: np.ndarray) -> np.ndarray:
    """Mean of each column over its finite values (NaN for a column without any, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(matrix, axis=0)


def needed_ci(curve: Callable[[str, np.ndarray], np.ndarray], entries: Sequence[str], num_cases: int,
              reference: str, pcts: list[float], higher: bool, num_resamples: int,
              seed: int) -> dict[str, tuple[list[float], int]]:
    """Per entry: the percentile bootstrap CI of labels-needed over resampled cases, and how many resamples
    did not reach the target (left out of the interval). ``curve(entry, index)`` is the entry's value at each
    of ``pcts`` on the cases ``index`` (n,) (the same resampled cases for every entry and the target)."""
    rng = np.random.default_rng(seed)
    full = pcts.index(FULL_PCT)
    samples = {entry: [] for entry in entries}
    for _ in range(num_resamples):
        index = rng.integers(0, num_cases, size=num_cases)
        curves = {entry: curve(entry, index) for entry in entries}
        target = curves[reference][full]
        for entry, values in curves.items():
            samples[entry].append(labels_needed(pcts, values.tolist(), float(target), higher)[0])
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    out = {}
    for entry, values in samples.items():
        data = np.asarray(values)
        finite = data[~np.isnan(data)]
        ci = ([float(v) for v in np.percentile(finite, [tail, 100.0 - tail])] if finite.size
              else [math.nan, math.nan])
        out[entry] = (ci, int(data.size - finite.size))
    return out


def needed_row(metric: str, label: str, entry: str, reference: str, target: float, curve: np.ndarray,
               pcts: list[float], higher: bool, ci: tuple[list[float], int], num_resamples: int) -> dict:
    """One row of labels_needed.csv: the entry's curve against ``target`` (:func:`labels_needed`) and its CI."""
    needed, status = labels_needed(pcts, curve.tolist(), target, higher)
    (lo, hi), missed = ci
    return {"metric": metric, "label": label, "entry": entry, "reference": reference, "target": target,
            "pct_needed": needed, "status": status, "ci95_lo": lo, "ci95_hi": hi, "n_not_reached": missed,
            "num_resamples": num_resamples}


NEEDED_COLUMNS = ["metric", "label", "entry", "reference", "target", "pct_needed", "status", "ci95_lo", "ci95_hi",
                  "n_not_reached", "num_resamples"]


def labels_needed_table(means: pd.DataFrame, reference: str, *, num_resamples: int = 1000,
                        seed: int = 0) -> pd.DataFrame:
    """Per metric, structure and entry: ``pct_needed`` for the entry's mean to reach the reference's 100 %
    mean (:func:`labels_needed`), its ``status``, a bootstrap CI over cases (``ci95_lo``, ``ci95_hi``;
    ``n_not_reached`` resamples left out). Empty when 100 is not among the study's pcts."""
    pcts = sorted(float(p) for p in means["pct"].unique())
    if FULL_PCT not in pcts:
        return pd.DataFrame(columns=NEEDED_COLUMNS)
    rows = []
    cases = sorted(means["case_id"].unique())
    entries = list(dict.fromkeys(means["entry"]))
    for metric, label in means[["metric", "label"]].drop_duplicates().itertuples(index=False):
        higher = METRICS.get(metric, True)
        matrices = {entry: _case_matrix(means, metric, label, entry, pcts, cases) for entry in entries}
        curves = {entry: _column_means(m) for entry, m in matrices.items()}
        target = float(curves[reference][pcts.index(FULL_PCT)])
        cis = needed_ci(lambda entry, index, m=matrices: _column_means(m[entry][index]), entries, len(cases),
                        reference, pcts, higher, num_resamples, seed)
        rows += [needed_row(metric, label, entry, reference, target, curves[entry], pcts, higher, cis[entry],
                            num_resamples) for entry in entries]
    return pd.DataFrame(rows, columns=NEEDED_COLUMNS)
