"""The raw-data convention: dataset.json parsing, case discovery, templates, per-file checks and tolerances.

In-process tests of ``load_spec``, ``discover_cases`` and ``check_dataset`` on real files
(the command line itself is exercised in test_verify.py).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

from threedino_pipe.artifacts import DatasetJson
from threedino_pipe.raw_data import case_checks
from threedino_pipe.raw_data.raw import discover_cases
from threedino_pipe.raw_data.verification import check_dataset
from threedino_pipe.runtime.errors import UserError

TEMPLATES = REPO / "dataset_templates"
_spec = importlib.util.spec_from_file_location("make_broken_corpus", REPO / "tests" / "data" / "make_broken_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

SIZE = (26, 26, 26)


def _write(array: np.ndarray, path: Path, **geometry) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(corpus.make_image(array, **geometry), str(path), useCompression=True)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, SIZE).round().astype(np.int16)


def _label(values=(1, 2, 3)) -> np.ndarray:
    seg = np.zeros(SIZE, np.uint8)
    for index, value in enumerate(values):
        seg[4 + 2 * index: 20 - 2 * index, 4:20, 4:20] = value
    return seg


def _errors(problems):
    return [p for p in problems if p.is_error]


def _from_template(tmp_path: Path, template: str, name: str) -> tuple[Path, dict]:
    folder = tmp_path / name
    shutil.copytree(TEMPLATES / template, folder, ignore=shutil.ignore_patterns("README.md"))
    return folder, json.loads((folder / "dataset.json").read_text())


def test_every_template_builds_a_dataset_that_verifies(tmp_path):
    """Files laid out as each template's README shows pass check_dataset without an error."""
    expected = {"segmentation_ct", "multichannel_mri_regions", "classification", "unlabeled", "dicom_cases"}
    assert expected <= {p.name for p in TEMPLATES.iterdir() if p.is_dir()}
    for template in expected:
        assert (TEMPLATES / template / "README.md").is_file()

    folder, spec = _from_template(tmp_path, "segmentation_ct", "Dataset501_LiverCT")
    for index in range(spec["numTraining"]):
        _write(_image(index), folder / "imagesTr" / f"liver_{index:03d}_0000.nii.gz")
        _write(_label((1, 2)), folder / "labelsTr" / f"liver_{index:03d}.nii.gz")
    _write(_image(9), folder / "imagesTs" / "liver_100_0000.nii.gz")

    folder, spec = _from_template(tmp_path, "multichannel_mri_regions", "Dataset502_BraTS")
    for index in range(spec["numTraining"]):
        for channel in range(4):
            _write(_image(10 * index + channel), folder / "imagesTr" / f"BraTS_{index:03d}_{channel:04d}.nii.gz")
        _write(_label((1, 2, 3)), folder / "labelsTr" / f"BraTS_{index:03d}.nii.gz")

    folder, spec = _from_template(tmp_path, "classification", "Dataset601_LungNodules")
    for index in range(spec["numTraining"]):
        _write(_image(index), folder / "imagesTr" / f"nodule_{index:03d}_0000.nii.gz")

    folder, spec = _from_template(tmp_path, "unlabeled", "Dataset701_BrainMRICollection")
    for index in range(3):
        _write(_image(index), folder / "imagesTr" / f"scan_{index:05d}_0000.nii.gz")

    folder, spec = _from_template(tmp_path, "dicom_cases", "Dataset801_ChestCTDicom")
    for index in range(spec["numTraining"]):
        corpus.write_dicom_series(_image(index), folder / "imagesTr" / f"chest_{index:03d}_0000", f"2.25.77{index}")
        _write(_label((1,)), folder / "labelsTr" / f"chest_{index:03d}.nii.gz")

    tasks = {}
    for folder in sorted(tmp_path.iterdir()):
        spec, cases, problems = check_dataset(folder, num_processes=1)
        assert _errors(problems) == [], (folder.name, problems)
        tasks[folder.name] = (spec.task, len(cases))
    assert tasks == {"Dataset501_LiverCT": ("segmentation", 3), "Dataset502_BraTS": ("segmentation", 2),
                     "Dataset601_LungNodules": ("classification", 4),
                     "Dataset701_BrainMRICollection": ("unlabeled", 3), "Dataset801_ChestCTDicom": ("segmentation", 2)}
    spec = DatasetJson.read(tmp_path / "Dataset502_BraTS")
    assert spec.has_regions and spec.label_values == {0, 1, 2, 3} and spec.regions_class_order == [1, 2, 3]
    _, cases, _ = check_dataset(tmp_path / "Dataset601_LungNodules", num_processes=1)
    assert [c.class_label for c in cases] == [0, 1, 0, 1]


def test_nnunet_dataset_key_lists_files_anywhere(tmp_path, monkeypatch):
    """nnU-Net v2's optional "dataset" key: relative, absolute and $VAR paths; missing files are errors."""
    folder = tmp_path / "Dataset510_Listed"
    elsewhere = tmp_path / "elsewhere"
    _write(_image(0), folder / "scans" / "a_t1.nii.gz")
    _write(_image(1), folder / "scans" / "a_t2.nii.gz")
    _write(_label((1,)), folder / "masks" / "a.nii.gz")
    _write(_image(2), elsewhere / "b_t1.nii.gz")
    _write(_image(3), elsewhere / "b_t2.nii.gz")
    _write(_label((1,)), elsewhere / "b.nii.gz")
    monkeypatch.setenv("LISTED_DATA", str(elsewhere))
    listing = {"a": {"images": ["scans/a_t1.nii.gz", "scans/a_t2.nii.gz"], "label": "masks/a.nii.gz"},
               "b": {"images": [str(elsewhere / "b_t1.nii.gz"), "$LISTED_DATA/b_t2.nii.gz"],
                     "label": "$LISTED_DATA/b.nii.gz"}}
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
        "file_ending": ".nii.gz", "dataset": listing}))
    spec, cases, problems = check_dataset(folder, num_processes=1)
    assert _errors(problems) == []
    assert [c.case_id for c in cases] == ["a", "b"]
    assert cases[1].images[1] == elsewhere / "b_t2.nii.gz" and cases[0].label == folder / "masks" / "a.nii.gz"

    (folder / "masks" / "a.nii.gz").unlink()
    listing["b"]["images"] = listing["b"]["images"][:1]
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
        "file_ending": ".nii.gz", "dataset": listing}))
    _, _, problems = check_dataset(folder, num_processes=1)
    found = {(p.file, p.problem.split(" (")[0]) for p in _errors(problems)}
    assert ("masks/a.nii.gz", "label file is missing") in found
    assert any("lists 1 images but channel_names declares 2" in p.problem for p in problems)


@pytest.mark.parametrize(("content", "words"), [
    ({"channel_names": {"0": "CT"}, "labels": {"0": "background", "1": "liver"}, "file_ending": ".nii.gz"},
     '"background": 0'),
    ({"channel_names": {"0": "MR"}, "labels": {"background": 0, "tumour": [1, 2]}, "file_ending": ".nii.gz"},
     "regions_class_order"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "file_ending": ".nii.gz",
      "dataset": {"a": {"images": "a.nii.gz", "label": "l.nii.gz"}}}, "'images'"),
    ({"channel_names": {"1": "CT"}, "labels": {"background": 0}, "file_ending": ".nii.gz"}, "0, 1, 2"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": "nii.gz"}, "file_ending"),
    ({"task": "classification", "channel_names": {"0": "CT"}, "class_names": ["only"], "file_ending": ".mha"},
     "at least 2 classes"),
])
def test_bad_dataset_json_is_a_user_error_naming_the_fix(tmp_path, content, words):
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    with pytest.raises(UserError) as info:
        DatasetJson.read(tmp_path)
    assert info.value.file.endswith("dataset.json") and words in info.value.render()


def test_layout_problems_and_what_nnunet_ignores(tmp_path):
    folder = tmp_path / "Dataset520_Layout"
    for case in ("c1", "c2"):
        _write(_image(0), folder / "imagesTr" / f"{case}_0000.nii.gz")
        _write(_label((1,)), folder / "labelsTr" / f"{case}.nii.gz")
    (folder / "imagesTr" / "notes.txt").write_text("ignored by nnU-Net too")
    _write(_label((1,)), folder / "labelsTr" / "orphan.nii.gz")
    corpus.write_dicom_series(_image(1), folder / "imagesTr" / "c2_0000", "2.25.5")  # c2 channel 0 twice
    _write(_image(2), folder / "imagesTr" / "badname.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
        "file_ending": ".nii.gz"}))
    spec = DatasetJson.read(folder)
    cases, problems = discover_cases(folder, spec)
    by_file = {p.file: p for p in problems}
    assert by_file["imagesTr/notes.txt"].severity == "warning"
    assert by_file["labelsTr/orphan.nii.gz"].severity == "warning"
    assert by_file["imagesTr/badname.nii.gz"].is_error
    assert "given twice" in by_file["imagesTr/c2_0000.nii.gz"].problem
    assert [c.case_id for c in cases] == ["c1", "c2"]


def test_tolerances_accept_rounding_and_refuse_real_differences(tmp_path):
    spacing, origin = (0.7, 0.7, 2.5), (-120.25, 33.5, 400.0)
    direction = corpus._rotated(20.0)

    def dataset(name: str, **label_geometry) -> Path:
        folder = tmp_path / name
        _write(_image(0), folder / "imagesTr" / "c_0000.nii.gz", spacing=spacing, origin=origin,
               direction=direction)
        geometry = {"spacing": spacing, "origin": origin, "direction": direction} | label_geometry
        _write(_label((1,)), folder / "labelsTr" / "c.nii.gz", **geometry)
        (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
            "background": 0, "organ": 1}, "numTraining": 1, "file_ending": ".nii.gz"}))
        return folder

    close = dataset("close", spacing=tuple(s * (1 + 5e-6) for s in spacing),
                    origin=tuple(o + 3e-5 for o in origin), direction=corpus._rotated(20.0001))
    assert _errors(check_dataset(close, num_processes=1)[2]) == []
    for name, geometry, word in (("far_spacing", {"spacing": (0.7, 0.7, 2.502)}, "spacing"),
                                 ("far_origin", {"origin": (-120.25, 33.5, 400.05)}, "origin"),
                                 ("far_direction", {"direction": corpus._rotated(20.1)}, "direction")):
        errors = _errors(check_dataset(dataset(name, **geometry), num_processes=1)[2])
        assert [p.problem.split(" ")[1] for p in errors] == [word], errors


def test_label_checks_and_pool_gives_the_same_report(tmp_path):
    folder = tmp_path / "Dataset530_Labels"
    _write(_image(0), folder / "imagesTr" / "empty_0000.nii.gz")
    _write(np.zeros(SIZE, np.uint8), folder / "labelsTr" / "empty.nii.gz")
    many = np.arange(np.prod(SIZE), dtype=np.int32).reshape(SIZE) % 40 - 5  # -5 .. 34: 37 undeclared values
    _write(_image(1), folder / "imagesTr" / "many_0000.nii.gz")
    _write(many, folder / "labelsTr" / "many.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
        "background": 0, "a": 1, "b": 2}, "numTraining": 2, "file_ending": ".nii.gz"}))
    _, _, inline = check_dataset(folder, num_processes=1)
    _, _, pooled = check_dataset(folder, num_processes=2)
    assert inline == pooled
    empty = [p for p in inline if p.case == "empty"]
    assert [(p.severity, p.problem) for p in empty] == [("warning", "label image holds only background (0)")]
    (many_error,) = _errors(inline)
    assert "-5, -4, -3, -2, -1, 3, 4, 5, 6, 7 and 27 more" in many_error.problem


def test_an_unexpected_exception_becomes_a_problem_of_that_file(tmp_path, monkeypatch):
    folder = tmp_path / "Dataset540_Bug"
    _write(_image(0), folder / "imagesTr" / "c_0000.nii.gz")
    _write(_label((1,)), folder / "labelsTr" / "c.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
        "background": 0, "organ": 1}, "numTraining": 1, "file_ending": ".nii.gz"}))

    def broken(*args, **kwargs):
        raise ValueError("a bug in a label check")

    monkeypatch.setattr(case_checks, "_label_problems", broken)
    _, _, problems = check_dataset(folder, num_processes=1)
    (error,) = _errors(problems)
    assert error.file == "labelsTr/c.nii.gz" and "ValueError: a bug in a label check" in error.problem
