"""``subset.json`` of a finetune run: the training cases ``--pct --fold --seed`` chose (docs/schemas.md).

Written by ``3dino finetune`` (segmentation heads and the classification probe) when a run starts.
"""

from __future__ import annotations

from threedino_pipe.artifacts.base import Artifact


class Subset(Artifact):
    """The whole ``subset.json``; ``num_fold_train`` and ``class_counts`` only for the classification probe."""

    KIND = "subset"
    SCHEMA_VERSION = 1
    WRITER = "3dino finetune"
    FILE = "subset.json"

    dataset: str
    fold: int
    seed: int
    pct: float
    ids: list[str]               # the training cases, sorted
    val_ids: list[str]           # the fold's validation cases
    num_fold_train: int | None = None
    class_counts: dict[str, int] | None = None

    OMIT_WHEN_NONE = ("num_fold_train", "class_counts")
