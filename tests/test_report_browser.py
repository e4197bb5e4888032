"""The reports open in a real headless browser (Debian's chromium, driven by playwright) with every image shown.

The demo report is built by :func:`threedino_pipe.demo.report.write` from a demo folder made in
seconds: real MNI152 scans, a demo study whose cells' predictions are derived from the references, real
``evaluate`` runs, the study's real tables and figure, and short training logs (no training).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg
from matplotlib.figure import Figure

from threedino_pipe.artifacts import BundledBackboneRecord, DemoTimings, StageTime, StudyCell, StudyRecord
from threedino_pipe.artifacts.study import StudyCellSpec
from threedino_pipe.demo import report as demo_report
from threedino_pipe.demo.comparison import DemoCells, read_cells
from threedino_pipe.demo.examples import build_mni_dataset
from threedino_pipe.demo.layout import DATASET_ID, DATASET_NAME, SIDES, STUDY_NAME, DemoLayout
from threedino_pipe.demo.report import BackboneInfo
from threedino_pipe.demo.seeds import write_seed_table
from threedino_pipe.evaluation.report import png_data_uri
from threedino_pipe.raw_data.image_io import read_image, write_image
from threedino_pipe.stages import evaluate
from threedino_pipe.study import aggregate

SEEDS = (0, 1)
NAMES = {"pretrained": "backbone_tiny_mni:adapter", "none": "none:adapter"}  # the sides' names in the study
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(apt-get install -y chromium); the report is checked in a real browser")]


def _write_log(path: Path, columns: list[str], rows: int = 5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(["iteration", *columns])]
    for i in range(1, rows + 1):
        lines.append(",".join([str(i), *[f"{1.0 / i + c * 0.1:.4f}" for c in range(len(columns))]]))
    path.write_text("\n".join(lines) + "\n")


def _shifted(label: np.ndarray, shift: int) -> np.ndarray:
    """A prediction that overlaps the reference only partly: the label map rolled along i."""
    return np.roll(label, shift, axis=0)


def _figure(path: Path) -> None:
    fig = Figure(figsize=(3, 2))
    fig.subplots().imshow(np.random.default_rng(0).random((8, 8, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _demo_study(layout: DemoLayout) -> DemoCells:
    """The demo study's folder as `3dino study` leaves it: per side and seed a cell with shifted-reference
    predictions, its evaluation and cell.json, a finetune log; then cells.csv, per_case.csv, summary.csv,
    tests.csv, the figure and the study's report (the study's own aggregation)."""
    labels, study = layout.raw / "labelsTs", layout.study
    specs, records, rows = [], [], []
    for seed in SEEDS:
        for side, shift in zip(SIDES, (1 + seed, 3), strict=True):
            spec = StudyCellSpec(cell=f"{side}__pct25__fold0__seed{seed}", entry=f"{side}:adapter",
                                 label=NAMES[side], backbone=side, head="adapter", pct=25.0, seed=seed, fold=0)
            run = layout.out / "results" / f"finetune__{side}__seed{seed}"
            _write_log(run / "log.csv", demo_report.FINETUNE_COLUMNS)
            for reference in sorted(labels.glob("*.nii.gz")):
                label, geometry = read_image(reference)
                write_image(_shifted(label, shift), geometry, study.predictions(spec.cell) / reference.name)
            assert evaluate.run(labels, study.predictions(spec.cell), dataset=str(DATASET_ID),
                                output=study.evaluation(spec.cell), num_bootstrap=50, num_processes=1) == 0
            records.append(StudyCell(spec=spec, outcome="done", run_folder=str(run), wall_seconds=1.0,
                                     commands=[f"3dino finetune -d 990 --seed {seed}"]))
            records[-1].write(study.cell_record(spec.cell))
            specs.append(spec)
            rows.append({"cell": spec.cell, "backbone": spec.label, "entry": spec.entry, "head": "adapter", "pct": 25.0,
                         "seed": seed, "fold": 0, "status": "done", "run_folder": str(run), "wall_seconds": 1.0,
                         "error": ""})
    record = StudyRecord(dataset=DATASET_NAME, name=STUDY_NAME, options={}, reference=NAMES["none"],
                         test_source="imagesTs", selection_biased=False, test_cases=[], cells=specs)
    per_case = pd.concat([aggregate.cell_per_case(study, spec) for spec in specs], ignore_index=True)
    aggregate.write_outputs(study, record, aggregate.Collected(pd.DataFrame(rows, columns=aggregate.CELL_COLUMNS),
                                                               records, per_case))
    return read_cells(layout)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, monkeypatch_module) -> tuple[DemoLayout, DemoCells, BackboneInfo]:
    """A demo folder (2 seeds) with everything the report reads; predictions are shifted references."""
    out = tmp_path_factory.mktemp("demo")
    layout = DemoLayout(out)
    monkeypatch_module.setenv("THREEDINO_RAW", str(out / "raw"))
    build_mni_dataset(out / "raw", DATASET_ID, 2, num_test=4, max_size=40)
    cells = _demo_study(layout)
    for side in SIDES:  # stand-ins for the PNGs of `3dino visualize`
        for name in ("pca_rgb", "attention"):
            _figure(layout.visualize(side) / f"{name}.png")
    backbone = out / "bundled" / "backbone_tiny_mni.pt"  # stand-ins for the shipped files
    backbone.parent.mkdir()
    backbone.write_bytes(b"weights")
    _figure(backbone.parent / "backbone_tiny_mni_curves.png")
    record = BundledBackboneRecord(file=backbone.name, sha256="0" * 64, commands=["3dino pretrain -d 989"],
                                   pretraining_data="48 MNI152 resamplings", iterations=6000, wall_seconds=3000.0,
                                   machine="x86_64, 2 cores", made="2026-12-06", curves="backbone_tiny_mni_curves.png",
                                   recipe_name="auto", deviations={"peak_lr": "why"},
                                   final_signals={"target_entropy": 0.9}, probe_curve={"0": 0.8, "6000": 0.85})
    return layout, cells, BackboneInfo(path=backbone, record=record)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _open_in_chromium(page_path: Path, screenshot: Path) -> list[dict]:
    """Load ``page_path`` in headless chromium, screenshot the full page; returns each <img>'s load state."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(img => ({alt: img.alt, complete: img.complete, "
                                   "width: img.naturalWidth, height: img.naturalHeight}))")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return images


def _assert_rendered(images: list[dict], screenshot: Path, min_images: int) -> None:
    assert len(images) >= min_images, images
    broken = [img["alt"] for img in images if not (img["complete"] and img["width"] > 0 and img["height"] > 0)]
    assert not broken, f"images not rendered: {broken}"
    pixels = mpimg.imread(screenshot)
    assert pixels.shape[0] > 900 and pixels.shape[1] >= 1000  # the full page, taller than the viewport
    assert pixels[..., :3].std() > 0.05  # not a blank page


def test_demo_report_renders_every_image_in_chromium(demo_folder, tmp_path):
    layout, cells, backbone = demo_folder
    timings = DemoTimings(quick=True, cpu_count=2, load_average_start=[0.5, 0.5, 0.5], total_seconds=1.0,
                          stages=[StageTime(stage="study", command="3dino study -d 990", seconds=1.0)])
    page = demo_report.write(layout, cells, write_seed_table(layout, cells.names), quick=True, timings=timings,
                             backbone=backbone)
    text = page.read_text()
    assert "not evidence" in text and "MNI152" in text and "0.125" in text  # what the data can and cannot show
    assert "has seen this brain" in text and "6000 iterations" in text and "peak_lr" in text  # the backbone's origin
    assert "mean over seeds" in text and "paired tests (tests.csv)" in text and "rank_biserial" in text
    assert "pretrained__pct25__fold0__seed1" in text  # the study's cells
    assert "http://" not in text and "https://" not in text and "src='data:image/png;base64," in text
    images = _open_in_chromium(page, tmp_path / "demo.png")
    # the study's figure, 3 overlay figures, 3 training-curve figures (shipped + 2 finetune), 2 x 2 backbone maps
    _assert_rendered(images, tmp_path / "demo.png", min_images=11)
    assert sum("reference" in img["alt"] for img in images) == 3
    assert sum("label_efficiency.png" in img["alt"] for img in images) == 1


def test_evaluate_compare_report_renders_in_chromium(demo_folder, tmp_path):
    layout, cells, _ = demo_folder
    sides = [str(layout.study.evaluation(cells.cells[side][0])) for side in SIDES]
    assert evaluate.run(layout.raw / "labelsTs", compare=sides, names=list(SIDES), dataset=str(DATASET_ID),
                        output=tmp_path / "compare", num_bootstrap=50, num_processes=1) == 0
    images = _open_in_chromium(tmp_path / "compare" / "report.html", tmp_path / "compare.png")
    _assert_rendered(images, tmp_path / "compare.png", min_images=2)


def test_a_broken_image_is_caught(tmp_path):
    """The check itself: an undecodable PNG is reported, a valid one is not."""
    page = tmp_path / "page.html"
    buffer = io.BytesIO()
    Figure(figsize=(1, 1)).savefig(buffer, format="png")
    valid = png_data_uri(buffer.getvalue())
    page.write_text(f"<html><body style='background:#fff'><h1>x</h1><img alt='good' src='{valid}'>"
                    "<img alt='bad' src='data:image/png;base64,AAAA'></body></html>")
    images = _open_in_chromium(page, tmp_path / "page.png")
    by_alt = {img["alt"]: img for img in images}
    assert by_alt["good"]["width"] > 0 and by_alt["bad"]["width"] == 0
