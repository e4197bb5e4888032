"""How a labelled dataset's cases are split (plans.json ``splits``; docs/plan.md, "Splits").

``plan`` decides and checks, ``preprocess`` writes ``splits.json`` from it
(:func:`threedino_pipe.training_data.splits.write_splits`): the share held out as the test list
(``--test-fraction``, default 0.2 from 20 cases on), groups of cases kept on one side of every
split (dataset.json ``case_groups``), or folds imported from nnU-Net's ``splits_final.json``
(``--splits-from``). Imported case ids are checked against the dataset's cases here (verify
checks ``case_groups``), so nothing wrong reaches ``preprocess``.
"""

from __future__ import annotations

from pathlib import Path

from threedino_pipe.artifacts import DatasetJson, ImportedFold, SplitPlan
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.training_data.splits import MIN_CASES_FOR_TEST, default_test_fraction

_MAX_LISTED = 10


def _listed(ids: list[str]) -> str:
    more = f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else ""
    return ", ".join(ids[:_MAX_LISTED]) + more


def case_groups(spec: DatasetJson) -> dict[str, str]:
    """dataset.json's ``case_groups`` as case id -> group (verify has checked the ids)."""
    return {case: group for group, members in (spec.case_groups or {}).items() for case in members}


def _check_imported(folds: list[ImportedFold], case_ids: list[str], groups: dict[str, str], path: Path) -> None:
    """Every id a case of the dataset, train and val disjoint, no group on both sides of a fold."""
    known = set(case_ids)
    for index, fold in enumerate(folds):
        unknown = sorted((set(fold.train) | set(fold.val)) - known)
        if unknown:
            raise UserError(f"fold {index} names case(s) the dataset does not have: {_listed(unknown)}", file=path,
                            fix="import the splits_final.json of this dataset (nnU-Net's "
                            "nnUNet_preprocessed/DatasetNNN_Name/splits_final.json)")
        both = sorted(set(fold.train) & set(fold.val))
        if both:
            raise UserError(f"fold {index} has case(s) in both train and val: {_listed(both)}", file=path,
                            fix="each case of a fold is either a training or a validation case")
        split = sorted({groups[c] for c in fold.train if c in groups} & {groups[c] for c in fold.val if c in groups})
        if split:
            raise UserError(f"fold {index} puts group(s) {_listed(split)} (dataset.json case_groups) on both "
                            "sides", file=path, fix="keep each group's cases together in train or in val")


def plan_splits(spec: DatasetJson, case_ids: list[str], *, test_fraction: float | None,
                splits_from: Path | None) -> tuple[SplitPlan, dict[str, str]]:
    """The split plan of a labelled dataset and the reasons of its decisions (``splits.*`` in plans.json).

    ``test_fraction`` (in [0, 1)) and ``splits_from`` (not both) are checked by ``plan``'s option parsing.

    Raises:
        UserError: imported folds naming unknown cases, or putting a group on both sides of a fold.
    """
    groups = case_groups(spec)
    num_groups = len(set(groups.values()))
    decisions = {"splits.groups": (f"{num_groups} group(s) of {len(groups)} cases from dataset.json case_groups: a "
                                   "group falls on one side of the test list and of every fold") if groups else
                 "no case_groups in dataset.json: every case is split on its own"}
    if splits_from is not None:
        folds = ImportedFold.read_nnunet(splits_from)
        _check_imported(folds, case_ids, groups, Path(splits_from))
        used = {c for f in folds for c in (*f.train, *f.val)}
        held = len(case_ids) - len(used)
        decisions["splits.folds"] = f"{len(folds)} folds imported from {splits_from} (--splits-from)"
        decisions["splits.test_fraction"] = (f"--splits-from: the {held} case(s) in no imported fold are the test "
                                             "list")
        return SplitPlan(test_fraction=round(held / len(case_ids), 6), groups=groups, folds=folds), decisions
    if test_fraction is None:
        fraction = default_test_fraction(len(case_ids))
        reason = (f"{len(case_ids)} cases >= {MIN_CASES_FOR_TEST}: {fraction:g} of them held out as the "
                  "test list" if fraction else f"{len(case_ids)} cases < {MIN_CASES_FOR_TEST}: no test list (every "
                  "case is needed for training and validation)")
    else:
        fraction, reason = float(test_fraction), "set by --test-fraction"
    decisions["splits.test_fraction"] = reason
    decisions["splits.folds"] = "5 folds drawn by preprocess (seed 12345) from the cases not held out"
    return SplitPlan(test_fraction=fraction, groups=groups), decisions
