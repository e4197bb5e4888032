"""``3dino study``'s records: ``study.json`` (the study's options and cells) and each cell's ``cell.json``.

Both live in ``<results>/<DatasetNNN_Name>/study__<NAME>/`` (docs/study.md): ``study.json`` at its top,
``cells/<cell>/cell.json`` per cell. A cell's record is written when the cell ends (done or failed), so
shares of a study (``--cells K/N``) run anywhere and ``--collect`` reads what they left.
"""

from __future__ import annotations

from typing import Literal

from threedino_pipe.artifacts.base import Artifact, Record


class StudyCellSpec(Record):
    """One cell of a study: a backbone entry (with its head) at one label share, seed and fold."""

    cell: str               # the cell's folder name under cells/
    entry: str              # the --backbones entry as given (``RUN``, ``RUN:adapter``, ``none``)
    label: str              # the name of the entry in tables and figures
    backbone: str           # what finetune --backbone receives
    head: str | None        # finetune --head (None: finetune's default for the backbone)
    pct: float
    seed: int
    fold: int


class StudyRecord(Artifact):
    """The whole ``study.json``: the options that define the study and its cells in run order."""

    KIND = "study"
    SCHEMA_VERSION = 1
    WRITER = "3dino study"
    FILE = "study.json"

    dataset: str                      # DatasetNNN_Name
    name: str                         # --name
    options: dict                     # every option that defines the cells (a rerun with others is refused)
    reference: str                    # label of the reference entry of tests.csv and labels_needed.csv
    task: Literal["segmentation", "classification"] = "segmentation"  # the dataset's (probe cells: classification)
    test_source: Literal["imagesTs", "splits_test", "validation"]
    selection_biased: bool            # --on-validation: the test cases chose the checkpoints
    test_cases: list[str]
    cells: list[StudyCellSpec]


class StudyCell(Artifact):
    """The whole ``cell.json`` of one cell: how it ended, where its run is, what it ran."""

    KIND = "study_cell"
    SCHEMA_VERSION = 1
    WRITER = "3dino study"
    FILE = "cell.json"

    spec: StudyCellSpec
    outcome: Literal["done", "failed"]
    run_folder: str | None            # the finetune run (None when finetune failed before naming it)
    wall_seconds: float
    error: str | None = None
    commands: list[str]               # the equivalent 3dino commands, in order
