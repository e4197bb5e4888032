"""From a fingerprint to ``plans.json``: every decision with its one-line reason (docs/plan.md).

Deterministic: the same fingerprint, options and memory target give the same plans on any
machine. Per-axis values inside configurations are in the order of the preprocessed arrays,
i.e. after ``transpose``; the fingerprint and the ``--target-spacing``/``--patch-size`` options
are in the raw voxel index order (i, j, k).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from threedino_pipe.artifacts import (
    DatasetJson,
    FinetuneConfiguration,
    Fingerprint,
    Normalization,
    Plans,
    PretrainConfiguration,
)
from threedino_pipe.artifacts.plans import Configurations
from threedino_pipe.planning import memory

AXES = "ijk"
ANISOTROPY_RULE = 3.0           # nnU-Net: above this max/min spacing ratio the low-res axis takes a lower percentile
LOWRES_PERCENTILE = 10.0
FINETUNE_PATCH = 112
PATCH_MULTIPLE = memory.PATCH
MIN_PRETRAIN_BATCH = 16         # the preset rule asks at least this pretrain_highres batch ...
MIN_FINETUNE_BATCH = 2          # ... and at least this finetune batch
FINETUNE_BATCH_CAP = {"segmentation": 8, "classification": 32}   # the paper's batch sizes


@dataclass(frozen=True)
class CropRecipe:
    """A pretraining configuration's crops (voxels), the smallest axis kept and the batch cap."""

    global_crop: int
    local_crop: int
    num_local_crops: int
    min_axis: int
    cap: int


HIGHRES_CROPS = CropRecipe(global_crop=112, local_crop=64, num_local_crops=8, min_axis=48, cap=64)
PRETRAIN = {"pretrain": CropRecipe(global_crop=96, local_crop=48, num_local_crops=8, min_axis=24, cap=128),
            "pretrain_highres": HIGHRES_CROPS}
NORMS = ("dataset", "volume")


@dataclass(frozen=True)
class PlanOptions:
    """The user's overrides (None = let the planner decide).

    Attributes:
        preset: ViT preset name (tiny/small/base/large).
        norm: finetune normalisation, "dataset" or "volume".
        target_spacing: finetune spacing in mm, raw index order (i, j, k).
        patch_size: finetune patch in voxels, raw index order (i, j, k), multiples of 16.
        batch_size: finetune batch size.
        allow_nan: whether NaN/Inf voxels were accepted (recorded only).
        highres_min_axis: pretrain_highres's min_axis in voxels (None: the method's 48).
        test_fraction, splits_from: the split options (recorded only; planning/split_plan.py decides).
    """

    preset: str | None = None
    norm: str | None = None
    target_spacing: tuple[float, float, float] | None = None
    patch_size: tuple[int, int, int] | None = None
    batch_size: int | None = None
    allow_nan: bool = False
    highres_min_axis: int | None = None
    test_fraction: float | None = None
    splits_from: str | None = None


def cases_passing(fingerprint: Fingerprint, min_axis: int) -> int:
    """Cases whose smallest axis after crop-to-nonzero is above ``min_axis`` voxels (the pretraining loaders' rule)."""
    return sum(min(c.shape_after_crop) > min_axis for c in fingerprint.cases.values())


def largest_smallest_axis(fingerprint: Fingerprint) -> int:
    """The largest over cases of the smallest axis after crop-to-nonzero (voxels): a min_axis below it keeps a case."""
    return max(min(c.shape_after_crop) for c in fingerprint.cases.values())


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def transpose_for(axis: int) -> list[int]:
    """``np.transpose`` axes that move ``axis`` last and keep the other two in order."""
    return [a for a in range(3) if a != axis] + [axis]


def target_spacing(fingerprint: Fingerprint) -> tuple[list[float], str]:
    """nnU-Net's median rule, raw order: the median spacing per axis; when the median spacings'
    largest/smallest ratio exceeds 3, the low-resolution axis takes the 10th percentile of its
    spacings instead (not below the other axes' largest median spacing)."""
    spacings = np.array([case.spacing for case in fingerprint.cases.values()])
    median = [float(v) for v in fingerprint.median_spacing]
    ratio = max(median) / min(median)
    if ratio <= ANISOTROPY_RULE:
        return median, f"median spacing {_fmt(median)} mm (largest/smallest {ratio:.2f} <= {ANISOTROPY_RULE:g})"
    axis = int(np.argmax(median))
    others = max(v for a, v in enumerate(median) if a != axis)
    lowres = max(float(np.percentile(spacings[:, axis], LOWRES_PERCENTILE)), others)
    spacing = [lowres if a == axis else v for a, v in enumerate(median)]
    return spacing, (f"median spacing {_fmt(median)} mm, but largest/smallest {ratio:.2f} > {ANISOTROPY_RULE:g}: "
                     f"low-resolution axis {AXES[axis]} takes its {LOWRES_PERCENTILE:g}th-percentile spacing "
                     f"{lowres:.3g} mm (nnU-Net's anisotropy rule)")


def resampled_median_shape(fingerprint: Fingerprint, spacing: list[float]) -> list[float]:
    """Median over cases of the cropped shape after resampling to ``spacing`` (voxels, raw order)."""
    shapes = [np.array(c.shape_after_crop) * np.array(c.spacing) / np.array(spacing)
              for c in fingerprint.cases.values()]
    return [float(v) for v in np.median(np.array(shapes), axis=0)]


def patch_size(median_shape: list[float]) -> list[int]:
    """112 per axis, clipped to the median shape and rounded down to a multiple of 16 (at least 16)."""
    return [max(PATCH_MULTIPLE, int(min(FINETUNE_PATCH, s)) // PATCH_MULTIPLE * PATCH_MULTIPLE) for s in median_shape]


def normalization(fingerprint: Fingerprint, norm: str | None) -> tuple[list[Normalization], str]:
    """Finetune normalisation per channel: CT -> dataset percentiles, others -> per-volume percentiles."""
    entries, reasons = [], []
    for index, channel in sorted(fingerprint.channels.items(), key=lambda kv: int(kv[0])):
        modality, stats = channel.modality_guess, channel.foreground
        scheme = norm or ("dataset" if modality == "CT" else "volume")
        why = "set by --norm" if norm else (f"{modality} ({channel.modality_reason})")
        if scheme == "dataset" and (stats is None or stats.p0_5 is None):
            scheme, why = "volume", why + "; no foreground voxels for dataset percentiles"
        if scheme == "dataset":
            entries.append(Normalization(scheme="dataset_percentile", lower=stats.p0_5, upper=stats.p99_5,
                                         lower_pct=0.5, upper_pct=99.5, range=[-1, 1], clip=True))
            reasons.append(f"channel {index} '{channel.name}': {why} -> dataset foreground 0.5/99.5 "
                           f"percentiles [{stats.p0_5:g}, {stats.p99_5:g}] -> [-1, 1]")
        else:
            entries.append(Normalization(scheme="volume_percentile", lower_pct=0.5, upper_pct=99.5, range=[-1, 1],
                                         clip=True))
            reasons.append(f"channel {index} '{channel.name}': {why} -> per-volume 0.5/99.5 percentiles "
                           "-> [-1, 1]")
    return entries, "; ".join(reasons)


def _batch(estimate: memory.Estimate, memory_gb: float, cap: int) -> tuple[int, str]:
    usable = f"{memory.usable_bytes(memory_gb) / memory.GIB:.1f} GB usable of {memory_gb:g} GB"
    fitted = memory.fit_batch(estimate, memory_gb, cap)
    if fitted == 0:
        return 1, (f"does not fit the {usable} by the memory model even at batch 1 ({estimate.describe(1)}); "
                   "use a smaller --preset or a larger --memory-gb")
    capped = ", the cap" if fitted == cap else ""
    return fitted, f"largest batch <= {cap} within the {usable}{capped}: {estimate.describe(fitted)}"


def _choose_preset(memory_gb: float, finetune_estimate, task: str) -> tuple[str, str]:
    crops = HIGHRES_CROPS
    for name in reversed(list(memory.PRESETS)):
        preset = memory.PRESETS[name]
        high = memory.fit_batch(memory.pretrain_estimate(preset, crops.global_crop, crops.local_crop),
                                memory_gb, crops.cap)
        tune = MIN_FINETUNE_BATCH if finetune_estimate is None else memory.fit_batch(
            finetune_estimate(preset), memory_gb, FINETUNE_BATCH_CAP[task])
        if high >= MIN_PRETRAIN_BATCH and tune >= MIN_FINETUNE_BATCH:
            return name, (f"largest preset with a pretrain_highres batch >= {MIN_PRETRAIN_BATCH} (here {high}) "
                          f"and a finetune batch >= {MIN_FINETUNE_BATCH} within {memory_gb:g} GB")
    return "tiny", f"no preset reaches a pretrain_highres batch of {MIN_PRETRAIN_BATCH} within {memory_gb:g} GB"


def _pretrain_config(name: str, fingerprint: Fingerprint, preset: str, preset_reason: str, memory_gb: float,
                     num_channels: int, min_axis: int | None = None) -> PretrainConfiguration:
    crops = PRETRAIN[name]
    estimate = memory.pretrain_estimate(memory.PRESETS[preset], crops.global_crop, crops.local_crop,
                                        crops.num_local_crops)
    batch, batch_reason = _batch(estimate, memory_gb, crops.cap)
    if min_axis is None:
        min_axis, axis_rule = crops.min_axis, "(docs/method.md, Data)"
    else:
        axis_rule = f"(set by --highres-min-axis; the method's {crops.min_axis}, docs/method.md, Data)"
    crops = replace(crops, min_axis=min_axis)
    kept = cases_passing(fingerprint, crops.min_axis)
    return PretrainConfiguration(
        resample=False, spacing=None,
        normalization=[Normalization(scheme="volume_percentile", lower_pct=0.05, upper_pct=99.95, range=[-1, 1],
                                     clip=True) for _ in range(num_channels)],
        crop="foreground_after_normalization",
        global_crop=crops.global_crop, local_crop=crops.local_crop,
        num_local_crops=crops.num_local_crops, min_axis=crops.min_axis,
        preset=preset, batch_size=batch,
        reasons={
            "spacing": "native spacing: pretraining crops are resized to cubes anyway (docs/method.md, Data)",
            "normalization": "per volume, 0.05/99.95 percentiles of all voxels -> [-1, 1], clipped; NaN -> volume "
                             "mean (docs/method.md, Data)",
            "crop": "normalise the whole volume first, then crop to voxels > -1 (docs/method.md, Data: order matters)",
            "global_crop": f"{crops.global_crop}^3 global / {crops.local_crop}^3 local crops, "
                           f"{crops.num_local_crops} local per volume (docs/method.md, Data)",
            "min_axis": f"volumes with an axis of <= {crops.min_axis} voxels after cropping are skipped "
                        f"{axis_rule}; {kept} of {len(fingerprint.cases)} cases pass (shape after "
                        "crop-to-nonzero)",
            "preset": preset_reason,
            "batch_size": batch_reason,
        },
    )


def _finetune_config(fingerprint: Fingerprint, spec: DatasetJson, options: PlanOptions, transpose: list[int],
                     preset: str, preset_reason: str, memory_gb: float) -> FinetuneConfiguration:
    def t(values):
        return [values[a] for a in transpose]

    if options.target_spacing is not None:
        spacing, spacing_reason = [float(v) for v in options.target_spacing], "set by --target-spacing"
    else:
        spacing, spacing_reason = target_spacing(fingerprint)
    median_shape = resampled_median_shape(fingerprint, spacing)
    if options.patch_size is not None:
        patch, patch_reason = [int(v) for v in options.patch_size], "set by --patch-size"
    else:
        patch = patch_size(median_shape)
        patch_reason = (f"{FINETUNE_PATCH}^3 clipped to the median resampled shape {_fmt(median_shape)} (i,j,k) and "
                        f"rounded down to a multiple of {PATCH_MULTIPLE}")
    norm, norm_reason = normalization(fingerprint, options.norm)
    ratio = max(spacing) / min(spacing)
    if ratio > ANISOTROPY_RULE:
        interpolation, interp_reason = "linear", (f"target spacing largest/smallest {ratio:.2f} > "
                                                  f"{ANISOTROPY_RULE:g}: linear, no B-spline ringing across thick "
                                                  "slices")
    else:
        interpolation, interp_reason = "bspline3", f"target spacing largest/smallest {ratio:.2f} <= " \
                                                   f"{ANISOTROPY_RULE:g}: 3rd-order B-spline"
    estimate = memory.finetune_estimate(memory.PRESETS[preset], patch, spec.num_channels, spec.task)
    if options.batch_size is not None:
        batch, batch_reason = options.batch_size, "set by --batch-size"
    else:
        batch, batch_reason = _batch(estimate, memory_gb, FINETUNE_BATCH_CAP[spec.task])
    segmentation = spec.task == "segmentation"
    return FinetuneConfiguration(
        resample=True, spacing=t(spacing),
        normalization=norm,
        crop="nonzero",
        image_interpolation=interpolation,
        label_interpolation="linear_per_class" if segmentation else None,
        patch_size=t(patch), batch_size=batch, preset=preset,
        median_shape=t([int(round(v)) for v in median_shape]),
        reasons={
            "spacing": spacing_reason,
            "normalization": norm_reason,
            "crop": "crop to the bounding box of nonzero voxels of any channel",
            "image_interpolation": interp_reason,
            "label_interpolation": ("one-hot, linear per class, argmax: creates no new label values" if segmentation
                                    else f"{spec.task}: no label images"),
            "patch_size": patch_reason,
            "preset": preset_reason,
            "batch_size": batch_reason,
        },
    )


def make_plans(fingerprint: Fingerprint, spec: DatasetJson, options: PlanOptions, memory_gb: float = 8.0) -> Plans:
    """The plans (docs/schemas.md) for a fingerprint, the user's overrides and a GPU memory target in GB
    (2**30 bytes)."""
    axis = int(fingerprint.cross_slice_axis)
    transpose = transpose_for(axis)
    median = fingerprint.median_spacing
    if not fingerprint.anisotropic:
        transpose_reason = (f"median spacing {_fmt(median)} mm is isotropic (largest/smallest <= 1.5): the last "
                            "axis plays the cross-slice role, no transpose")
    elif transpose == [0, 1, 2]:
        transpose_reason = f"median spacing {_fmt(median)} mm: cross-slice axis k is already last"
    else:
        transpose_reason = (f"median spacing {_fmt(median)} mm: cross-slice axis {AXES[axis]} (spacing most unlike "
                            f"the in-plane pair) moved last, as the backbone expects")
    finetune = spec.task != "unlabeled"
    if options.preset is not None:
        preset, preset_reason = options.preset, "set by --preset"
    else:
        if finetune:
            spacing = list(options.target_spacing) if options.target_spacing else target_spacing(fingerprint)[0]
            patch = list(options.patch_size) if options.patch_size else \
                patch_size(resampled_median_shape(fingerprint, spacing))

            def estimate(p):
                return memory.finetune_estimate(p, patch, spec.num_channels, spec.task)
        else:
            estimate = None
        preset, preset_reason = _choose_preset(memory_gb, estimate, spec.task)
    configurations = {name: _pretrain_config(name, fingerprint, preset, preset_reason, memory_gb, spec.num_channels,
                                             options.highres_min_axis if name == "pretrain_highres" else None)
                      for name in PRETRAIN}
    if finetune:
        configurations["finetune"] = _finetune_config(fingerprint, spec, options, transpose, preset, preset_reason,
                                                      memory_gb)
    decisions = {"transpose": transpose_reason, "preset": preset_reason}
    for name, config in configurations.items():
        for field, reason in config.reasons.items():
            if field != "preset":
                decisions[f"{name}.{field}"] = reason
    recorded = asdict(options)
    recorded = {k: (list(v) if isinstance(v, tuple) else v) for k, v in recorded.items()}
    recorded["memory_gb"] = memory_gb
    return Plans(dataset=fingerprint.dataset, task=spec.task,
                 channel_names={str(k): v for k, v in spec.channel_names.items()},
                 labels=spec.labels, regions_class_order=spec.regions_class_order, class_names=spec.class_names,
                 memory_target_gb=memory_gb, options=recorded, transpose=transpose, decisions=decisions,
                 configurations=Configurations(**configurations), series_rules=spec.series_rules)
