"""``3dino export RUN -o FILE``: a pretrain run's teacher in the released 3DINO layout (``--format 3dino``), or
a finetune run as a model zip for ``3dino predict -m`` (``--format zip``,
:func:`threedino_pipe.inference.model_zip.export_zip`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import RunRecord
from threedino_pipe.inference.model_zip import export_zip
from threedino_pipe.models.weight_files import export_3dino
from threedino_pipe.runtime.checkpoints import load_checkpoint
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.training.ssl_setup import source_checkpoint
from threedino_pipe.training.ssl_trainer import load_ssl_pair

FORMATS = ("3dino", "zip")


def run(run_dir: Path, output: Path, *, fmt: str = "3dino") -> Path:
    """Write ``run_dir`` in format ``fmt`` to ``output``; returns ``output``.

    Raises:
        UserError: an unknown format, or a run folder that is not of the format's kind.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}", fix="pass --format zip or --format 3dino")
    if fmt == "zip":
        return export_zip(run_dir, output)
    return export_teacher(run_dir, output)


def export_teacher(run_dir: Path, output: Path) -> Path:
    """Write the teacher backbone and heads of ``run_dir`` (final, else latest checkpoint) to ``output``."""
    run_dir = Path(run_dir)
    if not RunRecord.in_folder(run_dir).is_file():
        raise UserError("not a run folder (no run.json)", file=run_dir, fix="pass a pretrain run folder")
    path = source_checkpoint(run_dir, None)
    state = load_checkpoint(path, rerun="3dino pretrain")
    if "teacher" not in state or "student" not in state or "config" not in state:
        raise UserError("not a pretrain checkpoint", file=path, fix="pass a pretrain or adapt-highres run folder")
    config, _, teacher = load_ssl_pair(state)
    export_3dino(teacher.backbone, {"dino_head": teacher.dino_head, "ibot_head": teacher.ibot_head}, output,
                 meta={"run": run_dir.name, "iteration": int(state["iteration"]), "preset": config.preset})
    Console(stderr=True).print(f"wrote {output} (teacher of {path.name}, iteration {state['iteration']})")
    return Path(output)
