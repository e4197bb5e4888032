"""``predict_args.json``: what ``3dino predict`` ran with, in its output folder (docs/schemas.md, docs/predict.md).

``--continue`` reads it back and refuses a folder written by other models (checksums) or with
other output options (``overlap``, ``tta``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record

OUTPUT_OPTIONS = ("overlap", "tta")  # options that change the outputs: --continue refuses other values


class ModelIdentity(Record):
    """One model of the ensemble: where it came from, its two files' SHA-256 and what it was trained on."""

    source: str
    model_json_sha256: str
    weights_sha256: str
    dataset: str
    task: str
    head: str
    fold: int
    pct: float
    seed: int


class PredictOptions(Record):
    """The options of the run (the CLI's names); ``precision`` and ``device_used`` as resolved."""

    overlap: float = Field(ge=0.0, lt=1.0)
    tta: bool
    window_batch_size: int = Field(ge=1)
    save_probabilities: bool
    precision: Literal["fp32", "bf16", "fp16"]
    precision_requested: str
    device: str
    device_used: str
    num_workers: int = Field(ge=0)
    resume: bool = Field(alias="continue")
    checkpoint: Literal["best", "final"] = "best"
    output_formats: list[Literal["nifti", "dicom-seg", "rtstruct"]] = ["nifti"]
    series_rules: list[str] = []
    min_slices: int = Field(default=10, ge=2)
    qc: bool = False  # files written before QC existed: none ran
    qc_min_confidence: float = Field(default=0.7, ge=0.0, le=1.0)
    keep_patient_names: bool = False
    skip: bool = False  # files written before window skipping: every window ran
    coarse: bool = False  # files written before the coarse pass: none ran


class PredictArgs(Artifact):
    """The whole ``predict_args.json``."""

    KIND = "predict_args"
    SCHEMA_VERSION = 1
    WRITER = "3dino predict"
    FILE = "predict_args.json"

    models: list[ModelIdentity] = Field(min_length=1)
    input: str
    output: str
    num_cases: int = Field(ge=0)
    world_size: int = Field(ge=1)
    options: PredictOptions

    def identity(self) -> list[tuple[str, str]]:
        """The models' checksums, sorted (two runs with the same models in another order are the same)."""
        return sorted((m.model_json_sha256, m.weights_sha256) for m in self.models)

    def changed_output_options(self, other: PredictArgs) -> list[tuple[str, object, object]]:
        """``(option, value here, value in other)`` of the output options that differ."""
        return [(k, getattr(self.options, k), getattr(other.options, k)) for k in OUTPUT_OPTIONS
                if getattr(self.options, k) != getattr(other.options, k)]
