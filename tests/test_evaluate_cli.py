"""`3dino evaluate` through the real command line on real NIfTI files and CSVs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_3dino
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from threedino_pipe.raw_data.image_io import Geometry, read_image, write_image
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import evaluate

pytestmark = pytest.mark.e2e
NUM_CASES = 6


def _references(mni_raw: Path) -> dict[str, Path]:
    labels = sorted((mni_raw / "Dataset990_MNITissue" / "labelsTr").glob("*.nii.gz"))[:NUM_CASES]
    return {p.name[: -len(".nii.gz")]: p for p in labels}


def _write_predictions(references: dict[str, Path], out: Path, changed: list[int]) -> dict[str, dict[str, float]]:
    """Predictions = references with ``changed[i]`` grey-matter voxels (1) relabelled white matter (2).

    Returns the expected Dice per case: grey 2(n1-m)/(2n1-m), white 2n2/(2n2+m), the tissue region 1.
    """
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for (case, path), m in zip(references.items(), changed, strict=False):
        label, geometry = read_image(path)
        n1, n2 = int((label == 1).sum()), int((label == 2).sum())
        prediction = label.copy()
        prediction.reshape(-1)[np.flatnonzero(label == 1)[:m]] = 2
        write_image(prediction, geometry, out / path.name)
        expected[case] = {"grey_matter": 2 * (n1 - m) / (2 * n1 - m), "white_matter": 2 * n2 / (2 * n2 + m),
                          "tissue": 1.0}
    return expected


@pytest.fixture
def workspace(tmp_path, mni_raw):
    """A reference folder of real label images (anisotropic, oblique, non-zero origin) and a raw
    folder holding a dataset.json with two labels and a region."""
    references = _references(mni_raw)
    ref_dir = tmp_path / "labels"
    ref_dir.mkdir()
    for path in references.values():
        shutil.copy(path, ref_dir / path.name)
    _, geometry = read_image(next(iter(references.values())))
    assert not np.allclose(geometry.direction, np.eye(3).ravel()) and len(set(geometry.spacing)) > 1
    raw = tmp_path / "raw" / "Dataset992_Tissue"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "file_ending": ".nii.gz", "numTraining": NUM_CASES,
        "labels": {"background": 0, "grey_matter": 1, "white_matter": 2, "tissue": [1, 2]},
        "regions_class_order": [1, 2, 0]}))
    return {"tmp": tmp_path, "ref": ref_dir, "refs": {c: ref_dir / p.name for c, p in references.items()},
            "env": {"THREEDINO_RAW": str(tmp_path / "raw")}}


def test_segmentation_evaluation_with_regions_missing_and_misplaced_cases(workspace):
    refs, tmp = workspace["refs"], workspace["tmp"]
    pred = tmp / "pred"
    expected = _write_predictions(refs, pred, [40 * (i + 1) for i in range(NUM_CASES)])
    cases = list(refs)
    (pred / f"{cases[0]}.nii.gz").unlink()  # missing prediction
    label, geometry = read_image(refs[cases[1]])  # prediction shifted by 0.5 mm: not on its reference
    shifted = Geometry(geometry.size, geometry.spacing, tuple(np.add(geometry.origin, (0.5, 0, 0))),
                       geometry.direction)
    write_image(label, shifted, pred / f"{cases[1]}.nii.gz")
    write_image(label, geometry, pred / "stranger.nii.gz")  # no reference: ignored
    (pred / "predict_args.json").write_text("{}")  # not an image: ignored silently

    proc = run_3dino("evaluate", "-r", str(workspace["ref"]), "-p", str(pred), "-d", "992", "-np", "2",
                     "--no-progress", env=workspace["env"])
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "stranger" in proc.stderr

    out = pred / "evaluation"
    per_case = pd.read_csv(out / "per_case.csv")
    assert set(per_case["case_id"]) == set(cases[2:])
    assert list(per_case.columns[:5]) == ["case_id", "label", "label_values", "dice", "hd95_mm"]
    for row in per_case.itertuples():
        assert row.dice == pytest.approx(expected[row.case_id][row.label], abs=1e-9), (row.case_id, row.label)
    assert (per_case.loc[per_case["label"] == "tissue", "hd95_mm"] == 0).all()
    assert (per_case["hd95_mm"] >= 0).all()  # finite: every label is present in every case

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["kind"], summary["schema_version"], summary["mode"]) == ("evaluation_summary", 1, "evaluate")
    assert summary["labels"] == {"grey_matter": [1], "white_matter": [2], "tissue": [1, 2]}
    assert summary["cases"]["missing"] == [cases[0]] and summary["cases"]["ignored"] == ["stranger"]
    assert [f["case_id"] for f in summary["cases"]["failed"]] == [cases[1]]
    assert "origin" in summary["cases"]["failed"][0]["problem"]
    grey = summary["metrics"]["dice"]["grey_matter"]
    values = [expected[c]["grey_matter"] for c in cases[2:]]
    assert grey["mean"] == pytest.approx(np.mean(values)) and grey["median"] == pytest.approx(np.median(values))
    assert grey["n"] == len(values) and grey["n_nan"] == 0
    assert grey["ci95"][0] <= grey["mean"] <= grey["ci95"][1]
    assert set(summary["mean_over_labels"]) == {"dice", "hd95_mm"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "grey_matter" in html and "src='http" not in html
    assert (out / "metrics_per_label.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_two_prediction_folders_gives_the_wilcoxon_p_value(workspace):
    refs, tmp = workspace["refs"], workspace["tmp"]
    expected_a = _write_predictions(refs, tmp / "model_a", [30 * (i + 1) for i in range(NUM_CASES)])
    expected_b = _write_predictions(refs, tmp / "model_b", [45 * (i + 1) + (-1) ** i * 40 for i in range(NUM_CASES)])
    out = tmp / "cmp"
    proc = run_3dino("evaluate", "-r", str(workspace["ref"]), "--compare", str(tmp / "model_a"),
                     str(tmp / "model_b"), "-o", str(out), "-np", "1", "--seed", "3", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "compare" and summary["labels"] == {"label_1": [1], "label_2": [2]}
    entry = summary["comparisons"]["dice"]["label_1"]
    a = [expected_a[c]["grey_matter"] for c in refs]
    b = [expected_b[c]["grey_matter"] for c in refs]
    assert entry["test"] == "wilcoxon_signed_rank" and entry["n_pairs"] == NUM_CASES
    assert entry["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-9)
    assert entry["a"]["mean"] == pytest.approx(np.mean(a)) and entry["b"]["mean"] == pytest.approx(np.mean(b))
    assert entry["difference"]["mean"] == pytest.approx(np.mean(np.subtract(b, a)))
    per_case = pd.read_csv(out / "per_case.csv")
    assert list(per_case.columns) == ["case_id", "label", "dice_a", "dice_b", "hd95_mm_a", "hd95_mm_b",
                                      "hd95_near_empty_a", "hd95_near_empty_b"]
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (out / "compare_dice.png").is_file() and (out / "compare_hd95.png").is_file()


def _classification_files(folder: Path, seed: int, noise: float, y: np.ndarray, classes: list[str]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = np.eye(len(classes))[y] * 2 + rng.normal(0, noise, (y.size, len(classes)))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    table = pd.DataFrame({"case_id": [f"case{i:03d}" for i in range(y.size)],
                          "predicted_class": [classes[i] for i in probs.argmax(axis=1)]})
    for c, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, c]
    folder.mkdir(parents=True)
    table.to_csv(folder / "predictions.csv", index=False)
    return probs


def test_classification_evaluation_and_compare_from_csvs(tmp_path):
    classes = ["benign", "malignant", "normal"]
    y = np.random.default_rng(0).integers(0, 3, 40)
    reference = tmp_path / "reference.csv"
    pd.DataFrame({"case_id": [f"case{i:03d}" for i in range(y.size)], "label": [classes[i] for i in y]}) \
        .to_csv(reference, index=False)
    runs = {name: _classification_files(tmp_path / name, seed, noise, y, classes)
            for name, seed, noise in (("a1", 1, 1.0), ("a2", 2, 1.0), ("a3", 3, 1.0), ("b1", 4, 2.5), ("b2", 5, 2.5))}

    proc = run_3dino("evaluate", "-r", str(reference), "-p", str(tmp_path / "a1" / "predictions.csv"))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "a1" / "evaluation"
    summary = json.loads((out / "summary.json").read_text())
    probs = runs["a1"]
    assert summary["task"] == "classification" and summary["classes"] == classes
    assert summary["metrics"]["auc"]["macro"]["value"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert summary["metrics"]["f1"]["macro"]["value"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    assert summary["metrics"]["accuracy"]["all"]["value"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    lo, hi = summary["metrics"]["auc"]["macro"]["ci95"]
    assert lo <= summary["metrics"]["auc"]["macro"]["value"] <= hi
    assert np.array(summary["confusion_matrix"]).sum() == y.size
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (out / "report.html").read_text()

    side_a = ",".join(str(tmp_path / n) for n in ("a1", "a2", "a3"))
    side_b = f"{tmp_path / 'b1'},{tmp_path / 'b2'}"
    proc = run_3dino("evaluate", "-r", str(reference), "--compare", side_a, side_b, "--names", "3DINO,scratch",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "evaluation_compare" / "summary.json").read_text())
    auc = {n: roc_auc_score(y, p, multi_class="ovr", average="macro") for n, p in runs.items()}
    entry = summary["comparisons"]["auc"]["macro"]
    assert entry["test"] == "welch_t_test" and summary["sides"]["a"]["name"] == "3DINO"
    assert entry["a"]["runs"] == pytest.approx([auc["a1"], auc["a2"], auc["a3"]])
    assert entry["p_value"] == pytest.approx(stats.ttest_ind([auc["a1"], auc["a2"], auc["a3"]],
                                                             [auc["b1"], auc["b2"]], equal_var=False).pvalue)
    per_run = pd.read_csv(tmp_path / "evaluation_compare" / "per_run.csv")
    assert len(per_run) == 5 and {"auc_macro", "f1_macro", "accuracy"} <= set(per_run.columns)


def test_user_errors_print_no_traceback_and_write_nothing(tmp_path, workspace):
    out = tmp_path / "out"
    proc = run_3dino("evaluate", "-r", str(tmp_path / "nope"), "-p", str(workspace["ref"]), "-o", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nope" in proc.stderr and "fix:" in proc.stderr and not out.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no label image") as err:
        evaluate.run(workspace["ref"], empty, output=out)
    assert err.value.file == str(empty) and err.value.fix
    bad_csv = tmp_path / "ref.csv"
    bad_csv.write_text("case,klass\na,0\n")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "predictions.csv").write_text("case_id,predicted_class,prob_x,prob_y\na,x,0.9,0.1\n")
    with pytest.raises(UserError, match="lacks column"):
        evaluate.run(bad_csv, tmp_path / "p", output=out)
    (tmp_path / "p" / "predictions.csv").write_text("case_id,class\na,x\n")
    with pytest.raises(UserError, match="predicted_class"):
        evaluate.run(bad_csv, tmp_path / "p", output=out)
    with pytest.raises(UserError, match="either -p"):
        evaluate.run(workspace["ref"], output=out)
    assert not out.exists()


def _small_reference(workspace, cases: int) -> tuple[Path, dict[str, Path]]:
    """A reference folder holding only the first ``cases`` reference labels."""
    folder = workspace["tmp"] / f"labels_{cases}"
    folder.mkdir()
    refs = dict(list(workspace["refs"].items())[:cases])
    for path in refs.values():
        shutil.copy(path, folder / path.name)
    return folder, refs


def test_confidence_intervals_over_fewer_than_5_cases_are_marked_unreliable(workspace):
    ref3, refs3 = _small_reference(workspace, 3)
    tmp = workspace["tmp"]
    _write_predictions(workspace["refs"], tmp / "pred", [40 * (i + 1) for i in range(NUM_CASES)])
    _write_predictions(workspace["refs"], tmp / "pred_b", [90 * (i + 1) for i in range(NUM_CASES)])
    proc = run_3dino("evaluate", "-r", str(ref3), "-p", str(tmp / "pred"), "-d", "992", "-o", str(tmp / "ev3"),
                     "-np", "1", env=workspace["env"])
    assert proc.returncode == 0, proc.stderr  # 3 predictions of the 6 have a reference; the rest are ignored
    summary = json.loads((tmp / "ev3" / "summary.json").read_text())
    for metric in ("dice", "hd95_mm"):
        for entry in [*summary["metrics"][metric].values(), summary["mean_over_labels"][metric]]:
            assert entry["n"] == 3 and entry["ci_unreliable"] is True
    assert "grey_matter: Dice" in proc.stderr and "unreliable (n < 5)" in proc.stderr
    assert "fewer than 5 cases are marked unreliable" in proc.stderr
    html = (tmp / "ev3" / "report.html").read_text()
    assert "unreliable (n &lt; 5)" in html and "fewer than 5 cases are marked unreliable" in html

    proc = run_3dino("evaluate", "-r", str(workspace["ref"]), "-p", str(tmp / "pred"), "-d", "992", "-o",
                     str(tmp / "ev6"), "-np", "1", env=workspace["env"])
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp / "ev6" / "summary.json").read_text())
    assert summary["metrics"]["dice"]["grey_matter"]["n"] == NUM_CASES
    assert summary["metrics"]["dice"]["grey_matter"]["ci_unreliable"] is False
    assert "unreliable" not in proc.stderr and "unreliable" not in (tmp / "ev6" / "report.html").read_text()

    out = tmp / "cmp3"
    proc = run_3dino("evaluate", "-r", str(ref3), "--compare", str(tmp / "pred"), str(tmp / "pred_b"), "-d", "992",
                     "-o", str(out), "-np", "1", env=workspace["env"])
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((out / "summary.json").read_text())["comparisons"]["dice"]["grey_matter"]
    assert all(entry[k]["ci_unreliable"] is True for k in ("a", "b", "difference"))
    html = (out / "report.html").read_text()
    assert "unreliable (n &lt; 5)" in html and "fewer than 5 cases are marked unreliable" in html


def test_classification_ci_over_few_cases_is_marked_unreliable(tmp_path):
    y = np.array([0, 1, 1, 0])
    classes = ["benign", "malignant"]
    reference = tmp_path / "reference.csv"
    pd.DataFrame({"case_id": [f"case{i:03d}" for i in range(y.size)], "label": [classes[i] for i in y]}) \
        .to_csv(reference, index=False)
    _classification_files(tmp_path / "run", 0, 0.3, y, classes)
    proc = run_3dino("evaluate", "-r", str(reference), "-p", str(tmp_path / "run"), "-o", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["metrics"]["accuracy"]["all"]["n"] == 4 and summary["metrics"]["accuracy"]["all"]["ci_unreliable"]
    assert "unreliable (n < 5)" in proc.stderr
    assert "unreliable (n &lt; 5)" in (tmp_path / "ev" / "report.html").read_text()


def test_wilcoxon_floor_for_few_pairs_is_stated(workspace):
    ref4, refs4 = _small_reference(workspace, 4)
    tmp = workspace["tmp"]
    # B relabels more grey matter than A in every case: every paired difference has the same sign
    _write_predictions(refs4, tmp / "a", [30 * (i + 1) for i in range(4)])
    _write_predictions(refs4, tmp / "b", [60 * (i + 1) for i in range(4)])
    out = tmp / "cmp"
    proc = run_3dino("evaluate", "-r", str(ref4), "--compare", str(tmp / "a"), str(tmp / "b"), "-d", "992",
                     "-o", str(out), "-np", "1", env=workspace["env"])
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((out / "summary.json").read_text())["comparisons"]["dice"]["grey_matter"]
    assert entry["n_pairs"] == 4 and entry["min_p_value"] == 0.125
    assert entry["p_value"] == pytest.approx(0.125)  # the floor: scipy's exact test, all signs equal
    assert "smallest possible with 4 pairs: 0.125" in proc.stderr
    html = (out / "report.html").read_text()
    assert "smallest possible p" in html and "cannot give p below 2/2^n" in html and "p &gt;= 0.125" in html


def _near_empty_prediction(reference: Path, out: Path, keep: float) -> tuple[int, int]:
    """The reference with all but the first ``keep`` fraction of its white matter (2) set to background.

    Returns (reference white-matter voxels, predicted white-matter voxels)."""
    label, geometry = read_image(reference)
    prediction = label.copy()
    white = np.flatnonzero(label == 2)
    prediction.reshape(-1)[white[int(keep * white.size):]] = 0
    write_image(prediction, geometry, out / reference.name)
    return white.size, int((prediction == 2).sum())


def test_hd95_on_a_near_empty_prediction_is_flagged(workspace):
    refs, tmp = workspace["refs"], workspace["tmp"]
    pred = tmp / "pred"
    _write_predictions(refs, pred, [40 * (i + 1) for i in range(NUM_CASES)])
    first = next(iter(refs))
    n_ref, n_pred = _near_empty_prediction(refs[first], pred, keep=0.03)  # 3 % of the white matter left
    assert 10 <= n_pred < 0.1 * n_ref
    proc = run_3dino("evaluate", "-r", str(workspace["ref"]), "-p", str(pred), "-d", "992", "-np", "1",
                     env=workspace["env"])
    assert proc.returncode == 0, proc.stderr
    out = pred / "evaluation"
    per_case = pd.read_csv(out / "per_case.csv", dtype={"case_id": str})
    assert "hd95_near_empty" in per_case.columns
    flagged = per_case[per_case["hd95_near_empty"]]
    assert list(zip(flagged["case_id"], flagged["label"], strict=True)) == [(first, "white_matter")]
    assert np.isfinite(flagged["hd95_mm"]).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["hd95_mm"]["white_matter"]["n_near_empty"] == 1
    assert summary["metrics"]["hd95_mm"]["grey_matter"]["n_near_empty"] == 0
    assert summary["mean_over_labels"]["hd95_mm"]["n_near_empty"] == 1
    assert "white_matter" in proc.stderr and "1 of 6 on a near-empty mask" in proc.stderr
    html = (out / "report.html").read_text()
    assert "HD95 near-empty" in html and "fewer than 10 voxels or fewer than 10% of the other" in html

    # compare: the flag per side, also for an evaluation folder written before the column existed
    (out / "per_case.csv").write_text(per_case.drop(columns="hd95_near_empty").to_csv(index=False))
    _write_predictions(refs, tmp / "other", [50 * (i + 1) for i in range(NUM_CASES)])
    cmp = tmp / "cmp"
    proc = run_3dino("evaluate", "-r", str(workspace["ref"]), "--compare", str(out), str(tmp / "other"), "-d", "992",
                     "-o", str(cmp), "-np", "1", env=workspace["env"])
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(cmp / "per_case.csv", dtype={"case_id": str})
    flagged = table[table["hd95_near_empty_a"]]
    assert list(zip(flagged["case_id"], flagged["label"], strict=True)) == [(first, "white_matter")]
    assert not table["hd95_near_empty_b"].any()
    entry = json.loads((cmp / "summary.json").read_text())["comparisons"]["hd95_mm"]["white_matter"]
    assert (entry["a"]["n_near_empty"], entry["b"]["n_near_empty"]) == (1, 0)
    html = (cmp / "report.html").read_text()
    assert "HD95 near-empty A/B" in html and "<td>1/0</td>" in html and "near-empty mask are flagged" in html
