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

from threedino_pipe.artifacts import DemoTimings, StageTime
from threedino_pipe.demo import report as demo_report
from threedino_pipe.demo.examples import build_mni_dataset
from threedino_pipe.demo.layout import DATASET_ID, SIDES, DemoLayout
from threedino_pipe.evaluation.report import png_data_uri
from threedino_pipe.raw_data.image_io import read_image, write_image
from threedino_pipe.stages import evaluate

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


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, monkeypatch_module) -> tuple[DemoLayout, dict[str, Path]]:
    """A demo folder with everything the report reads; predictions are shifted references."""
    out = tmp_path_factory.mktemp("demo")
    layout = DemoLayout(out)
    monkeypatch_module.setenv("THREEDINO_RAW", str(out / "raw"))
    build_mni_dataset(out / "raw", DATASET_ID, 2, num_test=4, max_size=40)
    for side, shift in zip(SIDES, (1, 3), strict=True):
        for reference in sorted((layout.raw / "labelsTs").glob("*.nii.gz")):
            label, geometry = read_image(reference)
            write_image(_shifted(label, shift), geometry, layout.predictions(side) / reference.name)
    labels = layout.raw / "labelsTs"
    for side in SIDES:
        assert evaluate.run(labels, layout.predictions(side), dataset=str(DATASET_ID), output=layout.evaluation(side),
                            num_bootstrap=50, num_processes=1) == 0
    assert evaluate.run(labels, compare=[str(layout.evaluation(s)) for s in SIDES], names=list(SIDES),
                        dataset=str(DATASET_ID), output=layout.evaluation("compare"), num_bootstrap=50,
                        num_processes=1) == 0
    _write_log(layout.pretrain_run / "log.csv", demo_report.PRETRAIN_COLUMNS)
    _write_log(layout.highres_run / "log.csv", demo_report.PRETRAIN_COLUMNS)
    for side in SIDES:  # stand-ins for the PNGs of `3dino visualize`
        for name in ("pca_rgb", "attention"):
            fig = Figure(figsize=(3, 2))
            fig.subplots().imshow(np.random.default_rng(0).random((8, 8, 3)))
            layout.visualize(side).mkdir(parents=True, exist_ok=True)
            fig.savefig(layout.visualize(side) / f"{name}.png", format="png")
    runs = {side: out / "results" / f"finetune__{side}" for side in SIDES}
    for run in runs.values():
        _write_log(run / "log.csv", demo_report.FINETUNE_COLUMNS)
    return layout, runs


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
    layout, runs = demo_folder
    timings = DemoTimings(quick=True, cpu_count=2, load_average_start=[0.5, 0.5, 0.5], total_seconds=1.0,
                          stages=[StageTime(stage="pretrain", command="3dino pretrain -d 990", seconds=1.0)])
    page = demo_report.write(layout, runs, quick=True, timings=timings)
    text = page.read_text()
    assert "not evidence" in text and "MNI152" in text  # the smoke-test caveat is on the page
    assert "http://" not in text and "https://" not in text and "src='data:image/png;base64," in text
    images = _open_in_chromium(page, tmp_path / "demo.png")
    # 2 comparison plots, 3 overlay figures, 4 training-curve figures, 2 x 2 backbone maps
    _assert_rendered(images, tmp_path / "demo.png", min_images=13)
    assert sum("reference" in img["alt"] for img in images) == 3


def test_evaluate_compare_report_renders_in_chromium(demo_folder, tmp_path):
    layout, _ = demo_folder
    images = _open_in_chromium(layout.evaluation("compare") / "report.html", tmp_path / "compare.png")
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
