"""Label overlays on three orthogonal planes: a scan with its reference and predicted segmentations.

Arrays are ``X x Y x Z`` in voxel index order (i, j, k); each plane is drawn with its physical
aspect ratio (spacing in mm), the first in-plane axis horizontal.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

LABEL_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c")
COLOUR_NAMES = ("red", "green", "blue", "orange", "purple", "cyan", "magenta", "lime")


def colour_legend(labels: dict[str, Sequence[int]]) -> str:
    """``grey_matter red, white_matter green``: the colour of each label (by its first value) in the overlays."""
    return ", ".join(f"{name} {COLOUR_NAMES[(int(values[0]) - 1) % len(COLOUR_NAMES)]}"
                     for name, values in labels.items() if int(values[0]) > 0)
PLANES = ((0, "i"), (1, "j"), (2, "k"))


def slice_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel index (i, j, k) at the centre of the mask's bounding box (the volume centre for an empty mask)."""
    if not mask.any():
        return tuple(int(s) // 2 for s in mask.shape)
    coords = np.nonzero(mask)
    return tuple(int((c.min() + c.max()) // 2) for c in coords)


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice at ``index`` along ``axis``, transposed so the first remaining axis is horizontal."""
    return np.take(volume, index, axis=axis).T


def overlay_planes(image: np.ndarray, spacing: Sequence[float], labels: Sequence[tuple[str, np.ndarray | None]],
                   *, num_labels: int, title: str = "", centre: Sequence[int] | None = None,
                   plane_names: Sequence[str] | None = None) -> bytes:
    """PNG bytes: rows = the three planes through ``centre``, columns = the image, then each label map on it.

    Args:
        image: ``X x Y x Z`` intensities.
        spacing: mm per voxel along i, j, k.
        labels: (column title, ``X x Y x Z`` integer label map on the image's grid, or None for a
            missing map, drawn as an empty panel).
        num_labels: the largest label value (fixes the colours across columns).
        title: figure title.
        centre: voxel (i, j, k) the planes pass through (default: the centre of the first map's
            foreground).
        plane_names: a name per index axis written before each row's slice (e.g. ``axial``,
            :func:`threedino_pipe.visualization.planes.plane_names`); default none.
    """
    if centre is None:
        first = next((m for _, m in labels if m is not None), None)
        centre = slice_centre(first > 0) if first is not None else tuple(s // 2 for s in image.shape)
    lo, hi = np.percentile(image, [0.5, 99.5])
    cmap = ListedColormap([LABEL_COLOURS[i % len(LABEL_COLOURS)] for i in range(max(1, num_labels))])
    columns = [("image", None), *labels]
    fig = Figure(figsize=(2.3 * len(columns), 2.3 * len(PLANES) + (0.4 if title else 0.0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PLANES), len(columns), squeeze=False)
    for row, (axis, name) in enumerate(PLANES):
        rest = [a for a in range(3) if a != axis]
        aspect = float(spacing[rest[1]]) / float(spacing[rest[0]])
        for col, (column_title, label_map) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(_plane(image, axis, centre[axis]), cmap="gray", vmin=lo, vmax=hi, origin="lower",
                      aspect=aspect, interpolation="nearest")
            if col > 0 and label_map is not None:
                plane = _plane(label_map, axis, centre[axis]).astype(np.int64)
                ax.imshow(np.ma.masked_where(plane <= 0, plane - 1), cmap=cmap, vmin=0, vmax=max(1, num_labels) - 1,
                          alpha=0.45, origin="lower", aspect=aspect, interpolation="nearest")
            elif col > 0:
                ax.text(0.5, 0.5, "missing", color="white", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(column_title, fontsize=9)
            if col == 0:
                named = f"{plane_names[axis]} " if plane_names else ""
                ax.set_ylabel(f"{named}{name} = {centre[axis]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()
