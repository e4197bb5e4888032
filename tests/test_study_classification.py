"""``3dino study`` on a classification dataset (issue 17, item 3) through the real command: probe cells on the
MNI tissue crops planned with a test list, AUC/F1/accuracy with CIs, the paired bootstrap of the AUC difference,
labels needed, the figure and the report (in chromium); and the heads of the other task refused.

Two entries (the demo's bundled backbone and ``none``, the probe on a random frozen tiny ViT) x 50 and 100 % x
one seed, 20 grid iterations each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_3dino
from tissue_classification import build_tissue_dataset

from threedino_pipe.demo.bundled_backbone import BACKBONE

pytestmark = pytest.mark.e2e
DATASET = "Dataset996_MNITissueContent"
COMMON = ("--pct", "50", "100", "--seeds", "0", "--iters", "20", "--num-workers", "0", "--no-progress")


@pytest.fixture(scope="module")
def tissue_study(tmp_path_factory) -> dict:
    """19 MNI crops (grey- vs white-matter dominated), planned with --test-fraction 0.25 and preprocessed, then
    the study run once; returns the env and the study folder."""
    root = tmp_path_factory.mktemp("study_tissue")
    env = {"THREEDINO_RAW": str(root / "raw"), "THREEDINO_PREPROCESSED": str(root / "pre"),
           "THREEDINO_RESULTS": str(root / "results")}
    build_tissue_dataset(root / "raw", 996, 19, seed=0)
    for args in (("plan", "-d", "996", "--test-fraction", "0.25"), ("preprocess", "-d", "996", "-c", "finetune"),
                 ("study", "-d", "996", "--backbones", str(BACKBONE), "none", *COMMON)):
        done = run_3dino(*args, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    yield {"env": env, "folder": root / "results" / DATASET / "study__main", "root": root}
    shutil.rmtree(root, ignore_errors=True)


def test_classification_study_runs_probe_cells_and_compares_the_auc(tissue_study):
    folder = tissue_study["folder"]
    for name in ("cells.csv", "per_case.csv", "summary.csv", "tests.csv", "labels_needed.csv", "label_efficiency.png",
                 "label_efficiency.svg", "report.html", "reference.csv", "test_cases.txt"):
        assert (folder / name).is_file(), name
    study = json.loads((folder / "study.json").read_text())
    assert study["task"] == "classification" and study["test_source"] == "splits_test"
    cells = pd.read_csv(folder / "cells.csv")
    assert len(cells) == 4 and (cells["status"] == "done").all()
    assert all(Path(p).name.startswith("finetune__probe__") for p in cells["run_folder"])
    per_case = pd.read_csv(folder / "per_case.csv")
    test_cases = set(study["test_cases"])
    assert set(per_case["case_id"]) == test_cases and len(per_case) == 4 * len(test_cases)
    assert {"prob_grey", "prob_white", "reference", "predicted_class"} <= set(per_case.columns)

    # one seed: every summary value and CI is the cell's own evaluation (3dino evaluate's summary.json)
    summary = pd.read_csv(folder / "summary.csv").set_index(["metric", "class", "backbone", "pct"])
    for cell in cells.itertuples():
        evaluated = json.loads((folder / "cells" / cell.cell / "evaluation" / "summary.json").read_text())["metrics"]
        for metric, key in (("auc", "macro"), ("f1", "macro"), ("accuracy", "all")):
            row = summary.loc[(metric, key, cell.backbone, cell.pct)]
            assert row["value"] == pytest.approx(evaluated[metric][key]["value"]), (cell.cell, metric)
            assert [row["ci95_lo"], row["ci95_hi"]] == pytest.approx(evaluated[metric][key]["ci95"], nan_ok=True)
            assert row["n_cases"] == len(test_cases) and row["n_runs"] == 1
    tests = pd.read_csv(folder / "tests.csv")
    assert sorted(tests["pct"]) == [50.0, 100.0] and set(tests["backbone"]) == {"backbone_tiny_mni"}
    assert set(tests["reference"]) == {"none"} and (tests["metric"] == "auc").all()
    assert (tests["ci95_lo"] <= tests["difference"]).all() and (tests["difference"] <= tests["ci95_hi"]).all()
    assert (tests["p_holm"] >= tests["p_value"]).all()
    needed = pd.read_csv(folder / "labels_needed.csv")
    assert set(needed["backbone"]) == {"backbone_tiny_mni", "none"}
    assert set(needed["status"]) <= {"interpolated", "at_or_below", "not_reached"}
    svg = (folder / "label_efficiency.svg").read_text()
    assert "<!-- backbone_tiny_mni -->" in svg and "<!-- none -->" in svg and "AUC (macro)" in svg
    report = (folder / "report.html").read_text()
    assert "paired bootstrap" in report and f"-r {folder / 'reference.csv'}" in report


def test_classification_study_refuses_a_segmentation_head(tissue_study, monkeypatch):
    from typer.testing import CliRunner

    from threedino_pipe.cli import app
    from threedino_pipe.runtime.errors import UserError
    for key, value in tissue_study["env"].items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["study", "-d", "996", "--backbones", "none:unetr", *COMMON, "--name", "heads",
                                      "--dry-run"])
    assert isinstance(result.exception, UserError), result.output
    assert "does not fit this classification dataset" in result.exception.render()
    assert "probe" in result.exception.fix
    assert not (tissue_study["folder"].parent / "study__heads").exists()


def test_classification_study_report_renders_in_chromium(tissue_study, tmp_path):
    from test_report_browser import CHROMIUM, _open_in_chromium
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed")
    images = _open_in_chromium(tissue_study["folder"] / "report.html", tmp_path / "shot.png")
    assert len(images) == 1 and all(i["complete"] and i["width"] > 0 for i in images), images
