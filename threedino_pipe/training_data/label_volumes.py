"""The volume range of each structure over a run's training cases, for ``model.json`` (``label_volumes_ml``).

``3dino predict``'s QC flags a predicted structure whose volume lies outside the range seen in
training (docs/predict.md, *QC*). The volumes are those of the original label images (voxels of
the structure's label values x the voxel volume of the image's own spacing), read from the
``label_voxels`` that ``3dino preprocess`` records in each case's ``<case>.json``, so finetune
reads no image for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from threedino_pipe.artifacts import CaseProperties, VolumeRange

log = logging.getLogger(__name__)


def training_volume_ranges(folder: Path, case_ids: Sequence[str],
                           structures: Sequence[tuple[str, int, tuple[int, ...]]]) -> dict[str, VolumeRange] | None:
    """Per structure name, the smallest and largest volume (mL) over ``case_ids`` of the preprocessed ``folder``.

    Args:
        folder: a preprocessed configuration folder holding ``<case>.json`` per case.
        case_ids: the training cases of the run.
        structures: ``(name, output channel, label values)`` as :meth:`ModelCard.structures` gives them.

    Returns:
        The ranges, or None when a case's file predates ``label_voxels`` (logged with the command that
        records them) or there are no cases or structures.
    """
    volumes: dict[str, list[float]] = {name: [] for name, _, _ in structures}
    for case_id in case_ids:
        properties = CaseProperties.read(CaseProperties.path(folder, case_id))
        for name, _, values in structures:
            volume = properties.volume_ml_of(values)
            if volume is None:
                log.warning("%s was preprocessed before label volumes were recorded: model.json gets no "
                            "label_volumes_ml, so predict's QC will not check volumes (preprocess the dataset "
                            "again into a new folder to record them)", CaseProperties.path(folder, case_id))
                return None
            volumes[name].append(volume)
    if not case_ids or not volumes:
        return None
    return {name: VolumeRange(min_ml=min(found), max_ml=max(found)) for name, found in volumes.items()}
