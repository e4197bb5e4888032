"""Label-efficiency statistics of a classification study: AUC, F1 and accuracy per backbone entry and pct.

The input is the study's ``per_case.csv`` of a classification dataset as a DataFrame: one row per cell
(``entry``, ``pct``, ``seed``, ``fold``) and test case (``case_id``) with evaluate's classification columns
(``reference``, ``predicted_class``, ``correct``, ``prob_<class>`` in class order). AUC is not a per-case
value, so "each case averaged over seeds" means: each case's predicted probabilities are averaged over the
cell's replicates (seeds and folds) and the predicted class is the most probable one of that mean; with one
seed and fold this is exactly the cell's own evaluation.

- :func:`summary_table`: every metric (``evaluation.summary.classification_metrics_summary``: value on all
  cases, 95 % percentile bootstrap CI over cases).
- :func:`tests_table`: per pct, each entry against the reference entry: paired bootstrap of the macro AUC
  difference over the test cases (``evaluation.statistics.paired_bootstrap_difference``), Holm's correction
  over every comparison.
- :func:`labels_needed_table`: the smallest pct at which an entry's macro AUC reaches the reference's macro
  AUC at 100 % (``label_efficiency.labels_needed``), with a bootstrap CI over cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from threedino_pipe.evaluation import label_efficiency as le
from threedino_pipe.evaluation.classification import ClassificationResult
from threedino_pipe.evaluation.classification_metrics import fast_metrics
from threedino_pipe.evaluation.statistics import holm, paired_bootstrap_difference
from threedino_pipe.evaluation.summary import classification_metrics_summary

PROB = "prob_"
#: metric -> the key of its headline value (the figure's panels)
HEADLINE = {"auc": "macro", "f1": "macro", "accuracy": "all"}
TITLES = {"auc": "AUC (macro)", "f1": "F1 (macro)", "accuracy": "accuracy"}
COMPARED = ("auc", "macro")  # what tests.csv and labels_needed.csv compare
SUMMARY_COLUMNS = ["metric", "class", "entry", "pct", "value", "ci95_lo", "ci95_hi", "n_cases",
                   "n_undefined_resamples", "n_runs", "ci_unreliable"]
TESTS_COLUMNS = ["metric", "class", "pct", "entry", "reference", "n_pairs", "reference_value", "entry_value",
                 "difference", "ci95_lo", "ci95_hi", "p_value", "p_holm", "n_undefined_resamples", "num_resamples",
                 "note"]


@dataclass(frozen=True)
class Pooled:
    """One (entry, pct): its test cases with the probabilities averaged over the runs (seeds x folds)."""

    result: ClassificationResult
    n_runs: int


def class_names(per_case: pd.DataFrame) -> list[str]:
    """The classes, in order, from the ``prob_<class>`` columns."""
    return [c[len(PROB):] for c in per_case.columns if c.startswith(PROB)]


def pool(per_case: pd.DataFrame) -> dict[tuple[str, float], Pooled]:
    """Per (entry, pct): each case's probabilities averaged over the runs, its reference class, cases sorted."""
    names = class_names(per_case)
    columns = [PROB + n for n in names]
    index = {name: k for k, name in enumerate(names)}
    out = {}
    for (entry, pct), group in per_case.groupby(["entry", "pct"], sort=False):
        runs = group[["seed", "fold"]].drop_duplicates()
        cases = group.groupby("case_id", sort=True)
        probs = cases[columns].mean().to_numpy(dtype=np.float64)
        y_true = np.array([index[str(v)] for v in cases["reference"].first()], dtype=np.int64)
        result = ClassificationResult(class_names=names, case_ids=[str(c) for c in cases.groups], y_true=y_true,
                                      y_pred=probs.argmax(axis=1), probs=probs)
        out[(entry, float(pct))] = Pooled(result, len(runs))
    return out


def summary_table(pooled: dict[tuple[str, float], Pooled], *, num_resamples: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """Per metric, class key (a class, ``macro``, ``all``), entry and pct: ``value`` on every test case, its
    bootstrap CI (``ci95_lo``, ``ci95_hi``), ``n_cases``, ``n_undefined_resamples``, ``n_runs``,
    ``ci_unreliable``."""
    rows = []
    for (entry, pct), item in pooled.items():
        metrics = classification_metrics_summary(item.result, seed=seed, num_resamples=num_resamples)
        for metric, entries in metrics.items():
            for key, e in entries.items():
                rows.append({"metric": metric, "class": key, "entry": entry, "pct": pct, "value": e["value"],
                             "ci95_lo": e["ci95"][0], "ci95_hi": e["ci95"][1], "n_cases": e["n"],
                             "n_undefined_resamples": e["n_undefined_resamples"], "n_runs": item.n_runs,
                             "ci_unreliable": e["ci_unreliable"]})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _compared(result: ClassificationResult, rows: np.ndarray) -> float:
    """The compared metric (macro AUC) on the cases ``rows`` of ``result`` (NaN when undefined)."""
    if rows.size == 0:
        return float("nan")
    metric, key = COMPARED
    return fast_metrics(result.y_true[rows], result.y_pred[rows], result.probs[rows], result.class_names)[metric][key]


def _rows_of(result: ClassificationResult, cases: list[str]) -> np.ndarray:
    """The row of each of ``cases`` in ``result`` (-1 where it has none)."""
    where = {c: k for k, c in enumerate(result.case_ids)}
    return np.array([where.get(c, -1) for c in cases], dtype=np.int64)


def _comparison(ref: ClassificationResult, other: ClassificationResult, num_resamples: int, seed: int) -> dict:
    cases = sorted(set(ref.case_ids) & set(other.case_ids))
    a, b = _rows_of(ref, cases), _rows_of(other, cases)
    if not cases:
        return {"n_pairs": 0, "note": "no case has a prediction on both sides"}
    test = paired_bootstrap_difference(len(cases), lambda i: _compared(ref, a[i]), lambda i: _compared(other, b[i]),
                                       num_resamples=num_resamples, seed=seed)
    every = np.arange(len(cases))
    note = "" if test["n_undefined_resamples"] < num_resamples else "AUC undefined: the cases hold a single class"
    return {"n_pairs": len(cases), "reference_value": _compared(ref, a[every]),
            "entry_value": _compared(other, b[every]),
            "difference": test["difference"], "ci95_lo": test["ci95"][0], "ci95_hi": test["ci95"][1],
            "p_value": test["p_value"], "n_undefined_resamples": test["n_undefined_resamples"], "note": note}


def tests_table(pooled: dict[tuple[str, float], Pooled], reference: str, *, num_resamples: int = 1000,
                seed: int = 0) -> pd.DataFrame:
    """Each entry against ``reference`` per pct: paired bootstrap of the macro AUC difference (entry - reference)
    over the cases both have; ``p_holm`` Holm-adjusted over every row. Empty without a reference to compare."""
    rows = []
    for (entry, pct), item in pooled.items():
        if entry == reference or (reference, pct) not in pooled:
            continue
        rows.append({"metric": COMPARED[0], "class": COMPARED[1], "pct": pct, "entry": entry, "reference": reference,
                     "num_resamples": num_resamples,
                     **_comparison(pooled[(reference, pct)].result, item.result, num_resamples, seed)})
    table = pd.DataFrame(rows, columns=TESTS_COLUMNS)
    table["p_holm"] = holm(table["p_value"].to_numpy(dtype=float))
    return table


def labels_needed_table(pooled: dict[tuple[str, float], Pooled], reference: str, *, num_resamples: int = 1000,
                        seed: int = 0) -> pd.DataFrame:
    """Per entry: ``pct_needed`` for its macro AUC to reach the reference's macro AUC at 100 %, its ``status``
    and a bootstrap CI over the test cases (the same resampled cases for every entry, pct and the target).
    Empty when 100 is not among the pcts or the reference has no result."""
    pcts = sorted({pct for _, pct in pooled})
    columns = [c if c != "label" else "class" for c in le.NEEDED_COLUMNS]
    if le.FULL_PCT not in pcts or (reference, le.FULL_PCT) not in pooled:
        return pd.DataFrame(columns=columns)
    entries = list(dict.fromkeys(entry for entry, _ in pooled))
    cases = sorted({c for item in pooled.values() for c in item.result.case_ids})
    rows_of = {key: _rows_of(item.result, cases) for key, item in pooled.items()}

    def curve(entry: str, index: np.ndarray) -> np.ndarray:
        values = []
        for pct in pcts:
            if (entry, pct) not in pooled:
                values.append(float("nan"))
                continue
            rows = rows_of[(entry, pct)][index]
            values.append(_compared(pooled[(entry, pct)].result, rows[rows >= 0]))
        return np.array(values)

    every = np.arange(len(cases))
    target = float(curve(reference, every)[pcts.index(le.FULL_PCT)])
    cis = le.needed_ci(curve, entries, len(cases), reference, pcts, True, num_resamples, seed)
    rows = [le.needed_row(COMPARED[0], COMPARED[1], entry, reference, target, curve(entry, every), pcts, True,
                          cis[entry], num_resamples) for entry in entries]
    return pd.DataFrame(rows).rename(columns={"label": "class"})[columns]


def figure_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary rows of the figure's panels (each metric's headline key), as the plot reads them (``mean``)."""
    keep = summary[[HEADLINE.get(m) == k for m, k in zip(summary["metric"], summary["class"], strict=True)]]
    return keep.rename(columns={"value": "mean"})
