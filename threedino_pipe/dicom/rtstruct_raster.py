"""RTSTRUCT contours back to a voxel mask, by a stated rule.

The rule: a contour must be CLOSED_PLANAR and lie on one slice of the target grid (every point's
continuous index k within 0.01 of the same integer). On that slice, the contour is the polygon
through its points' (i, j) continuous indices. Voxel (i, j, k) belongs to the ROI when its centre
(i, j) lies inside an odd number of the ROI's polygons on slice k (the even-odd rule: a contour
inside another is a hole, an island inside a hole is inside again). "Inside a polygon" is decided
for pixel centres by ``skimage.draw.polygon``; the contours that
:mod:`threedino_pipe.dicom.rtstruct_writer` traces never pass through a pixel centre, so for them
the rule has no boundary cases.

Arrays are ``X x Y x Z`` (i, j, k) booleans on the given :class:`~threedino_pipe.raw_data.image_io.Geometry`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from threedino_pipe.raw_data.image_io import Geometry
from threedino_pipe.runtime.errors import UserError

SLICE_TOL = 0.01  # largest distance (in slices) of a contour point from its slice


def to_index(points_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``n x 3`` patient coordinates (mm) -> continuous (i, j, k) indices on ``geometry``."""
    direction = np.asarray(geometry.direction).reshape(3, 3)
    return ((points_mm - np.asarray(geometry.origin)) @ direction) / np.asarray(geometry.spacing)


def rasterise_contours(contours_mm: list[np.ndarray], geometry: Geometry, *, name: str = "ROI",
                       file: str | Path | None = None) -> np.ndarray:
    """The even-odd mask of closed planar contours (each ``n x 3`` mm) on ``geometry``'s grid."""
    from skimage.draw import polygon

    size = tuple(geometry.size)
    parity = np.zeros(size, bool)
    for number, points in enumerate(contours_mm, start=1):
        index = to_index(np.asarray(points, float).reshape(-1, 3), geometry)
        k = int(round(float(index[0, 2])))
        if np.abs(index[:, 2] - k).max() > SLICE_TOL:
            raise UserError(f"{name}: contour {number} does not lie on one slice of the grid", file=file,
                            fix="rasterise on the grid of the series the RTSTRUCT references")
        if not 0 <= k < size[2]:
            continue
        rr, cc = polygon(index[:, 0], index[:, 1], shape=size[:2])
        inside = np.zeros(size[:2], bool)
        inside[rr, cc] = True
        parity[:, :, k] ^= inside
    return parity


def roi_contours(ds: pydicom.Dataset) -> dict[str, list[np.ndarray]]:
    """ROIName -> its CLOSED_PLANAR contours (``n x 3`` mm) from an RTSTRUCT dataset."""
    names = {int(item.ROINumber): str(item.ROIName) for item in ds.get("StructureSetROISequence", [])}
    out: dict[str, list[np.ndarray]] = {name: [] for name in names.values()}
    for roi in ds.get("ROIContourSequence", []):
        name = names.get(int(roi.ReferencedROINumber), f"ROI {roi.ReferencedROINumber}")
        for contour in roi.get("ContourSequence", []):
            if contour.ContourGeometricType != "CLOSED_PLANAR":
                continue
            out.setdefault(name, []).append(np.asarray(contour.ContourData, float).reshape(-1, 3))
    return out


def rasterise_rtstruct(path: str | Path, geometry: Geometry) -> dict[str, np.ndarray]:
    """Every ROI of the RTSTRUCT at ``path`` as an ``X x Y x Z`` boolean mask on ``geometry`` (ROIName -> mask)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise UserError(f"not a readable DICOM file ({type(exc).__name__})", file=path) from None
    if str(ds.get("Modality", "")) != "RTSTRUCT":
        raise UserError(f"not an RTSTRUCT (Modality {ds.get('Modality', '')})", file=path)
    return {name: rasterise_contours(contours, geometry, name=name, file=path)
            for name, contours in roi_contours(ds).items()}
