"""Splits as `3dino plan` decides them and `3dino preprocess` writes them (issue 13.3), on real files via the CLI.

The test list (printed by preprocess, `plan --test-fraction`), groups of cases (dataset.json
`case_groups`) that never straddle a fold or the test list, and folds imported from nnU-Net's
`splits_final.json` (`plan --splits-from`), with the broken imports refused by name.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO, run_3dino

from threedino_pipe.training_data.splits import make_splits

_spec = importlib.util.spec_from_file_location("make_broken_corpus", REPO / "tests" / "data" / "make_broken_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

GROUPS = {"p1": ["case_000", "case_001", "case_002"], "p2": ["case_003", "case_004"], "p3": ["case_010", "case_011"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A 22-case segmentation dataset (8 x 8 x 6 voxels) with three case groups; env and folders."""
    root = tmp_path_factory.mktemp("splits")
    folder = root / "raw" / "Dataset963_Groups"
    corpus.dataset_json(folder, num_training=22, extra={"case_groups": GROUPS})
    for index in range(22):
        corpus.good_case(folder, f"case_{index:03d}", index)
    env = {"THREEDINO_RAW": str(root / "raw"), "THREEDINO_PREPROCESSED": str(root / "pre"),
           "THREEDINO_RESULTS": str(root / "results"), "nnUNet_raw": ""}
    return {"root": root, "env": env, "pre": root / "pre" / "Dataset963_Groups"}


def _plan(project, *args: str):
    return run_3dino("plan", "-d", "963", "--preset", "tiny", "-np", "1", *args, env=project["env"],
                     cwd=project["root"])


def _preprocess(project):
    proc = run_3dino("preprocess", "-d", "963", "-np", "1", "-c", "finetune", env=project["env"], cwd=project["root"])
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((project["pre"] / "splits.json").read_text())


def _sides(cases: list[str], side: set[str]) -> set[bool]:
    return {case in side for case in cases}


def test_default_test_list_is_printed_and_groups_stay_together(project):
    proc = _plan(project)
    assert proc.returncode == 0, proc.stderr
    assert "splits.test_fraction" in proc.stdout and "22 cases >= 20" in proc.stdout
    plans = json.loads((project["pre"] / "plans.json").read_text())
    assert plans["splits"]["test_fraction"] == 0.2 and plans["splits"]["groups"]["case_011"] == "p3"
    assert plans["options"]["test_fraction"] is None
    proc, splits = _preprocess(project)
    test = splits["test"]
    assert 4 <= len(test) <= 6  # 20 % of 22 = 4 cases, a group may carry it over
    assert f"test list: {len(test)} of 22 cases held out" in proc.stderr and ", ".join(test) in proc.stderr
    for members in GROUPS.values():
        assert len(_sides(members, set(test))) == 1, (members, test)
        for fold in splits["folds"]:
            assert len(_sides(members, set(fold["val"]))) == 1, (members, fold["val"])
    pool = set(f"case_{i:03d}" for i in range(22)) - set(test)
    assert set().union(*(set(f["val"]) for f in splits["folds"])) == pool


def test_test_fraction_zero_holds_nothing_out(project):
    proc = _plan(project, "--test-fraction", "0")
    assert proc.returncode == 0, proc.stderr
    plans = json.loads((project["pre"] / "plans.json").read_text())
    assert plans["splits"]["test_fraction"] == 0 and plans["decisions"]["splits.test_fraction"] == \
        "set by --test-fraction"
    proc, splits = _preprocess(project)
    assert splits["test"] == [] and "test list: none" in proc.stderr
    assert len(splits["folds"]) == 5


def test_nnunet_splits_final_is_imported(project):
    ids = [f"case_{i:03d}" for i in range(20)]  # case_020 and case_021 in no fold: the test list
    folds = [{"train": ids[5:], "val": ids[:5]}, {"train": ids[:5] + ids[12:], "val": ids[5:12]}]
    path = project["root"] / "splits_final.json"
    path.write_text(json.dumps(folds))
    proc = _plan(project, "--splits-from", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "2 folds imported from" in proc.stdout
    _, splits = _preprocess(project)
    assert splits["test"] == ["case_020", "case_021"]
    assert [(f["train"], f["val"]) for f in splits["folds"]] == [(sorted(f["train"]), sorted(f["val"])) for f in folds]
    assert splits["folds"][0]["subsets"]["0"]["100"] == sorted(folds[0]["train"])


@pytest.mark.parametrize(("content", "words"), [
    ([{"train": ["case_000", "case_099"], "val": ["case_005"]}], "fold 0 names case(s) the dataset does not have: "
                                                                   "case_099"),
    ([{"train": ["case_000", "case_005"], "val": ["case_001"]}], "fold 0 puts group(s) p1 (dataset.json "
                                                                   "case_groups) on both sides"),
    ([{"train": ["case_005"], "val": ["case_005"]}], "fold 0 has case(s) in both train and val: case_005"),
    ({"fold_0": {"train": [], "val": []}}, "not a list of folds"),
    ([{"train": ["case_005"]}], "fold 0: 'val' field required"),
])
def test_broken_splits_final_is_refused_and_nothing_written(project, tmp_path, content, words):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(content))
    before = {p.name: p.read_bytes() for p in project["pre"].glob("*.json")}
    proc = _plan(project, "--splits-from", str(path))
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and words in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in project["pre"].glob("*.json")} == before


def test_contradicting_split_options_are_refused(project, tmp_path):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ["case_001"], "val": ["case_002"]}]))
    proc = _plan(project, "--splits-from", str(path), "--test-fraction", "0.1")
    assert proc.returncode != 0 and "both decide the test list" in proc.stderr and "Traceback" not in proc.stderr


def test_groups_and_test_fraction_in_make_splits():
    ids = [f"c{i:02d}" for i in range(30)]
    groups = {c: f"g{i // 3}" for i, c in enumerate(ids[:12])}  # four groups of three, the rest alone
    splits = make_splits(ids, groups=groups, test_fraction=0.3)
    assert 9 <= len(splits.test) <= 11
    for g in set(groups.values()):
        members = [c for c in groups if groups[c] == g]
        assert len(_sides(members, set(splits.test))) == 1
        for fold in splits.folds:
            assert len(_sides(members, set(fold.val))) == 1
    assert make_splits(ids, test_fraction=0).test == []
    assert len(make_splits(ids[:5], test_fraction=0.5).test) == 3  # round(2.5) = 3, still 2 cases left
    nearly_all = make_splits(ids[:3], groups={c: "one" for c in ids[:2]}, test_fraction=0.9)
    assert 0 < len(nearly_all.test) < 3  # a test list never takes every case
