"""`3dino verify` (and `3dino plan`'s refusal) on the broken-dataset corpus and on good datasets.

Commands run the real CLI in a subprocess; the corpus runs go through a small thread pool (two
at a time) to keep this file fast on a 2-core machine. Each fault is also checked in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, run_3dino

from threedino_pipe.demo.examples import oblique_direction
from threedino_pipe.raw_data.verification import check_dataset
from threedino_pipe.runtime.errors import UserError

CORPUS = REPO / "tests" / "data" / "broken"
_spec = importlib.util.spec_from_file_location("make_broken_corpus", REPO / "tests" / "data" / "make_broken_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

# fault -> (file the report must name, words that say what is wrong)
EXPECTED = {
    "missing_channel": ("imagesTr/case_001_0001.nii.gz", "missing channel"),
    "extra_channel": ("imagesTr/case_001_0001.nii.gz", "extra channel"),
    "shape_mismatch": ("labelsTr/case_001.nii.gz", "label shape 8x8x5 differs"),
    "spacing_mismatch": ("labelsTr/case_001.nii.gz", "label spacing"),
    "origin_mismatch": ("labelsTr/case_001.nii.gz", "label origin"),
    "direction_mismatch": ("labelsTr/case_001.nii.gz", "label direction"),
    "channel_spacing_mismatch": ("imagesTr/case_001_0001.nii.gz", "channel spacing"),
    "undeclared_label": ("labelsTr/case_001.nii.gz", "not declared in dataset.json: 3, 7"),
    "non_integer_label": ("labelsTr/case_001.nii.gz", "non-integer values (1.5)"),
    "nan_voxels": ("imagesTr/case_001_0000.nii.gz", "3 NaN voxels"),
    "inf_voxels": ("imagesTr/case_001_0000.nii.gz", "3 infinite voxels"),
    "four_d_image": ("imagesTr/case_001_0000.nii.gz", "4D"),
    "two_d_image": ("imagesTr/case_001_0000.nii.gz", "2D"),
    "multi_component": ("imagesTr/case_001_0000.nii.gz", "3 components per voxel"),
    "truncated_file": ("imagesTr/case_001_0000.nii.gz", "truncated"),
    "unreadable_file": ("imagesTr/case_001_0000.nii.gz", "unreadable"),
    "num_training_mismatch": ("dataset.json", "numTraining is 3"),
    "missing_label": ("labelsTr/case_001.nii.gz", "label file is missing"),
    "missing_dataset_json": ("dataset.json", "dataset.json is missing"),
    "malformed_dataset_json": ("dataset.json", "not valid JSON"),
    "dicom_two_series": ("imagesTr/case_001_0000", "holds 2 series"),
    "dicom_no_series": ("imagesTr/case_001_0000", "no DICOM series"),
    "dicom_missing_slice": ("imagesTr/case_001_0000", "unevenly spaced"),
    "wrong_file_ending": ("imagesTr/case_001_0000.nii", "ends in '.nii' but dataset.json's file_ending is '.nii.gz'"),
    "wrong_label_ending": ("labelsTr/case_001.mha", "ends in '.mha' but dataset.json's file_ending is '.nii.gz'"),
    "no_cases": ("imagesTr", "no training case"),
    "classification_labels_from_1": ("dataset.json", "classes are numbered 0, 1, ..., K-1"),
    "case_groups_unknown_case": ("dataset.json", "case_groups 'patient_1' names case(s) the dataset does not have: "
                                 "case_009"),
}
RAISED = ("missing_dataset_json", "malformed_dataset_json", "classification_labels_from_1")  # nothing else checked
NO_CASES = ("no_cases",)  # faults where no case is found at all
# The command line (verify, and plan's refusal) runs on the faults the raw convention names first; every fault of
# the corpus, these and the further ones, is also checked in-process, exactly (and fast).
ISSUE_FAULTS = ["missing_channel", "extra_channel", "shape_mismatch", "spacing_mismatch", "origin_mismatch",
               "direction_mismatch", "undeclared_label", "nan_voxels", "inf_voxels", "four_d_image", "truncated_file",
               "unreadable_file", "num_training_mismatch", "missing_label", "missing_dataset_json",
               "malformed_dataset_json", "wrong_file_ending", "wrong_label_ending", "no_cases",
               "classification_labels_from_1", "case_groups_unknown_case"]


def _dataset(fault: str) -> Path:
    return next(p for p in (CORPUS / fault).iterdir() if p.name.startswith("Dataset"))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _env(raw: Path, base: Path) -> dict[str, str]:
    (base / "preprocessed").mkdir(parents=True, exist_ok=True)
    (base / "results").mkdir(parents=True, exist_ok=True)
    return {"THREEDINO_RAW": str(raw), "THREEDINO_PREPROCESSED": str(base / "preprocessed"),
            "THREEDINO_RESULTS": str(base / "results"), "nnUNet_raw": ""}


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory):
    """fault -> {"verify"/"plan": process, "verify_folder"/"plan_folder": its cwd}; the corpus stays untouched."""
    before = _snapshot(CORPUS)
    jobs = []
    for fault in ISSUE_FAULTS:
        number = _dataset(fault).name.split("_")[0].removeprefix("Dataset")
        for command in ("verify", "plan"):
            base = tmp_path_factory.mktemp(f"{fault}_{command}")
            jobs.append((fault, command, (command, "-d", number, "-np", "1"), _env(CORPUS / fault, base), base))
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda job: (job, run_3dino(*job[2], env=job[3], cwd=job[4], timeout=120)), jobs))
    out: dict[str, dict] = {}
    for (fault, command, _, _, base), proc in done:
        out.setdefault(fault, {})[command] = proc
        out[fault][f"{command}_folder"] = base
    assert _snapshot(CORPUS) == before, "verify or plan changed a file of the corpus"
    return out


@pytest.mark.parametrize("fault", list(EXPECTED))
def test_check_dataset_finds_each_fault_and_nothing_else(fault):
    file, words = EXPECTED[fault]
    if fault in RAISED:
        with pytest.raises(UserError) as info:
            check_dataset(_dataset(fault), num_processes=1)
        assert info.value.file.endswith(file) and words in info.value.problem
        return
    _, cases, problems = check_dataset(_dataset(fault), num_processes=1)
    errors = [p for p in problems if p.is_error]
    assert len(errors) == 1, errors
    assert errors[0].file == file and words in errors[0].problem and errors[0].fix
    assert errors[0].case in ("case_001", "")
    assert [c.case_id for c in cases] == ([] if fault in NO_CASES else ["case_000", "case_001"])
    if "ending" in fault:  # the fix names the field to change
        assert "file_ending" in errors[0].fix


@pytest.mark.parametrize("fault", ISSUE_FAULTS)
def test_verify_reports_each_fault(fault, corpus_runs):
    proc = corpus_runs[fault]["verify"]
    text = proc.stdout + proc.stderr
    file, words = EXPECTED[fault]
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    assert file in text and words in text, text
    if fault not in RAISED:  # the report names every error, and only case_001's file is at fault
        assert "1 errors" in proc.stdout, text
    if fault in NO_CASES:
        assert "0 cases, 1 errors" in proc.stdout and "verify failed" in proc.stdout, text
    assert not any(p.is_file() for p in corpus_runs[fault]["verify_folder"].rglob("*")), "verify wrote a file"


@pytest.mark.parametrize("fault", ISSUE_FAULTS)
def test_plan_refuses_each_fault_and_writes_nothing(fault, corpus_runs):
    proc = corpus_runs[fault]["plan"]
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    assert EXPECTED[fault][0] in text, text
    assert not any((corpus_runs[fault]["plan_folder"] / "preprocessed").rglob("*")), \
        "plan wrote under THREEDINO_PREPROCESSED"


def test_corpus_matches_its_generator(tmp_path):
    assert set(EXPECTED) == set(corpus.FAULTS), "every fault of the generator needs an expectation here"
    """The committed corpus is exactly what make_broken_corpus.py writes (regenerate it after a change)."""
    fresh = corpus.generate(tmp_path / "broken")
    assert set(fresh) == set(corpus.FAULTS)
    committed = {p.relative_to(CORPUS): p.read_bytes() for p in CORPUS.rglob("*") if p.is_file()}
    generated = {p.relative_to(tmp_path / "broken"): p.read_bytes() for p in (tmp_path / "broken").rglob("*")
                 if p.is_file()}
    assert committed.keys() == generated.keys()
    assert [k for k in committed if committed[k] != generated[k]] == []
    assert sum(len(b) for b in committed.values()) < 600_000


def test_allow_nan_turns_nan_into_a_warning(tmp_path):
    proc = run_3dino("verify", "-d", "910", "--allow-nan", "--no-progress",
                     env=_env(CORPUS / "nan_voxels", tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 NaN voxels" in proc.stdout and "--allow-nan" in proc.stdout
    assert "0 errors" in proc.stdout


def test_good_real_and_generated_datasets_pass(mni_raw, synthetic_raw, tmp_path):
    proc = run_3dino("verify", "-d", "990", "-np", "1", "-v", "--no-progress", env=_env(mni_raw, tmp_path),
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 cases, 0 errors" in proc.stdout and "checked mni_007" in proc.stderr  # -v: one line per case
    proc = run_3dino("verify", "-d", "Dataset991_Ellipsoids", "-np", "2", env=_env(synthetic_raw, tmp_path),
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 48 x 48 x 16 voxels: the too-few-slices warning, once per case, exit 0
    assert "6 cases, 0 errors, 6 warnings" in proc.stdout
    assert proc.stdout.count("too few slices for pretraining: smallest axis has 16 voxels") == 6
    assert "Traceback" not in proc.stderr


def test_ambiguous_and_missing_ids_list_what_exists(tmp_path):
    raw = tmp_path / "raw"
    for name in ("Dataset950_Alpha", "Dataset950_Beta", "Dataset951_Gamma"):
        (raw / name).mkdir(parents=True)
    env = _env(raw, tmp_path)
    proc = run_3dino("verify", "-d", "950", env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "ambiguous" in proc.stderr and "Dataset950_Alpha" in proc.stderr and "Dataset950_Beta" in proc.stderr
    proc = run_3dino("verify", "-d", "952", env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no dataset '952'" in proc.stderr and "Dataset951_Gamma" in proc.stderr


def _write(array_xyz: np.ndarray, path: Path, **geometry) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(corpus.make_image(array_xyz, **geometry), str(path), useCompression=True)


def _nnunet_ct_dataset(raw: Path) -> None:
    """A dataset exactly as nnU-Net v2 documents it (Dataset_conversion.md): extra keys, imagesTs/."""
    folder = raw / "Dataset501_Liver"
    rng = np.random.default_rng(0)
    for split, cases in (("Tr", ("liver_000", "liver_001", "liver_002")), ("Ts", ("liver_100",))):
        for case in cases:
            image = rng.normal(0, 50, (24, 20, 26)).astype(np.int16)
            seg = np.zeros((24, 20, 26), np.uint8)
            seg[4:18, 4:16, 5:20], seg[8:12, 8:12, 8:12] = 1, 2
            _write(image, folder / f"images{split}" / f"{case}_0000.nii.gz", spacing=(0.7, 0.7, 2.5))
            if split == "Tr":
                _write(seg, folder / "labelsTr" / f"{case}.nii.gz", spacing=(0.7, 0.7, 2.5))
    (folder / "imagesTr" / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": 3,
        "file_ending": ".nii.gz", "name": "Liver", "description": "nnU-Net v2 layout", "reference": "none",
        "licence": "CC0", "release": "1.0", "tensorImageSize": "3D", "overwrite_image_reader_writer": "SimpleITKIO",
    }, indent=4))


def _brats_region_dataset(raw: Path) -> None:
    """nnU-Net v2's region-based BraTS layout: 4 MRI channels, region labels, regions_class_order (.nrrd)."""
    folder = raw / "Dataset502_BraTS"
    rng = np.random.default_rng(1)
    direction = oblique_direction(15.0)
    for case in ("BraTS_000", "BraTS_001"):
        for c in range(4):
            _write(rng.normal(100, 20, (26, 26, 26)).astype(np.float32), folder / "imagesTr" / f"{case}_{c:04d}.nrrd",
                   spacing=(1.0, 1.0, 1.0), origin=(10.0, -5.0, 3.0), direction=direction)
        seg = np.zeros((26, 26, 26), np.uint8)
        seg[5:20, 5:20, 5:20], seg[8:16, 8:16, 8:16], seg[10:13, 10:13, 10:13] = 2, 1, 3
        _write(seg, folder / "labelsTr" / f"{case}.nrrd", spacing=(1.0, 1.0, 1.0), origin=(10.0, -5.0, 3.0),
               direction=direction)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
        "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
        "regions_class_order": [1, 2, 3], "numTraining": 2, "file_ending": ".nrrd"}))


def test_datasets_in_nnunet_v2_layout_pass_unchanged(tmp_path):
    raw = tmp_path / "raw"
    _nnunet_ct_dataset(raw)
    _brats_region_dataset(raw)
    env = _env(raw, tmp_path)
    for number, cases in (("501", 3), ("502", 2)):
        proc = run_3dino("verify", "-d", number, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{cases} cases, 0 errors" in proc.stdout


def test_classification_unlabeled_and_dicom_datasets_pass(tmp_path):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(2)
    cls = raw / "Dataset601_Nodules"
    for index in range(4):
        _write(rng.normal(0, 1, (26, 26, 26)).astype(np.float32), cls / "imagesTr" / f"nod_{index:03d}_0000.mha")
    (cls / "labelsTr.csv").write_text("case_id,label\nnod_000,benign\nnod_001,malignant\nnod_002,0\nnod_003,1\n")
    (cls / "dataset.json").write_text(json.dumps({
        "task": "classification", "channel_names": {"0": "CT"}, "class_names": ["benign", "malignant"],
        "numTraining": 4, "file_ending": ".mha"}))
    unl = raw / "Dataset602_Collection"
    for index in range(3):
        _write(rng.normal(0, 1, (26, 26, 30)).astype(np.float32), unl / "imagesTr" / f"scan_{index:03d}_0000.nii.gz")
    (unl / "dataset.json").write_text(json.dumps({
        "task": "unlabeled", "channel_names": {"0": "MR"}, "file_ending": ".nii.gz"}))
    dcm = raw / "Dataset603_DicomCT"
    geometry = {"spacing": (0.8, 0.8, 3.0), "origin": (-20.5, 14.25, 100.0), "direction": oblique_direction(20.0)}
    for index in range(2):
        volume = rng.normal(0, 100, (26, 26, 26)).round().astype(np.int16)
        corpus.write_dicom_series(volume, dcm / "imagesTr" / f"ct_{index:03d}_0000", f"2.25.1234{index}", **geometry)
        seg = np.zeros((26, 26, 26), np.uint8)
        seg[5:20, 5:20, 5:20] = 1
        _write(seg, dcm / "labelsTr" / f"ct_{index:03d}.nii.gz", **geometry)
    (dcm / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
        "file_ending": ".nii.gz"}))
    env = _env(raw, tmp_path)
    for number, cases in (("601", 4), ("602", 3), ("603", 2)):
        proc = run_3dino("verify", "-d", number, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{cases} cases, 0 errors, 0 warnings" in proc.stdout
    assert os.listdir(tmp_path / "preprocessed") == []


def test_files_of_another_ending_are_errors_naming_file_ending(tmp_path):
    """Every file .nii while file_ending is .nii.gz, no numTraining: errors naming each file, never 'verify passed'."""
    raw = tmp_path / "raw"
    folder = raw / "Dataset960_Endings"
    corpus.dataset_json(folder)
    spec = json.loads((folder / "dataset.json").read_text())
    del spec["numTraining"]
    (folder / "dataset.json").write_text(json.dumps(spec))
    for index, case in enumerate(("a", "b")):
        _write(corpus.volume(index), folder / "imagesTr" / f"{case}_0000.nii")
        _write(corpus.label(), folder / "labelsTr" / f"{case}.nii")
    proc = run_3dino("verify", "-d", "960", "-np", "1", env=_env(raw, tmp_path), cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text and "verify passed" not in text
    assert "2 cases, 4 errors" in proc.stdout, text
    for name in ("imagesTr/a_0000.nii", "imagesTr/b_0000.nii", "labelsTr/a.nii", "labelsTr/b.nii"):
        assert name in proc.stdout, text
    assert proc.stdout.count('set "file_ending": ".nii" in dataset.json') == 4
    assert "numTraining" not in proc.stdout
    spec["file_ending"] = ".nii"  # the fix the message gives
    (folder / "dataset.json").write_text(json.dumps(spec))
    proc = run_3dino("verify", "-d", "960", "-np", "1", env=_env(raw, tmp_path), cwd=tmp_path)
    assert proc.returncode == 0 and "2 cases, 0 errors" in proc.stdout, proc.stdout + proc.stderr


def test_classification_dataset_written_the_nnunet_way_is_recognised(tmp_path):
    """labels {name: 0..K-1}, labelsTr.csv, no labelsTr/, no task: classification with a note (issue 13.6)."""
    raw = tmp_path / "raw"
    folder = raw / "Dataset961_Lesions"
    rng = np.random.default_rng(3)
    for index in range(4):
        _write(rng.normal(0, 1, (26, 26, 26)).astype(np.float32), folder / "imagesTr" / f"les_{index:03d}_0000.nii.gz")
    (folder / "labelsTr.csv").write_text("case_id,label\nles_000,benign\nles_001,malignant\nles_002,0\nles_003,1\n")
    (folder / "dataset.json").write_text(json.dumps({  # written in the other order: the integers decide
        "channel_names": {"0": "CT"}, "labels": {"malignant": 1, "benign": 0}, "numTraining": 4,
        "file_ending": ".nii.gz"}))
    env = _env(raw, tmp_path)
    proc = run_3dino("verify", "-d", "961", "-np", "1", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 cases, 0 errors" in proc.stdout and "labelsTr/ is missing" not in proc.stdout
    assert "read as a classification dataset with class_names ['benign', 'malignant']" in proc.stderr, proc.stderr
    proc = run_3dino("plan", "-d", "961", "-np", "1", "--preset", "tiny", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "note: dataset.json has no 'task'" in proc.stderr
    plans = json.loads((tmp_path / "preprocessed" / "Dataset961_Lesions" / "plans.json").read_text())
    assert (plans["task"], plans["class_names"]) == ("classification", ["benign", "malignant"])
    assert "finetune" in plans["configurations"]
