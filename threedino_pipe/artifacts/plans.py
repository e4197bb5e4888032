"""``plans.json``: every decision of ``3dino plan`` (docs/schemas.md, docs/plan.md).

Per-axis values inside a configuration are in the order of the preprocessed arrays (after
``transpose``); spacings in mm, sizes in voxels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from threedino_pipe.artifacts.base import Artifact, Record, checksum, without_reasons
from threedino_pipe.artifacts.splits import ImportedFold
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

    @model_validator(mode="after")
    def _values_of_dataset_scheme(self) -> Normalization:
        if self.scheme == "dataset_percentile" and (self.lower is None or self.upper is None):
            raise ValueError("a dataset_percentile normalisation needs 'lower' and 'upper' intensities")
        return self


class Configuration(Record):
    """What every configuration has: ``reasons``, the one-line reason of each planned field (declared last by
    each kind, so it comes last in the file)."""

    def reason(self, field: str) -> str:
        """The one-line reason ``plan`` gave for ``field`` (empty when it gave none)."""
        return self.reasons.get(field, "")


class PretrainConfiguration(Configuration):
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


class FinetuneConfiguration(Configuration):
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


CROPS = ("nonzero", "foreground_after_normalization", "none")


class CasePreprocessing(Record):
    """How to preprocess one case: a configuration's steps with the dataset's transpose and label values.

    What ``preprocess`` applies to training cases and ``predict``, ``embed`` and ``visualize`` to
    new scans (:func:`threedino_pipe.preprocessing.pipeline.preprocess_case`).
    """

    configuration: str
    transpose: list[int] = Field(min_length=3, max_length=3)
    resample: bool
    spacing: list[float] | None
    normalization: list[Normalization]
    crop: str
    image_interpolation: str | None = None
    label_interpolation: str | None = None
    label_values: list[int] = [0]   # every value a label image may hold (0 included), sorted

    @classmethod
    def bare(cls, num_channels: int) -> CasePreprocessing:
        """Without plans (a bare backbone checkpoint): each channel normalised per volume as in pretraining
        (0.05th/99.95th percentiles -> [-1, 1], clipped), cropped to the voxels above -1, no resampling."""
        entry = Normalization(scheme="volume_percentile", lower_pct=0.05, upper_pct=99.95, range=[-1, 1], clip=True)
        return cls(configuration="embed", transpose=[0, 1, 2], resample=False, spacing=None,
                   normalization=[entry] * num_channels, crop="foreground_after_normalization")

    def for_channel(self, channel: int) -> CasePreprocessing:
        """These steps for a scan of channel ``channel`` alone."""
        return self.model_copy(update={"normalization": [self.normalization[channel]]})


class SplitPlan(Record):
    """How ``preprocess`` splits a labelled dataset's cases (``splits.json``), as ``plan`` decided it.

    ``test_fraction``: the share of cases held out as the test list (0 = none); ``groups``: case id ->
    group for cases that must stay together (dataset.json ``case_groups``); ``folds``: folds imported
    from nnU-Net's ``splits_final.json`` (``plan --splits-from``), else None (drawn by preprocess).
    """

    test_fraction: float = Field(ge=0.0, lt=1.0)
    groups: dict[str, str] = {}
    folds: list[ImportedFold] | None = None

    OMIT_WHEN_NONE = ("folds",)


class Configurations(Record):
    """The configurations of a dataset: ``pretrain`` always, ``pretrain_highres`` and ``finetune`` as planned."""

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
    splits: SplitPlan | None = None  # labelled datasets; plans made before it existed: preprocess's defaults
    series_rules: dict[str, str] | None = None  # dataset.json's, for model.json (DICOM series per channel)

    OMIT_WHEN_NONE = ("splits", "series_rules")

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

    def decision(self, name: str) -> str:
        """The reason of decision ``name`` (``transpose``, ``preset``, ``<configuration>.<field>``)."""
        return self.decisions.get(name, "")

    def configuration_names(self) -> list[str]:
        """The configurations these plans hold, in file order."""
        return [name for name in CONFIGURATIONS if getattr(self.configurations, name) is not None]

    def label_values(self) -> list[int]:
        """Every label value these plans declare (0 included), sorted; regions contribute their values."""
        values = {0}
        for value in (self.labels or {}).values():
            values.update(value if isinstance(value, list) else [value])
        return sorted(int(v) for v in values)

    def stores_labels(self, configuration: str) -> bool:
        """True when ``configuration`` stores label arrays: segmentation tasks, non-``pretrain*`` configurations."""
        return self.task == "segmentation" and not configuration.startswith("pretrain")

    def preprocessing(self, configuration: str, *, file: Path | None = None) -> CasePreprocessing:
        """The steps of ``configuration`` for one case (a missing configuration is a UserError)."""
        config = self.configuration(configuration, file=file)
        return CasePreprocessing(configuration=configuration, transpose=self.transpose, resample=config.resample,
                                 spacing=config.spacing, normalization=config.normalization, crop=config.crop,
                                 image_interpolation=getattr(config, "image_interpolation", None),
                                 label_interpolation=getattr(config, "label_interpolation", None),
                                 label_values=self.label_values())

    def crop_size(self, configuration: str) -> list[int]:
        """The spatial crop a loader reads from ``configuration`` (the arrays' chunking hint, voxels)."""
        config = self.configuration(configuration)
        patch = getattr(config, "patch_size", None)
        return [int(v) for v in patch] if patch else [int(config.global_crop)] * 3

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
