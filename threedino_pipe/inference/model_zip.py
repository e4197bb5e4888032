"""Model zips: one file holding a finetune run's ``model.json`` and weights (``3dino export RUN -o model.zip``).

A model zip holds exactly two members at its top level: ``model.json`` (which carries the
dataset's whole plans) and a weights file (``checkpoint_best.pt``, or ``checkpoint_final.pt`` with
``--checkpoint final``). ``predict -m
model.zip`` unpacks it into a temporary folder, but only after checking that every member is a
plain file whose path stays inside that folder (no absolute path, no ``..``, no link), so a zip
from elsewhere cannot write anywhere else; the weights are then loaded with ``weights_only=True``.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

from threedino_pipe.artifacts import ModelCard
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.progress import stderr_console

MODEL_JSON = ModelCard.FILE
_RERUN = "3dino finetune"


def export_zip(run_dir: Path, output: Path, checkpoint: str = "best") -> Path:
    """Write ``run_dir``'s ``model.json`` and its ``checkpoint`` (``best`` or ``final``) weights into the zip
    ``output`` (atomically).

    Raises:
        UserError: ``run_dir`` is not a finetune run folder or lacks those weights.
    """
    run_dir, output = Path(run_dir), Path(output)
    if not ModelCard.in_folder(run_dir).is_file():
        raise UserError("not a finetune run folder (no model.json: finetuning has not validated yet)", file=run_dir,
                        fix=f"pass a finetune run folder (results/DatasetNNN_Name/finetune__...); let `{_RERUN}` "
                        "reach its first validation")
    weights = ModelCard.read(ModelCard.in_folder(run_dir)).weights_file(checkpoint)
    if not (run_dir / weights).is_file():
        when = "a best checkpoint" if checkpoint == "best" else "its last iteration's weights"
        raise UserError(f"the run folder has no {weights} (finetuning has not saved {when} yet)",
                        file=run_dir, fix=f"let `{_RERUN}` finish, then export again"
                        + (", or pass --checkpoint best" if checkpoint != "best" else ""))
    if output.suffix.lower() != ".zip":
        raise UserError("a model zip's name must end in .zip", file=output, fix=f"use e.g. -o {output.stem}.zip")
    with atomic_path(output) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        archive.write(run_dir / MODEL_JSON, MODEL_JSON, compress_type=zipfile.ZIP_DEFLATED)
        archive.write(run_dir / weights, weights, compress_type=zipfile.ZIP_STORED)
    stderr_console().print(f"wrote {output} ({MODEL_JSON} + {weights} of {run_dir.name})")
    return output


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in path.parts:
        return "climbs out of the folder with '..'"
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no file type (plain file)
    if kind == stat.S_IFLNK:
        return "is a symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is not a plain file"
    return None


def check_members(zip_path: Path) -> list[zipfile.ZipInfo]:
    """The zip's members after checking that each one unpacks inside the target folder.

    Raises:
        UserError: the file is not a zip, a member would land outside the target, or ``model.json``
            is missing.
    """
    zip_path = Path(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"not a readable zip file ({exc})", file=zip_path,
                        fix="pass a model zip written by `3dino export RUN -o model.zip`") from None
    for info in members:
        reason = _unsafe_reason(info)
        if reason:
            raise UserError(f"refused to unpack: the member '{info.filename}' {reason}", file=zip_path,
                            fix="use a model zip written by `3dino export RUN -o model.zip`; this one may be malicious")
    if MODEL_JSON not in {info.filename for info in members}:
        raise UserError(f"the zip has no top-level {MODEL_JSON}", file=zip_path,
                        fix="pass a model zip written by `3dino export RUN -o model.zip`")
    return members


def unpack_model_zip(zip_path: Path, target: Path) -> Path:
    """Unpack a checked model zip into the (empty) folder ``target``; returns ``target`` (a run folder)."""
    zip_path, target = Path(zip_path), Path(target)
    members = check_members(zip_path)
    root = target.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for info in members:
            destination = (root / info.filename).resolve()
            if root != destination and root not in destination.parents:  # belt and braces after check_members
                raise UserError(f"refused to unpack: the member '{info.filename}' leaves the target folder",
                                file=zip_path, fix="use a model zip written by `3dino export RUN -o model.zip`")
            if info.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, destination.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
    return target
