"""The raw-data convention (nnU-Net v2 compatible, with extensions).

A raw dataset is a folder ``DatasetNNN_Name`` holding:

- ``dataset.json`` (read by :class:`threedino_pipe.artifacts.DatasetJson`): ``channel_names``,
  ``labels`` (or regions with ``regions_class_order``), ``numTraining``, ``file_ending``; our
  extensions ``task`` and ``class_names``.
- ``imagesTr/{case}_{XXXX}{ending}``: one file per channel XXXX (0000, 0001, ...), or a folder
  ``{case}_{XXXX}/`` holding one DICOM series.
- ``labelsTr/{case}{ending}`` (segmentation) or ``labelsTr.csv`` with ``case_id,label``
  (classification); optional ``imagesTs/``.
- Instead of the two folders, nnU-Net v2's optional ``"dataset"`` key may list each case's files:
  ``{"case": {"images": ["imagesTr/case_0000.nii.gz"], "label": "labelsTr/case.nii.gz"}}``
  (paths relative to the dataset folder or absolute; ``$VARS`` expanded).

Image files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ...) whose ending differs from the dataset's
``file_ending`` are errors naming the file and ``file_ending`` (nnU-Net v2 drops them silently,
which can leave a dataset of zero cases); they still count as their case's files, so one wrong
ending is one error. Other files in ``imagesTr/`` and label files without images are ignored with
a warning. A dataset without any training case is an error. Full description: ``docs/raw_convention.md``.

Discovery is tolerant: it returns what it found plus a list of :class:`Problem` so that
``3dino verify`` can report every problem at once.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts import DatasetJson
from threedino_pipe.raw_data import image_io
from threedino_pipe.raw_data.problems import Problem

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class CaseFiles:
    """Where one training case's files are.

    Attributes:
        case_id: the case name.
        images: one path per channel index (None where the channel is missing).
        label: label image (segmentation), else None.
        class_label: class index (classification), else None.
    """

    case_id: str
    images: list[Path | None]
    label: Path | None = None
    class_label: int | None = None


def split_channel_name(name: str, file_ending: str) -> tuple[str, int] | None:
    """``case_0001.nii.gz`` -> (``case``, 1); a DICOM folder ``case_0001`` too; else None."""
    stem = name[: -len(file_ending)] if file_ending and name.endswith(file_ending) else name
    match = _CHANNEL_RE.match(stem)
    return (match.group("case"), int(match.group("channel"))) if match else None


def other_image_ending(path: Path, file_ending: str) -> str | None:
    """The ending of an image file not ending in ``file_ending`` (``.nii`` in a ``.nii.gz`` dataset), else None."""
    if not path.is_file() or path.name.endswith(file_ending):
        return None
    ending = image_io.file_ending(path)
    return ending if ending.lower() in image_io.IMAGE_ENDINGS and len(ending) < len(path.name) else None


def wrong_ending(rel: str, ending: str, file_ending: str, case: str = "") -> Problem:
    """The error of an image file ending in ``ending`` in a dataset whose ``file_ending`` differs."""
    return Problem("error", rel, f"the file ends in '{ending}' but dataset.json's file_ending is '{file_ending}'",
                   f"set \"file_ending\": \"{ending}\" in dataset.json if every image and label ends so, else "
                   f"convert this file to {file_ending} (all files of a dataset share one format)", case)


def scan_images(images_dir: Path, file_ending: str, num_channels: int,
                rel_to: Path) -> tuple[dict[str, list[Path | None]], list[Problem]]:
    """Group ``{case}_{XXXX}`` entries of a folder by case; report stray and missing files."""
    problems: list[Problem] = []
    found: dict[str, dict[int, Path]] = {}
    for entry in sorted(images_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        rel = str(entry.relative_to(rel_to))
        other = other_image_ending(entry, file_ending)
        if entry.is_file() and not entry.name.endswith(file_ending) and other is None:
            problems.append(Problem("warning", rel, f"ignored: not an image with the dataset's file_ending "
                                    f"'{file_ending}'", "remove it from imagesTr/"))
            continue
        parsed = split_channel_name(entry.name, other or file_ending)
        if parsed is None:
            problems.append(Problem("error", rel, "name is not {case}_{XXXX}" + file_ending,
                                    "rename it with a 4-digit channel suffix, e.g. case001_0000" + file_ending))
            continue
        case, channel = parsed
        if other is not None:
            problems.append(wrong_ending(rel, other, file_ending, case))
        if channel >= num_channels:
            problems.append(Problem("error", rel, f"extra channel file: channel {channel:04d} is not in "
                                    f"channel_names (channels 0..{num_channels - 1})",
                                    "remove the file or declare the channel in dataset.json", case))
            continue
        if channel in found.get(case, {}):
            problems.append(Problem("error", rel, f"channel {channel:04d} of case '{case}' is given twice "
                                    f"(also {found[case][channel].name})", "keep one of the two", case))
            continue
        found.setdefault(case, {})[channel] = entry
    cases: dict[str, list[Path | None]] = {}
    for case, channels in sorted(found.items()):
        files = [channels.get(c) for c in range(num_channels)]
        for c, f in enumerate(files):
            if f is None:
                problems.append(Problem("error", str((images_dir / f"{case}_{c:04d}{file_ending}").relative_to(rel_to)),
                                        f"missing channel file {c:04d}", "add the file or remove the case", case))
        cases[case] = files
    return cases, problems


def read_class_labels(csv_path: Path, class_names: list[str], rel_to: Path) -> tuple[dict[str, int], list[Problem]]:
    """Read ``labelsTr.csv`` (``case_id,label``; label = class index or class name)."""
    problems: list[Problem] = []
    labels: dict[str, int] = {}
    rel = str(csv_path.relative_to(rel_to))
    if not csv_path.is_file():
        return labels, [Problem("error", rel, "labelsTr.csv is missing",
                                "a classification dataset needs labelsTr.csv with columns case_id,label")]
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"case_id", "label"} <= set(reader.fieldnames):
            return labels, [Problem("error", rel, f"header is {reader.fieldnames}, expected case_id,label",
                                    "make the first line 'case_id,label'")]
        for line_no, row in enumerate(reader, start=2):
            case, value = (row["case_id"] or "").strip(), (row["label"] or "").strip()
            if value in class_names:
                labels[case] = class_names.index(value)
            elif value.isdigit() and int(value) < len(class_names):
                labels[case] = int(value)
            else:
                problems.append(Problem("error", f"{rel}:{line_no}", f"label '{value}' of case '{case}' is not a "
                                        f"declared class ({', '.join(class_names)})",
                                        "use a class index or a name from class_names", case))
    return labels, problems


def display_path(path: Path, folder: Path) -> str:
    """``path`` relative to the dataset folder when inside it, else as given."""
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _cases_from_listing(folder: Path, spec: DatasetJson) -> tuple[list[CaseFiles], list[Problem]]:
    """Cases of nnU-Net v2's ``"dataset"`` key: explicit image and label paths per case."""
    def resolve(value: str) -> Path:
        path = Path(os.path.expandvars(value))
        return path if path.is_absolute() else folder / path

    cases: list[CaseFiles] = []
    problems: list[Problem] = []
    for case_id, item in spec.dataset.items():
        images: list[Path | None] = [resolve(v) for v in item.images]
        if len(images) != spec.num_channels:
            problems.append(Problem("error", "dataset.json", f"'dataset' entry '{case_id}' lists {len(images)} "
                                    f"images but channel_names declares {spec.num_channels} channels",
                                    "list one image per channel, in channel order", case_id))
            images = (images + [None] * spec.num_channels)[: spec.num_channels]
        for c, path in enumerate(images):
            if path is not None and not path.exists():
                problems.append(Problem("error", display_path(path, folder), f"missing channel file {c:04d} (listed "
                                        "in dataset.json 'dataset')", "add the file or fix its path", case_id))
                images[c] = None
        case = CaseFiles(case_id=str(case_id), images=images)
        if spec.task == "segmentation":
            label = resolve(item.label)
            if label.is_file():
                case.label = label
            else:
                problems.append(Problem("error", display_path(label, folder), "label file is missing (listed in "
                                        "dataset.json 'dataset')", "add the label image or fix its path", case_id))
        cases.append(case)
    return cases, problems


def _cases_from_folders(folder: Path, spec: DatasetJson) -> tuple[list[CaseFiles], list[Problem]] | None:
    """Cases found in ``imagesTr/`` (+ ``labelsTr/``); None when ``imagesTr/`` is missing."""
    images_dir = folder / "imagesTr"
    if not images_dir.is_dir():
        return None
    images, problems = scan_images(images_dir, spec.file_ending, spec.num_channels, folder)
    cases = [CaseFiles(case_id=c, images=files) for c, files in images.items()]
    if spec.task != "segmentation":
        return cases, problems
    labels_dir = folder / "labelsTr"
    if not labels_dir.is_dir():
        fix = ("labelsTr.csv is there: for a classification dataset write \"task\": \"classification\" and "
               "\"class_names\" in dataset.json (or \"labels\" mapping each class name to 0, 1, ...)"
               if (folder / "labelsTr.csv").is_file() else
               "add the label images, or set \"task\": \"unlabeled\" in dataset.json (pretraining only)")
        problems.append(Problem("error", "labelsTr", "folder labelsTr/ is missing", fix))
        return cases, problems
    others = {}  # label files of another image ending, by case id
    for entry in labels_dir.iterdir():
        ending = other_image_ending(entry, spec.file_ending)
        if ending is not None:
            others[entry.name[: -len(ending)]] = (entry, ending)
    for case in cases:
        label = labels_dir / f"{case.case_id}{spec.file_ending}"
        if label.is_file():
            case.label = label
        elif case.case_id in others:
            case.label, ending = others[case.case_id]
            problems.append(wrong_ending(str(case.label.relative_to(folder)), ending, spec.file_ending, case.case_id))
        else:
            problems.append(Problem("error", str(label.relative_to(folder)), "label file is missing",
                                    "add the label image or remove the case", case.case_id))
    used = {case.label for case in cases}
    names = {c.case_id for c in cases}
    for entry in sorted(labels_dir.iterdir()):
        stem = entry.name[: -len(spec.file_ending)] if entry.name.endswith(spec.file_ending) else None
        if not entry.name.startswith(".") and stem not in names and entry not in used:
            problems.append(Problem("warning", str(entry.relative_to(folder)),
                                    "ignored: label file without images in imagesTr/",
                                    "add the case's images or remove the label"))
    return cases, problems


def discover_cases(folder: Path, spec: DatasetJson) -> tuple[list[CaseFiles], list[Problem]]:
    """Every training case of a raw dataset with its files, and the layout problems found.

    Cases come from nnU-Net v2's ``"dataset"`` key when dataset.json has one, else from
    ``imagesTr/`` and ``labelsTr/`` (segmentation) or ``labelsTr.csv`` (classification).
    """
    if spec.dataset is not None:
        cases, problems = _cases_from_listing(folder, spec)
    else:
        found = _cases_from_folders(folder, spec)
        if found is None:
            return [], [Problem("error", "imagesTr", "folder imagesTr/ is missing", "put the training images there")]
        cases, problems = found
    if spec.task == "classification":
        labels, label_problems = read_class_labels(folder / "labelsTr.csv", spec.class_names, folder)
        problems += label_problems
        for case in cases:
            case.class_label = labels.get(case.case_id)
            if case.class_label is None and not any(p.case == case.case_id for p in label_problems):
                problems.append(Problem("error", "labelsTr.csv", f"case '{case.case_id}' has no label",
                                        "add a line case_id,label for it", case.case_id))
        for extra in sorted(set(labels) - {c.case_id for c in cases}):
            problems.append(Problem("error", "labelsTr.csv", f"case '{extra}' has a label but no images",
                                    "add its images or remove the line", extra))
    problems += _group_problems(spec, {c.case_id for c in cases})
    where = "dataset.json's 'dataset' lists" if spec.dataset is not None else "imagesTr/ holds"
    if not cases:
        problems.append(Problem("error", "dataset.json" if spec.dataset is not None else "imagesTr",
                                f"no training case: {where} no {{case}}_{{XXXX}} image (dataset.json's file_ending "
                                f"is '{spec.file_ending}')", f"add the training images, one file per channel: "
                                f"{{case}}_0000{spec.file_ending}, ... (a 3D image format: "
                                f"{', '.join(image_io.IMAGE_ENDINGS)}; or one DICOM series folder per channel)"))
    elif spec.num_training is not None and spec.num_training != len(cases):
        problems.append(Problem("error", "dataset.json", f"numTraining is {spec.num_training} but {where} "
                                f"{len(cases)} cases", f"set \"numTraining\": {len(cases)}"))
    return cases, problems


def _group_problems(spec: DatasetJson, case_ids: set[str]) -> list[Problem]:
    """dataset.json ``case_groups`` naming cases the dataset does not have, or a case in two groups."""
    problems, seen = [], {}
    for group, members in (spec.case_groups or {}).items():
        unknown = sorted(set(members) - case_ids)
        if unknown:
            problems.append(Problem("error", "dataset.json", f"case_groups '{group}' names case(s) the dataset does "
                                    f"not have: {', '.join(unknown)}", "list case ids of the training cases (the "
                                    "image names before _0000)"))
        for case in members:
            if seen.setdefault(case, group) != group:
                problems.append(Problem("error", "dataset.json", f"case '{case}' is in two case_groups: "
                                        f"'{seen[case]}' and '{group}'", "put each case in one group", case))
    return problems
