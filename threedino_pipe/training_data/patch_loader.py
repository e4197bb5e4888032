"""Training patches for segmentation finetuning: foreground oversampling, batchgenerators augmentation.

Reads ``<preprocessed>/<DatasetNNN_Name>/finetune/<case>.b2nd`` (float32 ``C x X x Y x Z`` in
[-1, 1]), ``<case>_seg.b2nd`` (``1 x X x Y x Z``) and ``<case>.json`` (``class_locations``). A
patch reads only its box from the blosc2 arrays, never a whole volume.

Sampling (like nnU-Net): a case is drawn uniformly; with probability ``fg_fraction`` (1/3) the
patch is centred on a voxel drawn from ``class_locations`` of a class drawn uniformly among the
classes present in the case, else its position is uniform over the positions that keep the patch
inside the volume (a volume smaller than the patch is placed at a random offset inside it).
Outside the volume the image is padded with -1 (the bottom of the normalisation range) and the
label with 0 (background); the sliding window of predict and validation pads with the same value.

Augmentation (modest, batchgenerators, on the fly in the workers), per patch:

- rotation with probability 0.2: up to +-15 degrees about the cross-slice (last) axis, and about
  the two other axes too when the finetune spacing is near-isotropic (largest / smallest <= 3;
  rotating out of plane mixes slices of very different thickness otherwise);
- scaling with probability 0.2: a factor in [0.85, 1.25] (one for all axes);
  (rotation and scaling sample a larger box around the patch so that rotated corners see real
  voxels; image linear (cheap on a CPU worker), label nearest interpolation);
- mirroring: each axis with probability 0.5;
- gamma with probability 0.3: gamma in [0.7, 1.5] on the patch's own [min, max] (range kept);
- brightness with probability 0.15: intensities multiplied by a factor in [0.85, 1.15].

Determinism and resume: batch number ``n`` is a pure function of ``(seed, n)``: its cases,
positions and augmentations come from generators seeded with ``(seed, n)``. With ``W`` workers
worker ``w`` makes batches ``w, w + W, ...`` and batchgenerators' ``MultiThreadedAugmenter`` hands
them out in order, so every ``num_workers`` (0 = in-process) gives the same stream, and
``state_dict()`` (batches consumed) resumes it exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import torch
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import BrightnessMultiplicativeTransform, GammaTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from threedino_pipe.artifacts import CaseProperties
from threedino_pipe.preprocessing.normalization import PAD_VALUE
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.training_data.batch_stream import BatchStream, IndexedBatchLoader

IMAGE_PAD = PAD_VALUE
LABEL_PAD = 0
FG_FRACTION = 1.0 / 3.0


@dataclass(frozen=True)
class Augmentation:
    """Probabilities and ranges of the training augmentation (see the module docstring)."""

    p_rotation: float = 0.2
    max_angle_deg: float = 15.0
    rotate_out_of_plane: bool = True
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.85, 1.25)
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.85, 1.15)

    @classmethod
    def for_spacing(cls, spacing: list[float] | None, **overrides: Any) -> Augmentation:
        """Out-of-plane rotations only when the spacing is near-isotropic (largest / smallest <= 3)."""
        iso = spacing is None or max(spacing) / max(min(spacing), 1e-9) <= 3.0
        return cls(rotate_out_of_plane=iso, **overrides)

    def sample_size(self, patch: tuple[int, ...]) -> tuple[int, ...]:
        """Box read around a patch that will be rotated or scaled (voxels, ``patch + even margin``)."""
        a = math.radians(self.max_angle_deg)
        out = []
        for d, p in enumerate(patch):
            others = [q for e, q in enumerate(patch) if e != d]
            if not self.rotate_out_of_plane:  # rotation about the last axis only
                others = [q for e, q in enumerate(patch) if e != d and e < 2] if d < 2 else []
            extent = self.scale[1] * (p * math.cos(a) + sum(others) * math.sin(a)) if others else self.scale[1] * p
            margin = max(0, math.ceil((extent - p) / 2))
            out.append(p + 2 * margin)
        return tuple(out)

    def options(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class SegCase:
    """A preprocessed finetune case: array paths, shape (voxels), foreground voxel lists per label; each
    channel's normalisation scheme and the spacing (mm), which validation's sliding window needs to skip air."""

    case_id: str
    image_path: Path
    seg_path: Path
    shape: tuple[int, int, int]
    class_locations: dict[int, np.ndarray]  # label -> int array [N, 3] of (x, y, z) voxels
    schemes: tuple[str, ...] = ()
    spacing: tuple[float, ...] = ()


class SegmentationCases:
    """The finetune cases of one dataset (a list of case ids); arrays opened lazily per process.

    Raises:
        UserError: a case without its array, label or metadata (names the preprocess command).
    """

    def __init__(self, config_dir: Path, case_ids: list[str], rerun: str) -> None:
        self.config_dir = Path(config_dir)
        self.cases: list[SegCase] = []
        for case_id in case_ids:
            meta_path = CaseProperties.path(self.config_dir, case_id)
            image, seg = self.config_dir / f"{case_id}.b2nd", self.config_dir / f"{case_id}_seg.b2nd"
            for path in (meta_path, image, seg):
                if not path.is_file():
                    raise UserError("a preprocessed finetune file is missing (an interrupted or older preprocess?)",
                                    file=path, fix=f"run `{rerun}` (it resumes)")
            meta = CaseProperties.read(meta_path, rerun=rerun)
            locations = {int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3)
                         for k, v in meta.class_locations.items()}
            self.cases.append(SegCase(case_id, image, seg, tuple(int(s) for s in meta.shape), locations,
                                      tuple(n.scheme for n in meta.normalization),
                                      tuple(float(s) for s in meta.spacing)))
        self._open: dict[int, dict[int, tuple[Any, Any]]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def arrays(self, index: int) -> tuple[Any, Any]:
        """The case's image and label blosc2 arrays (opened once per process, read-only)."""
        # Per process: a forked worker must not free arrays inherited from its parent (blosc2 would wait on
        # the parent's decompression threads, which do not exist in the child), so they stay referenced.
        mine = self._open.setdefault(os.getpid(), {})
        if index not in mine:
            case = self.cases[index]
            mine[index] = (blosc2.open(str(case.image_path), mode="r"), blosc2.open(str(case.seg_path), mode="r"))
        return mine[index]

    def read_box(self, index: int, lower: tuple[int, ...], size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[C, *size]`` float32 and label ``[1, *size]`` int16 of the box starting at voxel ``lower``
        (may lie partly outside the volume: padded with -1 / 0)."""
        image, seg = self.arrays(index)
        shape = self.cases[index].shape
        src = tuple(slice(max(lo, 0), min(lo + n, s)) for lo, n, s in zip(lower, size, shape, strict=True))
        dst = tuple(slice(sl.start - lo, sl.stop - lo) for sl, lo in zip(src, lower, strict=True))
        out_img = np.full((image.shape[0], *size), IMAGE_PAD, dtype=np.float32)
        out_seg = np.full((1, *size), LABEL_PAD, dtype=np.int16)
        if all(sl.stop > sl.start for sl in src):
            out_img[(slice(None), *dst)] = image[(slice(None), *src)]
            out_seg[(slice(None), *dst)] = seg[(slice(None), *src)]
        return out_img, out_seg


def patch_lower_corner(shape: tuple[int, ...], patch: tuple[int, ...], rng: np.random.Generator,
                       center: np.ndarray | None = None) -> tuple[int, ...]:
    """Lower voxel of a patch: centred on ``center`` (clipped) or uniform; in [min(0, s-p), max(0, s-p)]."""
    out = []
    for d, (s, p) in enumerate(zip(shape, patch, strict=True)):
        lo, hi = min(0, s - p), max(0, s - p)
        if center is None:
            out.append(int(rng.integers(lo, hi + 1)))
        else:
            out.append(int(np.clip(int(center[d]) - p // 2, lo, hi)))
    return tuple(out)


def sample_patch_position(case: SegCase, patch: tuple[int, ...], rng: np.random.Generator,
                          fg_fraction: float = FG_FRACTION) -> tuple[tuple[int, ...], int | None]:
    """Lower corner of a patch in ``case`` and the class it was centred on (None: random position)."""
    if rng.random() < fg_fraction:
        present = sorted(k for k, v in case.class_locations.items() if len(v))
        if present:
            label = present[int(rng.integers(len(present)))]
            voxels = case.class_locations[label]
            return patch_lower_corner(case.shape, patch, rng, voxels[int(rng.integers(len(voxels)))]), label
    return patch_lower_corner(case.shape, patch, rng), None


def _batch_seed(seed: int, index: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index), int(rank), 7]).generate_state(1)[0])


def make_batch(cases: SegmentationCases, patch: tuple[int, ...], aug: Augmentation | None, seed: int, index: int,
               batch_size: int, rank: int = 0, world_size: int = 1,
               fg_fraction: float = FG_FRACTION) -> dict[str, Any]:
    """Batch number ``index`` of the stream ``seed``: this rank's ``batch_size`` patches.

    Returns ``{"data": float32 [B, C, *patch], "seg": int16 [B, 1, *patch], "case_ids", "fg_labels",
    "batch_index"}``. The global batch (``batch_size * world_size`` patches) is drawn from
    ``default_rng([seed, index])``; rank r takes rows ``r*B .. (r+1)*B - 1``.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    total = batch_size * world_size
    picks = rng.integers(len(cases), size=total)
    rows = range(rank * batch_size, (rank + 1) * batch_size)
    np.random.seed(_batch_seed(seed, index, rank))  # batchgenerators draws from numpy's global generator
    data, seg, ids, fg = [], [], [], []
    for j in rows:
        sample_rng = np.random.default_rng([int(seed), int(index), j])
        i = int(picks[j])
        lower, label = sample_patch_position(cases.cases[i], patch, sample_rng, fg_fraction)
        rotate = aug is not None and sample_rng.random() < aug.p_rotation
        scale = aug is not None and sample_rng.random() < aug.p_scale
        if rotate or scale:
            size = aug.sample_size(patch)
            box = tuple(lo - (n - p) // 2 for lo, n, p in zip(lower, size, patch, strict=True))
            img, lab = cases.read_box(i, box, size)
            img, lab = _spatial(img, lab, patch, aug, rotate, scale)
        else:
            img, lab = cases.read_box(i, lower, patch)
        data.append(img)
        seg.append(lab)
        ids.append(cases.cases[i].case_id)
        fg.append(label)
    batch = {"data": np.stack(data), "seg": np.stack(seg)}
    if aug is not None:
        batch = _intensity_and_mirror(aug)(**batch)
    return {"data": np.ascontiguousarray(batch["data"], dtype=np.float32),
            "seg": np.ascontiguousarray(batch["seg"]).astype(np.int16), "case_ids": ids, "fg_labels": fg,
            "batch_index": int(index)}


def _spatial(img: np.ndarray, lab: np.ndarray, patch: tuple[int, ...], aug: Augmentation, rotate: bool,
             scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rotate and/or scale one sample about the box centre and cut the patch (batchgenerators)."""
    a = math.radians(aug.max_angle_deg)
    in_plane = (-a, a)
    off = (-a, a) if aug.rotate_out_of_plane else (0.0, 0.0)
    # batchgenerators' angle_x/y/z rotate about array axes 0/1/2; the cross-slice axis is the last
    transform = SpatialTransform(patch, patch_center_dist_from_border=None, do_elastic_deform=False,
                                 do_rotation=rotate, angle_x=off, angle_y=off, angle_z=in_plane,
                                 do_scale=scale, scale=aug.scale, border_mode_data="constant",
                                 border_cval_data=IMAGE_PAD, order_data=1, border_mode_seg="constant",
                                 border_cval_seg=LABEL_PAD, order_seg=0, random_crop=False,
                                 p_rot_per_sample=1.0, p_scale_per_sample=1.0)
    out = transform(data=img[None], seg=lab[None].astype(np.float32))
    return out["data"][0], np.rint(out["seg"][0]).astype(np.int16)


def _intensity_and_mirror(aug: Augmentation) -> Compose:
    return Compose([
        MirrorTransform(axes=aug.mirror_axes),
        GammaTransform(aug.gamma, invert_image=False, per_channel=True, retain_stats=False,
                       p_per_sample=aug.p_gamma),
        BrightnessMultiplicativeTransform(aug.brightness, per_channel=True, p_per_sample=aug.p_brightness),
    ])


class _PatchDataLoader(IndexedBatchLoader):
    """batchgenerators loader: in worker ``w`` of ``W`` it makes batches ``start + w + k*W``."""

    def __init__(self, cases: SegmentationCases, patch: tuple[int, ...], aug: Augmentation | None, batch_size: int,
                 seed: int, num_workers: int, start: int, rank: int, world_size: int) -> None:
        super().__init__(cases, batch_size, seed, num_workers, start, rank, world_size)
        self.patch, self.aug = patch, aug

    def make(self, index: int) -> dict[str, Any]:
        return make_batch(self._data, self.patch, self.aug, self.seed, index, self.batch_size, self.rank,
                          self.world_size)


class PatchLoader(BatchStream):
    """Endless iterator of training batches ``{"data": Tensor [B, C, *patch], "seg": Tensor [B, 1, *patch]
    (int64), "case_ids", "batch_index"}``; see the module docstring.

    Args:
        cases: the training cases.
        patch: patch size in voxels (preprocessed-array order; non-cubic is fine).
        batch_size: patches per process and iteration.
        num_workers: 0 = in-process; W > 0 = W worker processes (MultiThreadedAugmenter).
        seed: the stream's seed.
        augmentation: None turns augmentation off.
    """

    size_key = "num_cases"
    stream_name = "patch stream"
    resume_fix = "resume with the same options, or pass --restart"

    def __init__(self, cases: SegmentationCases, patch: tuple[int, ...], batch_size: int, num_workers: int,
                 seed: int, augmentation: Augmentation | None = Augmentation(), *, rank: int = 0,
                 world_size: int = 1, num_cached_per_worker: int = 2) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        super().__init__(cases, batch_size, num_workers, seed, num_cached_per_worker=num_cached_per_worker,
                         rank=rank, world_size=world_size)
        self.cases, self.patch, self.aug = cases, tuple(int(p) for p in patch), augmentation

    def _loader(self, start: int) -> _PatchDataLoader:
        return _PatchDataLoader(self.cases, self.patch, self.aug, self.batch_size, self.seed, self.num_workers,
                                start, self.rank, self.world_size)

    def _convert(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"data": torch.from_numpy(batch["data"]), "seg": torch.from_numpy(batch["seg"]).long(),
                "case_ids": list(batch["case_ids"]), "batch_index": batch["batch_index"]}
