"""``dataset_fingerprint.json``: per-case geometry and per-channel intensity statistics (docs/schemas.md).

Written by ``3dino plan`` beside ``plans.json``; everything in voxel index order (i, j, k),
spacings in mm, shapes in voxels. The planner reads it to make its decisions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record

Triple = list[float]


class CaseGeometry(Record):
    """One case: spacing (mm) and shape (voxels) per index axis, the nonzero box's shape, orientation."""

    spacing: Triple = Field(min_length=3, max_length=3)
    shape: list[int] = Field(min_length=3, max_length=3)
    shape_after_crop: list[int] = Field(min_length=3, max_length=3)
    orientation: str
    direction: list[float] = Field(min_length=9, max_length=9)
    origin: Triple = Field(min_length=3, max_length=3)


class IntensityStatistics(Record):
    """Foreground intensity statistics of one channel (percentiles keyed ``p0.05`` ... ``p99.95``)."""

    p0_05: float | None = Field(alias="p0.05")
    p0_5: float | None = Field(alias="p0.5")
    p50: float | None
    p99_5: float | None = Field(alias="p99.5")
    p99_95: float | None = Field(alias="p99.95")
    mean: float | None
    std: float | None
    min: float | None
    max: float | None


class ChannelStatistics(Record):
    """One channel: its name, the modality guess with its reason, the foreground statistics."""

    name: str
    modality_guess: Literal["CT", "MR", "PET", "other"]
    modality_reason: str
    foreground: IntensityStatistics | None
    num_samples: int = Field(ge=0)


class Fingerprint(Artifact):
    """The whole ``dataset_fingerprint.json``."""

    KIND = "fingerprint"
    SCHEMA_VERSION = 1
    WRITER = "3dino plan -d DATASET"
    FILE = "dataset_fingerprint.json"

    dataset: str
    task: Literal["segmentation", "classification", "unlabeled"]
    num_cases: int = Field(gt=0)
    cases: dict[str, CaseGeometry]
    channels: dict[str, ChannelStatistics]
    median_spacing: Triple = Field(min_length=3, max_length=3)
    median_shape: Triple = Field(min_length=3, max_length=3)
    cross_slice_axis: int = Field(ge=0, le=2)
    anisotropic: bool
