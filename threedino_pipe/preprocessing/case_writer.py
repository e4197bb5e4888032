"""Read one raw case, preprocess it, write ``<case>.b2nd`` (+ ``<case>_seg.b2nd``) and ``<case>.json``.

Every file goes through :func:`threedino_pipe.runtime.atomic_files.atomic_path`; the case JSON is written
last, so its presence (with the current ``plans_checksum``) marks a finished case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from threedino_pipe import __version__
from threedino_pipe.dataset.image_io import read_image, read_image_with_nonfinite
from threedino_pipe.dataset.raw import CaseFiles
from threedino_pipe.preprocessing.arrays import write_array
from threedino_pipe.preprocessing.class_locations import case_seed
from threedino_pipe.preprocessing.pipeline import preprocess_case, uses_labels
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

SCHEMA_VERSION = 1
PARTIAL_MARK = ".partial"
# Fields of a configuration that change the stored bytes (batch size, preset, reasons do not).


def image_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.b2nd"


def seg_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}_seg.b2nd"


def json_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.json"


def crop_size(config: dict) -> list[int]:
    """The spatial crop a loader reads from this configuration (chunking hint, voxels)."""
    if config.get("patch_size"):
        return [int(v) for v in config["patch_size"]]
    return [int(config.get("global_crop") or 128)] * 3


def case_json_text(case: dict) -> str:
    """The case JSON: one key per line, class locations compact (they can hold 10,000s of voxels)."""
    lines = []
    for key, value in case.items():
        separators = (",", ":") if key == "class_locations" else (", ", ": ")
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, separators=separators)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def is_finished(folder: Path, case_id: str, checksum: str, with_seg: bool, class_label: int | None = None) -> bool:
    """True when the case JSON is valid for these plans (and this class label) and its arrays exist."""
    path = json_path(folder, case_id)
    if not path.is_file() or not image_path(folder, case_id).is_file():
        return False
    if with_seg and not seg_path(folder, case_id).is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and data.get("kind") == "case" and data.get("schema_version") == SCHEMA_VERSION
            and data.get("case_id") == case_id and data.get("plans_checksum") == checksum
            and data.get("class_label") == class_label)


def remove_partials(folder: Path) -> list[Path]:
    """Delete temporary files a killed run left in ``folder``; returns them."""
    removed = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") and PARTIAL_MARK in path.name and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@dataclass(frozen=True)
class CaseJob:
    """Everything a worker needs for one case (picklable)."""

    raw_folder: Path
    case: CaseFiles
    plans: dict
    configuration: str
    out_folder: Path
    checksum: str


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def write_case(job: CaseJob) -> str:
    """Preprocess and write one case; returns its id.

    Raises:
        UserError: unreadable files or inconsistent case (naming the file).
    """
    case, plans, configuration = job.case, job.plans, job.configuration
    images, geometry = [], None
    for path in case.images:
        if path is None:
            raise UserError(f"case '{case.case_id}' misses a channel file", file=job.raw_folder / "imagesTr",
                            fix="run `3dino verify` and add the file")
        array, geom = read_image_with_nonfinite(path)
        images.append(array)
        geometry = geometry or geom
    with_seg = uses_labels(configuration, plans)
    label = None
    if with_seg:
        if case.label is None:
            raise UserError(f"case '{case.case_id}' has no label file", file=job.raw_folder / "labelsTr",
                            fix="run `3dino verify` and add the label")
        label = read_image(case.label)[0]
    try:
        data, seg, properties = preprocess_case(images, geometry, plans, configuration, label,
                                                seed=case_seed(case.case_id, configuration))
    except UserError as exc:
        if exc.file is not None:
            raise
        raise UserError(exc.problem, file=case.label if "label" in exc.problem else case.images[0],
                        fix=exc.fix) from None
    properties["class_label"] = case.class_label
    record = {"kind": "case", "schema_version": SCHEMA_VERSION, "version": __version__, "case_id": case.case_id,
              "configuration": configuration,
              "source_files": [_relative(p, job.raw_folder) for p in case.images]
              + ([_relative(case.label, job.raw_folder)] if with_seg else []),
              **{k: v for k, v in properties.items() if k != "configuration"},
              "plans_checksum": job.checksum}
    crop = crop_size(plans["configurations"][configuration])
    folder = job.out_folder
    write_array(image_path(folder, case.case_id), data, crop)
    if seg is not None:
        write_array(seg_path(folder, case.case_id), seg, crop)
    with atomic_path(json_path(folder, case.case_id)) as tmp:
        tmp.write_text(case_json_text(record))
    return case.case_id
