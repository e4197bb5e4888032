"""Geometry of a stack of DICOM planes: the slices of a series or the frames of a multi-frame object.

Per plane the input is what the header states: ImageOrientationPatient (6 direction cosines, the
row vector then the column vector), ImagePositionPatient (mm, centre of the first transmitted
pixel), PixelSpacing (mm, *between rows* then *between columns*), Rows and Columns. The output is
the planes' order along the slice normal (row x column) and the volume's SimpleITK geometry in
this repository's convention (index axes i = along a row, j = down a column, k = along the normal;
spacing in mm per index axis), or every problem that keeps the planes from forming one regular grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from threedino_pipe.dicom.header import Plane
from threedino_pipe.raw_data.image_io import Geometry

ORIENTATION_TOL = 1e-3  # largest difference between two planes' direction cosines
PIXEL_SPACING_TOL_MM = 1e-3  # largest difference between two planes' pixel spacings
POSITION_TOL_MM = 0.05  # two positions closer than this are the same; in-plane drift allowed
STEP_TOL_REL = 0.02  # a step may differ from the median step by this share (and POSITION_TOL_MM)


@dataclass(frozen=True)
class StackProblem:
    """Why planes do not form one regular grid.

    ``code`` is one of ``mixed_orientation``, ``mixed_pixel_spacing``, ``mixed_size``,
    ``duplicate_positions``, ``missing_slices``, ``uneven_spacing``, ``not_stacked``.
    """

    code: str
    message: str


@dataclass(frozen=True)
class Stack:
    """Planes sorted along their normal, and the grid they form.

    Attributes:
        order: indices of the input planes, sorted by position along the normal (ascending).
        offsets_mm: each sorted plane's position along the normal (mm).
        slice_spacing_mm: median distance between neighbouring planes (None for one plane).
        problems: empty when the planes form one regular grid.
        geometry: the volume's geometry (None when there are problems).
    """

    order: tuple[int, ...]
    offsets_mm: tuple[float, ...]
    slice_spacing_mm: float | None
    problems: tuple[StackProblem, ...]
    geometry: Geometry | None

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """The problems as one sentence ("" when there are none)."""
        return "; ".join(p.message for p in self.problems)


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal (row x column) of an ImageOrientationPatient."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def _format_mm(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _step_problems(sorted_offsets: np.ndarray) -> tuple[float | None, list[StackProblem]]:
    """The slice spacing (mm, median of the real steps; None without one) of sorted plane offsets, and the
    duplicate positions, missing slices and uneven steps among them."""
    problems: list[StackProblem] = []
    spacing_k: float | None = None
    steps = np.diff(sorted_offsets)
    duplicates = int((steps < POSITION_TOL_MM).sum())
    if duplicates:
        problems.append(StackProblem(
            "duplicate_positions", f"{duplicates} slice(s) share a position with another slice "
            "(several phases, echoes or acquisitions in one series)"))
    real = steps[steps >= POSITION_TOL_MM]
    if real.size:
        spacing_k = float(np.median(real))
        tolerance = max(POSITION_TOL_MM, STEP_TOL_REL * spacing_k)
        missing, uneven = [], []
        for index, step in enumerate(steps):
            if step < POSITION_TOL_MM or abs(step - spacing_k) <= tolerance:
                continue
            multiple = round(step / spacing_k)
            where = f"between {_format_mm(sorted_offsets[index])} and {_format_mm(sorted_offsets[index + 1])} mm"
            if multiple >= 2 and abs(step - multiple * spacing_k) <= tolerance:
                missing.append(f"{multiple - 1} {where}")
            else:
                uneven.append(f"{_format_mm(step)} mm step {where}")
        if missing:
            problems.append(StackProblem(
                "missing_slices", f"missing slice(s) along the normal (step {_format_mm(spacing_k)} mm): "
                + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")))
        if uneven:
            problems.append(StackProblem(
                "uneven_spacing", f"uneven slice spacing (median {_format_mm(spacing_k)} mm): "
                + ", ".join(uneven[:3]) + (" ..." if len(uneven) > 3 else "")))
    return spacing_k, problems


def analyse_stack(planes: Sequence[Plane], *, single_plane_spacing_mm: float = 1.0) -> Stack:
    """Sort planes along their normal and check they form one regular grid.

    Args:
        planes: the planes in any order (at least one).
        single_plane_spacing_mm: slice spacing used for the geometry of a single plane.

    Returns:
        The sorted order, offsets and geometry; ``problems`` lists mixed orientations, pixel
        spacings or sizes, duplicate positions, missing slices (a step that is a multiple of the
        median step), uneven steps, and positions that drift within the plane (gantry tilt, shear).
    """
    if not planes:
        raise ValueError("analyse_stack needs at least one plane")
    problems: list[StackProblem] = []
    orientations = np.array([p.orientation for p in planes], float)
    spacings = np.array([p.pixel_spacing for p in planes], float)
    positions = np.array([p.position for p in planes], float)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOL:
        distinct = len({tuple(np.round(o, 3)) for o in orientations})
        problems.append(StackProblem("mixed_orientation", f"{distinct} different orientations"))
    if np.abs(spacings - spacings[0]).max() > PIXEL_SPACING_TOL_MM:
        values = sorted({"x".join(_format_mm(v) for v in s) for s in spacings})
        problems.append(StackProblem("mixed_pixel_spacing", f"mixed pixel spacings ({', '.join(values)} mm)"))
    sizes = {(p.rows, p.columns) for p in planes}
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        problems.append(StackProblem("mixed_size", f"mixed image sizes ({listed})"))
    normal = normal_of(orientations[0])
    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    sorted_offsets = offsets[order]
    relative = positions - positions[order[0]]
    drift = np.linalg.norm(relative - np.outer(relative @ normal, normal), axis=1)
    if drift.max() > POSITION_TOL_MM:
        problems.append(StackProblem(
            "not_stacked", f"slice positions drift {_format_mm(float(drift.max()))} mm within the slice plane "
            "(gantry tilt or a sheared stack)"))
    spacing_k, step_problems = _step_problems(sorted_offsets) if len(planes) > 1 else (None, [])
    problems += step_problems
    geometry = None
    if not problems:
        row, col = orientations[0][:3], orientations[0][3:]
        direction = np.column_stack([row / np.linalg.norm(row), col / np.linalg.norm(col), normal])
        first = planes[int(order[0])]
        geometry = Geometry(
            size=(first.columns, first.rows, len(planes)),
            spacing=(float(spacings[0][1]), float(spacings[0][0]),
                     spacing_k if spacing_k is not None else float(single_plane_spacing_mm)),
            origin=tuple(float(v) for v in positions[order[0]]),
            direction=tuple(float(v) for v in direction.flatten()))
    return Stack(order=tuple(int(i) for i in order), offsets_mm=tuple(float(v) for v in sorted_offsets),
                 slice_spacing_mm=spacing_k, problems=tuple(problems), geometry=geometry)
