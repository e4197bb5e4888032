"""``summary.json`` of ``3dino evaluate``: the metrics of one prediction folder, or a comparison of two.

Written last into the output folder (its presence with ``per_case.csv`` marks a finished
evaluation, which ``evaluate --compare`` then reuses). ``mode`` is ``evaluate`` (one model) or
``compare`` (two sides); ``task`` is ``segmentation`` or ``classification``. The metric entries
(``metrics``, ``mean_over_labels``, ``comparisons``) are nested tables of numbers keyed by metric,
label or class (docs/evaluate.md); non-finite numbers are written as ``null``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

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


MetricTable = dict[str, dict[str, Any]]


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
    metrics: dict[str, MetricTable] | None = None
    comparisons: dict[str, MetricTable] | None = None
    mean_over_labels: MetricTable | None = None
    confusion_matrix: list[list[int]] | None = None
    files: SummaryFiles | None = None

    OMIT_WHEN_NONE = ("prediction", "sides", "labels", "classes", "metrics", "comparisons", "mean_over_labels",
                      "confusion_matrix", "files")

    def to_data(self) -> dict[str, Any]:
        """As :meth:`Artifact.to_data`, with NaN and infinities as ``null`` (strict JSON)."""
        return json_safe(super().to_data())
