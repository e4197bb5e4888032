"""The reports open in a real headless browser (Debian's chromium, driven by playwright) with every image shown.

The demo report is built by :func:`threedino_pipe.demo.report.write` from a demo folder made in
seconds: real MNI152 scans, predictions derived from the references, real ``evaluate`` runs and
short training logs (no training).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from matplotlib.figure import Figure

from threedino_pipe.artifacts import BundledBackboneRecord, DemoTimings, StageTime
from threedino_pipe.demo import report as demo_report
from threedino_pipe.demo.examples import build_mni_dataset
from threedino_pipe.demo.layout import DATASET_ID, SIDES, DemoLayout
from threedino_pipe.demo.report import BackboneInfo
from threedino_pipe.evaluation.report import png_data_uri
from threedino_pipe.raw_data.image_io import read_image, write_image
from threedino_pipe.stages import evaluate

SEEDS = (0, 1)
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


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, monkeypatch_module) -> tuple[DemoLayout, dict[str, dict[int, Path]], BackboneInfo]:
    """A demo folder (2 seeds) with everything the report reads; predictions are shifted references."""
    out = tmp_path_factory.mktemp("demo")
    layout = DemoLayout(out)
    monkeypatch_module.setenv("THREEDINO_RAW", str(out / "raw"))
    build_mni_dataset(out / "raw", DATASET_ID, 2, num_test=4, max_size=40)
    labels = layout.raw / "labelsTs"
    for seed in SEEDS:
        for side, shift in zip(SIDES, (1 + seed, 3), strict=True):
            for reference in sorted(labels.glob("*.nii.gz")):
                label, geometry = read_image(reference)
                write_image(_shifted(label, shift), geometry, layout.predictions(side, seed) / reference.name)
            assert evaluate.run(labels, layout.predictions(side, seed), dataset=str(DATASET_ID),
                                output=layout.evaluation(side, seed), num_bootstrap=50, num_processes=1) == 0
        assert evaluate.run(labels, compare=[str(layout.evaluation(s, seed)) for s in SIDES], names=list(SIDES),
                            dataset=str(DATASET_ID), output=layout.evaluation("compare", seed), num_bootstrap=50,
                            num_processes=1) == 0
    for side in SIDES:  # stand-ins for the PNGs of `3dino visualize`
        for name in ("pca_rgb", "attention"):
            _figure(layout.visualize(side) / f"{name}.png")
    runs = {side: {seed: out / "results" / f"finetune__{side}__seed{seed}" for seed in SEEDS} for side in SIDES}
    for by_seed in runs.values():
        for run in by_seed.values():
            _write_log(run / "log.csv", demo_report.FINETUNE_COLUMNS)
    backbone = out / "bundled" / "backbone_tiny_mni.pt"  # stand-ins for the shipped files
    backbone.parent.mkdir()
    backbone.write_bytes(b"weights")
    _figure(backbone.parent / "backbone_tiny_mni_curves.png")
    record = BundledBackboneRecord(file=backbone.name, sha256="0" * 64, commands=["3dino pretrain -d 989"],
                                   pretraining_data="48 MNI152 resamplings", iterations=6000, wall_seconds=3000.0,
                                   machine="x86_64, 2 cores", made="2026-12-06", curves="backbone_tiny_mni_curves.png",
                                   recipe_name="auto", deviations={"peak_lr": "why"},
                                   final_signals={"target_entropy": 0.9}, probe_curve={"0": 0.8, "6000": 0.85})
    return layout, runs, BackboneInfo(path=backbone, record=record)


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
    layout, runs, backbone = demo_folder
    timings = DemoTimings(quick=True, cpu_count=2, load_average_start=[0.5, 0.5, 0.5], total_seconds=1.0,
                          stages=[StageTime(stage="finetune", command="3dino finetune -d 990", seconds=1.0)])
    page = demo_report.write(layout, runs, quick=True, timings=timings, backbone=backbone)
    text = page.read_text()
    assert "not evidence" in text and "MNI152" in text and "0.125" in text  # what the data can and cannot show
    assert "has seen this brain" in text and "6000 iterations" in text and "peak_lr" in text  # the backbone's origin
    assert "Paired comparison over held-out cases, seed 1" in text and "mean over seeds" in text
    assert "http://" not in text and "https://" not in text and "src='data:image/png;base64," in text
    images = _open_in_chromium(page, tmp_path / "demo.png")
    # 2 comparison plots, 3 overlay figures, 3 training-curve figures (shipped + 2 finetune), 2 x 2 backbone maps
    _assert_rendered(images, tmp_path / "demo.png", min_images=12)
    assert sum("reference" in img["alt"] for img in images) == 3


def test_evaluate_compare_report_renders_in_chromium(demo_folder, tmp_path):
    layout, _, _ = demo_folder
    images = _open_in_chromium(layout.evaluation("compare", 0) / "report.html", tmp_path / "compare.png")
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
