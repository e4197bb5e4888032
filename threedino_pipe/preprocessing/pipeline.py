"""One case through one preprocessing recipe, in memory (used by ``preprocess``, ``predict``, ``embed``, ``visualize``).

Order (the recipe's ``crop``, ``resample`` and ``normalization`` fields choose the steps; a
recipe is one plans configuration with the dataset's transpose,
:meth:`threedino_pipe.artifacts.Plans.preprocessing`):

1. NaN/Inf voxels -> the mean of the channel's finite voxels (counted);
2. stack channels ``C x X x Y x Z`` and apply the ``transpose`` (cross-slice axis last);
3. ``crop == "nonzero"``: crop to the box of voxels nonzero in any channel (label cropped alike);
4. ``resample``: to the recipe's ``spacing`` (images: ``image_interpolation``; labels:
   ``label_interpolation``, per class by default), see :mod:`.resampling`;
5. normalise every channel over the whole (cropped) volume, see :mod:`.normalization`;
6. ``crop == "foreground_after_normalization"`` (pretraining): crop to the box of voxels above
   the normalised range's lower end (> -1) in any channel. Normalising before this crop is what
   the method asks (docs/method.md, "Data").
"""

from __future__ import annotations

import numpy as np

from threedino_pipe.artifacts import CasePreprocessing, PreprocessedCase
from threedino_pipe.artifacts.plans import CROPS
from threedino_pipe.preprocessing import cropping
from threedino_pipe.preprocessing.class_locations import sample_class_locations
from threedino_pipe.preprocessing.normalization import normalize_channel, replace_nonfinite
from threedino_pipe.preprocessing.resampling import (
    IMAGE_INTERPOLATORS,
    LABEL_INTERPOLATORS,
    resample_image,
    resample_label,
    target_shape,
)
from threedino_pipe.raw_data.image_io import Geometry
from threedino_pipe.runtime.errors import UserError

_REPLAN = "rerun `3dino plan` with this version of threedino-pipe"


def seg_dtype(label_values: list[int]) -> np.dtype:
    """uint8 when every declared label value is below 256, else int16."""
    return np.dtype(np.uint8) if max(label_values) < 256 else np.dtype(np.int16)


def check_recipe(recipe: CasePreprocessing, num_channels: int) -> None:
    """Refuse a recipe this code cannot apply to a case of ``num_channels`` channels.

    Raises:
        UserError (without a file: the caller names plans.json): a bad transpose, a channel count
            that differs, an unknown crop or interpolation.
    """
    name = recipe.configuration
    if sorted(int(a) for a in recipe.transpose) != [0, 1, 2]:
        raise UserError(f"plans.json transpose {recipe.transpose} is not a permutation of 0, 1, 2", fix=_REPLAN)
    if len(recipe.normalization) != num_channels:
        raise UserError(f"configuration '{name}' normalises {len(recipe.normalization)} channels but the case has "
                        f"{num_channels}", fix=_REPLAN)
    for key, value, table in (("image_interpolation", recipe.image_interpolation, IMAGE_INTERPOLATORS),
                              ("label_interpolation", recipe.label_interpolation, LABEL_INTERPOLATORS)):
        if recipe.resample and value is not None and value not in table:
            raise UserError(f"unknown {key} {value!r} in configuration '{name}' (known: {', '.join(table)})",
                            fix=_REPLAN)
    if recipe.crop not in CROPS:
        raise UserError(f"unknown crop {recipe.crop!r} in configuration '{name}' (known: {', '.join(CROPS)})",
                        fix=_REPLAN)
    if recipe.resample and not recipe.spacing:
        raise UserError(f"configuration '{name}' resamples but gives no spacing", fix=_REPLAN)
    if recipe.resample and recipe.crop == "foreground_after_normalization":
        raise UserError(f"configuration '{name}' crops after normalising a resampled volume, which this "
                        "version does not support", fix=_REPLAN)


def _check_label(label: np.ndarray, shape: tuple[int, ...], declared: list[int]) -> np.ndarray:
    if tuple(label.shape) != tuple(shape):
        raise UserError(f"label shape {tuple(label.shape)} differs from the image shape {tuple(shape)}",
                        fix="run `3dino verify` and fix the case")
    if np.issubdtype(label.dtype, np.floating):
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise UserError("label image holds non-integer values", fix="store labels as integers")
        label = rounded
    found = np.unique(label)
    undeclared = sorted(set(found.tolist()) - set(declared))
    if undeclared:
        raise UserError(f"label values {undeclared} are not declared in dataset.json labels {declared}",
                        fix="run `3dino verify`, then fix the label or declare the values and rerun `3dino plan`")
    return label.astype(seg_dtype(declared), copy=False)


def _stack_and_crop(images: list[np.ndarray], geometry: Geometry, recipe: CasePreprocessing,
                    label: np.ndarray | None):
    """Steps 1-3: ``(data C x X x Y x Z, seg, nan counts, spacing, crop box)`` in transposed order."""
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1 or shapes != {tuple(geometry.size)}:
        raise UserError(f"channel shapes {sorted(shapes)} differ from each other or from the image size "
                        f"{tuple(geometry.size)}", fix="run `3dino verify` and fix the case")
    transpose = [int(a) for a in recipe.transpose]
    channels, nan_counts = zip(*(replace_nonfinite(im) for im in images), strict=True)
    data = np.stack(channels).transpose(0, *(a + 1 for a in transpose))
    seg = None if label is None else _check_label(np.asarray(label), geometry.size,
                                                  recipe.label_values).transpose(transpose)
    box = cropping.full_box(data.shape[1:])
    if recipe.crop == "nonzero":
        box = cropping.nonzero_box(data)
        data = cropping.crop(data, box)
        seg = None if seg is None else cropping.crop(seg, box)
    return data, seg, nan_counts, [float(geometry.spacing[a]) for a in transpose], box


def label_voxels(label: np.ndarray | None) -> dict[str, int] | None:
    """Voxels per label value (``{"0": n0, "1": n1, ...}``, values present only) of a label image; None without."""
    if label is None:
        return None
    values = np.asarray(label)
    if not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values).astype(np.int64)
    if values.size and values.min() >= 0:
        counts = np.bincount(values.ravel())
        return {str(v): int(n) for v, n in enumerate(counts) if n}
    found, counts = np.unique(values, return_counts=True)
    return {str(int(v)): int(n) for v, n in zip(found, counts, strict=True)}


def preprocess_case(images: list[np.ndarray], geometry: Geometry, recipe: CasePreprocessing,
                    label: np.ndarray | None = None, *, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray | None, PreprocessedCase]:
    """Preprocess one case as ``recipe`` says.

    Args:
        images: one ``X x Y x Z`` array per channel (i, j, k order), NaN/Inf allowed.
        geometry: the images' geometry (spacing in mm per index axis).
        recipe: the steps (a plans configuration with the transpose and label values).
        label: ``X x Y x Z`` integer labels on the same grid, or None.
        seed: seeds the class-location draw.

    Returns:
        (``C x X' x Y' x Z'`` float32 array, ``1 x X' x Y' x Z'`` labels or None, the case's
        :class:`~threedino_pipe.artifacts.PreprocessedCase` record (``class_label`` None here)).

    Raises:
        UserError: inconsistent shapes, undeclared label values, or a recipe this code does not apply.
    """
    check_recipe(recipe, len(images))
    data, seg, nan_counts, spacing, box = _stack_and_crop(images, geometry, recipe, label)
    voxels = label_voxels(label)  # of the whole label image, before cropping and resampling: its volumes in mL
    shape_after_crop = [int(n) for n in data.shape[1:]]
    if recipe.resample:
        target = [float(s) for s in recipe.spacing]
        shape = target_shape(shape_after_crop, spacing, target)
        interp = recipe.image_interpolation or "bspline3"
        data = np.stack([resample_image(c, spacing, target, interpolation=interp, shape=shape) for c in data])
        if seg is not None:
            seg = resample_label(seg, spacing, target, shape=shape,
                                 interpolation=recipe.label_interpolation or "linear_per_class")
        spacing = target
    normalised, records = [], []
    for channel, entry, nan_count in zip(data, recipe.normalization, nan_counts, strict=True):
        out, record = normalize_channel(channel, entry, int(nan_count))
        normalised.append(out)
        records.append(record)
    data = np.stack(normalised)
    if recipe.crop == "foreground_after_normalization":
        lows = np.array([float(e.range[0]) for e in recipe.normalization], np.float32)
        inner = cropping.bbox_of_mask(np.any(data > lows[:, None, None, None], axis=0))
        inner = cropping.full_box(data.shape[1:]) if inner is None else inner
        data = cropping.crop(data, inner)
        seg = None if seg is None else cropping.crop(seg, inner)
        box = cropping.compose(box, inner)
        shape_after_crop = [int(n) for n in data.shape[1:]]
    data = np.ascontiguousarray(data, dtype=np.float32)
    locations: dict[str, list[list[int]]] = {}
    if seg is not None:
        seg = np.ascontiguousarray(seg)[None]
        locations = sample_class_locations(seg[0], [v for v in recipe.label_values if v != 0], seed)
    case = PreprocessedCase(
        configuration=recipe.configuration, original_geometry=geometry.to_dict(), transpose=list(recipe.transpose),
        crop_box=cropping.to_original_order(box, list(recipe.transpose)), shape_after_crop=shape_after_crop,
        spacing=spacing, shape=[int(n) for n in data.shape[1:]], normalization=records, class_locations=locations,
        label_voxels=voxels)
    return data, seg, case
