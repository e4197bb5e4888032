"""The demo's comparison as one ``3dino study``: the pretrained backbone and ``none``, both with the adapter head,
at 25 % labels, over the demo size's finetune seeds, tested on the demo dataset's held-out cases (imagesTs).

The study runs each cell (finetune, predict, evaluate; a finished cell is reused) and writes cells.csv,
per_case.csv, summary.csv, tests.csv, the figure and its report.html (docs/study.md); the demo reads its
cells by side and seed from cells.csv.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from threedino_pipe.demo.layout import DATASET_ID, SIDES, STUDY_NAME, DemoLayout, DemoSize
from threedino_pipe.runtime.errors import UserError

PCT = 25.0
HEAD = "adapter"  # both sides: the comparison differs only in the backbone's initialisation


def study_arguments(pretrained: Path, size: DemoSize) -> dict:
    """The keyword arguments of ``study.command.run`` (the pretrained side first, ``none`` the reference)."""
    return {"dataset": str(DATASET_ID), "backbones": [f"{pretrained}:{HEAD}", f"none:{HEAD}"], "pct": [PCT],
            "seeds": size.seeds, "iters": size.finetune_iters, "batch_size": size.finetune_batch,
            "lr": size.finetune_lr, "val_every": size.val_every, "name": STUDY_NAME}


def study_command(pretrained: Path, size: DemoSize) -> str:
    """The equivalent ``3dino study`` command line of :func:`study_arguments`."""
    return (f"3dino study -d {DATASET_ID} --backbones {pretrained}:{HEAD} none:{HEAD} --pct {PCT:g} --seeds "
            f"{' '.join(map(str, size.seeds))} --iters {size.finetune_iters} --batch-size {size.finetune_batch} "
            f"--lr {size.finetune_lr:g} --val-every {size.val_every} --name {STUDY_NAME}")


def run_study(layout: DemoLayout, pretrained: Path, size: DemoSize) -> DemoCells:
    """Run (or reuse) the study's cells and write its outputs; returns its cells by side and seed.

    Raises:
        UserError: a cell failed (cells.csv lists it with its error).
    """
    from threedino_pipe.study import command as study

    if study.run(**study_arguments(pretrained, size)) != 0:
        raise UserError("a cell of the demo's study failed", file=layout.study.out("cells.csv"),
                        fix="read the cell's error in cells.csv, fix the cause and rerun `3dino demo` with the same "
                            "options (finished cells are reused)")
    return read_cells(layout)


@dataclass(frozen=True)
class DemoCells:
    """The study's cells of the demo: by side (``pretrained``, ``none``) and seed, the cell's name and its finetune
    run folder; ``names`` are the sides' backbone names in the study's tables."""

    names: dict[str, str]
    cells: dict[str, dict[int, str]]
    runs: dict[str, dict[int, Path]]

    @property
    def seeds(self) -> list[int]:
        return sorted(self.cells[SIDES[0]])


def read_cells(layout: DemoLayout) -> DemoCells:
    """The demo's cells from the study's ``cells.csv`` (the ``none`` entry is side ``none``, the other
    ``pretrained``)."""
    table = pd.read_csv(layout.study.out("cells.csv"), keep_default_na=False)
    names: dict[str, str] = {}
    cells: dict[str, dict[int, str]] = {side: {} for side in SIDES}
    runs: dict[str, dict[int, Path]] = {side: {} for side in SIDES}
    for row in table.itertuples():
        side = "none" if str(row.entry).split(":")[0] == "none" else "pretrained"
        names[side] = str(row.backbone)
        cells[side][int(row.seed)] = str(row.cell)
        runs[side][int(row.seed)] = Path(str(row.run_folder))
    return DemoCells(names, cells, runs)
