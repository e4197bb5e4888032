"""A preprocessed case: where its voxels came from and how (``<configuration>/<case>.json``, docs/schemas.md).

:class:`PreprocessedCase` is what preprocessing one case computes (``preprocess`` stores it,
``predict`` and ``visualize`` invert it). :class:`CaseProperties` is the file ``preprocess``
writes beside ``<case>.b2nd``: the same fields plus the case id, its source files and the
checksum of the plans fields the stored bytes depend on.

Axis words: *original* order is the input image's index order (i, j, k); *transposed* order is
the preprocessed arrays' (after the plans' ``transpose``). ``crop_box`` is in original order,
``shape_after_crop``, ``spacing`` and ``shape`` in transposed order; spacings in mm, sizes in
voxels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record
from threedino_pipe.runtime.atomic_files import atomic_path

Three = Field(min_length=3, max_length=3)


class ImageGeometry(Record):
    """An image's grid: voxels, spacing (mm) and origin (mm) per index axis, direction row-major."""

    size: list[int] = Three
    spacing: list[float] = Three
    origin: list[float] = Three
    direction: list[float] = Field(min_length=9, max_length=9)


class ChannelNormalization(Record):
    """How one channel was normalised: the intensities mapped to the range ends, NaN/Inf voxels replaced."""

    scheme: str
    lower: float
    upper: float
    nan_replaced: int = Field(0, ge=0)


class PreprocessedCase(Record):
    """What preprocessing one case computed (see the module docstring for the axis orders)."""

    configuration: str
    original_geometry: ImageGeometry
    transpose: list[int] = Three
    crop_box: list[list[int]] = Three
    shape_after_crop: list[int] = Three
    spacing: list[float] = Three
    shape: list[int] = Three
    normalization: list[ChannelNormalization]
    class_locations: dict[str, list[list[int]]] = {}
    class_label: int | None = None
    # voxels of each label value in the whole label image (original grid, before cropping); None without a
    # label, and in files preprocessed before it was recorded
    label_voxels: dict[str, int] | None = None

    OMIT_WHEN_NONE = ("label_voxels",)

    def volume_ml_of(self, values: tuple[int, ...] | list[int]) -> float | None:
        """Volume (mL) of the voxels holding any of ``values`` in the original label image; None when not
        recorded (``label_voxels``)."""
        if self.label_voxels is None:
            return None
        voxel_ml = float(self.original_geometry.spacing[0] * self.original_geometry.spacing[1]
                         * self.original_geometry.spacing[2]) / 1000.0
        return sum(int(self.label_voxels.get(str(int(v)), 0)) for v in values) * voxel_ml

    def original_spacing_transposed(self) -> list[float]:
        """Spacing (mm) of the input image per transposed axis."""
        return [float(self.original_geometry.spacing[a]) for a in self.transpose]


class CaseProperties(PreprocessedCase, Artifact):
    """The whole ``<case>.json`` of a preprocessed configuration: :class:`PreprocessedCase` and where it came from."""

    KIND = "case"
    SCHEMA_VERSION = 1
    WRITER = "3dino preprocess -d DATASET"
    PATTERN = "<configuration>/<case>.json"
    # the fields the file starts with
    HEAD: ClassVar[tuple[str, ...]] = ("kind", "schema_version", "version", "case_id", "configuration", "source_files")

    case_id: str
    source_files: list[str]
    plans_checksum: str

    @staticmethod
    def path(folder: str | Path, case_id: str) -> Path:
        """``folder/<case_id>.json``."""
        return Path(folder) / f"{case_id}.json"

    @classmethod
    def of(cls, case: PreprocessedCase, *, case_id: str, source_files: list[str],
           plans_checksum: str) -> CaseProperties:
        """The file's record of a preprocessed case."""
        return cls(case_id=case_id, source_files=source_files, plans_checksum=plans_checksum, **dict(case))

    def preprocessed(self) -> PreprocessedCase:
        """The :class:`PreprocessedCase` part (what ``predict`` would invert)."""
        return PreprocessedCase.model_validate(self.model_dump(include=set(PreprocessedCase.model_fields)))

    def finished_for(self, case_id: str, plans_checksum: str, class_label: int | None) -> bool:
        """True when this record belongs to ``case_id`` preprocessed with these plans and this class label."""
        return (self.case_id, self.plans_checksum, self.class_label) == (case_id, plans_checksum, class_label)

    def to_data(self) -> dict:
        data = super().to_data()
        return {**{k: data[k] for k in self.HEAD}, **{k: v for k, v in data.items() if k not in self.HEAD}}

    def write(self, path: str | Path) -> Path:
        """Write atomically, one key per line and ``class_locations`` compact (they can hold 10,000s of voxels)."""
        lines = []
        for key, value in self.to_data().items():
            separators = (",", ":") if key == "class_locations" else (", ", ": ")
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, separators=separators)}")
        with atomic_path(path) as tmp:
            tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        return Path(path)
