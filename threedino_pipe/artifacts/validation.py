"""``validation.json`` of a finetune run: how the model scored on the fold's validation cases (docs/schemas.md).

Two variants share the file name and kind: :class:`SegmentationValidation` (written by the
segmentation trainer at every validation; Dice per class and case) and :class:`ProbeValidation`
(written by the classification probe when it finishes; the chosen grid point and its metrics).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record


class ValidationPoint(Record):
    """One validation of a segmentation run: mean foreground Dice and its mean per class (None: no case has it)."""

    iteration: int = Field(ge=0)
    mean_dice: float
    per_class: dict[str, float | None]


class ValidationScore(ValidationPoint):
    """A validation with the Dice of every case and class (None where the reference lacks the class)."""

    per_case: dict[str, dict[str, float | None]]

    def point(self) -> ValidationPoint:
        """This validation without the per-case table (an entry of ``history``)."""
        return ValidationPoint(iteration=self.iteration, mean_dice=self.mean_dice, per_class=self.per_class)


class SegmentationValidation(Artifact):
    """``validation.json`` of a segmentation run (``mean_dice``: mean over classes of their mean over cases)."""

    KIND = "validation"
    SCHEMA_VERSION = 1
    WRITER = "3dino finetune"
    FILE = "validation.json"

    metric: Literal["dice"] = "dice"
    classes: list[str]
    val_cases: list[str]
    iterations_done: int = Field(ge=0)
    iters: int = Field(gt=0)
    finished: bool
    best: ValidationScore | None
    latest: ValidationScore | None
    history: list[ValidationPoint]


class ProbePoint(Record):
    """A point of the probe's grid: learning rate, number of blocks whose CLS tokens are used, mean patch token."""

    lr: float
    layers: int = Field(gt=0)
    avgpool: bool


class ProbeValidation(Artifact):
    """``validation.json`` of a classification probe run (metrics: ``threedino_pipe.evaluation`` layout)."""

    KIND = "validation"
    SCHEMA_VERSION = 1
    WRITER = "3dino finetune --head probe"
    FILE = "validation.json"

    task: Literal["classification"] = "classification"
    head: Literal["probe"] = "probe"
    iteration: int = Field(ge=0)
    num_cases: int = Field(ge=0)
    best: ProbePoint
    metrics: dict[str, dict[str, Any]]
    selection: str
