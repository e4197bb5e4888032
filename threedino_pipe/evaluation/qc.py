"""QC of predicted segmentations for the clinician: measures per case and structure, and the flags (docs/predict.md).

Per case and structure (a label of a softmax model, a region of a sigmoid model,
:meth:`threedino_pipe.artifacts.ModelCard.structures`):

- ``volume_ml``: voxels x the voxel volume of the input grid (spacing in mm, product / 1000);
- ``components``: connected components of the structure (:func:`scipy.ndimage.label`,
  **26-connectivity**: voxels sharing a face, an edge or a corner are connected);
- ``border_share``: the share of the structure's voxels lying in the outermost voxel layer of the
  image (the first or last index along any axis); 0 for an empty structure;
- ``mean_confidence``: the model's probability of the structure averaged over its voxels (softmax:
  the label's probability where it won the argmax; sigmoid: the region's probability where it
  passed 0.5), from the predictor's probabilities restored onto the input grid; none when empty.

Flags (:func:`structure_flags`): ``empty`` (no voxel), ``volume_outside_training_range`` (outside
the card's ``label_volumes_ml`` range; not evaluated when the card has none), ``low_confidence``
(below ``--qc-min-confidence``, default 0.7; not evaluated when empty) and
``series_ranked_second`` (a DICOM study one of whose channels was read from a series that another
usable series of the study outranked, :attr:`threedino_pipe.dicom.selection.StudySelection.chosen_rank`,
or after a read fallback the rank of the series read instead; not evaluated for image files).

What ``3dino predict`` runs per case and per batch is :class:`threedino_pipe.evaluation.qc_report.QcBatch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from threedino_pipe.artifacts import CaseQc, StructureQc, VolumeRange
from threedino_pipe.inference.geometry import ConfidenceSums
from threedino_pipe.inference.predictor import QcInputs
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.visualization.overlays import overlay_planes, slice_centre
from threedino_pipe.visualization.planes import plane_names

CONNECTIVITY = 26
DEFAULT_MIN_CONFIDENCE = 0.7
FLAGS = ("empty", "volume_outside_training_range", "low_confidence", "series_ranked_second")
Structures = Sequence[tuple[str, int, tuple[int, ...]]]


def check_min_confidence(value: float) -> None:
    """Refuse a ``--qc-min-confidence`` outside [0, 1] (before anything is written)."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--qc-min-confidence {value} is outside [0, 1]",
                        fix="pass a probability, e.g. --qc-min-confidence 0.7 (the default)")


def volume_ml(voxels: int, spacing: Sequence[float]) -> float:
    """Volume in mL of ``voxels`` voxels of ``spacing`` (mm per axis)."""
    return int(voxels) * float(np.prod([float(s) for s in spacing])) / 1000.0


def count_components(mask: np.ndarray) -> int:
    """Connected components of a boolean ``X x Y x Z`` mask, 26-connectivity (:data:`CONNECTIVITY`)."""
    if not mask.any():
        return 0
    return int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1])


Box = tuple[slice, slice, slice]


def border_share(mask: np.ndarray, box: Box | None = None, shape: Sequence[int] | None = None) -> float:
    """Share of the mask's voxels in the outermost voxel layer of the image (0 for an empty mask).

    ``mask`` covers the whole image, or the region ``box`` (from 0, with stops) of an image of ``shape``.
    """
    total = int(np.count_nonzero(mask))
    if not total:
        return 0.0
    box = box or tuple(slice(0, n) for n in mask.shape)
    shape = shape or mask.shape
    inner = mask[tuple(slice(1 if b.start == 0 else 0, m - 1 if b.stop == n else m)
                       for b, m, n in zip(box, mask.shape, shape, strict=True))]
    return (total - int(np.count_nonzero(inner))) / total


def structure_boxes(labels: np.ndarray, structures: Structures) -> list[Box | None]:
    """Per structure, the bounding box of its voxels in ``labels`` (None when it has none): one pass over the image."""
    boxes = ndimage.find_objects(labels) if labels.size and int(labels.min()) >= 0 else []
    out = []
    for _, _, values in structures:
        found = [boxes[v - 1] for v in values if 0 < v <= len(boxes) and boxes[v - 1] is not None]
        out.append(tuple(slice(min(b[a].start for b in found), max(b[a].stop for b in found)) for a in range(3))
                   if found else None)
    return out


def measure_structure(labels: np.ndarray, name: str, values: Sequence[int], spacing: Sequence[float],
                      confidence: float | None, box: Box | None = None) -> StructureQc:
    """The measures of one structure (the voxels of ``labels`` holding any of ``values``; all inside ``box``
    when given, so only that region is read)."""
    region = labels if box is None else labels[box]
    mask = np.isin(region, np.asarray(values, dtype=labels.dtype)) if len(values) > 1 else region == values[0]
    voxels = int(np.count_nonzero(mask))
    return StructureQc(name=name, label_values=[int(v) for v in values], voxels=voxels,
                       volume_ml=volume_ml(voxels, spacing), components=count_components(mask),
                       border_share=border_share(mask, box, labels.shape),
                       mean_confidence=None if not voxels or confidence is None else min(1.0, max(0.0, confidence)))


def measure_case(case_id: str, labels: np.ndarray, spacing: Sequence[float], structures: Structures,
                 confidence: ConfidenceSums, *, weights_checksum: str, series_ranks: Sequence[int] = ()) -> CaseQc:
    """The QC record of one case: every structure of ``structures`` measured on ``labels`` (input grid)."""
    boxes = structure_boxes(labels, structures)
    measured = [measure_structure(labels, name, values, spacing, confidence.mean(channel), box)
                if box is not None else measure_structure(labels[:0, :0, :0], name, values, spacing, None)
                for (name, channel, values), box in zip(structures, boxes, strict=True)]
    return CaseQc(case_id=case_id, weights_checksum=weights_checksum, spacing_mm=[float(s) for s in spacing],
                  series_ranks=[int(r) for r in series_ranks], structures=measured)


@dataclass(frozen=True)
class QcRules:
    """What the flags compare with: the confidence threshold and the card's training volume ranges (or None)."""

    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    volume_ranges: Mapping[str, VolumeRange] | None = None


def structure_flags(structure: StructureQc, rules: QcRules, series_ranks: Sequence[int] = ()
                    ) -> dict[str, bool | None]:
    """Each flag of :data:`FLAGS`: True (raised), False, or None (not evaluated; module docstring)."""
    ranges = rules.volume_ranges
    limits = None if ranges is None else ranges.get(structure.name)
    confidence = structure.mean_confidence
    return {"empty": structure.voxels == 0,
            "volume_outside_training_range": None if limits is None else not limits.contains(structure.volume_ml),
            "low_confidence": None if confidence is None else confidence < rules.min_confidence,
            "series_ranked_second": (max(series_ranks) > 1) if series_ranks else None}


def case_flags(record: CaseQc, rules: QcRules) -> list[str]:
    """The flags raised by any structure of a case, in :data:`FLAGS` order."""
    raised = {flag for s in record.structures for flag, on in structure_flags(s, rules, record.series_ranks).items()
              if on}
    return [flag for flag in FLAGS if flag in raised]


def thumbnail_png(inputs: QcInputs, case_id: str) -> bytes:
    """Three planes (named axial, coronal, sagittal by the image's direction) through the centre of the
    predicted structures' bounding box: the image, and the image with the label overlay (on the preview grid)."""
    step = inputs.preview_step
    labels = inputs.labels[::step, ::step, ::step]
    image = inputs.preview if inputs.preview is not None else np.zeros(labels.shape, np.float32)
    spacing = [float(s) * step for s in inputs.geometry.spacing]
    return overlay_planes(image, spacing, [("prediction", labels)], num_labels=max(1, int(inputs.labels.max())),
                          title=case_id, centre=slice_centre(labels > 0),
                          plane_names=plane_names(inputs.geometry.direction))


def write_thumbnail(png: bytes, path: Path) -> None:
    """Write PNG bytes atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
