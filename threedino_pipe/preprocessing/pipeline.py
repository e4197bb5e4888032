"""One case through one plans configuration, in memory (used by ``preprocess`` and ``predict``).

Order (a configuration's ``crop``, ``resample`` and ``normalization`` fields choose the steps):

1. NaN/Inf voxels -> the mean of the channel's finite voxels (counted);
2. stack channels ``C x X x Y x Z`` and apply the plans ``transpose`` (cross-slice axis last);
3. ``crop == "nonzero"``: crop to the box of voxels nonzero in any channel (label cropped alike);
4. ``resample``: to the configuration's ``spacing`` (images: ``image_interpolation``; labels:
   ``label_interpolation``, per class by default), see :mod:`.resampling`;
5. normalise every channel over the whole (cropped) volume, see :mod:`.normalization`;
6. ``crop == "foreground_after_normalization"`` (pretraining): crop to the box of voxels above
   the normalised range's lower end (> -1) in any channel. Normalising before this crop is what
   METHOD.md asks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from threedino_pipe.dataset.image_io import Geometry
from threedino_pipe.preprocessing import cropping
from threedino_pipe.preprocessing.class_locations import sample_class_locations
from threedino_pipe.preprocessing.normalization import SCHEMES, normalize_channel, replace_nonfinite
from threedino_pipe.preprocessing.resampling import (
    IMAGE_INTERPOLATORS,
    LABEL_INTERPOLATORS,
    resample_image,
    resample_label,
    target_shape,
)
from threedino_pipe.runtime.errors import UserError

CROPS = ("nonzero", "foreground_after_normalization", "none")
_REPLAN = "rerun `3dino plan` with this version of threedino-pipe"


def label_values(plans: dict) -> list[int]:
    """Every label value plans declares (0 included), sorted; regions contribute their values."""
    values = {0}
    for value in (plans.get("labels") or {}).values():
        values.update(value if isinstance(value, list) else [value])
    return sorted(int(v) for v in values)


def seg_dtype(plans: dict) -> np.dtype:
    """uint8 when every declared label value is below 256, else int16."""
    return np.dtype(np.uint8) if max(label_values(plans)) < 256 else np.dtype(np.int16)


def uses_labels(configuration: str, plans: dict) -> bool:
    """True when the configuration stores label arrays: segmentation tasks, non-``pretrain*`` configurations."""
    return plans.get("task") == "segmentation" and not configuration.startswith("pretrain")


def check_configuration(plans: dict, configuration: str, num_channels: int) -> dict:
    """The configuration's dict, after checking the fields preprocessing relies on.

    Raises:
        UserError (without a file: the caller names plans.json): missing configuration, a bad
            transpose, a channel count that differs, an unknown crop.
    """
    configurations = plans.get("configurations") or {}
    if configuration not in configurations:
        raise UserError(f"plans.json has no configuration '{configuration}' (it has: "
                        f"{', '.join(configurations) or 'none'})",
                        fix="choose one of those with -c, or rerun `3dino plan`")
    config = configurations[configuration]
    transpose = plans.get("transpose", [0, 1, 2])
    if sorted(int(a) for a in transpose) != [0, 1, 2]:
        raise UserError(f"plans.json transpose {transpose} is not a permutation of 0, 1, 2", fix=_REPLAN)
    entries = config.get("normalization") or []
    if len(entries) != num_channels:
        raise UserError(f"configuration '{configuration}' normalises {len(entries)} channels but the case has "
                        f"{num_channels}", fix=_REPLAN)
    for entry in entries:
        if entry.get("scheme") not in SCHEMES:
            raise UserError(f"unknown normalisation scheme {entry.get('scheme')!r} in configuration "
                            f"'{configuration}' (known: {', '.join(SCHEMES)})", fix=_REPLAN)
    for key, table in (("image_interpolation", IMAGE_INTERPOLATORS), ("label_interpolation", LABEL_INTERPOLATORS)):
        if config.get("resample") and config.get(key) is not None and config[key] not in table:
            raise UserError(f"unknown {key} {config[key]!r} in configuration '{configuration}' (known: "
                            f"{', '.join(table)})", fix=_REPLAN)
    crop_mode = config.get("crop") or "none"
    if crop_mode not in CROPS:
        raise UserError(f"unknown crop {crop_mode!r} in configuration '{configuration}' (known: {', '.join(CROPS)})",
                        fix=_REPLAN)
    if config.get("resample") and not config.get("spacing"):
        raise UserError(f"configuration '{configuration}' resamples but gives no spacing", fix=_REPLAN)
    if config.get("resample") and crop_mode == "foreground_after_normalization":
        raise UserError(f"configuration '{configuration}' crops after normalising a resampled volume, which this "
                        "version does not support", fix=_REPLAN)
    return config


def _check_label(label: np.ndarray, shape: Sequence[int], plans: dict) -> np.ndarray:
    if tuple(label.shape) != tuple(shape):
        raise UserError(f"label shape {tuple(label.shape)} differs from the image shape {tuple(shape)}",
                        fix="run `3dino verify` and fix the case")
    if np.issubdtype(label.dtype, np.floating):
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise UserError("label image holds non-integer values", fix="store labels as integers")
        label = rounded
    declared = label_values(plans)
    found = np.unique(label)
    undeclared = sorted(set(found.tolist()) - set(declared))
    if undeclared:
        raise UserError(f"label values {undeclared} are not declared in dataset.json labels {declared}",
                        fix="run `3dino verify`, then fix the label or declare the values and rerun `3dino plan`")
    return label.astype(seg_dtype(plans), copy=False)


def preprocess_case(images: list[np.ndarray], geometry: Geometry, plans: dict, configuration: str,
                    label: np.ndarray | None = None, *, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Preprocess one case as ``plans['configurations'][configuration]`` says.

    Args:
        images: one ``X x Y x Z`` array per channel (i, j, k order), NaN/Inf allowed.
        geometry: the images' geometry (spacing in mm per index axis).
        plans: the parsed plans.json.
        configuration: e.g. ``"pretrain"`` or ``"finetune"``.
        label: ``X x Y x Z`` integer labels on the same grid, or None.
        seed: seeds the class-location draw.

    Returns:
        (``C x X' x Y' x Z'`` float32 array, ``1 x X' x Y' x Z'`` labels or None, properties: the
        case JSON's fields ``configuration``, ``original_geometry``, ``transpose``, ``crop_box``
        (original index order), ``shape_after_crop``, ``spacing``, ``shape``, ``normalization``,
        ``class_locations``, ``class_label`` (None here)).

    Raises:
        UserError: inconsistent shapes, undeclared label values, or a plans entry this code
            does not understand.
    """
    config = check_configuration(plans, configuration, len(images))
    transpose = [int(a) for a in plans.get("transpose", [0, 1, 2])]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1 or shapes != {tuple(geometry.size)}:
        raise UserError(f"channel shapes {sorted(shapes)} differ from each other or from the image size "
                        f"{tuple(geometry.size)}", fix="run `3dino verify` and fix the case")
    entries = config["normalization"]
    crop_mode = config.get("crop") or "none"
    resample = bool(config.get("resample"))

    channels, nan_counts = zip(*(replace_nonfinite(im) for im in images), strict=True)
    data = np.stack(channels).transpose(0, *(a + 1 for a in transpose))
    seg = None if label is None else _check_label(np.asarray(label), geometry.size, plans).transpose(transpose)
    spacing = [float(geometry.spacing[a]) for a in transpose]

    box = cropping.full_box(data.shape[1:])
    if crop_mode == "nonzero":
        box = cropping.nonzero_box(data)
        data = cropping.crop(data, box)
        seg = None if seg is None else cropping.crop(seg, box)
    shape_after_crop = [int(n) for n in data.shape[1:]]

    if resample:
        target = [float(s) for s in config["spacing"]]
        shape = target_shape(shape_after_crop, spacing, target)
        interp = config.get("image_interpolation", "bspline3")
        data = np.stack([resample_image(c, spacing, target, interpolation=interp, shape=shape) for c in data])
        if seg is not None:
            seg = resample_label(seg, spacing, target, shape=shape,
                                 interpolation=config.get("label_interpolation", "linear_per_class"))
        spacing = target

    normalised, records = [], []
    for channel, entry, nan_count in zip(data, entries, nan_counts, strict=True):
        out, record = normalize_channel(channel, entry)
        normalised.append(out)
        records.append({**record, "nan_replaced": int(nan_count)})
    data = np.stack(normalised)

    if crop_mode == "foreground_after_normalization":
        lows = np.array([float(e.get("range", (-1, 1))[0]) for e in entries], np.float32)
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
        locations = sample_class_locations(seg[0], [v for v in label_values(plans) if v != 0], seed)
    properties = {
        "configuration": configuration,
        "original_geometry": geometry.to_dict(),
        "transpose": transpose,
        "crop_box": cropping.to_original_order(box, transpose),
        "shape_after_crop": shape_after_crop,
        "spacing": spacing,
        "shape": [int(n) for n in data.shape[1:]],
        "normalization": records,
        "class_locations": locations,
        "class_label": None,
    }
    return data, seg, properties
