"""One prediction folder (or ``predictions.csv``) against its reference: metrics, tables, figures, report.

Segmentation (reference = folder of label images): Dice and HD95 (mm) per case, label and
region; classification (reference = ``case_id,label`` CSV): AUC, F1, accuracy; each with bootstrap
confidence intervals over cases (docs/evaluate.md). The functions return the
:class:`~threedino_pipe.artifacts.EvaluationSummary` and what :func:`.outputs.write_outputs` writes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from threedino_pipe.artifacts import DatasetJson, EvaluationSummary
from threedino_pipe.artifacts.evaluation_summary import CaseCounts, CaseFailure, SummaryFiles, SummaryOptions
from threedino_pipe.evaluation import plots, report
from threedino_pipe.evaluation.classification import ClassificationResult, evaluate_csv
from threedino_pipe.evaluation.classification_metrics import confusion
from threedino_pipe.evaluation.evaluated_files import dataset_labels, list_label_images, prediction_csv_path
from threedino_pipe.evaluation.outputs import PER_CASE_FILE
from threedino_pipe.evaluation.segmentation import SegmentationResult, evaluate_folder
from threedino_pipe.evaluation.summary import classification_metrics_summary, segmentation_metrics_summary

log = logging.getLogger(__name__)


def _inputs_info(reference: Path, prediction: Path, dataset: str | None, seed: int, num_bootstrap: int) -> list:
    return [("reference", str(reference)), ("prediction", str(prediction)), ("dataset", dataset or "none"),
            ("bootstrap", f"{num_bootstrap} resamples over cases, seed {seed}, 95 % percentile CI")]


def _case_warnings(missing: Sequence[str], failed: Sequence[CaseFailure], ignored: Sequence[str]) -> list[str]:
    out = [f"missing prediction for case '{c}'" for c in missing]
    out += [f"case '{f.case_id}' failed: {f.problem} ({f.file})" for f in failed]
    out += [f"prediction '{c}' has no reference (ignored)" for c in ignored]
    return out


def segmentation_table(metrics: dict, mean_over_labels: dict) -> pd.DataFrame:
    """Report table: one row per label (and the mean over labels) with Dice and HD95 statistics.

    CIs over fewer than 5 cases say ``unreliable``; ``HD95 near-empty`` counts the cases whose HD95
    is computed on a near-empty mask (``n/a`` for results written before the flag existed).
    """
    rows = []
    for name in [*metrics["dice"], "mean over labels"]:
        row = {"label": name}
        for metric, title in (("dice", "Dice"), ("hd95_mm", "HD95 mm")):
            entry = mean_over_labels[metric] if name == "mean over labels" else metrics[metric][name]
            row.update({f"{title} mean": entry["mean"], f"{title} median": entry["median"],
                        f"{title} 95% CI": report.entry_ci_text(entry), f"{title} n": entry["n"],
                        f"{title} NaN": entry["n_nan"]})
        row["HD95 near-empty"] = entry.get("n_near_empty")  # entry: the HD95 one, the loop's last
        rows.append(row)
    return pd.DataFrame(rows)



def classification_table(metrics: dict) -> pd.DataFrame:
    """Report table: one row per metric and class with value and CI."""
    return pd.DataFrame([{"metric": metric, "class": key, "value": e["value"], "95% CI": report.entry_ci_text(e),
                          "n": e["n"]} for metric, entries in metrics.items() for key, e in entries.items()])


def evaluate_segmentation(reference: Path, prediction: Path, spec: DatasetJson | None, dataset: str | None, *,
                           seed: int, num_bootstrap: int, num_processes: int
                           ) -> tuple[SegmentationResult, EvaluationSummary, dict]:
    references = list_label_images(reference, "reference folder")
    labels = dataset_labels(spec) if spec is not None else None
    result = evaluate_folder(reference, prediction, labels, num_processes=num_processes, references=references)
    metrics, mean_over_labels = segmentation_metrics_summary(result.per_case, list(result.labels), seed=seed,
                                                             num_resamples=num_bootstrap)
    summary = EvaluationSummary(
        mode="evaluate", task="segmentation", reference=str(reference.resolve()), prediction=str(prediction.resolve()),
        dataset=dataset, options=SummaryOptions(seed=seed, num_bootstrap=num_bootstrap),
        labels={k: list(v) for k, v in result.labels.items()},
        cases=CaseCounts(reference=len(references), evaluated=len(result.evaluated), missing=result.missing,
                         failed=result.failed, ignored=result.ignored),
        metrics=metrics, mean_over_labels=mean_over_labels)
    figures = {"metrics_per_label.png": plots.segmentation_boxplot(result.per_case, list(result.labels))}
    entries = [*mean_over_labels.values(), *(e for table in metrics.values() for e in table.values())]
    html = report.render(f"Segmentation evaluation: {prediction.name}",
                         _inputs_info(reference, prediction, dataset, seed, num_bootstrap)
                         + [("cases evaluated", f"{summary.cases.evaluated} of {len(references)}")],
                         [("Dice and HD95 per label", segmentation_table(metrics, mean_over_labels))],
                         [("Dice and HD95 (mm) per label; points are cases", figures["metrics_per_label.png"])],
                         _case_warnings(result.missing, result.failed, result.ignored),
                         notes=report.segmentation_notes(entries, mean_over_labels["hd95_mm"]["n_near_empty"]))
    summary.files = SummaryFiles(per_case=PER_CASE_FILE, figures=list(figures), report="report.html")
    write_kwargs = {"tables": {PER_CASE_FILE: result.per_case}, "figures": figures, "report": html,
                    "summary": summary}
    return result, summary, write_kwargs



def evaluate_classification(reference: Path, prediction: Path, spec: DatasetJson | None, dataset: str | None, *,
                             seed: int, num_bootstrap: int) -> tuple[ClassificationResult, EvaluationSummary, dict]:
    result = evaluate_csv(reference, prediction, spec.class_names if spec is not None else None)
    metrics = classification_metrics_summary(result, seed=seed, num_resamples=num_bootstrap)
    matrix = confusion(result.y_true, result.y_pred, len(result.class_names))
    summary = EvaluationSummary(
        mode="evaluate", task="classification", reference=str(reference.resolve()),
        prediction=str(prediction_csv_path(prediction).resolve()), dataset=dataset,
        options=SummaryOptions(seed=seed, num_bootstrap=num_bootstrap), classes=result.class_names,
        cases=CaseCounts(reference=len(result.case_ids) + len(result.missing), evaluated=len(result.case_ids),
                         missing=result.missing, failed=[], ignored=result.ignored),
        metrics=metrics, confusion_matrix=matrix.tolist())
    figures = {"confusion_matrix.png": plots.confusion_matrix_plot(matrix, result.class_names),
               "roc.png": plots.roc_plot(result.y_true, result.probs, result.class_names)}
    html = report.render(f"Classification evaluation: {prediction.name}",
                         _inputs_info(reference, prediction, dataset, seed, num_bootstrap)
                         + [("cases evaluated", f"{len(result.case_ids)} of {summary.cases.reference}")],
                         [("Metrics", classification_table(metrics))],
                         [("Confusion matrix (rows: reference, columns: predicted)", figures["confusion_matrix.png"]),
                          ("ROC curves, one class vs the rest", figures["roc.png"])],
                         _case_warnings(result.missing, [], result.ignored),
                         notes=[report.UNRELIABLE_CI_NOTE] if report.any_unreliable(
                             [e for table in metrics.values() for e in table.values()]) else [])
    summary.files = SummaryFiles(per_case=PER_CASE_FILE, figures=list(figures), report="report.html")
    write_kwargs = {"tables": {PER_CASE_FILE: result.per_case}, "figures": figures, "report": html,
                    "summary": summary}
    return result, summary, write_kwargs


def log_summary(summary: EvaluationSummary) -> None:
    """The headline numbers of an evaluation on the log (per label, or the classification metrics)."""
    (_log_segmentation if summary.task == "segmentation" else _log_classification)(summary)


def _log_segmentation(summary: EvaluationSummary) -> None:
    for name, entry in summary.metrics["dice"].items():
        hd = summary.metrics["hd95_mm"][name]
        flagged = hd.get("n_near_empty") or 0
        log.info("%s: Dice %.4f %s (n=%d), HD95 %.2f mm %s%s", name, entry["mean"], report.entry_ci_text(entry),
                 entry["n"], hd["mean"], report.entry_ci_text(hd),
                 f" ({flagged} of {hd['n']} on a near-empty mask: read with the Dice)" if flagged else "")
    if report.any_unreliable(list(summary.metrics["dice"].values())):
        log.warning("warning: %s", report.UNRELIABLE_CI_NOTE)


def _log_classification(summary: EvaluationSummary) -> None:
    m = summary.metrics
    accuracy, f1, auc = m["accuracy"]["all"], m["f1"]["macro"], m["auc"]["macro"]
    log.info("accuracy %.4f %s, F1 macro %.4f %s, AUC macro %.4f %s (n=%d)", accuracy["value"],
             report.entry_ci_text(accuracy), f1["value"], report.entry_ci_text(f1), auc["value"],
             report.entry_ci_text(auc), accuracy["n"])
    if m["accuracy"]["all"].get("ci_unreliable"):
        log.warning("warning: %s", report.UNRELIABLE_CI_NOTE)
