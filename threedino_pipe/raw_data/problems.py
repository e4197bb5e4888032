"""A problem found in a raw dataset: one row of the verify report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One finding about one file.

    Attributes:
        severity: ``"error"`` (verify fails) or ``"warning"`` (reported, verify passes).
        file: the file or folder concerned (relative to the dataset folder where possible).
        problem: what is wrong.
        fix: what to do about it.
        case: the case id, or ``""`` for dataset-level findings.
    """

    severity: str
    file: str
    problem: str
    fix: str
    case: str = ""

    @property
    def is_error(self) -> bool:
        return self.severity == "error"
