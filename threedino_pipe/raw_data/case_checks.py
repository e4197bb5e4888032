"""Integrity checks of one raw case: its files' readability, dimension, voxels and geometry.

:func:`check_case` runs in a worker process of ``3dino verify`` and returns every
:class:`~threedino_pipe.raw_data.problems.Problem` of one case; it never raises (an unexpected
exception while checking a file becomes a problem of that file).

Geometry is compared with tolerances (mm for spacing and origin, unitless for direction):
two values agree when ``|a - b| <= atol + rtol * |b|``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from threedino_pipe.artifacts import DatasetJson
from threedino_pipe.raw_data import itk_messages
from threedino_pipe.raw_data.image_io import Geometry, is_nifti
from threedino_pipe.raw_data.problems import Problem
from threedino_pipe.raw_data.raw import CaseFiles, display_path

SPACING_ATOL, SPACING_RTOL = 1e-4, 1e-4  # mm, relative
ORIGIN_ATOL, ORIGIN_RTOL = 1e-4, 1e-4  # mm, relative
DIRECTION_ATOL = 1e-4  # direction cosines
MIN_PRETRAIN_AXIS = 24  # voxels: pretraining keeps volumes whose smallest axis exceeds this (docs/method.md, Data)
DICOM_GAP_RTOL = 0.05  # relative deviation of a DICOM slice gap from the median gap
_MAX_LISTED = 10
_ITK_FIX = ("the file was read anyway: check its orientation and slices in a viewer, and re-export it if they "
            "are wrong")
_BUG_FIX = "check that the file opens in an image viewer; if it does, report this as a bug of threedino-pipe"


class _Unreadable(Exception):
    """A file that cannot be read; carries the problem and the fix."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what GDCM prints directly on file descriptor 2 (ITK's own messages become problems through
    :mod:`.itk_messages`; the reasons of a failed read come with its exception)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _itk_reason(exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception thrown") and "sitkImageReaderBase" not in ln]
    return (useful[-1] if useful else "unknown reason")[:200]


def _read_dicom(folder: Path) -> sitk.Image:
    """The one DICOM series of ``folder``; uneven slice gaps are refused (a missing slice)."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        count = sum(1 for p in folder.iterdir() if not p.name.startswith("."))
        raise _Unreadable(f"DICOM case folder holds no DICOM series (none of its {count} files is a DICOM slice)",
                          "put the slices of exactly one DICOM series in the folder")
    if len(series) > 1:
        raise _Unreadable(f"DICOM case folder holds {len(series)} series; a case folder must hold exactly one",
                          "move each series into its own folder (another case, or another channel _0001/)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    image = reader.Execute()
    if image.GetDimension() == 3 and image.GetSize()[2] > 2:
        normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
        first = np.asarray(image.GetOrigin())
        positions = []
        for name in reader.GetFileNames():
            header = sitk.ImageFileReader()
            header.SetFileName(name)
            header.ReadImageInformation()
            positions.append(float(np.dot(np.asarray(header.GetOrigin()) - first, normal)))
        gaps = np.diff(np.sort(positions))
        median = float(np.median(gaps))
        if median <= 0 or np.abs(gaps - median).max() > DICOM_GAP_RTOL * median:
            raise _Unreadable(f"DICOM slices are unevenly spaced (gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
                              "along the slice normal): a slice is missing or the series mixes acquisitions",
                              "restore the missing slices, or convert the series to one 3D file (.nii.gz) "
                              "with a tool that resamples uneven slices")
    return image


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    """The SimpleITK image and its voxels (any axis order).

    NIfTI voxels come from nibabel: SimpleITK reads NaN/Inf as 0 and silently zero-fills a
    truncated NIfTI file, nibabel does neither.
    """
    if not path.exists():
        raise _Unreadable("file not found", "add the file")
    try:
        with _quiet_native_stderr():
            image = _read_dicom(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _Unreadable(f"cannot read the image: unreadable or truncated file ({_itk_reason(exc)})",
                          "re-export or replace the file") from None
    if path.is_dir() or not is_nifti(path):
        return image, sitk.GetArrayViewFromImage(image)
    import nibabel as nib
    try:
        voxels = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises EOFError, OSError, zlib.error, ImageFileError...
        raise _Unreadable(f"cannot read the voxels: truncated or damaged NIfTI file ({exc})".replace("\n", " "),
                          "re-export or replace the file") from None
    return image, voxels


def _dimension_problem(image: sitk.Image, case_id: str, role: str, spec: DatasetJson) -> tuple[str, str]:
    """(problem, fix) for an image that is not a scalar 3D volume, else ("", "")."""
    dim, size = image.GetDimension(), "x".join(str(s) for s in image.GetSize())
    ending = spec.file_ending
    if dim == 4 and role == "image":
        if image.GetSize()[3] == 1:
            return f"image is 4D ({size}) with a single volume", "drop the 4th axis and save it as a 3D image"
        return (f"image is 4D ({size}): {image.GetSize()[3]} volumes in one file",
                f"split it into one 3D file per volume, each a channel: {case_id}_0000{ending}, "
                f"{case_id}_0001{ending}, ..., and declare each channel in dataset.json channel_names "
                "(e.g. with nibabel: img.slicer[..., t])")
    if dim != 3:
        what = "a label image must be one 3D volume" if role == "label" else "3DINO needs 3D volumes"
        fix = ("save the label as one 3D image on its image's grid" if role == "label" else
               "give a 3D volume per channel (stack 2D slices into one 3D file, or a folder holding one DICOM series)")
        return f"image is {dim}D ({size}); {what}", fix
    if image.GetNumberOfComponentsPerPixel() != 1:
        return (f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel (vector/RGB)",
                "store each component as its own channel file (_0000, _0001, ...), or convert to grayscale")
    return "", ""


def _listed(values: np.ndarray | list) -> str:
    values = list(values)
    text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:_MAX_LISTED])
    return text + (f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else "")


def _unique_values(voxels: np.ndarray) -> np.ndarray:
    """Sorted distinct values; bincount for compact integer ranges (much faster than sorting)."""
    if voxels.size == 0:
        return np.zeros(0, voxels.dtype)
    if np.issubdtype(voxels.dtype, np.integer) and voxels.dtype.itemsize <= 4:
        low, high = int(voxels.min()), int(voxels.max())
        if high - low < 1 << 20:
            counts = np.bincount((np.asarray(voxels, dtype=np.int64) - low).ravel(), minlength=high - low + 1)
            return np.nonzero(counts)[0] + low
    return np.unique(voxels)


def _label_problems(voxels: np.ndarray, spec: DatasetJson, rel: str, case_id: str) -> list[Problem]:
    problems: list[Problem] = []
    values = voxels
    if np.issubdtype(voxels.dtype, np.floating):
        finite = np.isfinite(voxels)
        bad = int(voxels.size - finite.sum())
        if bad:
            problems.append(Problem("error", rel, f"label image has {bad} NaN or infinite voxels",
                                    "write integer labels (0 = background) in every voxel", case_id))
            values = voxels[finite]
        distinct = _unique_values(values)
        fractional = distinct[distinct != np.round(distinct)]
        if fractional.size:
            problems.append(Problem("error", rel, f"label image has non-integer values ({_listed(fractional)})",
                                    "save labels as integers (uint8/uint16); resample labels with nearest "
                                    "neighbour, never linear", case_id))
        distinct = distinct[distinct == np.round(distinct)].astype(np.int64)
    else:
        distinct = _unique_values(values).astype(np.int64)
    undeclared = [int(v) for v in distinct if int(v) not in spec.label_values]
    if undeclared:
        declared = ", ".join(str(v) for v in sorted(spec.label_values))
        problems.append(Problem("error", rel, f"label values not declared in dataset.json: {_listed(undeclared)} "
                                f"(declared: {declared})", "declare them in dataset.json 'labels', or fix the "
                                "label image", case_id))
    elif distinct.size and set(distinct.tolist()) <= {0}:
        problems.append(Problem("warning", rel, "label image holds only background (0)",
                                "fine if the case truly has no foreground; otherwise fix the label", case_id))
    return problems


def check_file(path: Path, folder: Path, case_id: str, spec: DatasetJson, *, role: str,
               allow_nan: bool = False) -> tuple[Geometry | None, list[Problem]]:
    """Check one image (``role="image"``) or label (``role="label"``) file or DICOM folder.

    Returns:
        (its geometry, or None when it is unusable; the problems found).
    """
    rel = display_path(path, folder)
    try:
        with itk_messages.collected() as itk_texts:
            image, voxels = _read(path)
    except _Unreadable as exc:  # name the file relative to the dataset, as everywhere in the report
        return None, [Problem("error", rel, exc.problem.replace(str(path), rel), exc.fix, case_id)]
    problems = [Problem("warning", rel, f"the image reader (ITK) warns: {itk_messages.about(path, text)}",
                        _ITK_FIX, case_id) for text in itk_texts]
    problem, fix = _dimension_problem(image, case_id, role, spec)
    if problem:
        return None, [*problems, Problem("error", rel, problem, fix, case_id)]
    if role == "label":
        return Geometry.of(image), problems + _label_problems(voxels, spec, rel, case_id)
    if np.issubdtype(voxels.dtype, np.floating):
        nan, inf = int(np.isnan(voxels).sum()), int(np.isinf(voxels).sum())
        if nan or inf:
            counts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n]
            text = f"{' and '.join(counts)} voxels (of {voxels.size})"
            if allow_nan:
                problems.append(Problem("warning", rel, text, "accepted (--allow-nan): preprocess replaces them "
                                        "by the volume mean", case_id))
            else:
                problems.append(Problem("error", rel, text, "replace them in the file, or pass --allow-nan to "
                                        "let preprocess replace them by the volume mean", case_id))
    return Geometry.of(image), problems


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def compare_geometry(ref_rel: str, ref: Geometry, rel: str, geometry: Geometry, case_id: str,
                     role: str) -> list[Problem]:
    """Problems where ``geometry`` (of ``rel``) differs from the case's reference image beyond tolerance."""
    if role == "label":
        fix_grid = "resample the label onto its image's voxel grid (nearest neighbour)"
        fix_header = ("if the label overlays the image voxel for voxel, copy the image's header onto it "
                      "(SimpleITK: label.CopyInformation(image)); else resample it onto the image")
    else:
        fix_grid = f"resample every channel of the case onto one grid (e.g. onto {ref_rel})"
        fix_header = f"register and resample the channel onto {ref_rel}'s grid"
    problems = []
    if geometry.size != ref.size:
        problems.append(Problem("error", rel, f"{role} shape {'x'.join(map(str, geometry.size))} differs from "
                                f"{ref_rel} ({'x'.join(map(str, ref.size))})", fix_grid, case_id))
    checks = (("spacing", SPACING_ATOL, SPACING_RTOL, " mm"), ("origin", ORIGIN_ATOL, ORIGIN_RTOL, " mm"),
              ("direction", DIRECTION_ATOL, 0.0, ""))
    for name, atol, rtol, unit in checks:
        mine, theirs = np.asarray(getattr(geometry, name)), np.asarray(getattr(ref, name))
        if not np.allclose(mine, theirs, rtol=rtol, atol=atol):
            problems.append(Problem("error", rel, f"{role} {name} {_fmt(getattr(geometry, name))}{unit} differs from "
                                    f"{ref_rel} {_fmt(getattr(ref, name))}{unit} (largest difference "
                                    f"{np.abs(mine - theirs).max():.3g}{unit})", fix_header, case_id))
    return problems


def _guarded(path: Path, folder: Path, case_id: str, spec: DatasetJson, *, role: str,
             allow_nan: bool) -> tuple[Geometry | None, list[Problem]]:
    try:
        return check_file(path, folder, case_id, spec, role=role, allow_nan=allow_nan)
    except Exception as exc:  # never a traceback: an unexpected failure is a problem of this file
        message = f"unexpected error while checking this file ({type(exc).__name__}: {exc})".replace("\n", " ")
        return None, [Problem("error", display_path(path, folder), message[:300], _BUG_FIX, case_id)]


def check_case(folder: Path, case: CaseFiles, spec: DatasetJson, allow_nan: bool = False) -> list[Problem]:
    """Every problem of one case's files (missing files are reported by discovery, not here)."""
    problems: list[Problem] = []
    reference: tuple[str, Geometry] | None = None
    for path in case.images:
        if path is None:
            continue
        geometry, found = _guarded(path, folder, case.case_id, spec, role="image", allow_nan=allow_nan)
        problems += found
        if geometry is None:
            continue
        if reference is None:
            reference = (display_path(path, folder), geometry)
            if min(geometry.size) <= MIN_PRETRAIN_AXIS:
                problems.append(Problem(
                    "warning", reference[0], f"too few slices for pretraining: smallest axis has "
                    f"{min(geometry.size)} voxels (shape {'x'.join(map(str, geometry.size))}); pretraining keeps "
                    f"only volumes whose smallest axis exceeds {MIN_PRETRAIN_AXIS}", "fine for finetuning; give "
                    f"pretraining volumes with more than {MIN_PRETRAIN_AXIS} slices", case.case_id))
        else:
            problems += compare_geometry(*reference, display_path(path, folder), geometry, case.case_id, "channel")
    if case.label is not None:
        geometry, found = _guarded(case.label, folder, case.case_id, spec, role="label", allow_nan=False)
        problems += found
        if geometry is not None and reference is not None:
            problems += compare_geometry(*reference, display_path(case.label, folder), geometry, case.case_id, "label")
    return problems
