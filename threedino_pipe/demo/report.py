"""The demo's ``report.html``: one self-contained page built from the demo's files only.

Sections: the smoke-test caveat, the comparison table (pretrained vs none), each model's metrics
with 95 % bootstrap CIs, prediction overlays on three planes for a few held-out cases, the
training curves of every run (``log.csv``), the backbone visualisations (``3dino visualize``)
and the stage times.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from threedino_pipe.artifacts import DemoTimings, EvaluationSummary
from threedino_pipe.demo.layout import DemoLayout
from threedino_pipe.evaluation import report
from threedino_pipe.evaluation.compare import segmentation_comparison_table
from threedino_pipe.evaluation.outputs import write_text
from threedino_pipe.evaluation.single import segmentation_table
from threedino_pipe.raw_data.image_io import read_image
from threedino_pipe.visualization.curves import plot_curves
from threedino_pipe.visualization.overlays import colour_legend, overlay_planes

CAVEAT = ("All cases of this demo come from ONE brain: they are resamplings of the MNI152 template (different "
          "spacing, rotation, crop, flips and intensity), training and held-out cases alike, and the runs are a "
          "few iterations long. The comparison below is a smoke test that the whole chain runs end to end, not "
          "evidence about what pretraining buys.")
NUM_OVERLAY_CASES = 3
PRETRAIN_COLUMNS = ["loss", "dino_local", "dino_global", "ibot", "koleo", "lr"]
FINETUNE_COLUMNS = ["loss", "val_dice", "lr"]


def _nan_for_none(value: Any) -> Any:
    """``summary.json`` writes NaN as null; turn nulls back into NaN for the tables."""
    if isinstance(value, dict):
        return {k: _nan_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return math.nan if value is None else value


def _summary(folder: Path) -> EvaluationSummary:
    return EvaluationSummary.read(EvaluationSummary.in_folder(folder))


def comparison_table(compare_dir: Path) -> pd.DataFrame:
    """The comparison table (per metric and label: each side's mean and CI, B - A, Wilcoxon p) of an
    ``evaluate --compare`` output folder."""
    summary = _summary(compare_dir)
    names = {key: side.name for key, side in summary.sides.items()}
    return segmentation_comparison_table(_nan_for_none(summary.comparisons), _nan_for_none(summary.mean_over_labels),
                                         names)


def _mean_ci(entry: dict) -> str:
    mean = entry["mean"]
    return "n/a" if mean != mean else f"{mean:.4g} {report.ci_text(entry['ci95'])}"


def terminal_table(compare_dir: Path) -> Table:
    """The comparison for the terminal: per metric and label, each side's mean [95 % CI], B - A and p."""
    summary = _summary(compare_dir)
    names = {key: side.name for key, side in summary.sides.items()}
    comparisons, mean_over_labels = _nan_for_none(summary.comparisons), _nan_for_none(summary.mean_over_labels)
    out = Table(title=f"Held-out cases, {names['a']} vs {names['b']} (a smoke test: every case comes from the "
                "one MNI152 template)")
    for column in ("metric", "label", f"{names['a']} mean [95% CI]", f"{names['b']} mean [95% CI]", "B - A",
                   "Wilcoxon p", "n"):
        out.add_column(column, justify="left" if column in ("metric", "label") else "right")
    for metric, entries in comparisons.items():
        for label, e in [*entries.items(), ("mean", mean_over_labels[metric])]:
            diff, p = e["difference"]["mean"], e["p_value"]
            out.add_row(metric, label, _mean_ci(e["a"]), _mean_ci(e["b"]), "n/a" if diff != diff else f"{diff:+.4g}",
                        "n/a" if p != p else f"{p:.3g}", str(e["n_pairs"]))
    return out


def _metrics_tables(layout: DemoLayout, sides: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    tables = []
    for side in sides:
        summary = _summary(layout.evaluation(side))
        tables.append((f"{side}: {summary.cases.evaluated} held-out cases",
                       segmentation_table(_nan_for_none(summary.metrics), _nan_for_none(summary.mean_over_labels))))
    return tables


def _overlay_figures(layout: DemoLayout, sides: Sequence[str], labels: dict[str, list[int]]) -> list[tuple[str, bytes]]:
    """Image, reference and each side's prediction on three planes for the first few held-out cases."""
    figures = []
    num_labels = max((max(v) for v in labels.values()), default=1)
    references = sorted((layout.raw / "labelsTs").glob("*.nii.gz"))[:NUM_OVERLAY_CASES]
    for reference in references:
        case = reference.name[: -len(".nii.gz")]
        image, geometry = read_image(layout.raw / "imagesTs" / f"{case}_0000.nii.gz")
        label, _ = read_image(reference)
        maps: list[tuple[str, np.ndarray | None]] = [("reference", label)]
        for side in sides:
            prediction = layout.predictions(side) / reference.name
            maps.append((f"prediction: {side}", read_image(prediction)[0] if prediction.is_file() else None))
        png = overlay_planes(image, geometry.spacing, maps, num_labels=num_labels, title=case)
        figures.append((f"{case}: image, reference and predictions on the three planes through the centre of the "
                        f"reference's foreground (voxel index planes; colours: {colour_legend(labels)})", png))
    return figures


def _curve_figures(layout: DemoLayout, runs: Mapping[str, Path]) -> list[tuple[str, bytes]]:
    folder = layout.out / "report_figures"
    entries = [("pretrain", layout.pretrain_run, PRETRAIN_COLUMNS),
               ("adapt-highres", layout.highres_run, PRETRAIN_COLUMNS)]
    entries += [(f"finetune ({side})", run, FINETUNE_COLUMNS) for side, run in runs.items()]
    figures = []
    for name, run, columns in entries:
        png = plot_curves(run / "log.csv", folder / f"curves_{re.sub(r'[^A-Za-z0-9-]+', '_', name).strip('_')}.png",
                          columns=columns, title=f"{name}: {run.name}")
        if png is not None:
            figures.append((f"{name} training curves ({run / 'log.csv'})", Path(png).read_bytes()))
    return figures


def _backbone_section(layout: DemoLayout, sides: Sequence[str]) -> report.Section:
    """The PNGs ``3dino visualize`` wrote for each side (PCA view and CLS attention of the last layer)."""
    figures = []
    for side in sides:
        for name, what in (("pca_rgb", "PCA of the last-layer patch features (first component thresholds the "
                            "background, the next three are RGB)"), ("attention", "last-layer CLS attention")):
            png = layout.visualize(side) / f"{name}.png"
            if png.is_file():
                figures.append((f"{side} backbone: {what} ({png})", png.read_bytes()))
    paragraphs = [f"`3dino visualize` on the held-out scan {layout.visualized_scan.name}: the pretrained backbone "
                  "(the adapt-highres run, before finetuning) and the backbone trained from random initialisation in "
                  "the `none` finetune run. After a few pretraining iterations the maps show little structure; see "
                  "docs/visualize.md for how to read them."]
    if not figures:
        paragraphs.append("No `3dino visualize` output was found.")
    return report.Section("Backbone visualisations", paragraphs=paragraphs, figures=figures)


def _timings_table(timings: DemoTimings) -> pd.DataFrame:
    return pd.DataFrame([{"stage": s.stage, "seconds": s.seconds, "command": s.command} for s in timings.stages])


def write(layout: DemoLayout, runs: Mapping[str, Path], *, quick: bool, timings: DemoTimings) -> Path:
    """Write ``report.html`` (self-contained, figures embedded as PNG) from the demo's files; returns its path."""
    sides = list(runs)
    compare_dir = layout.evaluation("compare")
    compare_summary = _summary(compare_dir)
    compare_figures = [(f"{metric} per label: mean with 95 % bootstrap CI over the held-out cases (Wilcoxon p)",
                        (compare_dir / file).read_bytes())
                       for metric, file in (("Dice", "compare_dice.png"), ("HD95 (mm)", "compare_hd95.png"))
                       if (compare_dir / file).is_file()]
    load = (timings.load_average_start or [math.nan])[0]
    info = [("dataset", f"{layout.raw} ({compare_summary.cases.reference} held-out cases)"),
            ("models", "finetune --pct 25 on the same subset: "
             + ", ".join(f"{side} = {run.name}" for side, run in runs.items())),
            ("demo size", "--quick" if quick else "full"),
            ("time so far", f"{timings.total_seconds:.0f} s on {timings.cpu_count} CPU(s), load "
             f"average {load:.2f} at the start")]
    sections = [
        report.Section("Comparison: pretrained vs none", paragraphs=[
            "Side A: the tiny ViT pretrained with 3DINO (pretrain, then adapt-highres), frozen, with the adapter "
            "head. Side B: no pretraining (random initialisation, trained end to end), with the same adapter "
            "head. Both on the same 25 % subset of fold 0; Wilcoxon signed-rank test over the held-out cases.",
            "Expect side B to win here: after so few pretraining iterations the frozen backbone is still close to "
            "its random initialisation, while side B trains its backbone end to end."],
            tables=[("", comparison_table(compare_dir))], figures=compare_figures),
        report.Section("Metrics per model (95 % bootstrap CI over cases)", tables=_metrics_tables(layout, sides)),
        report.Section("Predictions on held-out cases",
                       figures=_overlay_figures(layout, sides, compare_summary.labels)),
        report.Section("Training curves", figures=_curve_figures(layout, runs)),
        _backbone_section(layout, sides),
        report.Section("Stage times (this invocation; timings.json)", tables=[("", _timings_table(timings))]),
    ]
    html = report.render("threedino-pipe demo: MNI152 grey/white matter", info, [], [], notes=[CAVEAT],
                         sections=sections)
    write_text(html, layout.report)
    return layout.report
