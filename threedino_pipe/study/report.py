"""The study's ``report.html``: the figure, labels needed, tests, summary, and every cell with its commands."""

from __future__ import annotations

import pandas as pd

from threedino_pipe.artifacts import StudyCell, StudyRecord
from threedino_pipe.evaluation.label_efficiency import MEAN_LABEL
from threedino_pipe.evaluation.report import Section, render

SOURCES = {"imagesTs": "the raw dataset's imagesTs/ with labelsTs/",
           "splits_test": "the test list of splits.json (plan --test-fraction)",
           "validation": "the validation cases of the fold (--on-validation)"}
BIASED_NOTE = ("Selection-biased: these results are measured on the validation cases, which also chose each "
               "run's checkpoint (--on-validation). They overstate every backbone; hold out a test list "
               "(3dino plan --test-fraction) for numbers to report.")


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the report shows it: without the selection_biased column (a note says it once)."""
    return table.drop(columns=[c for c in ("selection_biased",) if c in table.columns])


def report_html(study: StudyRecord, cells: pd.DataFrame, records: list[StudyCell], tables: dict[str, pd.DataFrame],
                png: bytes) -> str:
    """The whole page (self-contained: the figure embedded as a PNG data URI)."""
    done = int((cells["status"] == "done").sum())
    info = [("dataset", study.dataset), ("study", study.name),
            ("test cases", f"{len(study.test_cases)} from {SOURCES[study.test_source]}"),
            ("reference backbone", study.reference),
            ("cells", f"{done} done of {len(cells)}"
             + (f", {int((cells['status'] == 'failed').sum())} failed" if done < len(cells) else "")),
            ("options", ", ".join(f"{k}={v}" for k, v in study.options.items()))]
    warnings = [f"cell {row.cell}: {row.status}" + (f": {row.error}" if row.error else "")
                for row in cells.itertuples() if row.status != "done"]
    commands = pd.DataFrame([{"cell": r.spec.cell, "status": r.outcome, "wall s": r.wall_seconds,
                              "commands": " && ".join(r.commands)} for r in records])
    sections = [*_statistics_sections(study, tables),
                Section("Cells", paragraphs=["Each cell is these commands, run in order."],
                        tables=[("", commands)])]
    what = "value on the test cases" if study.task == "classification" else "mean over test cases"
    figures = [(f"Label efficiency: {what} with 95 % bootstrap CI bands, log % axis", png)] if png else []
    return render(f"3dino study {study.name}: {study.dataset}", info, [], figures, warnings,
                  notes=[BIASED_NOTE] if study.selection_biased else [], sections=sections)


def _statistics_sections(study: StudyRecord, tables: dict[str, pd.DataFrame]) -> list[Section]:
    """Labels needed, the paired tests and the summary, as the study's task computes them."""
    summary = tables["summary.csv"]
    if study.task == "classification":
        needed = (f"The smallest % of labels at which each backbone's macro AUC reaches {study.reference}'s at 100 %, "
                  "linear in log(%) between the grid points, with a 95 % bootstrap CI over test cases.")
        tests = (f"Each backbone against {study.reference} per % labels: paired bootstrap over the test cases of the "
                 "macro AUC difference (backbone - reference; each case's probabilities averaged over seeds), 95 % "
                 "CI, two-sided bootstrap p, Holm's correction over all comparisons (p_holm).")
        about = ("AUC, F1 and accuracy on the test cases (each case's probabilities averaged over seeds), 95 % "
                 "bootstrap CI over cases.")
        main = summary[summary["class"].isin(["macro", "all"])] if len(summary) else summary
        parts = [("macro and overall", _shown(main)), ("every class", _shown(summary))]
    else:
        needed = (f"The smallest % of labels at which each backbone's mean reaches {study.reference}'s mean at 100 %"
                  ", linear in log(%) between the grid points, with a 95 % bootstrap CI over test cases.")
        tests = (f"Each backbone against {study.reference} per % labels: two-sided Wilcoxon signed-rank over the "
                 "test cases (each case's metric averaged over seeds), Holm's correction over all comparisons of "
                 "one metric (p_holm), matched-pairs rank-biserial effect size.")
        about = "Mean and median over test cases (seeds averaged per case), 95 % bootstrap CI of the mean over cases."
        main = summary[summary["label"] == MEAN_LABEL] if len(summary) else summary
        parts = [("mean over labels", _shown(main)), ("every label", _shown(summary))]
    return [Section("Labels needed", paragraphs=[needed], tables=[("", _shown(tables["labels_needed.csv"]))]),
            Section("Paired tests", paragraphs=[tests], tables=[("", _shown(tables["tests.csv"]))]),
            Section("Summary", paragraphs=[about], tables=parts)]
