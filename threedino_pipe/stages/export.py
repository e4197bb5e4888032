"""``3dino export RUN -o FILE``: a finetune run as a model zip for ``3dino predict -m``
(:func:`threedino_pipe.inference.model_zip.export_zip`), or a pretrain / adapt-highres run's teacher in the
released 3DINO layout.

The format follows from the run's kind (``model.json`` or ``run.json``'s stage) and the file ending
(``--format auto``, the default); ``--format zip`` / ``3dino`` only confirm it. Refused are the real
contradictions: a model zip of a pretrain run (it has no ``model.json``), the 3DINO layout of a finetune
run (it has no DINO/iBOT teacher), a finetune run's zip whose name does not end in ``.zip``, and
``--checkpoint`` for a pretrain run (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path

from threedino_pipe.artifacts import CHECKPOINT_FILES, ModelCard, RunRecord
from threedino_pipe.inference.model_zip import export_zip
from threedino_pipe.models.weight_files import export_3dino
from threedino_pipe.runtime.checkpoints import load_checkpoint
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.progress import stderr_console
from threedino_pipe.training.ssl_setup import source_checkpoint
from threedino_pipe.training.ssl_trainer import load_ssl_pair, refuse_other_method

FORMATS = ("auto", "zip", "3dino")
PRETRAIN_STAGES = ("pretrain", "adapt-highres")


def run_kind(run_dir: Path) -> str:
    """``finetune`` (a ``model.json``, or run.json of a finetune run) or ``pretrain`` (run.json of pretrain or
    adapt-highres).

    Raises:
        UserError: the folder holds neither file.
    """
    run_dir = Path(run_dir)
    if ModelCard.in_folder(run_dir).is_file():
        return "finetune"
    if not RunRecord.in_folder(run_dir).is_file():
        raise UserError("not a run folder (no model.json or run.json)", file=run_dir,
                        fix="pass a finetune run folder (results/DatasetNNN_Name/finetune__...) or a pretrain run "
                        "folder (results/pretrain/...)")
    stage = RunRecord.read(RunRecord.in_folder(run_dir)).stage
    return "pretrain" if stage in PRETRAIN_STAGES else "finetune"


def choose_format(kind: str, output: Path, fmt: str, checkpoint: str | None) -> str:
    """``zip`` or ``3dino`` for a run of ``kind`` written to ``output``; refuses real contradictions."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}", fix="leave --format out (chosen from the run), or pass "
                        "--format zip or --format 3dino")
    if checkpoint is not None and checkpoint not in CHECKPOINT_FILES:
        raise UserError(f"unknown --checkpoint {checkpoint!r}", fix=f"pass one of {', '.join(CHECKPOINT_FILES)}")
    chosen = "zip" if kind == "finetune" else "3dino"
    if fmt not in ("auto", chosen):
        problem = ("a finetune run has no DINO/iBOT teacher to write in the 3DINO layout" if kind == "finetune"
                   else "a pretrain run has no model.json and head to put in a model zip")
        fix = ("leave --format out to write a model zip (-o model.zip); its backbone is the one model.json's "
               "backbone.source names" if kind == "finetune" else
               "leave --format out to write the teacher (-o teacher.pth); finetune a head on it for a model zip")
        raise UserError(f"--format {fmt}: {problem}", fix=fix)
    if chosen == "3dino":
        if Path(output).suffix.lower() == ".zip":
            raise UserError("a pretrain run is written in the 3DINO layout, not as a model zip, but the output "
                            "name ends in .zip", file=output, fix=f"use e.g. -o {Path(output).stem}.pth")
        if checkpoint is not None:
            raise UserError("--checkpoint chooses a finetune run's weights; a pretrain run exports "
                            "checkpoint_final.pt (else checkpoint_latest.pt)", fix="leave --checkpoint out")
    return chosen


def run(run_dir: Path, output: Path, *, fmt: str = "auto", checkpoint: str | None = None) -> Path:
    """Write ``run_dir`` to ``output`` in the format its kind and ``output``'s ending give; returns ``output``.

    Raises:
        UserError: an unknown format, or one that contradicts the run's kind or the file ending.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("run folder not found", file=run_dir, fix="pass a finetune or pretrain run folder")
    chosen = choose_format(run_kind(run_dir), Path(output), fmt, checkpoint)
    if chosen == "zip":
        return export_zip(run_dir, output, checkpoint=checkpoint or "best")
    return export_teacher(run_dir, output)


def export_teacher(run_dir: Path, output: Path) -> Path:
    """Write the teacher backbone and heads of ``run_dir`` (final, else latest checkpoint) to ``output``."""
    run_dir = Path(run_dir)
    if not RunRecord.in_folder(run_dir).is_file():
        raise UserError("not a run folder (no run.json)", file=run_dir, fix="pass a pretrain run folder")
    refuse_other_method(RunRecord.read(RunRecord.in_folder(run_dir)).options)
    path = source_checkpoint(run_dir, None)
    state = load_checkpoint(path, rerun="3dino pretrain")
    if "teacher" not in state or "student" not in state or "config" not in state:
        raise UserError("not a pretrain checkpoint", file=path, fix="pass a pretrain or adapt-highres run folder")
    config, _, teacher = load_ssl_pair(state)
    export_3dino(teacher.backbone, {"dino_head": teacher.dino_head, "ibot_head": teacher.ibot_head}, output,
                 meta={"run": run_dir.name, "iteration": int(state["iteration"]), "preset": config.preset})
    stderr_console().print(f"wrote {output} (teacher of {path.name}, iteration {state['iteration']})")
    return Path(output)
