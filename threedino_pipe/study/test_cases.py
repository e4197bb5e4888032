"""The held-out cases a study predicts and evaluates: ``imagesTs``/``labelsTs``, else splits.json's test list.

The validation cases of the fold chose each run's checkpoint, so they are never used silently: a dataset
with neither is refused (``plan --test-fraction``) unless ``--on-validation`` marks the study selection-biased.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts import DatasetJson, Splits
from threedino_pipe.raw_data.raw import discover_cases, read_class_labels
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.study.layout import StudyLayout


@dataclass(frozen=True)
class TestCases:
    """Where predict reads the cases (a folder or a list file), where evaluate finds their labels, and which."""

    source: str            # imagesTs | splits_test | validation
    input: Path
    reference: Path
    case_ids: list[str]


def ts_reference(raw: Path, spec: DatasetJson) -> Path:
    """Where the imagesTs cases' references are: ``labelsTs/`` (segmentation) or ``labelsTs.csv`` (classification)."""
    return raw / ("labelsTs.csv" if spec.task == "classification" else "labelsTs")


def _ts_cases(raw: Path, spec: DatasetJson) -> list[str]:
    labels = ts_reference(raw, spec)
    if not (raw / "imagesTs").is_dir() or not labels.exists():
        return []
    if spec.task == "classification":
        return sorted(read_class_labels(labels, spec.class_names, raw)[0])
    return sorted(p.name[: -len(spec.file_ending)] for p in labels.iterdir() if p.name.endswith(spec.file_ending))


def find_test_cases(raw: Path, pre: Path, dataset: str, folds: list[int], on_validation: bool) -> tuple[str, list[str]]:
    """``(source, case ids)`` of the study's test cases, checked before anything is written.

    Raises:
        UserError: no imagesTs/labelsTs and no test list (without ``--on-validation``), or ``--on-validation``
            with several folds (each fold validates on other cases).
    """
    spec = DatasetJson.read(raw)
    cases = _ts_cases(raw, spec)
    if cases:
        return "imagesTs", cases
    splits = Splits.of_dataset(pre, dataset)
    if splits.test:
        return "splits_test", sorted(splits.test)
    if not on_validation:
        raise UserError("the dataset has no held-out test cases (no imagesTs/ with labelsTs/, and splits.json has no "
                        "test list); the validation cases chose the checkpoints, so they cannot test them",
                        file=Splits.in_folder(pre),
                        fix=f"hold out a test list: `3dino plan -d {dataset} --test-fraction 0.2` and `3dino "
                            f"preprocess -d {dataset}`, then rerun the study (or pass --on-validation to accept "
                            "selection-biased results)")
    if len(folds) != 1:
        raise UserError("--on-validation takes one fold (each fold validates on other cases)",
                        fix=f"pass one of --folds {' '.join(map(str, folds))}")
    return "validation", sorted(splits.fold(folds[0], file=Splits.in_folder(pre)).val)


def _write_reference_csv(path: Path, case_ids: list[str], classes: dict[str, int], names: list[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("case_id,label\n" + "".join(f"{c},{names[classes[c]]}\n" for c in case_ids))


def prepare(raw: Path, source: str, case_ids: list[str], layout: StudyLayout) -> TestCases:
    """The predict input and evaluate reference of the test cases: ``imagesTs``/``labelsTs`` (``labelsTs.csv``)
    as they are, else ``test_cases.txt`` (the cases' images from imagesTr, one per line) and ``reference/`` (links
    to their labels) or, for a classification dataset, ``reference.csv`` (their classes).
    """
    spec = DatasetJson.read(raw)
    if source == "imagesTs":
        return TestCases(source, raw / "imagesTs", ts_reference(raw, spec), case_ids)
    classification = spec.task == "classification"
    found, _ = discover_cases(raw, spec)
    by_id = {c.case_id: c for c in found}
    missing = [c for c in case_ids if c not in by_id
               or (by_id[c].class_label if classification else by_id[c].label) is None]
    if missing:
        raise UserError(f"test case(s) {', '.join(missing[:5])} have no images or label in the raw dataset",
                        file=raw, fix=f"restore them, or rerun `3dino plan -d {raw.name}` and `3dino preprocess`")
    layout.folder.mkdir(parents=True, exist_ok=True)
    lines = [str(Path(image).resolve()) for case in case_ids for image in by_id[case].images if image is not None]
    if classification:
        _write_reference_csv(layout.reference_csv, case_ids, {c: by_id[c].class_label for c in case_ids},
                             spec.class_names)
    else:
        _link_labels([Path(by_id[c].label) for c in case_ids], layout.reference)
    with atomic_path(layout.test_list) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return TestCases(source, layout.test_list, layout.reference_csv if classification else layout.reference,
                     case_ids)


def _link_labels(labels: list[Path], folder: Path) -> None:
    """Links in ``folder`` to the label images (kept when there already)."""
    folder.mkdir(parents=True, exist_ok=True)
    for label in labels:
        link = folder / label.name
        if not link.is_symlink():
            with contextlib.suppress(FileExistsError):  # another share of the study made it just now
                os.symlink(label.resolve(), link)
