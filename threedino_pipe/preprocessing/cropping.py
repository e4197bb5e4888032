"""Bounding boxes and crops of ``C x X x Y x Z`` volumes.

Boxes are half-open ``[[x0, x1], [y0, y1], [z0, z1]]`` voxel ranges (Python slicing), as in
acvl-utils and nnU-Net. (acvl-utils' own helpers import torch, which costs seconds per worker
process; the numpy below is all a box needs.)
"""

from __future__ import annotations

import numpy as np

Box = list[list[int]]


def full_box(shape: tuple[int, ...]) -> Box:
    """The box covering a whole spatial ``shape`` (voxels)."""
    return [[0, int(n)] for n in shape]


def bbox_of_mask(mask: np.ndarray) -> Box | None:
    """Tightest half-open box around the True voxels of a 3D ``mask``; None when it has none."""
    box: Box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        if hits.size == 0:
            return None
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def nonzero_box(images: np.ndarray) -> Box:
    """Box of the voxels that are nonzero in any channel of ``images`` (``C x X x Y x Z``).

    An all-zero volume keeps its full extent.
    """
    box = bbox_of_mask(np.any(images != 0, axis=0))
    return full_box(images.shape[1:]) if box is None else box


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """The ``box`` of the last three axes of ``array`` (leading axes kept), as a view."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[lead + tuple(slice(lo, hi) for lo, hi in box)]


def compose(outer: Box, inner: Box) -> Box:
    """The box ``inner`` (relative to the crop ``outer``) in the coordinates ``outer`` was taken from."""
    return [[o0 + i0, o0 + i1] for (o0, _), (i0, i1) in zip(outer, inner, strict=True)]


def to_original_order(box: Box, transpose: list[int]) -> Box:
    """Re-order a box given in transposed axis order into the original index order (i, j, k).

    Transposed axis ``a`` is original axis ``transpose[a]``.
    """
    out: Box = [[0, 0]] * len(box)
    for axis, original in enumerate(transpose):
        out[original] = list(box[axis])
    return out
