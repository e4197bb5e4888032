"""``summary.json`` of ``3dino evaluate``: the metrics of one prediction folder, or a comparison of two.

Written last into the output folder (its presence with ``per_case.csv`` marks a finished
evaluation, which ``evaluate --compare`` then reuses). ``mode`` is ``evaluate`` (one model) or
``compare`` (two sides); ``task`` is ``segmentation`` or ``classification``. The metric entries
(``metrics``, ``mean_over_labels``, ``comparisons``) are tables keyed by metric, then label or
class, of the entries typed below (docs/evaluate.md); non-finite numbers are written as ``null``.
They stay plain dicts in memory (typed dicts: the keys and value types are checked on reading).
``ci_unreliable`` marks a bootstrap interval over fewer than 5 cases; files written before it
existed lack it (and ``n_near_empty``, ``min_p_value``), which reads as unknown.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict

from threedino_pipe.artifacts.base import Artifact, Record, json_safe


class SummaryOptions(Record):
    """Bootstrap settings: seed, resamples, confidence level of the intervals."""

    seed: int
    num_bootstrap: int = Field(ge=1)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


class CaseFailure(Record):
    """A prediction that could not be evaluated."""

    case_id: str
    file: str
    problem: str


class RunIssues(Record):
    """A compared run's cases that are missing, failed or without a reference."""

    side: Literal["a", "b"]
    run: str
    missing: list[str]
    failed: list[CaseFailure]
    ignored: list[str]


class CaseCounts(Record):
    """Which cases were evaluated (``evaluate``) or paired (``compare``)."""

    reference: int | None = None
    evaluated: int | None = None
    paired: int | None = None
    missing: list[str] | None = None
    failed: list[CaseFailure] | None = None
    ignored: list[str] | None = None
    unpaired: list[str] | None = None
    runs: list[RunIssues] | None = None

    OMIT_WHEN_NONE = ("reference", "evaluated", "paired", "missing", "failed", "ignored", "unpaired", "runs")


class SideInfo(Record):
    """One side of a comparison: its display name and run folders."""

    name: str
    runs: list[str]


class SummaryFiles(Record):
    """The other files of the output folder."""

    per_case: str
    per_run: str | None = None
    figures: list[str]
    report: str

    OMIT_WHEN_NONE = ("per_run",)


@with_config(ConfigDict(extra="forbid"))
class CaseStatistics(TypedDict):
    """Per-case values of a segmentation metric: mean, median, bootstrap CI of the mean over the ``n``
    finite values (``n_nan`` left out); ``ci_unreliable`` when ``n`` < 5; HD95 entries count the
    cases whose HD95 is computed on a near-empty mask (``n_near_empty``)."""

    mean: float | None
    median: float | None
    ci95: list[float | None]
    n: int
    n_nan: int
    ci_unreliable: NotRequired[bool]
    n_near_empty: NotRequired[int]


@with_config(ConfigDict(extra="forbid"))
class ClassificationStatistics(TypedDict):
    """A classification metric on all ``n`` cases with its bootstrap CI over cases (``ci_unreliable``
    when ``n`` < 5; resamples where it is undefined are counted, not used)."""

    value: float | None
    ci95: list[float | None]
    n: int
    n_undefined_resamples: int
    ci_unreliable: NotRequired[bool]


class StatisticalTest(TypedDict):
    """A statistical test: its name, statistic, two-sided p (null when undefined, with a ``note``)."""

    test: str
    statistic: float | None
    p_value: float | None
    note: str | None


@with_config(ConfigDict(extra="forbid"))
class SegmentationComparison(StatisticalTest):
    """Both sides' statistics, the paired difference B - A, and the Wilcoxon signed-rank test over
    ``n_pairs`` cases; ``min_p_value`` is the smallest p the exact test can give with these pairs."""

    a: CaseStatistics
    b: CaseStatistics
    difference: CaseStatistics
    n_pairs: int
    min_p_value: NotRequired[float | None]


@with_config(ConfigDict(extra="forbid"))
class RunValues(TypedDict):
    """One side of a classification comparison: each run's value, their mean and a CI (``ci_method``:
    ``t_across_runs``, or ``bootstrap_over_cases`` with one run, then ``ci_unreliable`` under 5 cases)."""

    runs: list[float | None]
    mean: float | None
    ci95: list[float | None]
    ci_method: str
    n_runs: int
    ci_unreliable: NotRequired[bool]


@with_config(ConfigDict(extra="forbid"))
class ClassificationComparison(StatisticalTest):
    """Both sides' run values, the difference of their means (B - A) and Welch's t-test across runs."""

    a: RunValues
    b: RunValues
    difference: float | None
    n_a: int
    n_b: int


MetricEntry = CaseStatistics | ClassificationStatistics
ComparisonEntry = SegmentationComparison | ClassificationComparison


class EvaluationSummary(Artifact):
    """The whole ``summary.json`` (fields a mode or task does not use are left out)."""

    KIND = "evaluation_summary"
    SCHEMA_VERSION = 1
    WRITER = "3dino evaluate"
    FILE = "summary.json"

    mode: Literal["evaluate", "compare"]
    task: Literal["segmentation", "classification"]
    reference: str
    prediction: str | None = None
    dataset: str | None
    options: SummaryOptions
    sides: dict[str, SideInfo] | None = None
    labels: dict[str, list[int]] | None = None
    classes: list[str] | None = None
    cases: CaseCounts
    metrics: dict[str, dict[str, MetricEntry]] | None = None
    comparisons: dict[str, dict[str, ComparisonEntry]] | None = None
    mean_over_labels: dict[str, CaseStatistics | SegmentationComparison] | None = None
    confusion_matrix: list[list[int]] | None = None
    files: SummaryFiles | None = None

    OMIT_WHEN_NONE = ("prediction", "sides", "labels", "classes", "metrics", "comparisons", "mean_over_labels",
                      "confusion_matrix", "files")

    def to_data(self) -> dict[str, Any]:
        """As :meth:`Artifact.to_data`, with NaN and infinities as ``null`` (strict JSON)."""
        return json_safe(super().to_data())
