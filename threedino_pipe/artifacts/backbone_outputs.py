"""The records ``3dino embed`` and ``3dino visualize`` write beside their outputs (docs/embed.md, docs/visualize.md).

- :class:`EmbedRecord`: ``<features>.json`` beside the features CSV (same stem).
- :class:`VisualizeRecord`: ``visualize.json`` in the visualize output folder.

Both name the model they ran (:class:`ModelSource`) and the preprocessing the scans went through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.artifacts.plans import CasePreprocessing


class ModelSource(Record):
    """The ``-m`` model: a finetune run (or model zip), or a bare backbone checkpoint."""

    kind: Literal["finetune run", "backbone checkpoint"]
    source: str
    dataset: str | None = None
    head: str | None = None
    backbone: dict[str, Any] | None = None
    weights_sha256: str | None = None
    sha256: str | None = None
    preset: str | None = None

    OMIT_WHEN_NONE = ("dataset", "head", "backbone", "weights_sha256", "sha256")


class EmbedRecord(Artifact):
    """``<features>.json``: the model, options and preprocessing of a features CSV."""

    KIND = "embed_args"
    SCHEMA_VERSION = 1
    WRITER = "3dino embed"
    PATTERN = "<features>.json"

    model: ModelSource
    input: str
    cases: int = Field(ge=0)
    layers: int = Field(ge=1)
    avgpool: bool
    blocks: list[int]
    channels: int = Field(ge=1)
    embed_dim: int = Field(ge=1)
    columns: int = Field(ge=1)
    configuration: str
    view_size: list[int] = Field(min_length=3, max_length=3)
    preprocessing: CasePreprocessing
    transpose: list[int] = Field(min_length=3, max_length=3)
    device: str

    @staticmethod
    def beside(csv_path: str | Path) -> Path:
        """The record's path for a features CSV: the same stem, ``.json``."""
        return Path(csv_path).with_suffix(".json")


class VisualizeOptions(Record):
    """The options of ``3dino visualize`` (the CLI's names)."""

    size: int = Field(ge=0)
    threshold: float
    rgb_pca: str
    per_head: bool


class PCARecord(Record):
    """The PCA maps: explained variances, sign flip, border mean of component 1, foreground share."""

    explained_variance_component1: float
    explained_variance_rgb: list[float]
    sign_flipped: bool
    border_mean_component1: float
    foreground_patches: int = Field(ge=0)
    patches: int = Field(ge=1)
    foreground_voxel_fraction: float = Field(ge=0.0, le=1.0)


class AttentionRecord(Record):
    """The CLS attention maps: heads, and the colour scale of each PNG (0.5th/99.5th percentiles)."""

    heads: int = Field(ge=1)
    png_scale: list[list[float]]


class VisualizeRecord(Artifact):
    """The whole ``visualize.json``."""

    KIND = "visualize_args"
    SCHEMA_VERSION = 1
    WRITER = "3dino visualize"
    FILE = "visualize.json"

    model: ModelSource
    scan: str
    channel: int = Field(ge=0)
    configuration: str
    preprocessing: CasePreprocessing
    transpose: list[int] = Field(min_length=3, max_length=3)
    options: VisualizeOptions
    preprocessed_shape: list[int] = Field(min_length=3, max_length=3)
    network_input_shape: list[int] = Field(min_length=3, max_length=3)
    patch_grid: list[int] = Field(min_length=3, max_length=3)
    backbone: dict[str, Any]
    pca: PCARecord
    attention: AttentionRecord
    pngs: dict[str, str]
    niftis: dict[str, str]
    device: str
    seconds: float = Field(ge=0.0)
