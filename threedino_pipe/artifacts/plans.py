"""``plans.json``: every decision of ``3dino plan`` (docs/schemas.md, docs/plan.md).

Per-axis values inside a configuration are in the order of the preprocessed arrays (after
``transpose``); spacings in mm, sizes in voxels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record, checksum, without_reasons
from threedino_pipe.runtime.errors import UserError

PRETRAIN_CONFIGURATIONS = ("pretrain", "pretrain_highres")
CONFIGURATIONS = (*PRETRAIN_CONFIGURATIONS, "finetune")
# the configuration fields that change the bytes preprocess stores (crop sizes: the arrays' chunking)
STORED_FIELDS = ("resample", "spacing", "normalization", "crop", "image_interpolation", "label_interpolation",
                 "patch_size", "global_crop", "local_crop")


class Normalization(Record):
    """One channel's intensity mapping: ``[lower, upper]`` (or the percentiles) -> ``range``."""

    scheme: Literal["volume_percentile", "dataset_percentile"]
    lower: float | None = None   # dataset_percentile only: intensities mapped to range[0] / range[1]
    upper: float | None = None
    lower_pct: float
    upper_pct: float
    range: list[float] = Field(min_length=2, max_length=2)
    clip: bool

    OMIT_WHEN_NONE = ("lower", "upper")


class PretrainConfiguration(Record):
    """``pretrain`` / ``pretrain_highres``: native spacing, multi-crop sizes in voxels."""

    resample: bool
    spacing: list[float] | None
    normalization: list[Normalization]
    crop: str
    global_crop: int = Field(gt=0)
    local_crop: int = Field(gt=0)
    num_local_crops: int = Field(ge=0)
    min_axis: int = Field(ge=0)
    preset: str
    batch_size: int = Field(gt=0)
    reasons: dict[str, str] = {}


class FinetuneConfiguration(Record):
    """``finetune``: resampled to ``spacing`` (mm), patches of ``patch_size`` voxels."""

    resample: bool
    spacing: list[float] = Field(min_length=3, max_length=3)
    normalization: list[Normalization]
    crop: str
    image_interpolation: str
    label_interpolation: str | None
    patch_size: list[int] = Field(min_length=3, max_length=3)
    batch_size: int = Field(gt=0)
    preset: str
    median_shape: list[int] = Field(min_length=3, max_length=3)
    reasons: dict[str, str] = {}


class Configurations(Record):
    pretrain: PretrainConfiguration
    pretrain_highres: PretrainConfiguration | None = None  # `plan` always writes it; hand-made plans may not
    finetune: FinetuneConfiguration | None = None  # absent for unlabeled datasets

    OMIT_WHEN_NONE = ("pretrain_highres", "finetune")


class Plans(Artifact):
    """The whole ``plans.json``."""

    KIND = "plans"
    SCHEMA_VERSION = 1
    WRITER = "3dino plan -d DATASET"
    FILE = "plans.json"

    kind: Literal["plans"] = "plans"
    schema_version: Literal[1] = 1
    dataset: str
    task: Literal["segmentation", "classification", "unlabeled"]
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]] | None = None
    regions_class_order: list[int] | None = None
    class_names: list[str] = []
    memory_target_gb: float
    options: dict[str, Any]
    transpose: list[int] = Field(min_length=3, max_length=3)
    decisions: dict[str, str]
    configurations: Configurations

    @classmethod
    def of_dataset(cls, folder: Path) -> Plans:
        """The plans of a preprocessed dataset folder; a missing file says to run plan and preprocess."""
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise UserError("plans.json is missing", file=path, fix=f"run `3dino plan -d {folder.name}` and "
                            f"`3dino preprocess -d {folder.name}` first")
        return cls.read(path, rerun=f"3dino plan -d {folder.name}")

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def configuration(self, name: str, *, file: Path | None = None) -> PretrainConfiguration | FinetuneConfiguration:
        """The configuration ``name``; its absence is a UserError naming the stage to rerun."""
        config = getattr(self.configurations, name, None) if name in CONFIGURATIONS else None
        if config is None:
            what = "it is an unlabeled dataset" if name == "finetune" and self.task == "unlabeled" else "rerun plan"
            raise UserError(f"plans.json has no '{name}' configuration ({what})", file=file or self.FILE,
                            fix=f"rerun `3dino plan -d {self.dataset}`" if what == "rerun plan" else
                            "finetune on a labelled (segmentation or classification) dataset")
        return config

    def dependencies(self, configuration: str) -> dict[str, Any]:
        """Everything in these plans that a run on ``configuration`` depends on, without the reasons.

        Recorded in each run's ``run.json``: a resume compares these values field by field, so an
        edited reason never blocks it and an edited patch size does, naming the field.
        """
        config = self.configuration(configuration).model_dump(mode="json")
        return without_reasons({"task": self.task, "channel_names": self.channel_names, "labels": self.labels,
                                "regions_class_order": self.regions_class_order, "class_names": self.class_names,
                                "transpose": self.transpose, "configuration": configuration, **config})

    def stored_checksum(self, configuration: str) -> str:
        """Checksum of the fields that change what ``preprocess`` stores for ``configuration``."""
        config = self.configuration(configuration).model_dump(mode="json")
        return checksum({"task": self.task, "labels": self.labels, "transpose": self.transpose,
                         "configuration": configuration, **{k: config.get(k) for k in STORED_FIELDS}})
