"""The demo's ``report.html``: one self-contained page built from the demo's files only.

Sections: what the data can and cannot show, which backbone was used and how it was made, the
comparison over finetune seeds (pretrained vs none, same head; ``seeds.csv``), the demo study's
figure, paired tests and summary (``3dino study``: tests.csv, summary.csv, 95 % bootstrap CIs), each
model's metrics, prediction overlays on three planes for a few held-out cases, the training curves
(``log.csv``; the bundled backbone's shipped curves), the backbone visualisations (``3dino
visualize``), the study's cells and the stage times.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from threedino_pipe.artifacts import BundledBackboneRecord, DemoTimings, EvaluationSummary
from threedino_pipe.demo.comparison import DemoCells
from threedino_pipe.demo.layout import SIDES, DemoLayout
from threedino_pipe.evaluation import report
from threedino_pipe.evaluation.label_efficiency import MEAN_LABEL
from threedino_pipe.evaluation.outputs import write_text
from threedino_pipe.evaluation.single import segmentation_table
from threedino_pipe.raw_data.image_io import read_image
from threedino_pipe.visualization.curves import plot_curves
from threedino_pipe.visualization.overlays import colour_legend, overlay_planes

CAVEAT = ("All cases of this demo come from ONE brain: they are resamplings of the MNI152 template (different "
          "spacing, rotation, crop, flips and intensity), training and held-out cases alike. What this can show: "
          "that the whole chain runs end to end, and whether a backbone pretrained by `3dino pretrain` gives a "
          "frozen backbone + adapter head better features than training the same head and backbone from random "
          "initialisation, on this anatomy at 25 % labels. What it cannot show: anything about other subjects, "
          "anatomy, scanners or diseases (the comparison is not evidence about them), nor a significant per-case "
          "test: with 4 held-out pairs the smallest two-sided Wilcoxon p is 0.125 (the study's tests.csv). The "
          "finetune seeds show how much of a difference is the luck of one run.")
BUNDLED_CAVEAT = ("The bundled backbone was pretrained on 48 other resamplings of the same template (drawn with "
                  "another seed; none of this demo's cases): it has seen this brain, though never these cases or "
                  "their labels.")
HERE_CAVEAT = ("--pretrain-here: the backbone was pretrained inside the demo for a few iterations only, so it is "
               "still close to its random initialisation; expect the `none` side to win.")
NUM_OVERLAY_CASES = 3
PRETRAIN_COLUMNS = ["loss", "dino_local", "dino_global", "ibot", "koleo", "lr"]
FINETUNE_COLUMNS = ["loss", "val_dice", "lr"]


@dataclass(frozen=True)
class BackboneInfo:
    """The pretrained side's backbone: a file (with the bundled backbone's record) or a run folder."""

    path: Path
    record: BundledBackboneRecord | None = None

    def lines(self) -> list[str]:
        """How the backbone was made, one fact per line."""
        r = self.record
        if r is None:
            return [f"pretrained inside this demo (--pretrain-here): {self.path}"]
        deviations = ", ".join(sorted(r.deviations)) or "none"
        signals = ", ".join(f"{k} {v:g}" for k, v in r.final_signals.items())
        return [f"bundled backbone {r.file} (SHA-256 {r.sha256}), made {r.made} on {r.machine} in "
                f"{r.wall_seconds / 60:.0f} min of `3dino pretrain`, {r.iterations} iterations, recipe "
                f"{r.recipe_name} (deviations from the paper: {deviations})",
                f"pretraining data: {r.pretraining_data}", *[f"command: {c}" for c in r.commands],
                f"learning signals at the last iteration: {signals or 'not recorded'}",
                "patch probe (balanced accuracy) by pretraining iteration: "
                + (", ".join(f"{k}: {v:.3f}" for k, v in r.probe_curve.items()) or "not recorded")]


def _nan_for_none(value: Any) -> Any:
    """``summary.json`` writes NaN as null; turn nulls back into NaN for the tables."""
    if isinstance(value, dict):
        return {k: _nan_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return math.nan if value is None else value


def _summary(folder: Path) -> EvaluationSummary:
    return EvaluationSummary.read(EvaluationSummary.in_folder(folder))


def _study_table(layout: DemoLayout, name: str) -> pd.DataFrame:
    """One of the demo study's CSV tables (summary.csv, tests.csv, cells.csv) as written."""
    return pd.read_csv(layout.study.out(name))


def study_terminal_table(layout: DemoLayout) -> Table:
    """The study's mean Dice and HD95 over labels for the terminal: per backbone, mean [95 % CI], and the paired
    test's p against ``none``."""
    summary = _study_table(layout, "summary.csv")
    tests = _study_table(layout, "tests.csv")
    out = Table(title="Held-out cases, `3dino study` summary (seeds averaged per case; a smoke test: every case comes "
                "from the one MNI152 template)")
    for column in ("metric", "backbone", "mean [95% CI]", "n cases", "Wilcoxon p vs none"):
        out.add_column(column, justify="left" if column in ("metric", "backbone") else "right")
    for row in summary[summary["label"] == MEAN_LABEL].itertuples():
        test = tests[(tests["metric"] == row.metric) & (tests["label"] == MEAN_LABEL)
                     & (tests["backbone"] == row.backbone)] if len(tests) else tests
        p = float(test["p_value"].iloc[0]) if len(test) else math.nan
        out.add_row(row.metric, row.backbone, f"{row.mean:.4g} [{row.ci95_lo:.4g}, {row.ci95_hi:.4g}]",
                    str(row.n_cases), "" if not len(test) else "n/a" if p != p else f"{p:.3g}")
    return out


def seeds_terminal_table(seeds: pd.DataFrame) -> Table:
    """The per-seed mean Dice table (:func:`threedino_pipe.demo.seeds.seed_table`) for the terminal."""
    out = Table(title="Mean Dice over labels and held-out cases, per finetune seed (both sides: the same subset "
                "and head)")
    for column in seeds.columns:
        out.add_column(str(column), justify="left" if column == "seed" else "right")
    for _, row in seeds.iterrows():
        out.add_row(*[f"{v:+.4f}" if k == "difference" else f"{v:.4f}" if isinstance(v, float) else str(v)
                      for k, v in row.items()])
    return out


def _metrics_tables(layout: DemoLayout, cells: DemoCells) -> list[tuple[str, pd.DataFrame]]:
    """Each study cell's ``evaluate`` metrics with their CIs (the cell's evaluation/summary.json)."""
    tables = []
    for side in SIDES:
        for _, cell in sorted(cells.cells[side].items()):
            summary = _summary(layout.study.evaluation(cell))
            tables.append((f"{side} ({cell}): {summary.cases.evaluated} held-out cases",
                           segmentation_table(_nan_for_none(summary.metrics), _nan_for_none(summary.mean_over_labels))))
    return tables


def _overlay_figures(layout: DemoLayout, cells: DemoCells, labels: dict[str, list[int]]) -> list[tuple[str, bytes]]:
    """Image, reference and each side's seed-0 prediction (its study cell's) on three planes for the first few
    held-out cases."""
    figures = []
    num_labels = max((max(v) for v in labels.values()), default=1)
    references = sorted((layout.raw / "labelsTs").glob("*.nii.gz"))[:NUM_OVERLAY_CASES]
    for reference in references:
        case = reference.name[: -len(".nii.gz")]
        image, geometry = read_image(layout.raw / "imagesTs" / f"{case}_0000.nii.gz")
        label, _ = read_image(reference)
        maps: list[tuple[str, np.ndarray | None]] = [("reference", label)]
        for side in SIDES:
            prediction = layout.study.predictions(cells.cells[side][0]) / reference.name
            maps.append((f"prediction: {side}", read_image(prediction)[0] if prediction.is_file() else None))
        png = overlay_planes(image, geometry.spacing, maps, num_labels=num_labels, title=case)
        figures.append((f"{case}: image, reference and each side's seed-0 prediction on the three planes through "
                        f"the centre of the reference's foreground (voxel index planes; colours: "
                        f"{colour_legend(labels)})", png))
    return figures


def _finetune_panels(log_csv: Path) -> list:
    """:data:`FINETUNE_COLUMNS` and, when the log has them, the per-class validation Dice in one panel."""
    per_class = [c for c in pd.read_csv(log_csv, nrows=0).columns if c.startswith("val_dice_")]
    return [*FINETUNE_COLUMNS, *([("val_dice per class", per_class)] if per_class else [])]


def _curve_figures(layout: DemoLayout, cells: DemoCells, backbone: BackboneInfo) -> list[tuple[str, bytes]]:
    folder = layout.out / "report_figures"
    figures = []
    if backbone.record is not None and backbone.record.curves:
        shipped = backbone.path.parent / backbone.record.curves
        if shipped.is_file():
            figures.append((f"the bundled backbone's pretraining curves, as shipped ({shipped.name}): losses, "
                            "learning signals, schedules", shipped.read_bytes()))
        entries = []
    else:
        entries = [("pretrain", layout.pretrain_run, PRETRAIN_COLUMNS),
                   ("adapt-highres", layout.highres_run, PRETRAIN_COLUMNS)]
    entries += [(f"finetune ({side}, seed 0)", cells.runs[side][0], _finetune_panels(cells.runs[side][0] / "log.csv"))
                for side in SIDES]
    for name, run, columns in entries:
        png = plot_curves(run / "log.csv", folder / f"curves_{re.sub(r'[^A-Za-z0-9-]+', '_', name).strip('_')}.png",
                          columns=columns, title=f"{name}: {run.name}")
        if png is not None:
            figures.append((f"{name} training curves ({run / 'log.csv'})", Path(png).read_bytes()))
    return figures


def _backbone_section(layout: DemoLayout, backbone: BackboneInfo) -> report.Section:
    """The PNGs ``3dino visualize`` wrote for each side (PCA view and CLS attention of the last layer)."""
    figures = []
    for side in SIDES:
        for name, what in (("pca_rgb", "PCA of the last-layer patch features (first component thresholds the "
                            "background, the next three are RGB)"), ("attention", "last-layer CLS attention")):
            png = layout.visualize(side) / f"{name}.png"
            if png.is_file():
                figures.append((f"{side} backbone: {what} ({png})", png.read_bytes()))
    which = "the bundled backbone" if backbone.record is not None else "the adapt-highres run"
    paragraphs = [f"`3dino visualize` on the held-out scan {layout.visualized_scan.name}: the pretrained backbone "
                  f"({which}, before finetuning) and the backbone trained from random initialisation in the seed-0 "
                  "`none` finetune run; see docs/visualize.md for how to read them."]
    if not figures:
        paragraphs.append("No `3dino visualize` output was found.")
    return report.Section("Backbone visualisations", paragraphs=paragraphs, figures=figures)


def _timings_table(timings: DemoTimings) -> pd.DataFrame:
    return pd.DataFrame([{"stage": s.stage, "seconds": s.seconds, "command": s.command} for s in timings.stages])


def _comparison_sections(layout: DemoLayout, seeds: pd.DataFrame, backbone: BackboneInfo) -> list[report.Section]:
    """The table over seeds, then the study's figure, paired tests and summary."""
    frozen = "the bundled backbone" if backbone.record is not None else "the backbone pretrained in this demo"
    expectation = (BUNDLED_CAVEAT if backbone.record is not None else HERE_CAVEAT)
    study = layout.study
    figure = study.out("label_efficiency.png")
    summary = _study_table(layout, "summary.csv")
    return [report.Section("Comparison over finetune seeds: pretrained vs none", paragraphs=[
        f"Side pretrained: {frozen}, frozen, with the adapter head. Side none: the same architecture at random "
        "initialisation, trained end to end, with the same adapter head. Both on the same 25 % subset of fold 0 "
        "(finetune --seed S takes subset draw S), the same iterations and batch; each seed changes the subset, "
        "crops and initialisation. Each value is the mean over held-out cases of each case's mean Dice over "
        f"labels, from the study's per_case.csv ({layout.seeds_summary}); the last row is the mean over seeds with "
        "the Student-t 95 % CI of the difference.", expectation], tables=[("", seeds)]),
        report.Section("The study: `3dino study --name demo`", paragraphs=[
            f"The comparison ran as one `3dino study` ({study.folder}; its own report: {study.out('report.html')}). "
            "Paired tests: each backbone against none, two-sided Wilcoxon signed-rank over the held-out cases (each "
            "case's metric averaged over seeds), Holm's correction, rank-biserial effect size (tests.csv). Summary: "
            "mean and median over held-out cases with 95 % bootstrap CIs (summary.csv)."],
            tables=[("paired tests (tests.csv)", _study_table(layout, "tests.csv")),
                    ("summary, mean over labels (summary.csv)", summary[summary["label"] == MEAN_LABEL]),
                    ("summary, every label", summary[summary["label"] != MEAN_LABEL])],
            figures=[("the study's figure: each metric at 25 % labels, mean over held-out cases with its 95 % "
                      "bootstrap CI (label_efficiency.png)", figure.read_bytes())] if figure.is_file() else [])]


def _cells_table(layout: DemoLayout) -> pd.DataFrame:
    """The study's cells.csv as the report shows it (cell, backbone, seed, status, wall time, run folder)."""
    cells = _study_table(layout, "cells.csv")
    return cells[["cell", "backbone", "seed", "status", "wall_seconds", "run_folder"]]


def write(layout: DemoLayout, cells: DemoCells, seeds: pd.DataFrame, *, quick: bool, timings: DemoTimings,
          backbone: BackboneInfo) -> Path:
    """Write ``report.html`` (self-contained, figures embedded as PNG) from the demo's files; returns its path.

    Args:
        cells: the demo study's cells (and finetune run folders) by side and seed.
        seeds: the table over seeds (:func:`threedino_pipe.demo.seeds.seed_table`).
        backbone: the pretrained side's backbone and, when bundled, its provenance record.
    """
    first = _summary(layout.study.evaluation(cells.cells[SIDES[0]][cells.seeds[0]]))
    load = (timings.load_average_start or [math.nan])[0]
    info = [("dataset", f"{layout.raw} ({first.cases.reference} held-out cases)"),
            *[("backbone", line) for line in backbone.lines()],
            ("models", "finetune --pct 25 --head adapter, both sides on the same subset per seed, seeds "
             f"{', '.join(map(str, cells.seeds))}: "
             + "; ".join(f"{side} = {', '.join(cells.runs[side][s].name for s in cells.seeds)}" for side in SIDES)),
            ("demo size", "--quick" if quick else "full"),
            ("time so far", f"{timings.total_seconds:.0f} s on {timings.cpu_count} CPU(s), load "
             f"average {load:.2f} at the start")]
    sections = [
        *_comparison_sections(layout, seeds, backbone),
        report.Section("Metrics per model (95 % bootstrap CI over cases)", tables=_metrics_tables(layout, cells)),
        report.Section("Predictions on held-out cases", figures=_overlay_figures(layout, cells, first.labels)),
        report.Section("Training curves", figures=_curve_figures(layout, cells, backbone)),
        _backbone_section(layout, backbone),
        report.Section("Stage times (this invocation; timings.json)", tables=[("", _timings_table(timings))]),
        report.Section("The study's cells (cells.csv; each one's commands are in the study's report)",
                       tables=[("", _cells_table(layout))]),
    ]
    html = report.render("threedino-pipe demo: MNI152 grey/white matter", info, [], [], notes=[CAVEAT],
                         sections=sections)
    write_text(html, layout.report)
    return layout.report
