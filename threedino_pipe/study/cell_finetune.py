"""A cell's finetune under torchrun (``3dino study --gpus-per-cell G``): one process per GPU, as
``torchrun --standalone --nproc-per-node G -m threedino_pipe.cli finetune ...`` would run it, with the study's
``beside`` naming; rank 0 writes the run folder's path where the study reads it.

Run as ``python -m torch.distributed.run --standalone --nproc-per-node G -m threedino_pipe.study.cell_finetune
SPEC DATASET ITERS BATCH_SIZE LR VAL_EVERY NUM_WORKERS DEVICE FOLDER_FILE`` (``SPEC``: the cell's
:class:`StudyCellSpec` as JSON; ``ITERS`` ... ``VAL_EVERY`` the study's finetune settings, :data:`SETTINGS`, 0 for
finetune's default).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from threedino_pipe.artifacts.study import StudyCellSpec
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

FAILED = 2  # the exit code of a refused finetune (its message on stderr)
#: the study's options passed to every cell's finetune, in the order of its command line (docs/study.md)
SETTINGS = ("iters", "batch_size", "lr", "val_every")


def settings_flags(settings: dict) -> list[str]:
    """``--iters N --batch-size B --lr LR --val-every V``: the finetune options of the given (non-None) settings."""
    flags: list[str] = []
    for name in SETTINGS:
        value = settings.get(name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def finetune_arguments(spec: StudyCellSpec, dataset: str, settings: dict, num_workers: int, device: str) -> dict:
    """The keyword arguments of ``stages.finetune.run`` for the cell (``beside`` left out; of ``settings``
    (:data:`SETTINGS`) only those given, so the others are finetune's defaults)."""
    return {"dataset": dataset, "pct": spec.pct, "fold": spec.fold, "seed": spec.seed, "backbone": spec.backbone,
            "head": spec.head, "num_workers": num_workers, "device": device,
            **{k: v for k, v in settings.items() if k in SETTINGS and v is not None}}


def command(gpus: int, spec: StudyCellSpec, dataset: str, settings: dict, num_workers: int, device: str,
            folder_file: Path) -> list[str]:
    """The torchrun command line that runs the cell's finetune on ``gpus`` processes (this Python)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), "-m",
            __name__, spec.model_dump_json(), dataset, *[str(settings.get(name) or 0) for name in SETTINGS],
            str(num_workers), device, str(folder_file)]


def main(argv: list[str]) -> int:
    """Every rank finetunes; rank 0 writes the run folder's path to the last argument. Returns the exit code."""
    from threedino_pipe.stages import finetune

    spec = StudyCellSpec.model_validate_json(argv[0])
    dataset, given, (num_workers, device, folder_file) = argv[1], argv[2:2 + len(SETTINGS)], argv[2 + len(SETTINGS):]
    settings = {name: (float if name == "lr" else int)(value) or None
                for name, value in zip(SETTINGS, given, strict=True)}
    num_workers, folder_file = int(num_workers), Path(folder_file)
    try:
        folder = finetune.run(**finetune_arguments(spec, dataset, settings, num_workers, device), beside=True)
    except UserError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return FAILED
    if os.environ.get("RANK", "0") == "0":
        with atomic_path(folder_file) as tmp:
            tmp.write_text(str(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
