"""Back to the input's geometry: from scores on the preprocessed grid to a label image on the input grid.

Preprocessing (``threedino_pipe.preprocessing.pipeline.preprocess_case``) transposed the case
(cross-slice axis last), cropped it to the box of nonzero voxels and resampled the crop onto a
grid of the plan's spacing centred on it (docs/schemas.md, "Preprocessed case"). This module
inverts those steps using the case's ``properties`` (:class:`~threedino_pipe.artifacts.PreprocessedCase`):

1. resample each output channel (class probability or region probability) from the
   preprocessed grid back to the cropped grid (linear interpolation, SimpleITK; the same centred
   grid convention as preprocessing, with input and output swapped), **one channel and one slab
   of rows at a time**, so no ``K x`` volume exists at the original resolution;
2. softmax models: argmax over the channels (a running maximum per slab); sigmoid (region)
   models: each region thresholded at 0.5 and written with its ``regions_class_order`` value,
   later regions over earlier ones (nnU-Net's rule);
3. undo the transpose and paste the crop into a zero volume of the input's size.

Axis words: *transposed* order is the preprocessed arrays' axis order; *original* order is the
input image's index order (i, j, k). ``crop_box`` is in original order, ``shape_after_crop`` and
``spacing`` in transposed order.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from threedino_pipe.artifacts import PreprocessedCase
from threedino_pipe.runtime.atomic_files import atomic_path

SLAB_VOXELS = 8_000_000  # output voxels resampled at once (one channel): 32 MB of float32


class ImplicitBackground:
    """Softmax channel 0 of probabilities stored without it: ``1 - sum`` of the stored channels.

    Indexing (``[x0:x1, y0:y1, z0:z1]``) computes only the requested block (float32).
    """

    def __init__(self, rest: torch.Tensor) -> None:
        self.rest = rest
        self.shape = tuple(rest.shape[1:])

    def __getitem__(self, index: tuple) -> torch.Tensor:
        total = self.rest[0][index].to(torch.float32, copy=True)  # never a view of the accumulator
        for c in range(1, self.rest.shape[0]):  # one channel at a time: no K x block float32 temporary
            total.add_(self.rest[c][index])
        return total.neg_().add_(1.0)


class Channels:
    """``K`` output channels on the preprocessed grid, ``X' x Y' x Z'`` each (CPU tensors).

    Args:
        stored: ``K x X' x Y' x Z'`` probabilities, or ``K - 1`` (channels 1..K-1) when
            ``implicit_background``: softmax probabilities sum to 1, so predict's accumulator leaves
            the background out (one channel less of memory) and it is derived here.
    """

    def __init__(self, stored: torch.Tensor, implicit_background: bool = False) -> None:
        self.stored, self.implicit = stored, bool(implicit_background)

    def __len__(self) -> int:
        return int(self.stored.shape[0]) + int(self.implicit)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """``X' x Y' x Z'``, the grid every channel lies on."""
        return tuple(int(n) for n in self.stored.shape[1:])

    def __getitem__(self, c: int):
        if not self.implicit:
            return self.stored[c]
        return ImplicitBackground(self.stored) if c == 0 else self.stored[c - 1]


def as_channels(scores: torch.Tensor | Channels) -> Channels:
    """``scores`` as :class:`Channels` (a plain ``K x X' x Y' x Z'`` tensor holds every channel)."""
    return scores if isinstance(scores, Channels) else Channels(scores)


def inverse_permutation(transpose: Sequence[int]) -> list[int]:
    """Axes that undo ``np.transpose(a, transpose)``."""
    return [int(a) for a in np.argsort(transpose)]


def needs_resampling(properties: PreprocessedCase) -> bool:
    """False when the preprocessed grid is the cropped input grid (same shape and spacing)."""
    same_shape = list(properties.shape) == list(properties.shape_after_crop)
    return not (same_shape and np.allclose(properties.spacing, properties.original_spacing_transposed(),
                                           rtol=0, atol=1e-6))


def grid_positions(n_out: int, s_out: float, n_in: int, s_in: float) -> np.ndarray:
    """Continuous input index of each output voxel for two grids centred on each other (mm spacings)."""
    return (np.arange(n_out) - (n_out - 1) / 2) * s_out / s_in + (n_in - 1) / 2


def slabs(n: int, other_voxels: int, slab_voxels: int | None = None) -> Iterator[tuple[int, int]]:
    """Half-open row ranges covering ``n`` rows of ``other_voxels`` each, at most ``slab_voxels``
    (default :data:`SLAB_VOXELS`) voxels per range, at least one row."""
    rows = max(1, (slab_voxels or SLAB_VOXELS) // max(1, other_voxels))
    for lo in range(0, n, rows):
        yield lo, min(n, lo + rows)


def _as_numpy(block: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float32 copy (callers update it in place; it must never alias the accumulator)."""
    if isinstance(block, torch.Tensor):
        return block.to(torch.float32, copy=True).numpy()
    return np.array(block, dtype=np.float32, copy=True)


def resample_rows(channel, properties: PreprocessedCase, axis: int, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` (along transposed ``axis``) of one channel restored onto the cropped input grid.

    Args:
        channel: ``X' x Y' x Z'`` values on the preprocessed grid (a CPU tensor of any float dtype,
            an array, or :class:`ImplicitBackground`), sliced one block at a time.
        properties: the case properties of ``preprocess_case``.

    Returns:
        float32 array of ``shape_after_crop`` with ``hi - lo`` rows along ``axis`` (transposed order).
    """
    out_shape = [int(n) for n in properties.shape_after_crop]
    if not needs_resampling(properties):
        index = [slice(None)] * 3
        index[axis] = slice(lo, hi)
        return _as_numpy(channel[tuple(index)])
    in_shape = [int(n) for n in channel.shape]
    s_in = [float(s) for s in properties.spacing]
    s_out = properties.original_spacing_transposed()
    positions = grid_positions(out_shape[axis], s_out[axis], in_shape[axis], s_in[axis])
    first = max(0, int(math.floor(positions[lo])) - 1)
    last = min(in_shape[axis], int(math.floor(positions[hi - 1])) + 3)
    index = [slice(None)] * 3
    index[axis] = slice(first, last)
    block = _as_numpy(channel[tuple(index)])
    starts = [0, 0, 0]
    starts[axis] = first
    image = sitk.GetImageFromArray(np.ascontiguousarray(block.transpose(2, 1, 0)))
    image.SetSpacing(s_in)
    image.SetOrigin([(starts[d] - (in_shape[d] - 1) / 2) * s_in[d] for d in range(3)])
    size = list(out_shape)
    size[axis] = hi - lo
    out_starts = [0, 0, 0]
    out_starts[axis] = lo
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(size)
    resampler.SetOutputSpacing(s_out)
    resampler.SetOutputOrigin([(out_starts[d] - (out_shape[d] - 1) / 2) * s_out[d] for d in range(3)])
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetUseNearestNeighborExtrapolator(True)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampler.Execute(image)).transpose(2, 1, 0)


def label_dtype(values: Sequence[int]) -> np.dtype:
    """uint8 when every written label value fits, else int16."""
    return np.dtype(np.uint8) if 0 <= min(values, default=0) and max(values, default=0) < 256 else np.dtype(np.int16)


class ConfidenceSums:
    """Per output channel, the summed probability of that channel over the voxels it was restored as, and their
    count (:func:`restore_labels` with ``confidence``): softmax, the voxels whose argmax is the channel (its
    probability there is the maximum); sigmoid, the voxels where the region passed 0.5. Voxels outside the
    crop box (background) are not counted.
    """

    def __init__(self, channels: int) -> None:
        self.sums = np.zeros(channels, np.float64)
        self.counts = np.zeros(channels, np.int64)

    def add(self, channel: int, values: np.ndarray) -> None:
        """Add the probabilities ``values`` (of voxels restored as ``channel``)."""
        self.sums[channel] += float(values.sum(dtype=np.float64))
        self.counts[channel] += int(values.size)

    def add_argmax(self, index: np.ndarray, best: np.ndarray) -> None:
        """Add a softmax slab: ``index`` (the argmax channel per voxel) and ``best`` (its probability)."""
        n = len(self.sums)
        self.sums += np.bincount(index.ravel(), weights=best.ravel(), minlength=n)[:n]
        self.counts += np.bincount(index.ravel(), minlength=n)[:n]

    def mean(self, channel: int) -> float | None:
        """The mean probability of ``channel`` over its voxels; None when it has none."""
        count = int(self.counts[channel])
        return float(self.sums[channel]) / count if count else None


def _label_rows(scores: Channels, shape: Sequence[int], rows: Callable, *, output: str,
                values: Sequence[int], confidence: ConfidenceSums | None = None) -> np.ndarray:
    """Labels of ``shape`` from ``scores`` read slab by slab: ``rows(channel, lo, hi)`` gives float32 rows."""
    dtype = label_dtype(values)
    lookup = np.asarray(values, dtype=dtype)
    labels = np.zeros([int(n) for n in shape], dtype)
    for lo, hi in slabs(labels.shape[0], labels.shape[1] * labels.shape[2]):
        if output == "softmax":
            best = rows(scores[0], lo, hi)
            index = np.zeros(best.shape, np.uint8 if len(values) < 256 else np.int16)
            for c in range(1, len(scores)):
                value = rows(scores[c], lo, hi)
                np.putmask(index, value > best, c)
                np.maximum(best, value, out=best)
            labels[lo:hi] = lookup[index]
            if confidence is not None:
                confidence.add_argmax(index, best)
        else:
            out = labels[lo:hi]
            for r in range(len(scores)):
                value = rows(scores[r], lo, hi)
                passed = value > 0.5
                out[passed] = lookup[r]
                if confidence is not None:
                    confidence.add(r, value[passed])
    return labels


def labels_on_crop(scores: torch.Tensor | Channels, properties: PreprocessedCase, *, output: str,
                   values: Sequence[int], confidence: ConfidenceSums | None = None) -> np.ndarray:
    """The label image of the cropped region (transposed order) from ``K x X' x Y' x Z'`` scores.

    Args:
        scores: probabilities on the preprocessed grid (CPU, float16 or float32), or :class:`Channels`.
        output: ``softmax`` (``values[c]`` is the label of channel ``c``; argmax) or ``sigmoid``
            (``values[r]`` is region ``r``'s ``regions_class_order`` value; threshold 0.5, later
            regions written over earlier ones).
        confidence: when given, the restored probabilities are added to it (:class:`ConfidenceSums`).
    """
    return _label_rows(as_channels(scores), properties.shape_after_crop,
                       lambda channel, lo, hi: resample_rows(channel, properties, 0, lo, hi),
                       output=output, values=values, confidence=confidence)


def labels_on_grid(scores: torch.Tensor | Channels, *, output: str, values: Sequence[int],
                   confidence: ConfidenceSums | None = None) -> np.ndarray:
    """The label image on the preprocessed grid itself (``X' x Y' x Z'``), the rule of :func:`labels_on_crop`.

    What finetune's validation scores; for a case that needs no resampling it is the crop of what
    ``3dino predict`` writes.
    """
    scores = as_channels(scores)
    return _label_rows(scores, scores.grid_shape, lambda channel, lo, hi: _as_numpy(channel[lo:hi]),
                       output=output, values=values, confidence=confidence)


def paste_into_input(cropped: np.ndarray, properties: PreprocessedCase) -> np.ndarray:
    """Undo the transpose of a cropped ``shape_after_crop`` array and paste it into zeros of the input's size."""
    original = np.transpose(cropped, inverse_permutation(properties.transpose))
    full = np.zeros([int(n) for n in properties.original_geometry.size], cropped.dtype)
    full[tuple(slice(lo, hi) for lo, hi in properties.crop_box)] = original
    return full


def restore_labels(scores: torch.Tensor | Channels, properties: PreprocessedCase, *, output: str,
                   values: Sequence[int], confidence: ConfidenceSums | None = None) -> np.ndarray:
    """``X x Y x Z`` labels on the input grid (original order) from scores on the preprocessed grid
    (``confidence``: see :func:`labels_on_crop`)."""
    cropped = labels_on_crop(scores, properties, output=output, values=values, confidence=confidence)
    return paste_into_input(cropped, properties)


def _restored_rows_original(channel, properties: PreprocessedCase, fill: float) -> Iterator[np.ndarray]:
    """One channel on the whole input grid, yielded as blocks of rows of original axis 0 (float16)."""
    transpose = [int(a) for a in properties.transpose]
    inverse = inverse_permutation(transpose)
    axis = transpose.index(0)  # the transposed axis that is original axis 0
    size = [int(n) for n in properties.original_geometry.size]
    box = properties.crop_box
    (x0, x1), (y0, y1), (z0, z1) = box
    other = size[1] * size[2]
    for lo, hi in slabs(size[0], other):
        block = np.full((hi - lo, size[1], size[2]), fill, np.float16)
        a, b = max(lo, x0), min(hi, x1)
        if a < b:
            rows = resample_rows(channel, properties, axis, a - x0, b - x0)
            block[a - lo:b - lo, y0:y1, z0:z1] = np.transpose(rows, inverse)
        yield block


def write_probabilities(scores: torch.Tensor | Channels, properties: PreprocessedCase, path: Path, *, output: str,
                        names: Sequence[str]) -> None:
    """Write ``<case>_probabilities.npz`` on the input grid, one channel and slab at a time (atomically).

    Members: ``probabilities`` (``K x X x Y x Z`` float16, input voxel order i, j, k; outside the
    crop box softmax channel 0 (background) is 1 and every other channel 0) and ``names``
    (``K`` channel names). Loads with ``np.load(path)`` (no pickle).
    """
    scores = as_channels(scores)
    size = [int(n) for n in properties.original_geometry.size]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": (len(scores), *size)}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED,
                                                   compresslevel=1, allowZip64=True) as archive:
        with archive.open("probabilities.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for c in range(len(scores)):
                fill = 1.0 if (output == "softmax" and c == 0) else 0.0
                for block in _restored_rows_original(scores[c], properties, fill):
                    member.write(np.ascontiguousarray(block).tobytes())
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(list(names), dtype=str))
        archive.writestr("names.npy", buffer.getvalue())
