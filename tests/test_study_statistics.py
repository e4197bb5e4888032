"""The study's statistics on known tables: Wilcoxon against scipy, Holm and the rank-biserial effect size by
hand, labels-needed on synthetic curves with known answers (issue 17)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from threedino_pipe.evaluation import label_efficiency as le
from threedino_pipe.evaluation.statistics import holm, paired_bootstrap_difference, rank_biserial


def test_holm_on_a_known_table():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([math.nan, 0.02, 0.5, 0.9])  # NaN is not counted: m = 3
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.06, 1.0, 1.0])


def test_rank_biserial_on_a_known_table():
    a = np.zeros(5)
    b = np.array([1.0, 2.0, -3.0, 4.0, 0.0])  # the zero difference is dropped; R+ = 1 + 2 + 4, R- = 3
    assert rank_biserial(a, b) == pytest.approx(0.4)
    assert rank_biserial(a, a + 1) == 1.0 and math.isnan(rank_biserial(a, a))


def _per_case(values: dict[tuple[str, float, int], list[float]]) -> pd.DataFrame:
    """A study per_case table with one structure ``gm``: (backbone, pct, seed) -> Dice of cases c0, c1, ..."""
    rows = []
    for (entry, pct, seed), dice in values.items():
        for index, value in enumerate(dice):
            rows.append({"entry": entry, "pct": pct, "seed": seed, "fold": 0, "case_id": f"c{index}", "label": "gm",
                         "dice": value, "hd95_mm": 10 * (1 - value)})
    return pd.DataFrame(rows)


def test_tests_table_is_scipys_wilcoxon_on_seed_means_with_holm_over_one_metric():
    rng = np.random.default_rng(3)
    values = {}
    for pct in (25.0, 100.0):
        for seed in (0, 1):
            base = rng.uniform(0.4, 0.8, 9)
            values[("none", pct, seed)] = list(base)
            values[("dino", pct, seed)] = list(base + rng.normal(0.05, 0.03, 9))
    table = le.tests_table(le.case_means(_per_case(values)), "none")
    dice = table[(table["metric"] == "dice") & (table["label"] == "gm")].sort_values("pct")
    p_values = []
    for row in dice.itertuples():
        ref = np.mean([values[("none", row.pct, s)] for s in (0, 1)], axis=0)
        other = np.mean([values[("dino", row.pct, s)] for s in (0, 1)], axis=0)
        expected = stats.wilcoxon(ref, other)
        assert row.p_value == pytest.approx(expected.pvalue) and row.statistic == pytest.approx(expected.statistic)
        assert row.n_pairs == 9 and row.mean_difference == pytest.approx(np.mean(other - ref))
        assert row.rank_biserial == pytest.approx(rank_biserial(ref, other))
    every_dice = table[table["metric"] == "dice"]  # gm and mean_over_labels at both pcts: one family of 4
    assert len(every_dice) == 4
    p_values = every_dice["p_value"].to_numpy()
    assert every_dice["p_holm"].to_numpy() == pytest.approx(holm(p_values))


def test_labels_needed_on_synthetic_curves():
    pcts = [10.0, 25.0, 50.0, 100.0]
    needed, status = le.labels_needed(pcts, [0.5, 0.6, 0.7, 0.8], 0.65)
    assert status == "interpolated" and needed == pytest.approx(math.sqrt(25 * 50))  # halfway in log(pct)
    needed, status = le.labels_needed(pcts, [10.0, 8.0, 6.0, 4.0], 7.0, higher_better=False)  # HD95: lower wins
    assert status == "interpolated" and needed == pytest.approx(math.sqrt(25 * 50))
    assert le.labels_needed(pcts, [0.9, 0.9, 0.9, 0.9], 0.8) == (10.0, "at_or_below")
    needed, status = le.labels_needed(pcts, [0.1, 0.2, 0.3, 0.4], 0.8)
    assert math.isnan(needed) and status == "not_reached"
    needed, _ = le.labels_needed(pcts, [0.5, math.nan, 0.7, 0.8], 0.6)  # a missing point is skipped
    assert needed == pytest.approx(math.sqrt(10 * 50))


def test_labels_needed_table_with_a_known_answer_and_its_bootstrap_interval():
    pcts = (10.0, 25.0, 50.0, 100.0)
    none = dict(zip(pcts, (0.3, 0.5, 0.6, 0.7), strict=True))
    dino = dict(zip(pcts, (0.5, 0.6, 0.8, 0.85), strict=True))  # reaches none's 0.7 halfway from 25 to 50 %
    values = {}
    for pct in pcts:
        values[("none", pct, 0)] = [none[pct]] * 6  # every case the same: the bootstrap cannot move the answer
        values[("dino", pct, 0)] = [dino[pct]] * 6
    table = le.labels_needed_table(le.case_means(_per_case(values)), "none", num_resamples=50)
    row = table[(table["metric"] == "dice") & (table["label"] == "gm") & (table["entry"] == "dino")].iloc[0]
    assert row.status == "interpolated" and row.target == pytest.approx(0.7)
    assert row.pct_needed == pytest.approx(math.sqrt(25 * 50))
    assert [row.ci95_lo, row.ci95_hi] == pytest.approx([math.sqrt(25 * 50)] * 2) and row.n_not_reached == 0
    own = table[(table["metric"] == "dice") & (table["label"] == "gm") & (table["entry"] == "none")].iloc[0]
    assert own.pct_needed == pytest.approx(100.0)
    assert le.labels_needed_table(le.case_means(_per_case({("none", 50.0, 0): [0.5]})), "none").empty  # no 100 %


def test_summary_is_the_bootstrap_over_seed_averaged_cases():
    values = {("none", 100.0, 0): [0.2, 0.4, 0.6, 0.8, 1.0], ("none", 100.0, 1): [0.4, 0.6, 0.8, 1.0, 1.0]}
    summary = le.summary_table(le.case_means(_per_case(values)), num_resamples=200)
    row = summary[(summary["metric"] == "dice") & (summary["label"] == "gm")].iloc[0]
    averaged = np.array([0.3, 0.5, 0.7, 0.9, 1.0])
    assert row["mean"] == pytest.approx(averaged.mean()) and row["median"] == pytest.approx(0.7)
    assert row["n_cases"] == 5 and row["n_runs"] == 2 and row["ci95_lo"] < row["mean"] < row["ci95_hi"]


# ----- classification studies: the paired bootstrap of the AUC difference ----------------------------------
def _auc(y: np.ndarray, scores: np.ndarray):
    from sklearn.metrics import roc_auc_score
    return lambda index: float(roc_auc_score(y[index], scores[index])) if len(set(y[index])) == 2 else math.nan


def test_paired_bootstrap_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(0)
    y, scores = np.tile([0, 1], 10), rng.uniform(size=20)
    test = paired_bootstrap_difference(20, _auc(y, scores), _auc(y, scores.copy()), num_resamples=300)
    assert test["difference"] == 0.0 and test["ci95"] == [0.0, 0.0] and test["p_value"] == 1.0


def test_paired_bootstrap_ci_excludes_zero_for_a_clearly_better_predictor():
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 15)
    noise, good = rng.uniform(size=30), y + rng.normal(0, 0.3, 30)  # AUC about 0.5 against about 0.99
    test = paired_bootstrap_difference(30, _auc(y, noise), _auc(y, good), num_resamples=500, seed=2)
    assert test["difference"] == pytest.approx(_auc(y, good)(np.arange(30)) - _auc(y, noise)(np.arange(30)))
    assert 0 < test["ci95"][0] < test["difference"] < test["ci95"][1]
    assert test["p_value"] == pytest.approx(2 / 501)  # no resample at or below zero: the smallest p of 500
    worse = paired_bootstrap_difference(30, _auc(y, good), _auc(y, noise), num_resamples=500, seed=2)
    assert worse["ci95"] == pytest.approx([-test["ci95"][1], -test["ci95"][0]])  # the same resamples, mirrored


def _classification_per_case(probs: dict[tuple[str, float, int], list[float]], y: list[int]) -> pd.DataFrame:
    """A classification study's per_case table, classes a and b: (entry, pct, seed) -> P(b) of cases c0, c1, ..."""
    rows = []
    for (entry, pct, seed), p_b in probs.items():
        for index, (p, cls) in enumerate(zip(p_b, y, strict=True)):
            rows.append({"entry": entry, "pct": pct, "seed": seed, "fold": 0, "case_id": f"c{index:02d}",
                         "reference": "ab"[cls], "predicted_class": "ab"[int(p > 0.5)], "correct": int(p > 0.5) == cls,
                         "prob_a": 1 - p, "prob_b": p})
    return pd.DataFrame(rows)


def test_classification_tables_average_seeds_per_case_and_compare_the_auc():
    from threedino_pipe.evaluation import label_efficiency_classification as lec
    from threedino_pipe.evaluation.classification_metrics import classification_metrics
    rng = np.random.default_rng(4)
    y = [0, 1] * 8
    probs = {}
    for pct in (50.0, 100.0):
        for seed in (0, 1):
            probs[("none", pct, seed)] = list(rng.uniform(size=16)) if pct == 50 else [0.5] * 16  # AUC 0.5: ties
            probs[("dino", pct, seed)] = list(np.clip(np.array(y) * 0.6 + rng.uniform(0, 0.4, 16), 0, 1))
    pooled = lec.pool(_classification_per_case(probs, y))
    summary = lec.summary_table(pooled, num_resamples=100)
    averaged = np.mean([probs[("dino", 50.0, s)] for s in (0, 1)], axis=0)
    expected = classification_metrics(np.array(y), (averaged > 0.5).astype(int),
                                      np.stack([1 - averaged, averaged], 1), ["a", "b"])
    row = summary.set_index(["metric", "class", "entry", "pct"]).loc[("auc", "macro", "dino", 50.0)]
    assert row["value"] == pytest.approx(expected["auc"]["macro"]) and row["n_runs"] == 2 and row["n_cases"] == 16
    accuracy = summary.set_index(["metric", "class", "entry", "pct"]).loc[("accuracy", "all", "dino", 50.0)]
    assert accuracy["value"] == pytest.approx(expected["accuracy"]["all"])
    tests = lec.tests_table(pooled, "none", num_resamples=200)
    assert len(tests) == 2 and set(tests["entry"]) == {"dino"} and (tests["n_pairs"] == 16).all()
    assert (tests["difference"] == tests["entry_value"] - tests["reference_value"]).all()
    assert (tests["ci95_lo"] > 0).all()  # the informative probabilities beat the random ones at both pcts
    full = tests.set_index("pct").loc[100.0]  # AUC 1 against 0.5 on every resample (both classes always drawn)
    assert full["difference"] == 0.5 and [full["ci95_lo"], full["ci95_hi"]] == [0.5, 0.5]
    assert full["p_value"] == pytest.approx(2 / 201)
    assert tests["p_holm"].to_numpy() == pytest.approx(holm(tests["p_value"].to_numpy()))


def test_classification_labels_needed_on_the_auc_with_a_known_answer():
    from threedino_pipe.evaluation import label_efficiency_classification as lec
    y = [1, 1, 0, 0]
    probs = {("none", 10.0, 0): [0.5] * 4, ("none", 100.0, 0): [0.9, 0.4, 0.5, 0.1],  # AUC 0.5, then 3 of 4 pairs
             ("dino", 10.0, 0): [0.5] * 4, ("dino", 100.0, 0): [0.9, 0.8, 0.2, 0.1]}  # AUC 0.5, then 1
    table = lec.labels_needed_table(lec.pool(_classification_per_case(probs, y)), "none", num_resamples=50)
    row = table.set_index("entry").loc["dino"]
    assert row["target"] == pytest.approx(0.75) and row["status"] == "interpolated"
    assert row["pct_needed"] == pytest.approx(math.sqrt(10 * 100))  # halfway from 0.5 to 1 in log(pct)
    assert table.set_index("entry").loc["none", "pct_needed"] == pytest.approx(100.0)
