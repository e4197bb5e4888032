"""Cross-validation folds, a held-out test list and nested label-efficiency subsets.

``splits.json`` (docs/schemas.md) holds, per fold, for each subset seed 0-4, the fold's training
cases in a seeded draw order. ``--pct P`` with subset seed S takes the first round(P % of n)
cases of that order (half rounds up), so subsets are nested (1 % ⊂ 10 % ⊂ ... ⊂ 100 %) and the
same ``--pct --fold --seed`` gives the same cases for every backbone and head compared. For
classification the draw order is stratified: every prefix holds the classes in proportion.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from threedino_pipe.artifacts import Fold, SplitPlan, Splits
from threedino_pipe.runtime.errors import UserError

STANDARD_PCTS = (1, 10, 25, 50, 100)
NUM_SUBSET_SEEDS = 5
MIN_CASES_FOR_TEST = 20
TEST_FRACTION = 0.2


def subset_size(num_cases: int, pct: float) -> int:
    """round(pct % of num_cases), halves rounded up (2.5 -> 3)."""
    return int(math.floor(num_cases * pct / 100.0 + 0.5))


def stratified_order(case_ids: list[str], class_labels: dict[str, int] | None,
                     rng: np.random.Generator) -> list[str]:
    """A random draw order of ``case_ids``; with class labels every prefix is class-proportional.

    Classes are shuffled separately, then merged by always taking the class furthest behind its
    share (largest remainder; ties to the smaller class index).
    """
    ids = sorted(case_ids)
    if not class_labels:
        return [ids[i] for i in rng.permutation(len(ids))]
    by_class: dict[int, list[str]] = {}
    for case in ids:
        by_class.setdefault(class_labels[case], []).append(case)
    queues = {c: [members[i] for i in rng.permutation(len(members))] for c, members in sorted(by_class.items())}
    total = len(ids)
    taken = dict.fromkeys(queues, 0)
    order = []
    for step in range(1, total + 1):
        best = max((c for c in queues if taken[c] < len(queues[c])),
                   key=lambda c: (step * len(queues[c]) / total - taken[c], -c))
        order.append(queues[best][taken[best]])
        taken[best] += 1
    return order


def _units(ids: list[str], groups: dict[str, str]) -> dict[str, list[str]]:
    """Cases that move together, keyed by their first case id: a group's cases, else each case alone."""
    by_group: dict[str, list[str]] = {}
    for case in ids:
        by_group.setdefault(groups.get(case, "\0" + case), []).append(case)
    return {members[0]: members for members in by_group.values()}


def _unit_labels(units: dict[str, list[str]], class_labels: dict[str, int] | None) -> dict[str, int] | None:
    """A unit's class for stratification: its first case's."""
    return None if not class_labels else {key: class_labels[key] for key in units}


def _assign_folds(units: dict[str, list[str]], class_labels: dict[str, int] | None, num_folds: int,
                  rng: np.random.Generator) -> list[list[str]]:
    """Split the units into ``num_folds`` validation groups of cases (class-stratified when labelled).

    Units are taken in a random (stratified) order, each to the fold with the fewest cases so far (ties:
    the lower fold); for single cases this is ``order[f::num_folds]``.
    """
    order = stratified_order(list(units), _unit_labels(units, class_labels), rng)
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    for key in order:
        min(folds, key=len).extend(units[key])
    return [sorted(fold) for fold in folds]


def default_test_fraction(num_cases: int) -> float:
    """The held-out share when ``plan --test-fraction`` is not given: 0.2 from 20 cases on, else 0."""
    return TEST_FRACTION if num_cases >= MIN_CASES_FOR_TEST else 0.0


def make_splits(case_ids: list[str], class_labels: dict[str, int] | None = None, *, seed: int = 12345,
                num_folds: int = 5, test_fraction: float | None = None, groups: dict[str, str] | None = None,
                folds: list[tuple[list[str], list[str]]] | None = None) -> Splits:
    """Folds, held-out test list and nested subsets for ``case_ids`` (see module docstring).

    Args:
        test_fraction: share of the cases held out as the test list (None: :func:`default_test_fraction`).
        groups: case id -> group; a group's cases fall on one side of the test list and of every fold.
        folds: (train, val) case ids per fold, imported (nnU-Net's splits_final.json); the test list is
            then the cases in no fold, and ``test_fraction`` is not used.

    Datasets of at least 20 cases hold out 20 % as a test list by default; the rest is split into
    min(num_folds, number of units) folds. A single case gives one fold whose train and val are that case.
    """
    if not case_ids:
        raise ValueError("no cases to split")
    rng = np.random.default_rng(seed)
    ids = sorted(case_ids)
    units = _units(ids, groups or {})
    if folds is not None:
        used = {c for train, val in folds for c in (*train, *val)}
        pairs = [(sorted(train), sorted(val)) for train, val in folds]
        return Splits(seed=seed, test=[c for c in ids if c not in used],
                      folds=[_fold(train, val, class_labels, seed, f) for f, (train, val) in enumerate(pairs)])
    fraction = default_test_fraction(len(ids)) if test_fraction is None else test_fraction
    test: list[str] = []
    if fraction > 0:
        target = subset_size(len(ids), fraction * 100)
        for key in stratified_order(list(units), _unit_labels(units, class_labels), rng):
            if len(test) >= target or len(test) + len(units[key]) >= len(ids):  # keep cases to train on
                break
            test += units[key]
        test.sort()
    held = set(test)
    pool = [c for c in ids if c not in held]
    pool_units = {key: members for key, members in units.items() if key not in held}
    if len(pool_units) == 1:
        val_groups = [pool]
    else:
        val_groups = _assign_folds(pool_units, class_labels, min(num_folds, len(pool_units)), rng)
    out = []
    for f, val in enumerate(val_groups):
        train = [c for c in pool if c not in set(val)] or list(val)
        out.append(_fold(train, val, class_labels, seed, f))
    return Splits(seed=seed, test=test, folds=out)


def _fold(train: list[str], val: list[str], class_labels: dict[str, int] | None, seed: int, f: int) -> Fold:
    """Fold ``f`` with its seeded subset draw orders and the standard subsets of ``train``."""
    orders = {}
    for s in range(NUM_SUBSET_SEEDS):
        sub_rng = np.random.default_rng([seed, f, s])
        orders[str(s)] = stratified_order(train, class_labels, sub_rng)
    subsets = {s: {str(p): sorted(order[: subset_size(len(order), p)]) for p in STANDARD_PCTS
                   if _min_prefix(order, class_labels) <= subset_size(len(order), p)}
               for s, order in orders.items()}
    return Fold(train=train, val=sorted(val), subset_order=orders, subsets=subsets)


def _min_prefix(order: list[str], class_labels: dict[str, int] | None) -> int:
    """Smallest prefix length of ``order`` holding one case (or one case of every class)."""
    if not class_labels:
        return 1
    needed = {class_labels[c] for c in order}
    seen: set[int] = set()
    for i, case in enumerate(order, start=1):
        seen.add(class_labels[case])
        if seen == needed:
            return i
    return len(order)


def min_pct(num_cases: int, min_cases: int) -> float:
    """The smallest percentage P (2 decimals, rounded up) with subset_size(num_cases, P) >= min_cases."""
    pct = math.ceil((min_cases - 0.5) * 100.0 / num_cases * 100) / 100
    while subset_size(num_cases, pct) < min_cases:
        pct = round(pct + 0.01, 2)
    return pct


def select_subset(splits: Splits, fold: int, seed: int, pct: float, class_labels: dict[str, int] | None = None,
                  splits_file: str | Path | None = None) -> list[str]:
    """The training cases of ``fold`` for ``--pct pct --seed seed`` (sorted).

    Raises:
        UserError: unknown fold or seed, or a pct that gives fewer than one case (one per class
            for classification); the message names the smallest valid pct.
    """
    orders = splits.fold(fold, file=splits_file).subset_order
    if str(seed) not in orders:
        raise UserError(f"subset seed {seed} does not exist (seeds {', '.join(orders)})", file=splits_file,
                        fix="pass --seed between 0 and 4")
    if not 0 < pct <= 100:
        raise UserError(f"--pct {pct} is outside (0, 100]", fix="pass a percentage such as 1, 10, 25, 50 or 100")
    order = orders[str(seed)]
    needed = _min_prefix(order, class_labels)
    size = subset_size(len(order), pct)
    if size < needed:
        what = "one case of every class" if class_labels else "one case"
        raise UserError(f"--pct {pct:g} of the {len(order)} training cases of fold {fold} gives {size} cases, "
                        f"fewer than {what}", file=splits_file,
                        fix=f"pass --pct {min_pct(len(order), needed):g} or more")
    return sorted(order[:size])


def write_splits(preprocessed_folder: Path, case_ids: list[str], class_labels: dict[str, int] | None = None,
                 seed: int = 12345, plan: SplitPlan | None = None) -> Path:
    """Write ``splits.json`` for the dataset's cases into its preprocessed folder as ``plan`` (plans.json's
    ``splits``; None: the defaults) says; returns the path."""
    if plan is None:
        splits = make_splits(case_ids, class_labels, seed=seed)
    else:
        folds = None if plan.folds is None else [(f.train, f.val) for f in plan.folds]
        splits = make_splits(case_ids, class_labels, seed=seed, test_fraction=plan.test_fraction, groups=plan.groups,
                             folds=folds)
    return splits.write(Splits.in_folder(preprocessed_folder))
