"""Read one raw case, preprocess it, write ``<case>.b2nd`` (+ ``<case>_seg.b2nd``) and ``<case>.json``.

Every file goes through :func:`threedino_pipe.runtime.atomic_files.atomic_path`; the case JSON
(:class:`~threedino_pipe.artifacts.CaseProperties`) is written last, so its presence (with the
current ``plans_checksum``) marks a finished case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts import CaseProperties, Plans
from threedino_pipe.preprocessing.arrays import write_array
from threedino_pipe.preprocessing.class_locations import case_seed
from threedino_pipe.preprocessing.pipeline import preprocess_case
from threedino_pipe.raw_data.image_io import read_image, read_image_with_nonfinite
from threedino_pipe.raw_data.raw import CaseFiles
from threedino_pipe.runtime.errors import UserError

PARTIAL_MARK = ".partial"


def image_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.b2nd"


def seg_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}_seg.b2nd"


def is_finished(folder: Path, case_id: str, checksum: str, with_seg: bool, class_label: int | None = None) -> bool:
    """True when the case JSON is valid for these plans (and this class label) and its arrays exist."""
    path = CaseProperties.path(folder, case_id)
    if not path.is_file() or not image_path(folder, case_id).is_file():
        return False
    if with_seg and not seg_path(folder, case_id).is_file():
        return False
    try:
        return CaseProperties.read(path).finished_for(case_id, checksum, class_label)
    except UserError:  # unreadable, foreign or older: preprocess the case again
        return False


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
    plans: Plans
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
    with_seg = plans.stores_labels(configuration)
    label = None
    if with_seg:
        if case.label is None:
            raise UserError(f"case '{case.case_id}' has no label file", file=job.raw_folder / "labelsTr",
                            fix="run `3dino verify` and add the label")
        label = read_image(case.label)[0]
    try:
        data, seg, preprocessed = preprocess_case(images, geometry, plans.preprocessing(configuration), label,
                                                  seed=case_seed(case.case_id, configuration))
    except UserError as exc:
        if exc.file is not None:
            raise
        raise UserError(exc.problem, file=case.label if "label" in exc.problem else case.images[0],
                        fix=exc.fix) from None
    sources = [_relative(p, job.raw_folder) for p in case.images] + ([_relative(case.label, job.raw_folder)]
                                                                     if with_seg else [])
    record = CaseProperties.of(preprocessed.model_copy(update={"class_label": case.class_label}),
                               case_id=case.case_id, source_files=sources, plans_checksum=job.checksum)
    crop = plans.crop_size(configuration)
    folder = job.out_folder
    write_array(image_path(folder, case.case_id), data, crop)
    if seg is not None:
        write_array(seg_path(folder, case.case_id), seg, crop)
    record.write(CaseProperties.path(folder, case.case_id))
    return case.case_id
