"""A DICOM SEG read back onto its source series' grid (for checks, evaluation and QC).

Frames are matched to slices by the source SOP instance (and frame number, for a multi-frame
source) they reference, not by position, so the comparison with the label map that was written
is voxel for voxel. Segments map back to label values by their SegmentLabel.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from threedino_pipe.dicom.volume import SeriesVolume
from threedino_pipe.runtime.errors import UserError


def read_seg_on_source(path: str | Path, volume: SeriesVolume, labels: Mapping[int, str]) -> np.ndarray:
    """The SEG at ``path`` as an ``X x Y x Z`` uint16 label map on ``volume``'s grid.

    Args:
        labels: label value -> name; each segment's SegmentLabel must be one of the names.

    Raises:
        UserError: not a SEG, a segment with an unknown label, or frames that reference other images.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise UserError(f"not a readable DICOM SEG ({type(exc).__name__}: {str(exc)[:120]})", file=path) from None
    by_name = {str(name): int(value) for value, name in labels.items()}
    lut = np.zeros(max(seg.segment_numbers) + 1, np.uint16)
    for number in seg.segment_numbers:
        name = str(seg.get_segment_description(number).SegmentLabel)
        if name not in by_name:
            raise UserError(f"segment {number} is labelled {name!r}, not one of {sorted(by_name)}", file=path)
        lut[number] = by_name[name]
    if volume.is_multiframe:
        uid = volume.frames[0].sop_instance_uid
        frames = seg.get_pixels_by_source_frame(uid, [f.frame_number for f in volume.frames],
                                                combine_segments=True, relabel=False)
    else:
        frames = seg.get_pixels_by_source_instance([f.sop_instance_uid for f in volume.frames],
                                                   combine_segments=True, relabel=False)
    return lut[np.asarray(frames)].transpose(2, 1, 0)
