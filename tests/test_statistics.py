"""Bootstrap CIs, paired Wilcoxon and Welch's t-test against their definitions and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from threedino_pipe.evaluation.statistics import (
    bootstrap_mean_ci,
    bootstrap_statistic_ci,
    paired_wilcoxon,
    summarize,
    t_interval,
    welch_ttest,
)

VALUES = np.array([0.81, 0.77, 0.92, 0.65, 0.88, 0.71, 0.95, 0.83, 0.59, 0.9, 0.86, 0.74])


def test_bootstrap_ci_is_the_percentile_bootstrap_of_the_mean():
    rng = np.random.default_rng(7)
    means = VALUES[rng.integers(0, VALUES.size, size=(1000, VALUES.size))].mean(axis=1)
    assert bootstrap_mean_ci(VALUES, seed=7) == pytest.approx(np.percentile(means, [2.5, 97.5]).tolist())


def test_bootstrap_ci_reproducible_with_its_seed_and_not_with_another():
    first = bootstrap_mean_ci(VALUES, num_resamples=1000, seed=0)
    assert bootstrap_mean_ci(VALUES, num_resamples=1000, seed=0) == first
    assert bootstrap_mean_ci(VALUES, num_resamples=1000, seed=1) != first
    lo, hi = first
    assert lo < VALUES.mean() < hi


def test_summarize_excludes_and_counts_nans():
    values = np.concatenate([VALUES, [np.nan, np.nan]])
    out = summarize(values, seed=0)
    assert out["n"] == VALUES.size and out["n_nan"] == 2
    assert out["mean"] == pytest.approx(VALUES.mean())
    assert out["median"] == pytest.approx(np.median(VALUES))
    assert out["ci95"] == bootstrap_mean_ci(VALUES, seed=0)
    empty = summarize([np.nan], seed=0)
    assert empty["n"] == 0 and empty["n_nan"] == 1 and math.isnan(empty["mean"]) and math.isnan(empty["ci95"][0])


def test_bootstrap_statistic_ci_counts_undefined_resamples():
    labels = np.array([0] * 9 + [1])

    def share_and_undefined(index: np.ndarray) -> np.ndarray:
        positives = labels[index].sum()
        return np.array([labels[index].mean(), np.nan if positives == 0 else 1.0])

    (ci_share, ci_other), undefined = bootstrap_statistic_ci(labels.size, share_and_undefined, seed=3)
    assert undefined[0] == 0 and 0 < undefined[1] < 1000  # (9/10)^10 ~ 35 % of resamples have no positive
    assert ci_share[0] == 0.0 and 0.1 < ci_share[1] <= 0.4
    assert ci_other == [1.0, 1.0]


def test_wilcoxon_matches_scipy_on_a_known_pair():
    a = np.array([0.91, 0.85, 0.78, 0.88, 0.93, 0.70, 0.82, 0.89, 0.76, 0.84])
    b = np.array([0.89, 0.80, 0.79, 0.83, 0.90, 0.61, 0.80, 0.85, 0.70, 0.86])
    expected = stats.wilcoxon(a, b)
    out = paired_wilcoxon(a, b)
    assert out["p_value"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert out["statistic"] == pytest.approx(expected.statistic)
    assert out["n_pairs"] == 10 and out["test"] == "wilcoxon_signed_rank"


def test_wilcoxon_drops_nan_pairs_and_reports_degenerate_cases():
    a = np.array([0.9, np.nan, 0.8, 0.7, 0.6, 0.75, 0.85])
    b = np.array([0.8, 0.5, np.nan, 0.65, 0.5, 0.7, 0.7])
    keep = ~(np.isnan(a) | np.isnan(b))
    out = paired_wilcoxon(a, b)
    assert out["n_pairs"] == 5
    assert out["p_value"] == pytest.approx(stats.wilcoxon(a[keep], b[keep]).pvalue)
    same = paired_wilcoxon([0.5, 0.6], [0.5, 0.6])
    assert math.isnan(same["p_value"]) and "zero" in same["note"]


def test_welch_matches_scipy():
    a = [0.84, 0.86, 0.83, 0.87, 0.85]
    b = [0.80, 0.79, 0.83, 0.78, 0.81]
    expected = stats.ttest_ind(a, b, equal_var=False)
    out = welch_ttest(a, b)
    assert out["p_value"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert out["statistic"] == pytest.approx(expected.statistic)
    assert out["test"] == "welch_t_test"
    single = welch_ttest([0.8], b)
    assert math.isnan(single["p_value"]) and "2 runs" in single["note"]


def test_t_interval_matches_scipy():
    runs = [0.84, 0.86, 0.83, 0.87, 0.85]
    expected = stats.t.interval(0.95, 4, loc=np.mean(runs), scale=stats.sem(runs))
    assert t_interval(runs) == pytest.approx(list(expected))
    assert all(math.isnan(v) for v in t_interval([0.8]))


@pytest.mark.parametrize("n", range(1, 9))
def test_wilcoxon_floor_is_the_exact_tests_p_when_every_sign_agrees(n):
    from threedino_pipe.evaluation.statistics import wilcoxon_min_p

    differences = np.arange(1.0, n + 1)
    assert wilcoxon_min_p(n) == 2.0 / 2**n == pytest.approx(stats.wilcoxon(differences).pvalue)
    out = paired_wilcoxon(np.zeros(n + 1), np.append(differences, 0.0))  # a zero difference does not count
    assert out["n_pairs"] == n + 1 and out["min_p_value"] == wilcoxon_min_p(n)


def test_summary_marks_intervals_over_fewer_than_5_values():
    assert summarize(VALUES[:4])["ci_unreliable"] is True
    assert summarize(np.append(VALUES[:4], np.nan))["ci_unreliable"] is True  # NaNs do not count
    assert summarize(VALUES[:5])["ci_unreliable"] is False
