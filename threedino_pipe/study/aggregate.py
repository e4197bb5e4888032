"""The study's tables, figure and report from its cells' records (``--collect`` and the end of a full run).

Everything here is a function of the cells' ``cell.json`` and evaluation ``per_case.csv`` files only, so
shares run anywhere and collected later give the same ``per_case.csv``, ``summary.csv``, ``tests.csv`` and
``labels_needed.csv`` byte for byte as one full run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from threedino_pipe.artifacts import StudyCell, StudyRecord
from threedino_pipe.artifacts.study import StudyCellSpec
from threedino_pipe.evaluation import label_efficiency as le
from threedino_pipe.evaluation import label_efficiency_classification as lec
from threedino_pipe.evaluation.outputs import PER_CASE_FILE, write_bytes, write_csv, write_text
from threedino_pipe.evaluation.plots import label_efficiency_plot
from threedino_pipe.study.layout import StudyLayout
from threedino_pipe.study.report import report_html
from threedino_pipe.study.runner import is_done

NUM_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
FIGURE = "label_efficiency"
CELL_COLUMNS = ["cell", "backbone", "entry", "head", "pct", "seed", "fold", "status", "run_folder", "wall_seconds",
                "error"]


@dataclass
class Collected:
    """What the study's outputs are made of."""

    cells: pd.DataFrame      # one row per cell, status done | failed | not_run
    records: list[StudyCell]
    per_case: pd.DataFrame

    @property
    def complete(self) -> bool:
        return bool((self.cells["status"] == "done").all())


def _cell_row(spec, record: StudyCell | None, done: bool) -> dict:
    status = "done" if done else ("failed" if record is not None and record.outcome == "failed" else "not_run")
    return {"cell": spec.cell, "backbone": spec.label, "entry": spec.entry, "head": spec.head or "", "pct": spec.pct,
            "seed": spec.seed, "fold": spec.fold, "status": status,
            "run_folder": record.run_folder if record is not None and record.run_folder else "",
            "wall_seconds": record.wall_seconds if record is not None else float("nan"),
            "error": (record.error or "") if record is not None and not done else ""}


def cell_per_case(layout: StudyLayout, spec: StudyCellSpec) -> pd.DataFrame:
    """A cell's evaluation ``per_case.csv`` with its ``backbone`` (entry name), ``pct``, ``seed`` and ``fold`` in
    front, sorted by case (and label)."""
    table = pd.read_csv(layout.evaluation(spec.cell) / PER_CASE_FILE)
    table.insert(0, "fold", spec.fold)
    table.insert(0, "seed", spec.seed)
    table.insert(0, "pct", spec.pct)
    table.insert(0, "backbone", spec.label)
    return table.sort_values([c for c in ("case_id", "label") if c in table.columns], kind="stable")


def collect(layout: StudyLayout, study: StudyRecord) -> Collected:
    """Every cell's state and the per-case metrics of the done cells, in the study's cell order."""
    rows, records, tables = [], [], []
    for spec in study.cells:
        path = layout.cell_record(spec.cell)
        record = StudyCell.read(path) if path.is_file() else None
        done = is_done(layout, spec.cell)
        rows.append(_cell_row(spec, record, done))
        if record is not None:
            records.append(record)
        if done:
            tables.append(cell_per_case(layout, spec))
    empty = ["case_id"] if study.task == "classification" else ["case_id", "label", *le.METRICS]
    per_case = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["backbone", "pct", "seed", "fold", *empty])
    return Collected(pd.DataFrame(rows, columns=CELL_COLUMNS), records, per_case)


def statistics_tables(per_case: pd.DataFrame, reference: str) -> dict[str, pd.DataFrame]:
    """summary.csv, tests.csv and labels_needed.csv of the done cells' per-case rows (columns ``entry``, not
    ``backbone``; empty tables when nothing is done, no tests while the reference has no done cell)."""
    means = (le.case_means(per_case.rename(columns={"backbone": "entry"})) if len(per_case)
             else pd.DataFrame(columns=["entry", "pct", "label", "metric", "case_id", "value", "n_runs"]))
    compared = means if reference in set(means["entry"]) else means.iloc[:0]
    return {"summary.csv": le.summary_table(means, num_resamples=NUM_BOOTSTRAP, seed=BOOTSTRAP_SEED),
            "tests.csv": le.tests_table(compared, reference),
            "labels_needed.csv": le.labels_needed_table(compared, reference, num_resamples=NUM_BOOTSTRAP,
                                                        seed=BOOTSTRAP_SEED)}


def classification_tables(per_case: pd.DataFrame, reference: str) -> dict[str, pd.DataFrame]:
    """The same three tables of a classification study (:mod:`~threedino_pipe.evaluation.
    label_efficiency_classification`): AUC, F1 and accuracy per entry and pct, the paired bootstrap of the macro
    AUC difference, labels needed on the macro AUC."""
    pooled = lec.pool(per_case.rename(columns={"backbone": "entry"})) if len(per_case) else {}
    settings = {"num_resamples": NUM_BOOTSTRAP, "seed": BOOTSTRAP_SEED}
    return {"summary.csv": lec.summary_table(pooled, **settings),
            "tests.csv": lec.tests_table(pooled, reference, **settings),
            "labels_needed.csv": lec.labels_needed_table(pooled, reference, **settings)}


def _figure(study: StudyRecord, summary: pd.DataFrame) -> tuple[bytes, bytes]:
    """The label-efficiency figure (PNG, SVG) of the entries with results, in the study's entry order."""
    present = set(summary["entry"])
    entries = [e for e in dict.fromkeys(c.label for c in study.cells) if e in present]
    if study.task == "classification":
        return label_efficiency_plot(lec.figure_rows(summary), entries, None, list(lec.TITLES.items()))
    return label_efficiency_plot(summary, entries, le.MEAN_LABEL)


def write_outputs(layout: StudyLayout, study: StudyRecord, collected: Collected) -> None:
    """cells.csv, per_case.csv, summary.csv, tests.csv, labels_needed.csv, the figure (PNG, SVG), report.html."""
    write_csv(collected.cells, layout.out("cells.csv"))
    write_csv(collected.per_case, layout.out("per_case.csv"))
    tables = (classification_tables if study.task == "classification" else statistics_tables)(
        collected.per_case, study.reference)
    summary = tables["summary.csv"]
    png = b""
    if len(summary):
        png, svg = _figure(study, summary)
        write_bytes(png, layout.out(f"{FIGURE}.png"))
        write_bytes(svg, layout.out(f"{FIGURE}.svg"))
    for name, table in tables.items():
        table = table.rename(columns={"entry": "backbone"})
        if study.selection_biased:
            table.insert(0, "selection_biased", True)
        tables[name] = table
        write_csv(table, layout.out(name))
    write_text(report_html(study, collected.cells, collected.records, tables, png), layout.out("report.html"))
