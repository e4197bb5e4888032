"""Figures of three orthogonal planes through a scan's centre, with maps overlaid (PNG bytes).

Columns: the planes perpendicular to index axes i, j and k at the centre voxel (``size // 2``),
each named after the anatomical plane its normal is closest to (the direction matrix's column
of that axis against the patient axes L-R, A-P, S-I: sagittal, coronal, axial). Each slice is
drawn in millimetres (square pixels in mm, whatever the voxel spacing), its first remaining index
axis to the right and its second upwards. Rows: the scan alone (grey, 0.5th-99.5th percentile
window), then one row per overlay.

The image size is fixed (:func:`png_size`): ``COLUMN_INCHES * DPI`` pixels per column and
``ROW_INCHES * DPI`` per row.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from threedino_pipe.raw_data.image_io import Geometry

DPI = 100
COLUMN_INCHES = 3.2
ROW_INCHES = 3.2
TITLE_INCHES = 0.5
PLANES = ("sagittal", "coronal", "axial")  # plane perpendicular to the patient's L-R, A-P, S-I axis
INDEX_AXES = "ijk"
RGB_ALPHA = 0.75
HEAT_ALPHA = 0.6
HEAT_CMAP = "inferno"


@dataclass
class Overlay:
    """One row of a figure.

    Attributes:
        label: the row's title.
        volume: ``X x Y x Z`` values for a heat map, or ``3 x X x Y x Z`` colours in [0, 1].
        mask: ``X x Y x Z`` bool, where colours are drawn (None: everywhere).
        vmin, vmax: the heat map's colour scale; ignored for colours.
    """

    label: str
    volume: np.ndarray
    mask: np.ndarray | None = None
    vmin: float = 0.0
    vmax: float = 1.0


def png_size(rows: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with ``rows`` rows (the scan row included)."""
    return round(3 * COLUMN_INCHES * DPI), round((rows * ROW_INCHES + TITLE_INCHES) * DPI)


def plane_names(direction: Sequence[float]) -> list[str]:
    """Per index axis, the anatomical name of the plane perpendicular to it (``direction``: 9 numbers, row-major)."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return [PLANES[int(np.abs(matrix[:, axis]).argmax())] for axis in range(3)]


def plane_titles(geometry: Geometry) -> list[str]:
    """Per index axis: its plane's anatomical name and the centre slice, e.g. ``axial (k = 22)``."""
    return [f"{name} ({INDEX_AXES[axis]} = {int(geometry.size[axis]) // 2})"
            for axis, name in enumerate(plane_names(geometry.direction))]


def _plane(volume: np.ndarray, axis: int) -> np.ndarray:
    """The centre slice of the last three axes along ``axis``, transposed for ``origin='lower'`` display."""
    spatial = volume.shape[-3:]
    taken = np.take(volume, spatial[axis] // 2, axis=volume.ndim - 3 + axis)
    return np.swapaxes(taken, -1, -2)


def _extent(geometry: Geometry, axis: int) -> tuple[float, float, float, float]:
    u, v = (a for a in range(3) if a != axis)
    return 0.0, geometry.size[u] * geometry.spacing[u], 0.0, geometry.size[v] * geometry.spacing[v]


def _grey(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = np.clip((plane - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(plane)
    return np.repeat(scaled[..., None], 3, axis=-1)


def _blend(grey: np.ndarray, overlay: Overlay, axis: int) -> np.ndarray:
    if overlay.volume.ndim == 4:
        colours = np.moveaxis(_plane(overlay.volume, axis), 0, -1)
        alpha = RGB_ALPHA
    else:
        span = overlay.vmax - overlay.vmin if overlay.vmax > overlay.vmin else 1.0
        colours = colormaps[HEAT_CMAP](np.clip((_plane(overlay.volume, axis) - overlay.vmin) / span, 0, 1))[..., :3]
        alpha = HEAT_ALPHA
    weight = np.full(grey.shape[:2] + (1,), alpha)
    if overlay.mask is not None:
        weight = weight * _plane(overlay.mask, axis)[..., None]
    return (1 - weight) * grey + weight * colours


def planes_png(scan: np.ndarray, geometry: Geometry, overlays: Sequence[Overlay], title: str) -> bytes:
    """PNG bytes: the scan's three centre planes, then each overlay blended onto them (module docstring).

    Args:
        scan: ``X x Y x Z`` intensities on the grid of ``geometry`` (NaN/Inf drawn as the window's bottom).
        overlays: rows under the scan row, on the same grid.
        title: the figure's title.
    """
    scan = np.nan_to_num(np.asarray(scan, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(v) for v in np.percentile(scan, [0.5, 99.5]))
    rows = 1 + len(overlays)
    width, height = png_size(rows)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    top = 1 - TITLE_INCHES * DPI / height
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=top, wspace=0.02, hspace=0.1)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 * TITLE_INCHES * DPI / height, va="top")
    axes = fig.subplots(rows, 3, squeeze=False)
    titles = plane_titles(geometry)
    for axis in range(3):
        grey = _grey(_plane(scan, axis), lo, hi)
        for row, ax in enumerate(axes[:, axis]):
            image = grey if row == 0 else _blend(grey, overlays[row - 1], axis)
            ax.imshow(image, origin="lower", extent=_extent(geometry, axis), interpolation="nearest")
            label = titles[axis] if row == 0 else f"{overlays[row - 1].label}, {titles[axis].split(' ')[0]}"
            ax.set_title(label, fontsize=8)
            ax.set_axis_off()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
