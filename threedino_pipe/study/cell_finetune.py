"""A cell's finetune under torchrun (``3dino study --gpus-per-cell G``): one process per GPU, as
``torchrun --standalone --nproc-per-node G -m threedino_pipe.cli finetune ...`` would run it, with the study's
``beside`` naming; rank 0 writes the run folder's path where the study reads it.

Run as ``python -m torch.distributed.run --standalone --nproc-per-node G -m threedino_pipe.study.cell_finetune
OPTIONS_JSON FOLDER_FILE`` (``OPTIONS_JSON``: finetune's keyword arguments).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

FAILED = 2  # the exit code of a refused finetune (its message on stderr)


def command(gpus: int, options: dict, folder_file: Path) -> list[str]:
    """The torchrun command line that runs finetune with ``options`` on ``gpus`` processes (this Python)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), "-m",
            __name__, json.dumps(options, sort_keys=True), str(folder_file)]


def main(argv: list[str]) -> int:
    """Every rank finetunes; rank 0 writes the run folder's path to ``argv[1]``. Returns the exit code."""
    from threedino_pipe.stages import finetune

    options, folder_file = json.loads(argv[0]), Path(argv[1])
    try:
        folder = finetune.run(**options, beside=True)
    except UserError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return FAILED
    if os.environ.get("RANK", "0") == "0":
        with atomic_path(folder_file) as tmp:
            tmp.write_text(str(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
