"""Summary statistics and tests: bootstrap CIs over cases, paired bootstrap differences, paired Wilcoxon,
Welch's t-test.

Bootstrap: percentile method, cases resampled with replacement, ``numpy.random.default_rng(seed)``
so a given seed always gives the same interval. An interval over fewer than
:data:`MIN_CASES_FOR_CI` cases is marked unreliable (``ci_unreliable``): with 1 to 4 values the
resamples can take only a handful of distinct means, so the percentiles say little.

Wilcoxon signed-rank: with n pairs whose difference is not zero, the exact two-sided test cannot
give a p-value below ``2 / 2**n`` (every sign the same: 1.0, 0.5, 0.25, 0.125, 0.0625 for n = 1..5;
n <= 5 can never reach 0.05); :func:`wilcoxon_min_p` gives that floor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_CASES_FOR_CI = 5  # fewer values than this: the bootstrap CI is marked unreliable


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[~np.isnan(array)]


def _percentiles(samples: np.ndarray, confidence: float) -> list[float]:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, *, num_resamples: int = 1000, seed: int = 0,
                      confidence: float = CONFIDENCE) -> list[float]:
    """Percentile bootstrap CI ``[lo, hi]`` of the mean of ``values`` (NaNs dropped first).

    NaN bounds when no finite value remains; a single value gives ``[v, v]``.
    """
    data = _finite(values)
    if data.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    chunk = max(1, 2_000_000 // data.size)  # bound memory of the index matrix
    for start in range(0, num_resamples, chunk):
        stop = min(num_resamples, start + chunk)
        means[start:stop] = data[rng.integers(0, data.size, size=(stop - start, data.size))].mean(axis=1)
    return _percentiles(means, confidence)


def bootstrap_statistic_ci(num_cases: int, statistic: Callable[[np.ndarray], np.ndarray], *,
                           num_resamples: int = 1000, seed: int = 0,
                           confidence: float = CONFIDENCE) -> tuple[list[list[float]], list[int]]:
    """Percentile bootstrap CIs of statistics computed on resampled case indices.

    Args:
        num_cases: number of cases n.
        statistic: takes an index array (n,) into the cases and returns m floats (NaN where a
            statistic is undefined on that resample, e.g. an AUC on a single class).
        num_resamples, seed, confidence: bootstrap settings.

    Returns:
        (m intervals ``[lo, hi]``, m counts of resamples where the statistic was undefined).
    """
    samples = _resampled(num_cases, statistic, num_resamples, seed)
    return ([_percentiles(samples[:, j], confidence) for j in range(samples.shape[1])],
            np.isnan(samples).sum(axis=0).astype(int).tolist())


def _resampled(num_cases: int, statistic: Callable[[np.ndarray], np.ndarray], num_resamples: int,
               seed: int) -> np.ndarray:
    """(num_resamples, m) values of ``statistic`` on case indices drawn with replacement (``default_rng(seed)``)."""
    if num_cases < 1:
        raise ValueError("bootstrap needs at least one case")
    rng = np.random.default_rng(seed)
    return np.array([np.atleast_1d(statistic(rng.integers(0, num_cases, size=num_cases)))
                     for _ in range(num_resamples)], dtype=np.float64)


def paired_bootstrap_difference(num_cases: int, statistic_a: Callable[[np.ndarray], float],
                                statistic_b: Callable[[np.ndarray], float], *, num_resamples: int = 1000,
                                seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Paired percentile bootstrap of ``statistic_b - statistic_a`` over the same resampled cases.

    Both statistics take an index array (n,) into the n paired cases (the same cases on both sides) and return
    a float, NaN where undefined on a resample (e.g. an AUC on a single class; those resamples are left out).
    Returns ``difference`` (on all cases), ``ci95`` ``[lo, hi]``, ``p_value`` (two-sided: twice the smaller
    share of resampled differences at or below, and at or above, zero, each counted with the +1 of
    ``(k + 1) / (B + 1)``, at most 1), ``n_undefined_resamples`` and ``num_resamples``.
    """
    every = np.arange(num_cases)
    samples = _resampled(num_cases, lambda index: statistic_b(index) - statistic_a(index), num_resamples, seed)[:, 0]
    finite = samples[~np.isnan(samples)]
    p_value = float("nan")
    if finite.size:
        below, above = (np.count_nonzero(finite <= 0) + 1, np.count_nonzero(finite >= 0) + 1)
        p_value = min(1.0, 2.0 * min(below, above) / (finite.size + 1))
    return {"difference": float(statistic_b(every) - statistic_a(every)), "ci95": _percentiles(samples, confidence),
            "p_value": p_value, "n_undefined_resamples": int(samples.size - finite.size),
            "num_resamples": num_resamples}


def ci_unreliable(n: int) -> bool:
    """True when a bootstrap CI over ``n`` cases is too small a sample to trust (n < :data:`MIN_CASES_FOR_CI`)."""
    return n < MIN_CASES_FOR_CI


def summarize(values: Sequence[float] | np.ndarray, *, num_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean, median, 95 % bootstrap CI of the mean, ``n`` (finite values), ``n_nan`` of per-case values,
    and ``ci_unreliable`` (fewer than :data:`MIN_CASES_FOR_CI` finite values)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    data = _finite(array)
    empty = data.size == 0
    return {"mean": float("nan") if empty else float(data.mean()),
            "median": float("nan") if empty else float(np.median(data)),
            "ci95": bootstrap_mean_ci(data, num_resamples=num_resamples, seed=seed),
            "n": int(data.size), "n_nan": int(array.size - data.size), "ci_unreliable": ci_unreliable(data.size)}


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """Student-t CI ``[lo, hi]`` of the mean across runs; NaN bounds with fewer than 2 values."""
    data = _finite(values)
    if data.size < 2:
        return [float("nan"), float("nan")]
    sem = stats.sem(data)
    if sem == 0:
        return [float(data.mean()), float(data.mean())]
    lo, hi = stats.t.interval(confidence, data.size - 1, loc=data.mean(), scale=sem)
    return [float(lo), float(hi)]


def wilcoxon_min_p(n: int) -> float:
    """The smallest two-sided p-value the exact Wilcoxon signed-rank test can give with ``n`` non-zero
    paired differences: ``2 / 2**n`` (at most 1; NaN for n = 0)."""
    return float("nan") if n < 1 else min(1.0, 2.0 ** (1 - n))


def paired_wilcoxon(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired per-case values (scipy defaults).

    Pairs where either value is NaN are dropped. Returns ``statistic``, ``p_value``, ``n_pairs``,
    ``min_p_value`` (:func:`wilcoxon_min_p` of the pairs whose difference is not zero; scipy's
    default ``zero_method="wilcox"`` drops zero differences) and a ``note`` when the test is
    undefined (no pairs, or every difference is zero: p = NaN).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    out = {"test": "wilcoxon_signed_rank", "statistic": float("nan"), "p_value": float("nan"),
           "n_pairs": int(x.size), "min_p_value": wilcoxon_min_p(int(np.count_nonzero(x != y))), "note": None}
    if x.size == 0:
        out["note"] = "no case has a value on both sides"
    elif np.all(x == y):
        out["note"] = "every paired difference is zero"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.wilcoxon(x, y)
        out["statistic"], out["p_value"] = float(result.statistic), float(result.pvalue)
    return out


def welch_ttest(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict:
    """Welch's two-sided t-test (unequal variances) between two groups of run-level values.

    NaNs are dropped. Returns ``statistic``, ``p_value``, ``n_a``, ``n_b`` and a ``note`` when
    undefined (fewer than 2 runs on a side: p = NaN).
    """
    x, y = _finite(a), _finite(b)
    out = {"test": "welch_t_test", "statistic": float("nan"), "p_value": float("nan"),
           "n_a": int(x.size), "n_b": int(y.size), "note": None}
    if x.size < 2 or y.size < 2:
        out["note"] = "Welch's t-test needs at least 2 runs on each side"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.ttest_ind(x, y, equal_var=False)
    out["statistic"], out["p_value"] = float(result.statistic), float(result.pvalue)
    return out


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family of tests (NaN p-values stay NaN and are not counted).

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``: reject where the
    adjusted p is below alpha and the family-wise error rate is at most alpha.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = finite.size
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return out


def rank_biserial(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of ``b - a``, in [-1, 1]: ``(R+ - R-) / (R+ + R-)`` with R+ (R-)
    the rank sum of the positive (negative) differences (zero differences and NaN pairs dropped, ties get
    mean ranks, as :func:`paired_wilcoxon`). +1: b is larger in every pair; NaN when no difference is non-zero."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = (y - x)[~(np.isnan(x) | np.isnan(y))]
    d = d[d != 0]
    if d.size == 0:
        return float("nan")
    ranks = stats.rankdata(np.abs(d))
    positive, negative = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((positive - negative) / (positive + negative))
