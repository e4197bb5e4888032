"""Dataset fingerprint: per-case geometry and per-channel foreground intensity statistics.

Everything is in voxel index order (i, j, k); spacings in mm, shapes in voxels. Intensity
statistics come from a bounded, seeded sample (at most :data:`SAMPLES_PER_CASE` foreground
voxels per case and channel, and at most :data:`MAX_SAMPLES` per channel over the dataset), so
memory does not grow with the dataset and the result is the same on every machine. Non-finite
voxels (NaN/Inf, read with nibabel for NIfTI) are left out of every statistic.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from threedino_pipe.artifacts import DatasetJson, Fingerprint
from threedino_pipe.artifacts.fingerprint import CaseGeometry, ChannelStatistics, IntensityStatistics
from threedino_pipe.raw_data.image_io import read_image, read_image_with_nonfinite
from threedino_pipe.raw_data.raw import CaseFiles
from threedino_pipe.runtime import progress
from threedino_pipe.runtime.errors import UserError

SAMPLES_PER_CASE = 10_000
MAX_SAMPLES = 10_000_000
PERCENTILES = (0.05, 0.5, 50.0, 99.5, 99.95)
ISOTROPY_RATIO = 1.5
SIGNIFICANT_DIGITS = 7

_CT_TOKEN = re.compile(r"^(CT\d*|CTA|NCCT|CECT|HU)$")
_MR_TOKEN = re.compile(r"^(MRI?|T1\w*|T2\w*|FLAIR|ADC|DWI|PDW?|SWI|DTI|DCE|BOLD|DIXON)$")
_PET_TOKEN = re.compile(r"^(PET|SUV\w*|FDG|PSMA)$")


def _round(value: float) -> float | None:
    """Round to :data:`SIGNIFICANT_DIGITS` so float noise never reaches the JSON; None for no value."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def bounding_box_shape(nonzero: np.ndarray) -> list[int]:
    """Shape of the bounding box of a boolean mask's True voxels (the whole shape when it has none)."""
    boxes = ndimage.find_objects(nonzero.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return [int(s) for s in nonzero.shape]
    return [int(sl.stop - sl.start) for sl in boxes[0]]


def cross_slice_axis(spacing: list[float] | np.ndarray) -> tuple[int, bool]:
    """The cross-slice axis and whether the spacing is anisotropic.

    Isotropic (largest / smallest spacing <= 1.5): axis 2, the last axis plays the cross-slice
    role. Otherwise the in-plane axes are the two whose spacings agree most closely (smallest
    ratio) and the cross-slice axis is the third, i.e. the one whose spacing differs most from
    the other two; this also covers data anisotropic in all three axes. Usually this is the axis
    with the largest spacing.
    """
    s = np.asarray(spacing, dtype=float)
    if s.max() / s.min() <= ISOTROPY_RATIO:
        return 2, False
    logs = np.log(s)
    pairs = [(abs(logs[a] - logs[b]), 3 - a - b) for a, b in ((0, 1), (1, 2), (0, 2))]
    best = min(gap for gap, _ in pairs)
    candidates = [axis for gap, axis in pairs if math.isclose(gap, best, rel_tol=1e-9, abs_tol=1e-12)]
    return max(candidates, key=lambda axis: (s[axis], axis)), True


def guess_modality(name: str, volume_minima: list[float], foreground: IntensityStatistics | None) -> tuple[str, str]:
    """CT, MR, PET or other, with the reason: from the channel name, else from intensities.

    Intensity rule for CT: the median of the per-case minima lies in [-3100, -900] (air, or a
    scanner's outside-field padding) and the foreground's 0.5-99.5 percentiles lie in
    [-1100, 3100] HU.
    """
    tokens = [t for t in re.split(r"[^A-Z0-9]+", name.upper()) if t]
    for modality, pattern in (("CT", _CT_TOKEN), ("PET", _PET_TOKEN), ("MR", _MR_TOKEN)):
        if any(pattern.match(t) for t in tokens):
            return modality, f"channel name '{name}'"
    minima = [m for m in volume_minima if m is not None and math.isfinite(m)]
    if minima and foreground and foreground.p0_5 is not None:
        low = float(np.median(minima))
        if -3100 <= low <= -900 and -1100 <= foreground.p0_5 and foreground.p99_5 <= 3100:
            return "CT", (f"intensities: median volume minimum {low:g} (air) and foreground within "
                          "[-1100, 3100] HU")
    return "other", f"channel name '{name}' is not a known modality and the intensities do not look like CT HU"


@dataclass(frozen=True)
class _CaseJob:
    case_id: str
    images: tuple[str, ...]
    label: str | None
    num_samples: int


def _seed(case_id: str, channel: int) -> int:
    return zlib.crc32(f"{case_id}/{channel}".encode())


def _fingerprint_case(job: _CaseJob) -> tuple[CaseGeometry, list[np.ndarray], list[float | None]]:
    """One case: its geometry record, a foreground sample per channel and each channel's minimum."""
    arrays, geometry = [], None
    for path in job.images:
        array, geom = read_image_with_nonfinite(path)
        geometry = geometry or geom
        if array.shape != tuple(geometry.size):
            raise UserError(f"channel shape {array.shape} differs from channel 0's {tuple(geometry.size)}",
                            file=path, fix="run `3dino verify` and fix the case")
        arrays.append(array)
    nonzero = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays:
        nonzero |= array != 0
    label_mask = None
    if job.label is not None:
        label, _ = read_image(job.label)
        if label.shape != arrays[0].shape:
            raise UserError(f"label shape {label.shape} differs from the image's {arrays[0].shape}",
                            file=job.label, fix="run `3dino verify` and fix the case")
        label_mask = label > 0
    samples, minima = [], []
    for channel, array in enumerate(arrays):
        finite = np.isfinite(array)
        values = array[finite]
        minima.append(float(values.min()) if values.size else None)
        if label_mask is not None:
            values = array[label_mask & finite]
        elif values.size:
            values = values[values > np.percentile(values, PERCENTILES[0])]
        if values.size > job.num_samples:
            values = np.random.default_rng(_seed(job.case_id, channel)).choice(values, job.num_samples, replace=False)
        samples.append(values.astype(np.float64))
    record = CaseGeometry(
        spacing=[float(v) for v in geometry.spacing], shape=[int(v) for v in geometry.size],
        shape_after_crop=bounding_box_shape(nonzero),
        orientation=sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction),
        direction=[float(v) for v in geometry.direction], origin=[float(v) for v in geometry.origin])
    return record, samples, minima


def _init_worker() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def intensity_statistics(sample: np.ndarray) -> IntensityStatistics | None:
    """Percentiles 0.05/0.5/50/99.5/99.95, mean, std, min, max of a 1-D sample (None when empty)."""
    if sample.size == 0:
        return None
    stats = {f"p{p:g}": _round(v) for p, v in zip(PERCENTILES, np.percentile(sample, PERCENTILES), strict=True)}
    return IntensityStatistics(**stats, mean=_round(sample.mean()), std=_round(sample.std()),
                               min=_round(sample.min()), max=_round(sample.max()))


def compute_fingerprint(folder: Path, spec: DatasetJson, cases: list[CaseFiles], num_processes: int = 2
                        ) -> Fingerprint:
    """The ``dataset_fingerprint.json`` content of a verified raw dataset (docs/schemas.md).

    Args:
        folder: the raw dataset folder.
        spec: its parsed dataset.json.
        cases: its training cases (every channel present).
        num_processes: worker processes reading cases.
    """
    if not cases:
        raise UserError("the dataset has no training cases", file=folder / "imagesTr",
                        fix="add cases to imagesTr/ (run `3dino verify` for details)")
    per_case = max(1, min(SAMPLES_PER_CASE, MAX_SAMPLES // len(cases)))
    cases = sorted(cases, key=lambda c: c.case_id)
    jobs = [_CaseJob(c.case_id, tuple(str(p) for p in c.images),
                     str(c.label) if spec.task == "segmentation" and c.label is not None else None, per_case)
            for c in cases]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context().Pool(min(num_processes, len(jobs)), initializer=_init_worker) as pool:
            results = list(progress.track(pool.imap(_fingerprint_case, jobs), "fingerprint", total=len(jobs)))
    else:
        results = [_fingerprint_case(job) for job in progress.track(jobs, "fingerprint", total=len(jobs))]

    records = {case.case_id: record for case, (record, _, _) in zip(cases, results, strict=True)}
    channels = {}
    for channel, name in spec.channel_names.items():
        sample = np.concatenate([samples[channel] for _, samples, _ in results])
        stats = intensity_statistics(sample)
        modality, reason = guess_modality(name, [minima[channel] for _, _, minima in results], stats)
        channels[str(channel)] = ChannelStatistics(name=name, modality_guess=modality, modality_reason=reason,
                                                   foreground=stats, num_samples=int(sample.size))
    spacings = np.array([r.spacing for r in records.values()])
    shapes = np.array([r.shape for r in records.values()])
    median_spacing = [float(v) for v in np.median(spacings, axis=0)]
    axis, anisotropic = cross_slice_axis(median_spacing)
    return Fingerprint(dataset=folder.name, task=spec.task, num_cases=len(records), cases=records, channels=channels,
                       median_spacing=median_spacing, median_shape=[float(v) for v in np.median(shapes, axis=0)],
                       cross_slice_axis=axis, anisotropic=anisotropic)
