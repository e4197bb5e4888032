"""Folds, held-out test list and nested label-efficiency subsets (training_data/splits.py)."""

from __future__ import annotations

import json

import pytest

from threedino_pipe.artifacts import Splits
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.training_data.splits import make_splits, min_pct, select_subset, subset_size, write_splits


def _ids(n: int) -> list[str]:
    return [f"c{i:03d}" for i in range(n)]


def test_subset_size_rounds_half_up():
    assert subset_size(10, 25) == 3  # 2.5 -> 3
    assert subset_size(10, 1) == 0
    assert subset_size(40, 1) == 0  # 0.4
    assert subset_size(50, 1) == 1  # 0.5 -> 1
    assert subset_size(7, 100) == 7


def test_folds_partition_cases_and_hold_out_test_from_20_cases():
    splits = make_splits(_ids(25))
    assert len(splits.test) == 5
    pool = set(_ids(25)) - set(splits.test)
    vals = [set(f.val) for f in splits.folds]
    assert len(vals) == 5 and set().union(*vals) == pool
    assert sum(len(v) for v in vals) == len(pool)  # disjoint
    for fold in splits.folds:
        assert set(fold.train) | set(fold.val) == pool
        assert not set(fold.train) & set(fold.val)


def test_small_datasets_still_get_usable_splits():
    three = make_splits(_ids(3))
    assert three.test == [] and len(three.folds) == 3
    assert all(len(f.val) == 1 and len(f.train) == 2 for f in three.folds)
    one = make_splits(_ids(1))
    assert one.folds[0].train == one.folds[0].val == ["c000"]


def test_subsets_are_nested_and_sized_by_rounding():
    splits = make_splits(_ids(90))  # 18 test, 72 pool, train 57 or 58 per fold
    for fold in splits.folds:
        n = len(fold.train)
        for subsets in fold.subsets.values():
            previous: set[str] = set()
            for pct in ("1", "10", "25", "50", "100"):
                if pct not in subsets:
                    continue
                current = set(subsets[pct])
                assert len(current) == subset_size(n, float(pct))
                assert previous <= current
                previous = current
            assert set(subsets["100"]) == set(fold.train)
    # different subset seeds draw different 25 % subsets
    fold0 = splits.folds[0].subsets
    assert fold0["0"]["25"] != fold0["1"]["25"]


def test_select_subset_is_deterministic_and_refuses_too_small_pct():
    splits = make_splits(_ids(12))  # 5 folds: train of 9 or 10 cases
    fold = next(i for i, f in enumerate(splits.folds) if len(f.train) == 10)
    a = select_subset(splits, fold, 2, 25)
    b = select_subset(make_splits(_ids(12)), fold, 2, 25)
    assert a == b and len(a) == 3
    with pytest.raises(UserError) as err:
        select_subset(splits, fold, 0, 1)  # 1 % of 10 cases = 0.1 -> 0
    assert "--pct 5 or more" in err.value.render()
    assert min_pct(10, 1) == 5.0
    with pytest.raises(UserError):
        select_subset(splits, 7, 0, 25)


def test_classification_subsets_are_stratified():
    ids = _ids(40)
    labels = {c: (0 if i < 30 else 1) for i, c in enumerate(ids)}  # 75 % / 25 %
    splits = make_splits(ids, labels)
    for fold in splits.folds:
        train_share = sum(labels[c] for c in fold.train) / len(fold.train)
        val = fold.val
        assert sum(labels[c] for c in val) in (1, 2)  # 6 or 7 val cases, 25 % minority
        for seed in range(5):
            sub = select_subset(splits, 0, seed, 50, labels)
            share = sum(labels[c] for c in sub) / len(sub)
            assert abs(share - train_share) <= 1 / len(sub) + 1e-9
    # the smallest pct must hold one case of each class
    fold0 = splits.folds[0]
    n = len(fold0.train)
    with pytest.raises(UserError) as err:
        select_subset(splits, 0, 0, 100 / n, labels)  # one case only
    assert "one case of every class" in err.value.render()


def test_write_and_load_splits_round_trip(tmp_path):
    path = write_splits(tmp_path, _ids(6), None, seed=3)
    data = json.loads(path.read_text())
    assert data["kind"] == "splits" and data["schema_version"] == 1 and data["seed"] == 3
    assert Splits.of_dataset(tmp_path).to_data() == data
    first = path.read_bytes()
    write_splits(tmp_path, list(reversed(_ids(6))), None, seed=3)
    assert path.read_bytes() == first  # independent of input order
