"""QC of `3dino predict` for the clinician (issue 14, item 4): the measures, the flags, qc.csv and qc_report.html.

The measures are checked on hand-made label maps with known answers; the command on
test_predict's tiny random network (a real run folder) and NIfTI scans, and on the DICOM example
studies (series ranking). The training volume ranges of model.json are checked on a real finetune
run in tests/test_finetune.py.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_3dino
from scipy import ndimage
from test_predict import GOOD, one_thread, project  # noqa: F401 - fixtures: one torch thread; plans, runs and scans

from threedino_pipe.artifacts import CaseProperties, CaseQc, ModelCard, PreprocessedCase, StructureQc, VolumeRange
from threedino_pipe.dicom.index import index_folder
from threedino_pipe.dicom.selection import rules_for_channels, select_series
from threedino_pipe.evaluation.qc import (
    CONNECTIVITY,
    FLAGS,
    QcRules,
    border_share,
    case_flags,
    count_components,
    measure_case,
    measure_structure,
    structure_flags,
    volume_ml,
)
from threedino_pipe.evaluation.qc_report import QC_COLUMNS, render_report
from threedino_pipe.inference.geometry import ConfidenceSums, labels_on_grid
from threedino_pipe.preprocessing.pipeline import label_voxels
from threedino_pipe.raw_data.image_io import read_image
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.training_data.label_volumes import training_volume_ranges

ENV = {"OMP_NUM_THREADS": "1"}
NAMES = ("body", "lesion")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _structure(**fields) -> StructureQc:
    base = {"name": "lesion", "label_values": [2], "voxels": 10, "volume_ml": 1.5, "components": 1,
            "border_share": 0.0, "mean_confidence": 0.9}
    return StructureQc(**{**base, **fields})


# ----- the measures, on hand-made label maps ---------------------------------------------------------
def test_volume_in_ml_uses_the_anisotropic_voxel_volume():
    labels = np.zeros((10, 8, 6), np.uint8)
    labels[2:4, 1:4, 1:5] = 2  # 2 x 3 x 4 = 24 voxels
    structure = measure_structure(labels, "lesion", [2], (0.5, 2.0, 3.0), 0.8)  # 3 mm^3 per voxel
    assert structure.voxels == 24
    assert structure.volume_ml == pytest.approx(24 * 3.0 / 1000)
    assert volume_ml(1000, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert measure_structure(labels, "body", [1], (0.5, 2.0, 3.0), None).volume_ml == 0.0


def test_components_are_counted_with_26_connectivity():
    assert CONNECTIVITY == 26
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner neighbours: one component with 26-connectivity
    assert count_components(mask) == 1
    assert ndimage.label(mask)[1] == 2  # what face connectivity (6) would say
    mask[4, 4, 4] = True  # apart
    assert count_components(mask) == 2
    assert count_components(np.zeros((3, 3, 3), bool)) == 0


def test_border_share_is_the_share_in_the_outermost_voxel_layer():
    mask = np.zeros((10, 5, 5), bool)
    mask[:, 2, 2] = True  # a line through the image: its two end voxels lie on the border
    assert border_share(mask) == pytest.approx(2 / 10)
    mask[:] = False
    mask[3:6, 1:4, 1:4] = True  # inside
    assert border_share(mask) == 0.0
    mask[3:6, 0, 1:4] = True  # a face of 9 voxels on the j = 0 layer
    assert border_share(mask) == pytest.approx(9 / 36)
    assert border_share(np.zeros((4, 4, 4), bool)) == 0.0


def test_a_case_is_measured_on_each_structure_s_bounding_box_as_on_the_whole_image():
    rng = np.random.default_rng(0)
    labels = ((rng.random((12, 9, 7)) < 0.15) * rng.integers(1, 3, (12, 9, 7))).astype(np.uint8)
    labels[0, 0, 0] = 3  # a structure in a corner of the image
    structures = [("a", 1, (1,)), ("b", 2, (2,)), ("corner", 3, (3,)), ("none", 4, (4,)), ("ab", 0, (1, 2))]
    record = measure_case("x", labels, (1.0, 2.0, 3.0), structures, ConfidenceSums(5), weights_checksum="ab")
    for measured, (name, _, values) in zip(record.structures, structures, strict=True):
        whole = measure_structure(labels, name, values, (1.0, 2.0, 3.0), None)
        assert measured == whole, name
    assert record.structures[2].border_share == 1.0 and record.structures[3].voxels == 0


def test_confidence_is_the_label_probability_over_its_voxels():
    # softmax, 3 channels over 4 voxels: argmax 1, 1, 2, 0
    probs = torch.tensor([[0.2, 0.1, 0.3, 0.6], [0.7, 0.5, 0.1, 0.3], [0.1, 0.4, 0.6, 0.1]]).reshape(3, 4, 1, 1)
    sums = ConfidenceSums(3)
    labels = labels_on_grid(probs, output="softmax", values=[0, 1, 2], confidence=sums)
    assert labels.ravel().tolist() == [1, 1, 2, 0]
    assert sums.mean(1) == pytest.approx((0.7 + 0.5) / 2) and sums.mean(2) == pytest.approx(0.6)
    record = measure_case("c", labels, (1.0, 1.0, 1.0), [("body", 1, (1,)), ("lesion", 2, (2,))], sums,
                          weights_checksum="ab")
    assert [s.mean_confidence for s in record.structures] == pytest.approx([0.6, 0.6])
    # sigmoid regions: the region's probability where it passed 0.5; later regions written over earlier
    sig = torch.tensor([[0.9, 0.8, 0.2, 0.6], [0.3, 0.7, 0.1, 0.55]]).reshape(2, 4, 1, 1)
    sums = ConfidenceSums(2)
    labels = labels_on_grid(sig, output="sigmoid", values=[1, 2], confidence=sums)
    assert labels.ravel().tolist() == [1, 2, 0, 2]
    assert sums.mean(0) == pytest.approx((0.9 + 0.8 + 0.6) / 3) and sums.mean(1) == pytest.approx((0.7 + 0.55) / 2)
    empty = ConfidenceSums(2)
    assert empty.mean(1) is None


def test_structures_of_softmax_and_region_cards(project):  # noqa: F811 - the fixture
    card = ModelCard.read(project["run_a"] / "model.json")
    assert card.structures() == [("body", 1, (1,)), ("lesion", 2, (2,))]
    regions = card.model_copy(update={"labels": {"background": 0, "whole": [1, 2], "core": 2}, "output": "sigmoid",
                                      "regions_class_order": [1, 2], "num_outputs": 2})
    assert regions.structures() == [("whole", 0, (1, 2)), ("core", 1, (2,))]


# ----- the flags ------------------------------------------------------------------------------------
def test_flags_empty_outside_range_low_confidence_and_series_rank():
    ranges = {"lesion": VolumeRange(min_ml=1.0, max_ml=2.0)}
    rules = QcRules(min_confidence=0.7, volume_ranges=ranges)
    fine = structure_flags(_structure(), rules, (1,))
    assert fine == {"empty": False, "volume_outside_training_range": False, "low_confidence": False,
                    "series_ranked_second": False}
    empty = structure_flags(_structure(voxels=0, volume_ml=0.0, components=0, mean_confidence=None), rules)
    assert empty == {"empty": True, "volume_outside_training_range": True, "low_confidence": None,
                     "series_ranked_second": None}  # no confidence of nothing; image files have no series
    assert structure_flags(_structure(volume_ml=2.5), rules)["volume_outside_training_range"] is True
    assert structure_flags(_structure(mean_confidence=0.69), rules)["low_confidence"] is True
    assert structure_flags(_structure(mean_confidence=0.69), QcRules(0.6, ranges))["low_confidence"] is False
    assert structure_flags(_structure(), rules, (1, 2))["series_ranked_second"] is True
    # a card without ranges (written before they were recorded): the range is not evaluated
    assert structure_flags(_structure(volume_ml=99.0), QcRules(0.7, None))["volume_outside_training_range"] is None
    assert structure_flags(_structure(name="body"), rules)["volume_outside_training_range"] is None
    record = CaseQc(case_id="c", weights_checksum="ab", spacing_mm=[1.0, 1.0, 1.0], series_ranks=[2],
                    structures=[_structure(mean_confidence=0.5), _structure(name="body", voxels=0, volume_ml=0.0)])
    assert case_flags(record, rules) == ["empty", "low_confidence", "series_ranked_second"]
    assert list(FLAGS) == ["empty", "volume_outside_training_range", "low_confidence", "series_ranked_second"]


def test_report_lists_flagged_cases_first_and_says_what_was_not_evaluated(project, tmp_path):  # noqa: F811
    card = ModelCard.read(project["run_a"] / "model.json")
    records = [CaseQc(case_id=name, weights_checksum="ab", spacing_mm=[1.0, 1.0, 1.0],
                      structures=[_structure(mean_confidence=conf)]) for name, conf in (("a", 0.95), ("b", 0.4))]
    page = render_report(tmp_path, records, ["c"], QcRules(), card)
    assert page.index("b: low_confidence") < page.index("Cases without flags")
    assert "no thumbnail" in page.lower() and "1 predicted case(s) have no QC record" in page
    assert "volume_outside_training_range is not evaluated" in page
    with_ranges = card.model_copy(update={"label_volumes_ml": {"lesion": VolumeRange(min_ml=1.0, max_ml=2.0)}})
    assert "not evaluated" not in render_report(tmp_path, records, [], QcRules(0.7, with_ranges.label_volumes_ml),
                                                with_ranges)


# ----- the training volume ranges -------------------------------------------------------------------
def test_label_voxels_and_training_volume_ranges(tmp_path, project):  # noqa: F811
    label = np.zeros((4, 5, 6), np.uint8)
    label[0, :2, :3] = 1
    label[3, 4, 5] = 2
    assert label_voxels(label) == {"0": 113, "1": 6, "2": 1}
    assert label_voxels(None) is None
    card = ModelCard.read(project["run_a"] / "model.json")
    geometry = {"size": [4, 5, 6], "spacing": [1.0, 2.0, 0.5], "origin": [0.0] * 3,
                "direction": [1.0, 0, 0, 0, 1, 0, 0, 0, 1]}
    case = {"configuration": "finetune", "original_geometry": geometry, "transpose": [0, 1, 2],
            "crop_box": [[0, 4], [0, 5], [0, 6]], "shape_after_crop": [4, 5, 6], "spacing": [1.0, 1.0, 1.0],
            "shape": [4, 5, 6], "normalization": []}
    for case_id, voxels in (("a", {"0": 100, "1": 20, "2": 4}), ("b", {"0": 110, "1": 10})):
        CaseProperties(case_id=case_id, source_files=[], plans_checksum="0" * 16, label_voxels=voxels,
                       **case).write(CaseProperties.path(tmp_path, case_id))
    ranges = training_volume_ranges(tmp_path, ["a", "b"], card.structures())  # 1 mm^3 voxels
    assert {name: (r.min_ml, r.max_ml) for name, r in ranges.items()} == {
        "body": (pytest.approx(0.01), pytest.approx(0.02)), "lesion": (0.0, pytest.approx(0.004))}
    CaseProperties(case_id="old", source_files=[], plans_checksum="0" * 16,
                   **case).write(CaseProperties.path(tmp_path, "old"))  # preprocessed before label_voxels
    assert training_volume_ranges(tmp_path, ["a", "old"], card.structures()) is None
    assert PreprocessedCase(**case).volume_ml_of([1]) is None


def test_a_card_with_a_reversed_volume_range_is_refused(project, tmp_path):  # noqa: F811
    card = ModelCard.read(project["run_a"] / "model.json")
    data = card.to_data()
    data["label_volumes_ml"] = {"body": {"min_ml": 3.0, "max_ml": 1.0}}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        ModelCard.read(path)
    assert "label_volumes_ml.body" in err.value.problem and err.value.file.endswith("model.json")


def test_series_rank_of_a_rule_that_overrides_the_ranking(dicom_studies):
    _, studies = dicom_studies
    study = studies["mr"]
    index = index_folder(study.folder, processes=1)
    by_rank = select_series(index, rules_for_channels({"0": "MR"}))[0]
    by_rule = select_series(index, rules_for_channels({"0": "MR"}, {"0": "REFORMAT"}))[0]
    assert by_rank.chosen["0"].series_uid == study.series["axial"] and by_rank.chosen_rank == {"0": 1}
    assert by_rule.chosen["0"].series_uid == study.series["reformat"] and by_rule.chosen_rank == {"0": 2}


# ----- the command ----------------------------------------------------------------------------------
def _model_with_ranges(source: Path, target: Path, ranges: dict[str, VolumeRange]) -> Path:
    shutil.copytree(source, target)
    card = ModelCard.read(target / "model.json")
    card.model_copy(update={"label_volumes_ml": ranges}).write(target / "model.json")
    return target


@pytest.fixture(scope="module")
def plain_batch(project) -> tuple:  # noqa: F811 - the fixture
    """The random model (no volume ranges in its card), probabilities saved, every structure flagged low."""
    out = project["root"] / "qc_plain"
    proc = run_3dino("predict", "-i", str(project["scans"]), "-o", str(out), "-m", str(project["run_a"]),
                     "--save-probabilities", "--qc-min-confidence", "1.0", "--num-workers", "0", "--no-progress",
                     env=ENV)
    return proc, out


@pytest.mark.e2e
def test_qc_csv_measures_the_written_labels_and_the_saved_probabilities(plain_batch):
    proc, out = plain_batch
    assert proc.returncode == 1, proc.stderr  # the truncated scan
    assert "Traceback" not in proc.stderr
    with (out / "qc.csv").open(newline="") as fh:
        assert tuple(next(csv.reader(fh))) == QC_COLUMNS
    rows = _rows(out / "qc.csv")
    assert [(r["case_id"], r["structure"]) for r in rows] == [(c, n) for c in GOOD for n in NAMES]
    for row in rows:
        labels, geo = read_image(out / f"{row['case_id']}.nii.gz")
        value = NAMES.index(row["structure"]) + 1
        mask = labels == value
        assert row["label_values"] == str(value)
        assert float(row["volume_ml"]) == pytest.approx(mask.sum() * np.prod(geo.spacing) / 1000, abs=1e-3)
        assert int(row["components"]) == ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]
        edge = np.ones(mask.shape, bool)
        edge[1:-1, 1:-1, 1:-1] = False
        assert float(row["border_share"]) == pytest.approx((mask & edge).sum() / max(1, mask.sum()), abs=1e-4)
        assert row["empty"] == str(int(not mask.any()))
        assert row["training_min_ml"] == row["volume_outside_training_range"] == ""  # the card has no ranges
        assert row["series_ranked_second"] == ""  # image files
        if mask.any():
            with np.load(out / f"{row['case_id']}_probabilities.npz") as saved:
                expected = saved["probabilities"][value].astype(np.float64)[mask].mean()
            assert float(row["mean_confidence"]) == pytest.approx(expected, abs=2e-3)
            assert row["low_confidence"] == "1"  # --qc-min-confidence 1.0
        else:
            assert row["mean_confidence"] == row["low_confidence"] == ""
    for case in GOOD:
        assert CaseQc.read(CaseQc.path(out, case)).case_id == case
        assert CaseQc.thumbnail_path(out, case).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "qc_report.html").read_text()
    assert "volume_outside_training_range is not evaluated" in page
    assert "http://" not in page and "https://" not in page


@pytest.fixture(scope="module")
def continued_batch(project, tmp_path_factory) -> tuple:  # noqa: F811 - the fixture
    """A model whose card's ranges no prediction fits: two scans, then --continue over all of them."""
    root = tmp_path_factory.mktemp("qc_continue")
    run = _model_with_ranges(project["run_a"], root / "run_ranges", {
        "body": VolumeRange(min_ml=1000.0, max_ml=2000.0), "lesion": VolumeRange(min_ml=1000.0, max_ml=2000.0)})
    part = root / "part"
    part.mkdir()
    for case in GOOD[:2]:
        shutil.copy(project["scans"] / f"{case}.nii.gz", part)
    out = root / "out"
    first = run_3dino("predict", "-i", str(part), "-o", str(out), "-m", str(run), "--num-workers", "0",
                      "--no-progress", env=ENV)
    assert first.returncode == 0, first.stderr
    before = {case: CaseQc.path(out, case).read_text() for case in GOOD[:2]}
    assert [r["case_id"] for r in _rows(out / "qc.csv")] == [c for c in GOOD[:2] for _ in NAMES]
    again = run_3dino("predict", "-i", str(project["scans"]), "-o", str(out), "-m", str(run), "--continue",
                      "--num-workers", "0", "--no-progress", env=ENV)
    return again, out, before


@pytest.mark.e2e
def test_continue_keeps_the_qc_of_earlier_cases_and_flags_volumes_outside_the_range(continued_batch):
    proc, out, before = continued_batch
    assert proc.returncode == 1, proc.stderr  # the truncated scan
    for case, text in before.items():
        assert CaseQc.path(out, case).read_text() == text  # not predicted again
    rows = _rows(out / "qc.csv")
    assert [(r["case_id"], r["structure"]) for r in rows] == [(c, n) for c in GOOD for n in NAMES]
    for row in rows:
        assert (row["training_min_ml"], row["training_max_ml"]) == ("1000.000", "2000.000")
        assert row["volume_outside_training_range"] == "1"  # no structure of these scans is a litre
        assert "volume_outside_training_range" in row["flags"].split()
        if row["mean_confidence"]:
            assert row["low_confidence"] == str(int(float(row["mean_confidence"]) < 0.7))  # the default 0.7


@pytest.mark.e2e
def test_qc_report_renders_every_thumbnail_in_chromium(continued_batch, tmp_path):
    from test_report_browser import CHROMIUM, _assert_rendered, _open_in_chromium
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    _, out, _ = continued_batch
    page = out / "qc_report.html"
    text = page.read_text()
    assert text.index(f"<h2>{GOOD[0]}: ") < text.index("Cases without flags")  # flagged cases first
    assert text.count("volume_outside_training_range") >= len(GOOD)
    assert "src='data:image/png;base64," in text and "http://" not in text
    images = _open_in_chromium(page, tmp_path / "qc.png")
    _assert_rendered(images, tmp_path / "qc.png", min_images=len(GOOD))  # a thumbnail per flagged case


@pytest.mark.e2e
def test_no_qc_writes_no_qc_files(project, tmp_path):  # noqa: F811
    scans = tmp_path / "in"
    scans.mkdir()
    shutil.copy(project["scans"] / f"{GOOD[0]}.nii.gz", scans)
    proc = run_3dino("predict", "-i", str(scans), "-o", str(tmp_path / "out"), "-m", str(project["run_a"]),
                     "--no-qc", "--num-workers", "0", "--no-progress", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["failures.csv", f"{GOOD[0]}.nii.gz",
                                                                   "predict_args.json", "predict_log.jsonl"]
    bad = run_3dino("predict", "-i", str(scans), "-o", str(tmp_path / "bad"), "-m", str(project["run_a"]),
                    "--qc-min-confidence", "1.5", env=ENV)
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()


@pytest.mark.e2e
def test_dicom_study_read_from_a_lower_ranked_series_is_flagged(dicom_studies, project, tmp_path):  # noqa: F811
    _, studies = dicom_studies
    study = studies["mr"]
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(study.folder), "-o", str(out), "-m", str(project["run_a"]),
                     "--series-rule", "0=REFORMAT", "--num-workers", "0", "--no-progress", env=ENV)
    assert proc.returncode == 0, proc.stderr
    chosen = [r for r in _rows(out / "series_selection.csv") if r["status"] == "chosen"]
    assert [r["series_uid"] for r in chosen] == [study.series["reformat"]]
    rows = _rows(out / "qc.csv")
    assert len(rows) == len(NAMES) and {r["series_ranked_second"] for r in rows} == {"1"}
    assert "series_ranked_second" in (out / "qc_report.html").read_text()
    secrets = [p for p in study.identity.patient_name.split("^") if len(p) > 4]
    secrets += [study.identity.patient_id, study.identity.accession]
    for path in [out / "qc.csv", out / "qc_report.html", *(out / ".qc").iterdir()]:
        data = path.read_bytes().decode("latin-1").lower()
        assert not any(s.lower() in data or s.lower() in path.name.lower() for s in secrets), path
