"""``3dino evaluate``: metrics of one prediction folder, or a comparison of two (``--compare``).

Segmentation (reference = folder of label images): Dice and HD95 (mm) per case, label and
region. Classification (reference = ``case_id,label`` CSV): AUC, F1, accuracy. Outputs:
``per_case.csv``, ``summary.json``, PNG figures and ``report.html`` (docs/evaluate.md).
Exit code 0 when every reference case was evaluated, 1 when a prediction is missing or failed.
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
from threedino_pipe.evaluation.inputs import dataset_labels, list_label_images, prediction_csv_path
from threedino_pipe.evaluation.outputs import PER_CASE_FILE, write_outputs
from threedino_pipe.evaluation.segmentation import SegmentationResult, evaluate_folder
from threedino_pipe.evaluation.summary import classification_metrics_summary, segmentation_metrics_summary
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.paths import resolve_dataset

log = logging.getLogger(__name__)


def load_dataset(dataset: str | None) -> tuple[DatasetJson | None, str | None]:
    """(dataset.json of ``-d``, its folder name), or (None, None) without ``-d``."""
    if dataset is None:
        return None, None
    folder = resolve_dataset(dataset)
    return DatasetJson.read(folder), folder.name


def infer_task(reference: Path, spec: DatasetJson | None) -> str:
    """``classification`` for a CSV reference, ``segmentation`` for a folder; checked against dataset.json.

    Raises:
        UserError: missing reference, another kind of file, or a task that contradicts ``-d``.
    """
    if not reference.exists():
        raise UserError("reference not found", file=reference,
                        fix="pass -r a folder of reference label images or a case_id,label CSV")
    if reference.is_dir():
        task = "segmentation"
    elif reference.suffix.lower() == ".csv":
        task = "classification"
    else:
        raise UserError("the reference must be a folder of label images or a case_id,label CSV", file=reference,
                        fix="pass -r the labels folder (e.g. labelsTs/) or the CSV of reference classes")
    if spec is not None and spec.task != task:
        expected = "a case_id,label CSV" if spec.task == "classification" else "a folder of label images"
        raise UserError(f"dataset task is '{spec.task}' but the reference is a {task} reference", file=reference,
                        fix=f"for this dataset pass -r {expected}" if spec.task != "unlabeled"
                        else "evaluate against a labelled dataset, or leave out -d")
    return task


def _inputs_info(reference: Path, prediction: Path, dataset: str | None, seed: int, num_bootstrap: int) -> list:
    return [("reference", str(reference)), ("prediction", str(prediction)), ("dataset", dataset or "none"),
            ("bootstrap", f"{num_bootstrap} resamples over cases, seed {seed}, 95 % percentile CI")]


def _case_warnings(missing: Sequence[str], failed: Sequence[CaseFailure], ignored: Sequence[str]) -> list[str]:
    out = [f"missing prediction for case '{c}'" for c in missing]
    out += [f"case '{f.case_id}' failed: {f.problem} ({f.file})" for f in failed]
    out += [f"prediction '{c}' has no reference (ignored)" for c in ignored]
    return out


def segmentation_table(metrics: dict, mean_over_labels: dict) -> pd.DataFrame:
    """Report table: one row per label (and the mean over labels) with Dice and HD95 statistics."""
    rows = []
    for name in [*metrics["dice"], "mean over labels"]:
        row = {"label": name}
        for metric, title in (("dice", "Dice"), ("hd95_mm", "HD95 mm")):
            entry = mean_over_labels[metric] if name == "mean over labels" else metrics[metric][name]
            row.update({f"{title} mean": entry["mean"], f"{title} median": entry["median"],
                        f"{title} 95% CI": report.ci_text(entry["ci95"]), f"{title} n": entry["n"],
                        f"{title} NaN": entry["n_nan"]})
        rows.append(row)
    return pd.DataFrame(rows)


def classification_table(metrics: dict) -> pd.DataFrame:
    """Report table: one row per metric and class with value and CI."""
    return pd.DataFrame([{"metric": metric, "class": key, "value": e["value"], "95% CI": report.ci_text(e["ci95"]),
                          "n": e["n"]} for metric, entries in metrics.items() for key, e in entries.items()])


def _evaluate_segmentation(reference: Path, prediction: Path, spec: DatasetJson | None, dataset: str | None, *,
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
    html = report.render(f"Segmentation evaluation: {prediction.name}",
                         _inputs_info(reference, prediction, dataset, seed, num_bootstrap)
                         + [("cases evaluated", f"{summary.cases.evaluated} of {len(references)}")],
                         [("Dice and HD95 per label", segmentation_table(metrics, mean_over_labels))],
                         [("Dice and HD95 (mm) per label; points are cases", figures["metrics_per_label.png"])],
                         _case_warnings(result.missing, result.failed, result.ignored))
    summary.files = SummaryFiles(per_case=PER_CASE_FILE, figures=list(figures), report="report.html")
    write_kwargs = {"tables": {PER_CASE_FILE: result.per_case}, "figures": figures, "report": html,
                    "summary": summary}
    return result, summary, write_kwargs



def _evaluate_classification(reference: Path, prediction: Path, spec: DatasetJson | None, dataset: str | None, *,
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
                         _case_warnings(result.missing, [], result.ignored))
    summary.files = SummaryFiles(per_case=PER_CASE_FILE, figures=list(figures), report="report.html")
    write_kwargs = {"tables": {PER_CASE_FILE: result.per_case}, "figures": figures, "report": html,
                    "summary": summary}
    return result, summary, write_kwargs


def _log_segmentation(summary: EvaluationSummary) -> None:
    for name, entry in summary.metrics["dice"].items():
        hd = summary.metrics["hd95_mm"][name]
        log.info("%s: Dice %.4f %s (n=%d), HD95 %.2f mm %s", name, entry["mean"], report.ci_text(entry["ci95"]),
                 entry["n"], hd["mean"], report.ci_text(hd["ci95"]))


def _log_classification(summary: EvaluationSummary) -> None:
    m = summary.metrics
    log.info("accuracy %.4f, F1 macro %.4f, AUC macro %.4f (n=%d)", m["accuracy"]["all"]["value"],
             m["f1"]["macro"]["value"], m["auc"]["macro"]["value"], m["accuracy"]["all"]["n"])


def default_output(prediction: Path) -> Path:
    """``<PRED_DIR>/evaluation`` (for a predictions.csv file: beside it)."""
    return (prediction if prediction.is_dir() else prediction.parent) / "evaluation"


def run(reference: Path, prediction: Path | None = None, *, compare: Sequence[str] | None = None,
        names: Sequence[str] | None = None, dataset: str | None = None, output: Path | None = None,
        seed: int = 0, num_bootstrap: int = 1000, num_processes: int = 2) -> int:
    """Evaluate ``prediction`` against ``reference`` (or compare two sides) and write the outputs.

    Args:
        reference: folder of reference label images, or a ``case_id,label`` CSV.
        prediction: folder of predicted label images, or ``predictions.csv`` / its folder.
        compare: two entries (sides A and B), each one or more comma-separated prediction or
            evaluation folders (one per run); exclusive with ``prediction``.
        names: display names of the two sides (default: from the folder names).
        dataset: ``-d`` id or name: labels/regions and classes from its dataset.json.
        output: output folder (default ``<PRED_DIR>/evaluation``, or ``./evaluation_compare``).
        seed, num_bootstrap: bootstrap settings.
        num_processes: worker processes for reading and scoring segmentation cases.

    Returns:
        The exit code: 0 when every reference case was evaluated, 1 when one is missing or failed.

    Raises:
        UserError: unusable inputs; nothing is written then.
    """
    if (prediction is None) == (not compare):
        raise UserError("give either -p PRED_DIR (evaluate one folder) or --compare A B (compare two)",
                        fix="see `3dino evaluate --help`")
    if num_bootstrap < 1:
        raise UserError(f"--num-bootstrap is {num_bootstrap}; it must be at least 1", fix="pass e.g. 1000")
    spec, dataset_name = load_dataset(dataset)
    task = infer_task(reference, spec)
    if compare:
        from threedino_pipe.evaluation import compare as compare_stage
        return compare_stage.run(reference, compare, task=task, spec=spec, dataset=dataset_name, names=names,
                                 output=output, seed=seed, num_bootstrap=num_bootstrap, num_processes=num_processes)
    if task == "segmentation":
        _, summary, outputs = _evaluate_segmentation(reference, prediction, spec, dataset_name, seed=seed,
                                                     num_bootstrap=num_bootstrap, num_processes=num_processes)
    else:
        _, summary, outputs = _evaluate_classification(reference, prediction, spec, dataset_name, seed=seed,
                                                       num_bootstrap=num_bootstrap)
    out_dir = output if output is not None else default_output(prediction)
    write_outputs(out_dir, **outputs)
    (_log_segmentation if task == "segmentation" else _log_classification)(summary)
    cases = summary.cases
    log.info("wrote %s", out_dir)
    if cases.missing or cases.failed:
        log.error("error: %d case(s) missing and %d failed (listed in %s)", len(cases.missing),
                  len(cases.failed), EvaluationSummary.in_folder(out_dir))
        return 1
    return 0
