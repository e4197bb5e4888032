"""``model.json``: everything ``predict`` needs to rebuild and run a finetuned model (docs/schemas.md).

Written by ``finetune`` (segmentation heads and the classification probe) beside
``checkpoint_best.pt`` (and, at the end, ``checkpoint_final.pt``); a run folder, or a zip of
model.json and a weights file, is self-contained.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.artifacts.dataset_json import series_rules_problem
from threedino_pipe.artifacts.plans import CasePreprocessing, Normalization, Plans

HEADS = ("adapter", "unetr", "linear", "probe")
# ``--checkpoint`` of predict and export -> weights file of a finetune run (both hold ``{"model": state_dict}``)
CHECKPOINT_FILES = {"best": "checkpoint_best.pt", "final": "checkpoint_final.pt"}
PROBE_ONLY = ("normalization", "input_view", "probe")


class BackboneRecord(Record):
    """Which backbone the model started from (``source`` ``none``: random initialisation).

    ``family``: the backbone's architecture (``vit3d``: the 3D ViT; ``swin``: MONAI's Swin encoder;
    ``hf2d``: a transformers natural-image 2D ViT applied slice by slice). ``method``: how it was
    pretrained (``dino`` = 3DINO, ``simmim``, ``tang``, or the 2D model's kind, e.g. ``dinov2``), None
    for random initialisation, a file of unknown origin, or a card written before methods were recorded.
    """

    tag: str
    source: str
    sha256: str | None = None
    frozen: bool
    preset: str | None = None
    family: str = "vit3d"
    method: str | None = None


class BestMetric(Record):
    """The validation metric that chose the weights, and its value."""

    name: str
    value: float


class VolumeRange(Record):
    """The smallest and largest volume (mL) of one structure over a run's training cases."""

    min_ml: float = Field(ge=0.0)
    max_ml: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> VolumeRange:
        if self.min_ml > self.max_ml:
            raise ValueError(f"min_ml {self.min_ml} exceeds max_ml {self.max_ml}")
        return self

    def contains(self, volume_ml: float) -> bool:
        """True when ``volume_ml`` lies within [min_ml, max_ml]."""
        return self.min_ml <= volume_ml <= self.max_ml


class ModelCard(Artifact):
    """The whole ``model.json``."""

    KIND = "model"
    SCHEMA_VERSION = 1
    WRITER = "3dino finetune"
    FILE = "model.json"

    task: Literal["segmentation", "classification"]
    dataset: str
    plans: Plans
    configuration: str = "finetune"
    channel_names: dict[str, str] = Field(min_length=1)
    labels: dict[str, int | list[int]] | None = None
    regions_class_order: list[int] | None = None
    class_names: list[str] = []
    head: str
    model_args: dict[str, Any]
    backbone: BackboneRecord
    in_channels: int = Field(gt=0)
    num_outputs: int = Field(gt=0)
    output: Literal["softmax", "sigmoid"]
    patch_size: list[int] = Field(min_length=3, max_length=3)
    weights: str = "checkpoint_best.pt"
    fold: int
    pct: float
    seed: int
    best_iteration: int | None = None
    best_metric: BestMetric | None = None
    # segmentation: per structure (output_names, background left out) its volume range over the training cases,
    # in mL of the original images; None in cards written before it was recorded (QC then does not check volumes)
    label_volumes_ml: dict[str, VolumeRange] | None = None
    # classification probe only
    normalization: list[Normalization] | None = None
    input_view: str | None = None
    probe: dict[str, Any] | None = None
    # dataset.json's series_rules: channel name or index -> SeriesDescription regex (predict's DICOM selection)
    series_rules: dict[str, str] | None = None

    OMIT_WHEN_NONE = (*PROBE_ONLY, "label_volumes_ml", "series_rules")

    @field_validator("weights")
    @classmethod
    def _plain_file_name(cls, name: str) -> str:
        if PurePosixPath(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{name!r} is not a plain file name (model.json must name a file inside the run folder)")
        return name

    @model_validator(mode="after")
    def _outputs_agree(self) -> ModelCard:
        if any(p <= 0 for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} is not 3 positive sizes")
        problem = series_rules_problem(self.series_rules or {}, self.channel_names)
        if problem:
            raise ValueError(problem)
        if getattr(self.plans.configurations, self.configuration, None) is None:
            raise ValueError(f"the plans have no configuration {self.configuration!r}")
        if self.task == "classification":
            if len(self.class_names) != self.num_outputs:
                raise ValueError(f"num_outputs {self.num_outputs} but {len(self.class_names)} class_names")
        elif self.output == "sigmoid" and len(self.regions_class_order or []) != self.num_outputs:
            raise ValueError(f"num_outputs {self.num_outputs} but regions_class_order has "
                             f"{len(self.regions_class_order or [])} entries")
        elif self.output == "softmax" and len(self.softmax_values()) != self.num_outputs:
            raise ValueError(f"num_outputs {self.num_outputs} but labels declare {len(self.softmax_values())}")
        return self

    def weights_file(self, checkpoint: str = "best") -> str:
        """The weights file of ``--checkpoint`` ``best`` (the one model.json names) or ``final`` (the last
        iteration's)."""
        return self.weights if checkpoint == "best" else CHECKPOINT_FILES[checkpoint]

    def softmax_values(self) -> list[int]:
        """Label value of each softmax output channel: the declared label values, sorted (0 first)."""
        return sorted({int(v) for v in (self.labels or {}).values() if not isinstance(v, list)} | {0})

    def output_values(self) -> list[int]:
        """The label value each output channel is written as (sigmoid: regions_class_order)."""
        if self.output == "sigmoid":
            return [int(v) for v in self.regions_class_order or []]
        return self.softmax_values()

    def output_names(self) -> list[str]:
        """A name per output channel: classes, regions, or labels (background first)."""
        if self.task == "classification":
            return list(self.class_names)
        labels = self.labels or {}
        if self.output == "sigmoid":
            regions = [name for name in labels if name != "background"]
            return regions if len(regions) == self.num_outputs else [f"region_{r}" for r in range(self.num_outputs)]
        by_value = {int(v): k for k, v in labels.items() if not isinstance(v, list)}
        return [by_value.get(v, f"label_{v}") for v in self.softmax_values()]

    def structures(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """``(name, output channel, label values)`` of each segmented structure, background left out.

        Softmax: one per declared label value (the channel of that value; the voxels of that value).
        Sigmoid: one per region (its channel; the voxels of any of the region's label values, which
        are the ``labels`` entry of its name, else its ``regions_class_order`` value). Empty for
        classification.
        """
        if self.task == "classification":
            return []
        names, labels = self.output_names(), self.labels or {}
        if self.output == "softmax":
            return [(n, c, (v,)) for c, (n, v) in enumerate(zip(names, self.output_values(), strict=True)) if v != 0]
        out = []
        for channel, (name, value) in enumerate(zip(names, self.output_values(), strict=True)):
            declared = labels.get(name)
            values = declared if isinstance(declared, list) else [value if declared is None else declared]
            out.append((name, channel, tuple(int(v) for v in values)))
        return out

    def ordered_channel_names(self) -> dict[str, str]:
        """Channel index (string) -> name, in index order."""
        return dict(sorted(self.channel_names.items(), key=lambda kv: int(kv[0])))

    def preprocessing(self) -> CasePreprocessing:
        """How a scan is preprocessed for this model (as finetuning's data was)."""
        return self.plans.preprocessing(self.configuration)
