"""The study's statistics on known tables: Wilcoxon against scipy, Holm and the rank-biserial effect size by
hand, labels-needed on synthetic curves with known answers (issue 17)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from threedino_pipe.evaluation import label_efficiency as le
from threedino_pipe.evaluation.statistics import holm, rank_biserial


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
