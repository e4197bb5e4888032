"""``3dino evaluate``: metrics of one prediction folder, or a comparison of two (``--compare``).

The computations are :mod:`threedino_pipe.evaluation.single` and :mod:`threedino_pipe.evaluation.compare`.

Segmentation (reference = folder of label images): Dice and HD95 (mm) per case, label and
region. Classification (reference = ``case_id,label`` CSV): AUC, F1, accuracy. Outputs:
``per_case.csv``, ``summary.json``, PNG figures and ``report.html`` (docs/evaluate.md).
Exit code 0 when every reference case was evaluated, 1 when a prediction is missing or failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from threedino_pipe.artifacts import DatasetJson, EvaluationSummary
from threedino_pipe.evaluation.compare import write_comparison
from threedino_pipe.evaluation.outputs import write_outputs
from threedino_pipe.evaluation.single import evaluate_classification, evaluate_segmentation, log_summary
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
        return write_comparison(reference, compare, task=task, spec=spec, dataset=dataset_name, names=names,
                                 output=output, seed=seed, num_bootstrap=num_bootstrap, num_processes=num_processes)
    if task == "segmentation":
        _, summary, outputs = evaluate_segmentation(reference, prediction, spec, dataset_name, seed=seed,
                                                     num_bootstrap=num_bootstrap, num_processes=num_processes)
    else:
        _, summary, outputs = evaluate_classification(reference, prediction, spec, dataset_name, seed=seed,
                                                       num_bootstrap=num_bootstrap)
    out_dir = output if output is not None else default_output(prediction)
    write_outputs(out_dir, **outputs)
    log_summary(summary)
    cases = summary.cases
    log.info("wrote %s", out_dir)
    if cases.missing or cases.failed:
        log.error("error: %d case(s) missing and %d failed (listed in %s)", len(cases.missing),
                  len(cases.failed), EvaluationSummary.in_folder(out_dir))
        return 1
    return 0
