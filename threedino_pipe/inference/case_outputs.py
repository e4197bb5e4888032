"""What ``3dino predict`` writes per segmentation case: the label image, DICOM SEG, RTSTRUCT (docs/predict.md).

Formats (``--output-format``, several allowed):

- ``nifti``: ``<case><ending>``, the label image in the input's format (NIfTI ``.nii.gz`` for DICOM
  input); NIfTI files carry the model in their header's ``descrip`` (:meth:`CaseOutputs.notes`);
- ``dicom-seg``: ``<case>_seg.dcm``, one DICOM Segmentation (:func:`threedino_pipe.dicom.seg_writer.write_seg`);
- ``rtstruct``: ``<case>_rtstruct.dcm``, one RT Structure Set
  (:func:`threedino_pipe.dicom.rtstruct_writer.write_rtstruct`).

The DICOM formats need DICOM input: they reference the source series' images and file under the
source patient and study. Files are written atomically in the order RTSTRUCT, SEG, label image,
so the last requested file of that order (:meth:`CaseOutputs.marker`) marks a finished case for
``--continue``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from threedino_pipe.dicom.rtstruct_writer import write_rtstruct
from threedino_pipe.dicom.seg_writer import ModelIdentity, write_seg
from threedino_pipe.dicom.volume import SeriesVolume
from threedino_pipe.inference.input_cases import InputCase
from threedino_pipe.raw_data.image_io import Geometry, write_image
from threedino_pipe.runtime.errors import UserError

FORMATS = ("nifti", "dicom-seg", "rtstruct")
DICOM_FORMATS = ("dicom-seg", "rtstruct")
WRITE_ORDER = ("rtstruct", "dicom-seg", "nifti")  # the label image last: it marks a finished case
SUFFIXES = {"dicom-seg": "_seg.dcm", "rtstruct": "_rtstruct.dcm"}
NIFTI_ENDINGS = (".nii", ".nii.gz")
logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines list every module it copies, per case


def parse_formats(values: Sequence[str] | None, *, dicom_input: bool) -> tuple[str, ...]:
    """The ``--output-format`` values (repeated or comma-separated), in write order; the default when none.

    Default: ``nifti`` for image files, ``nifti`` and ``dicom-seg`` for DICOM input.

    Raises:
        UserError: an unknown format, or a DICOM format for input that is not DICOM.
    """
    given = [v.strip().lower() for value in values or [] for v in value.split(",") if v.strip()]
    for value in given:
        if value not in FORMATS:
            raise UserError(f"unknown --output-format {value!r}", fix=f"pass one or more of {', '.join(FORMATS)}")
    chosen = set(given) or ({"nifti", "dicom-seg"} if dicom_input else {"nifti"})
    dicom_only = sorted(chosen & set(DICOM_FORMATS))
    if dicom_only and not dicom_input:
        raise UserError(f"--output-format {', '.join(dicom_only)} needs DICOM input (it references the source "
                        "images), but the input is image files", fix="pass --output-format nifti, or give the "
                        "DICOM studies as input (a folder tree of DICOM files)")
    return tuple(f for f in WRITE_ORDER if f in chosen)


@dataclass(frozen=True)
class CaseOutputs:
    """The outputs of every case of a run.

    Attributes:
        formats: the formats to write, in write order (:data:`WRITE_ORDER`).
        model: the model(s) that made the result, written into the DICOM objects and the NIfTI header.
        labels: label value -> name (background 0 left out): the SEG's segments, the RTSTRUCT's ROIs.
    """

    formats: tuple[str, ...] = ("nifti",)
    model: ModelIdentity | None = None
    labels: dict[int, str] = field(default_factory=dict)

    def names(self, case: InputCase) -> list[str]:
        """The case's output file names, in write order."""
        return [case.output_name if f == "nifti" else f"{case.case_id}{SUFFIXES[f]}" for f in self.formats]

    def marker(self, case: InputCase) -> str:
        """The file written last for ``case``: its presence marks the case finished."""
        return self.names(case)[-1]

    def notes(self) -> str | None:
        """The NIfTI ``descrip`` line: model name, weights checksum prefix and version (79 characters at most)."""
        if self.model is None:
            return None
        m = self.model
        return f"3dino {m.name[:28]} sha256:{m.weights_checksum[:12]} {m.version}"[:79]

    def write(self, labels: np.ndarray, case: InputCase, geometry: Geometry, source: SeriesVolume | None,
              output_dir: Path) -> list[Path]:
        """Write every format for one case (``labels``: ``X x Y x Z`` on ``geometry``); returns the paths in order.

        Raises:
            UserError: a DICOM format for a case read from image files.
        """
        paths = []
        for fmt, name in zip(self.formats, self.names(case), strict=True):
            path = Path(output_dir) / name
            if fmt == "nifti":
                nifti = name.lower().endswith(NIFTI_ENDINGS)
                write_image(labels, geometry, path, notes=self.notes() if nifti else None)
            else:
                if source is None or self.model is None:
                    raise UserError(f"--output-format {fmt} needs a DICOM series as input", file=case.label or
                                    str(case.files[0]), fix="pass --output-format nifti for image files")
                writer = write_seg if fmt == "dicom-seg" else write_rtstruct
                writer(labels, self.labels, source, self.model, path)
            paths.append(path)
        return paths
