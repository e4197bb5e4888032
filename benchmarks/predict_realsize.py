"""Benchmark: ``3dino predict`` at its defaults against MONAI's sliding window on a real-size CT with 13 organs.

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/predict_realsize.py [--repeats 1] [--train-cases 6] [--finetune-iters 300]
        [--finetune-lr 1e-3] [--coarse-side] [--skip-memory] [--monai-logits] [--body-area 0.57]
        [--work-dir DIR] [--out FILE]
    .venv/bin/python benchmarks/predict_realsize.py --quick      # about 5 minutes: checks that the script runs

Issue 15's requirement: on a CT-like case of 512 x 512 x 400 voxels whose body fills about 55-60 % of
the field in-plane, holding 13 organs, with a ``small`` adapter finetuned on such cases so that its
labels mean something, our whole ``3dino predict`` at its defaults (overlap 0.5) takes <= 0.35 x the
time of MONAI's ``sliding_window_inference`` alone with the same network at overlap 0.5 on the same
preprocessed case, the two label maps agree with Dice >= 0.99 per structure, and predict's peak
memory is <= 4 GiB.

1. **Data** (:func:`ct_slices`, laid out in mm so every case shows the same anatomy at its spacing):
   an int16 HU volume in air (-1000 HU) holding an elliptic body cylinder (``--body-area`` of the
   field in-plane, default 0.57 of its area, width/depth 1.15; a waist of +-2 % along z), a fat layer
   of about 12 mm (-100 HU) around soft tissue (40 HU), and 13 labelled organs (:data:`LABELS`), each
   a smooth deformed ellipsoid (liver, spleen, kidneys, stomach, pancreas, gallbladder, bladder,
   lungs) or a gently curving tube (aorta, inferior vena cava, spine) with its own HU and texture
   amplitude; 10 unlabelled loops of bowel (gas or fluid) in the lower abdomen; smooth texture (a 4 mm
   random field) and in-plane correlated noise of about 10 HU.
   Every case (a patient) draws its own body size, organ positions (+-8 mm), sizes (+-10 %), shapes
   and HU (+-5) from its seed. The field is 409.6 x 409.6 x 600 mm (lower thorax to pelvis): the test
   case is 512 x 512 x 400 voxels of 0.8 x 0.8 x 1.5 mm. Generated slice by slice into the int16
   volume and the uint8 label map (float32 temporaries of one slice; a process generating and writing
   the big case peaks at about 1.4 GB RSS, torch and MONAI imports included). The measured body
   fraction (area per slice, and width and depth of the middle slice) is in the JSON. At 0.57 of the
   area the body (about 0.91 of the field's width, 0.80 of its depth) with the air rule's 10 mm
   margin meets every one of the 567 windows (112^3, overlap 0.5): predict skips no window as air,
   so the time target can only come from the coarse pass (``--coarse-side``).
2. **Model**: a raw dataset (``Dataset961_PredictRealsize``, the project's layout: ``dataset.json``,
   ``imagesTr/case_NNN_0000.nii.gz``, ``labelsTr/case_NNN.nii.gz``) of ``--train-cases`` training
   cases and one validation case. They keep the whole field in-plane (512 x 512 at the test case's
   spacing: a 256 x 256 crop at 0.8 mm would cut a 380 mm body and hide the air around it) and take a
   window of ``--train-slices`` (160) slices along z, spread over the 400 slices (the first and last
   at the field's ends, the others evenly with jitter) so that every organ is seen; the validation
   case is a 112-slice window through the upper abdomen (validation runs the whole sliding window: one
   validation, at the end). Fold 0 is imported with ``3dino plan --splits-from`` (training cases / the
   validation case). Then the real commands:
   ``3dino plan -d 961 --preset small --splits-from ...`` (target spacing = the cases', patch 112^3),
   ``3dino preprocess -d 961 -c finetune``, ``3dino finetune -d 961 --backbone none --head adapter
   --iters 300 --lr 1e-3 --val-every 300 --num-workers 1 --run NAME`` (end to end, batch 2 on a CPU).
   Its run folder is the model for ``3dino predict -m``. With ``--work-dir`` a finished run there
   (``checkpoint_final.pt``) is reused instead of finetuning again (said in the JSON), a generated
   and preprocessed dataset with the same settings is reused, and a killed finetune resumes.
3. **Comparison** on one 512 x 512 x 400 test case (same generator, another seed, the plans' spacing),
   alternating ``--repeats`` times (default 1: each side once, no warm-up, at this size a few seconds of
   start-up are noise), through ``predict.side_by_side``:

   - **ours**: ``3dino predict -i <case folder> -o <fresh> -m <run>`` at its defaults (overlap 0.5,
     air skipping on, ``--precision auto``, one case read ahead, the coarse pass as the default has
     it: off), wall time of the whole command; its windows (total, skipped as air, coarse) from
     ``predict_log.jsonl``; with ``--coarse-side`` also ``3dino predict --coarse``;
   - **MONAI**, in this process: ``predict.run_monai``, i.e. ``sliding_window_inference`` with the same
     network (``load_run``), the model's window, overlap 0.5, window batch 1, Gaussian blending (sigma
     ``SIGMA_SCALE``) under the autocast precision ``--precision auto`` resolves to, on the case
     preprocessed by predict's own ``prepare_case`` (untimed). The predictor returns each window's
     softmax probabilities, which is what predict blends (``--monai-logits``: the logits, as MONAI's
     tutorials do); timed: the sliding window alone. Its labels: predict's own
     ``inference.geometry.restore_labels`` (argmax, back to the input grid; timed separately,
     not in the ratio).

   Ratio = ours / MONAI (median of the per-repeat ratios; target <= 0.35). Dice per structure
   (``predict.label_agreement``) between ours and MONAI (target >= 0.99), and of each against the
   generator's ground truth, so that a reader sees the labels mean something.
4. **Peak memory** (RSS and PSS of the whole process tree, ``common.run_measured(sample_memory=True)``)
   of one more ``3dino predict`` at its defaults on the test case (timed runs are not sampled);
   ``--skip-memory`` leaves it out. Target <= 4 GiB.

``--quick``: the same pipeline at toy size to check that the script runs (test case 128 x 128 x 96
of the same field, so 3.2 x 3.2 x 6.25 mm; 2 training cases of 64 slices; the ``tiny`` preset with
64^3 patches; 5 finetune iterations): no figure, about 5 minutes on 2 cores.

Prints a table and writes everything (machine, the exact command, settings, the data's measured body
fraction, the finetune run's commands, seconds, iterations and validation Dice, per-side times, ratio,
Dice per structure, windows, memory) to ``--out`` (default
``benchmarks/results/<UTC date>/predict_realsize.json``). The scratch folder is deleted unless
``--work-dir`` (always kept) or ``--keep``.

Cost on 2 CPU cores (fp32): a finetune iteration of the small adapter (batch 2 of 112^3, end to end)
takes about a minute and a 112^3 window about 5-10 s, so the default run is several hours (finetune
300 iterations, then about 570 windows per predict and for MONAI); reuse the run with ``--work-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    MIB,
    dated_result_path,
    format_table,
    invocation,
    median,
    openmp_like_3dino,
    write_json,
)
from predict import (
    GIB,
    coarse_windows,
    cpu_setup,
    folder_env,
    label_agreement,
    run_monai,
    run_ours,
    side_by_side,
    threedino,
)
from scipy import ndimage

from threedino_pipe.inference.geometry import restore_labels
from threedino_pipe.inference.input_cases import discover_cases
from threedino_pipe.inference.model_loading import load_run
from threedino_pipe.inference.predictor import prepare_case
from threedino_pipe.raw_data.image_io import Geometry, read_image, write_image

DATASET_ID = 961
DATASET = f"Dataset{DATASET_ID}_PredictRealsize"
FIELD_MM = (409.6, 409.6, 600.0)  # in-plane field and z extent: lower thorax to pelvis
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4, "aorta": 5,
          "inferior_vena_cava": 6, "spine": 7, "stomach": 8, "pancreas": 9, "gallbladder": 10, "bladder": 11,
          "lung_right": 12, "lung_left": 13}
NAMES = {v: k for k, v in LABELS.items()}
FULL = {"shape": (512, 512, 400), "train_slices": 160, "val_slices": 112, "train_cases": 6, "iters": 300,
        "preset": "small", "patch_size": None}
QUICK = {"shape": (128, 128, 96), "train_slices": 64, "val_slices": 64, "train_cases": 2, "iters": 5,
         "preset": "tiny", "patch_size": "64,64,64"}
TIME_TARGET = 0.35
DICE_TARGET = 0.99
MEMORY_TARGET_GIB = 4.0
BODY_ASPECT = 1.15  # body width / depth
FAT_MM = 12.0
TEXTURE_STEP_MM = 4.0
NOISE_HU = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes (see the docstring): checks that the script runs")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side, alternating")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (predict's default)")
    p.add_argument("--precision", default="auto", help="passed to predict; MONAI uses what it resolves to")
    p.add_argument("--coarse-side", action="store_true", help="also time 3dino predict --coarse")
    p.add_argument("--skip-memory", action="store_true", help="no memory-sampled predict run")
    p.add_argument("--monai-logits", action="store_true",
                   help="MONAI blends the network's logits (default: each window's softmax, as predict blends)")
    p.add_argument("--body-area", type=float, default=0.57, help="the body's share of the field's area in-plane")
    p.add_argument("--shape", default=None, help="X,Y,Z voxels of the test case (default 512,512,400)")
    p.add_argument("--train-cases", type=int, default=None, help="training cases (default 6)")
    p.add_argument("--train-slices", type=int, default=None, help="slices of each training case (default 160)")
    p.add_argument("--preset", default=None, help="plan --preset (default small)")
    p.add_argument("--patch-size", default=None, help="plan --patch-size (default: the planner's, 112^3)")
    p.add_argument("--finetune-iters", type=int, default=None, help="finetune --iters (default 300)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="finetune --lr (its own default is 1e-4)")
    p.add_argument("--finetune-batch", type=int, default=None, help="finetune --batch-size (default: plans', "
                   "capped at 2 on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seeds the generated cases (finetune --seed stays 0)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="scratch folder (kept; a finished finetune run there is reused)")
    p.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: benchmarks/results/<UTC date>/predict_realsize[_quick].json)")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    args.shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else mode["shape"]
    args.train_cases = args.train_cases or mode["train_cases"]
    args.train_slices = args.train_slices or mode["train_slices"]
    args.val_slices = mode["val_slices"]
    args.preset = args.preset or mode["preset"]
    args.patch_size = args.patch_size or mode["patch_size"]
    args.finetune_iters = args.finetune_iters or mode["iters"]
    args.out = args.out or dated_result_path("predict_realsize", args.quick)
    return args


# --------------------------------------------------------------------------- the generator


@dataclass(frozen=True)
class Organ:
    """One labelled structure in mm: a deformed ellipsoid (``radii``) or, with ``tube``, a tube of radius
    ``radii[0]`` along z between ``centre[2] -+ radii[2]`` whose axis curves by ``wiggle`` mm."""

    label: int
    hu: float
    texture: float  # HU amplitude of the smooth texture
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    tube: bool = False
    shape: tuple[float, ...] = (0.0,) * 6  # deformation coefficients (ellipsoids); phases (tubes)
    wiggle: float = 0.0


@dataclass(frozen=True)
class Anatomy:
    """One patient: body half-axes (mm), waist phase, fat thickness, organs in paint order, texture field."""

    a: float
    b: float
    waist_phase: float
    fat: float
    organs: tuple[Organ, ...]
    texture: np.ndarray  # float32 random field on a TEXTURE_STEP_MM grid over the field (std 1)


def draw_anatomy(rng: np.random.Generator, body_area: float) -> Anatomy:
    """A patient of the anatomy family: body of ``body_area`` of the field (+-3 %), organs jittered."""
    fx, fy, fz = FIELD_MM
    b = math.sqrt(body_area * fx * fy / (math.pi * BODY_ASPECT)) * rng.uniform(0.985, 1.015)
    a = BODY_ASPECT * b * rng.uniform(0.985, 1.015)

    def j(v: float, spread: float = 8.0) -> float:
        return float(v + rng.uniform(-spread, spread))

    def s(v: float) -> float:
        return float(v * rng.uniform(0.9, 1.1))

    def blob(label: int, hu: float, texture: float, centre, radii) -> Organ:
        return Organ(label, hu + float(rng.uniform(-5, 5)), texture, (j(centre[0]), j(centre[1]), j(centre[2])),
                     (s(radii[0]), s(radii[1]), s(radii[2])), shape=tuple(rng.uniform(-0.15, 0.15, 6).tolist()))

    def tube(label: int, hu: float, texture: float, x: float, y: float, z_lo: float, z_hi: float, r: float,
             wiggle: float) -> Organ:
        z_lo, z_hi = j(z_lo, 15), j(z_hi, 15)
        return Organ(label, hu + float(rng.uniform(-5, 5)), texture, (j(x, 3), j(y, 3), (z_lo + z_hi) / 2),
                     (s(r), s(r), (z_hi - z_lo) / 2), tube=True, shape=tuple(rng.uniform(0, 2 * math.pi, 2).tolist()),
                     wiggle=wiggle)

    spine_y = 0.70 * b
    bowel = tuple(  # unlabelled loops of bowel (gas or fluid) in the lower abdomen, painted first
        Organ(0, float(rng.choice([-500.0, 25.0])), 20.0,
              (float(rng.uniform(-0.6, 0.6) * a), float(rng.uniform(-0.6, 0.3) * b), float(rng.uniform(-200, 60))),
              tuple(rng.uniform(15, 30, 3).tolist()), shape=tuple(rng.uniform(-0.15, 0.15, 6).tolist()))
        for _ in range(10))
    organs = bowel + (  # paint order: later ones over earlier ones (the liver carves the right lung's base, ...)
        blob(12, -860.0, 30.0, (-0.50 * a, 0.0, 270.0), (0.36 * a, 0.62 * b, 130.0)),
        blob(13, -820.0, 30.0, (0.52 * a, 0.0, 275.0), (0.33 * a, 0.60 * b, 125.0)),
        blob(1, 95.0, 10.0, (-0.42 * a, -0.02 * b, 110.0), (0.42 * a, 0.55 * b, 85.0)),
        blob(2, 125.0, 8.0, (0.58 * a, 0.25 * b, 120.0), (28.0, 45.0, 55.0)),
        blob(8, 15.0, 15.0, (0.30 * a, -0.35 * b, 140.0), (45.0, 35.0, 55.0)),
        blob(9, 70.0, 14.0, (0.05 * a, 0.05 * b, 70.0), (65.0, 14.0, 18.0)),
        blob(3, 170.0, 12.0, (-0.36 * a, 0.38 * b, 10.0), (26.0, 32.0, 55.0)),
        blob(4, 190.0, 12.0, (0.36 * a, 0.38 * b, 25.0), (25.0, 30.0, 52.0)),
        blob(10, -15.0, 4.0, (-0.30 * a, -0.45 * b, 60.0), (16.0, 18.0, 32.0)),
        blob(11, 5.0, 4.0, (0.0, -0.25 * b, -230.0), (45.0, 38.0, 40.0)),
        tube(6, 140.0, 5.0, -25.0, spine_y - 40.0, -120.0, 200.0, 11.0, 4.0),
        tube(5, 250.0, 5.0, 20.0, spine_y - 37.0, -120.0, 320.0, 12.0, 4.0),
        tube(7, 420.0, 45.0, 0.0, spine_y, -320.0, 320.0, 19.0, 8.0),
    )
    grid = [int(math.ceil(f / TEXTURE_STEP_MM)) + 3 for f in (fx, fy, fz)]
    field = ndimage.gaussian_filter(rng.standard_normal(grid, dtype=np.float32), 1.0)
    field /= max(float(field.std()), 1e-6)
    return Anatomy(a, b, float(rng.uniform(0, 2 * math.pi)), FAT_MM * float(rng.uniform(0.8, 1.2)), organs, field)


def _organ_mask(organ: Organ, x: np.ndarray, y: np.ndarray, z: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The organ's in-plane bounding box on the slice at ``z`` mm and its mask there (None: not on this slice)."""
    cx, cy, cz = organ.centre
    rx, ry, rz = organ.radii
    dz = (z - cz) / rz
    if organ.tube:
        if abs(dz) > 1:
            return None
        cx += organ.wiggle * math.sin(z / 150.0 + organ.shape[0])
        cy += organ.wiggle * math.sin(z / 110.0 + organ.shape[1])
        r = rx * (1 + 0.05 * math.sin(z / 80.0))
        reach = r + 1
    else:
        if abs(dz) > 1.35:
            return None
        reach = 1.35 * max(rx, ry) + 1
    box_x = slice(int(np.searchsorted(x, cx - reach)), int(np.searchsorted(x, cx + reach)))
    box_y = slice(int(np.searchsorted(y, cy - reach)), int(np.searchsorted(y, cy + reach)))
    if box_x.start >= box_x.stop or box_y.start >= box_y.stop:
        return None
    xs, ys = x[box_x, None], y[None, box_y]
    if organ.tube:
        return (box_x, box_y), (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    dx, dy = (xs - cx) / rx, (ys - cy) / ry
    d = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    ux, uy, uz = dx / d, dy / d, dz / d
    c = organ.shape
    bump = (c[0] * ux * uy + c[1] * uy * uz + c[2] * ux * uz + c[3] * (ux * ux - uy * uy) + c[4] * ux ** 3
            + c[5] * uy ** 3)
    return (box_x, box_y), d <= 1 + np.clip(bump, -0.3, 0.3)


def ct_slices(anatomy: Anatomy, shape: tuple[int, int, int], spacing: tuple[float, float, float], z_start_mm: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The int16 HU volume and uint8 label map of ``anatomy`` on an ``X x Y x Z`` grid (centred in-plane on the
    field, slice 0 at ``z_start_mm``), generated slice by slice; and the body's measured share of each slice."""
    nx, ny, nz = shape
    x = ((np.arange(nx) - (nx - 1) / 2) * spacing[0]).astype(np.float32)
    y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)
    volume = np.empty(shape, np.int16)
    labels = np.zeros(shape, np.uint8)
    origin = np.array([-FIELD_MM[0] / 2, -FIELD_MM[1] / 2, -FIELD_MM[2] / 2]) - TEXTURE_STEP_MM
    tx = np.broadcast_to(((x - origin[0]) / TEXTURE_STEP_MM)[:, None], (nx, ny))
    ty = np.broadcast_to(((y - origin[1]) / TEXTURE_STEP_MM)[None, :], (nx, ny))
    shares, widths, depths = [], [], []
    for k in range(nz):
        z = z_start_mm + k * spacing[2]
        waist = 1 + 0.02 * math.sin(2 * math.pi * z / FIELD_MM[2] + anatomy.waist_phase)
        a, b = anatomy.a * waist, anatomy.b * waist
        r2 = (x[:, None] / a) ** 2 + (y[None, :] / b) ** 2
        body = r2 <= 1
        inner = (x[:, None] / (a - anatomy.fat)) ** 2 + (y[None, :] / (b - anatomy.fat)) ** 2 <= 1
        tz = np.full((nx, ny), (z - origin[2]) / TEXTURE_STEP_MM, np.float32)
        texture = ndimage.map_coordinates(anatomy.texture, [tx, ty, tz], order=1, mode="nearest")
        hu = np.where(body, -100.0 + 12.0 * texture, -1000.0).astype(np.float32)
        hu[inner] = 40.0 + 10.0 * texture[inner]
        label = labels[:, :, k]
        for organ in anatomy.organs:
            found = _organ_mask(organ, x, y, z)
            if found is None:
                continue
            box, mask = found
            mask &= inner[box]
            hu[box][mask] = organ.hu + organ.texture * texture[box][mask]
            label[box][mask] = organ.label
        noise = ndimage.gaussian_filter(rng.standard_normal((nx, ny), dtype=np.float32), 0.7)
        hu += noise * (NOISE_HU / max(float(noise.std()), 1e-6))
        volume[:, :, k] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        shares.append(float(body.mean()))
        if k == nz // 2:
            widths.append(float(body.any(1).mean()))
            depths.append(float(body.any(0).mean()))
    info = {"body_area_share_mean": float(np.mean(shares)), "body_area_share_min": float(np.min(shares)),
            "body_area_share_max": float(np.max(shares)), "body_width_share_middle_slice": widths[0],
            "body_depth_share_middle_slice": depths[0]}
    return volume, labels, info


def field_spacing(shape: tuple[int, int, int]) -> tuple[float, float, float]:
    """The spacing that lays ``shape`` voxels over the whole field (0.8 x 0.8 x 1.5 mm for 512 x 512 x 400)."""
    return tuple(round(f / n, 6) for f, n in zip(FIELD_MM, shape, strict=True))


def write_case(image_path: Path, label_path: Path, seed: int, shape: tuple[int, int, int],
               spacing: tuple[float, float, float], z_start_slice: int, field_slices: int,
               body_area: float) -> dict[str, Any]:
    """Generate one case (patient ``seed``; slices ``z_start_slice ..`` of the field's ``field_slices``) and
    write its image and label map; returns the body's measured share and the seconds it took."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    anatomy = draw_anatomy(rng, body_area)
    z_start_mm = (z_start_slice - (field_slices - 1) / 2) * spacing[2]
    volume, labels, info = ct_slices(anatomy, shape, spacing, z_start_mm, rng)
    x0, y0 = (-(shape[0] - 1) / 2 * spacing[0], -(shape[1] - 1) / 2 * spacing[1])
    geometry = Geometry(size=shape, spacing=spacing, origin=(x0, y0, z_start_mm), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(volume, geometry, image_path)
    write_image(labels, geometry, label_path)
    return {**info, "seed": seed, "shape": list(shape), "z_start_slice": z_start_slice,
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- dataset and finetune


def dataset_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the generated dataset depends on (reused from ``--work-dir`` only when these match)."""
    return {"shape": list(args.shape), "train_cases": args.train_cases, "train_slices": args.train_slices,
            "val_slices": args.val_slices, "seed": args.seed, "body_area": args.body_area, "preset": args.preset,
            "patch_size": args.patch_size}


def build_dataset(work: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path]:
    """``raw/Dataset961_PredictRealsize`` (training cases and one validation case) and fold 0's splits file."""
    folder = work / "raw" / DATASET
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    nx, ny, nz = args.shape
    spacing = field_spacing(args.shape)
    rng = np.random.default_rng([args.seed, 1])
    span = nz - args.train_slices
    stride = span / max(args.train_cases - 1, 1)
    cases, train = [], []
    for i in range(args.train_cases):  # z windows spread over the field (the first and last at its ends)
        jitter = rng.uniform(-0.25, 0.25) * stride if 0 < i < args.train_cases - 1 else 0.0
        start = int(np.clip(round(i * stride + jitter), 0, span))
        case = f"case_{i:03d}"
        cases.append({"case": case, "role": "train", **write_case(
            folder / "imagesTr" / f"{case}_0000.nii.gz", folder / "labelsTr" / f"{case}.nii.gz",
            args.seed * 1000 + i, (nx, ny, args.train_slices), spacing, start, nz, args.body_area)})
        train.append(case)
        print(f"  {case}: slices {start}..{start + args.train_slices - 1} of {nz}, {cases[-1]['seconds']:.0f} s",
              flush=True)
    # validation: the upper abdomen (liver, spleen, stomach, pancreas, kidneys, gallbladder), centred at z = +80 mm
    val_start = int(np.clip(round(80.0 / spacing[2] + (nz - 1) / 2 - args.val_slices / 2), 0, nz - args.val_slices))
    case = f"case_{args.train_cases:03d}"
    cases.append({"case": case, "role": "validation", **write_case(
        folder / "imagesTr" / f"{case}_0000.nii.gz", folder / "labelsTr" / f"{case}.nii.gz",
        args.seed * 1000 + 500, (nx, ny, args.val_slices), spacing, val_start, nz, args.body_area)})
    spec = {"name": DATASET, "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(cases),
            "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    splits = work / "splits_final.json"
    splits.write_text(json.dumps([{"train": train, "val": [case]}], indent=2) + "\n")
    return cases, splits


def run_command(args: list[str], env: dict[str, str], log: Path) -> float:
    """Run a ``3dino`` command (output to ``log``); its seconds. Stops the benchmark when it fails."""
    command = [*threedino(), *args]
    print(f"$ {' '.join(command[-len(args) - 1:])}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); its output is in {log}:\n"
                         + log.read_text()[-4000:])
    return seconds


def run_name(args: argparse.Namespace) -> str:
    """The finetune run folder's name: the settings it depends on (the data's as a short hash)."""
    data = hashlib.sha256(json.dumps(dataset_settings(args), sort_keys=True).encode()).hexdigest()[:8]
    return (f"realsize__adapter__{args.preset}__it{args.finetune_iters}__lr{args.finetune_lr:g}"
            + (f"__b{args.finetune_batch}" if args.finetune_batch else "") + f"__data{data}")


def finetuned_model(work: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The finetune run folder (reused when finished, else data -> plan -> preprocess -> finetune) and its record."""
    env = folder_env(work)
    run = work / "results" / DATASET / run_name(args)
    log = work / "commands.log"
    record: dict[str, Any] = {"run": str(run), "run_name": run.name, "commands": {}, "seconds": {}}
    if (run / "checkpoint_final.pt").is_file():
        print(f"reusing the finished finetune run {run}", flush=True)
        record["reused"] = True
    else:
        record["reused"] = False
        info_file = work / "dataset_info.json"
        settings = dataset_settings(args)
        ready = info_file.is_file() and json.loads(info_file.read_text()).get("settings") == settings
        if ready:
            print(f"reusing the generated and preprocessed dataset in {work}", flush=True)
            record["dataset_reused"] = True
        else:
            record["dataset_reused"] = False
            info_file.unlink(missing_ok=True)
            shutil.rmtree(work / "preprocessed" / DATASET, ignore_errors=True)
            start = time.perf_counter()
            print(f"generating {args.train_cases} training cases + 1 validation case", flush=True)
            cases, splits = build_dataset(work, args)
            record["seconds"]["generate"] = time.perf_counter() - start
            plan = ["plan", "-d", str(DATASET_ID), "--preset", args.preset, "--splits-from", str(splits),
                    "--no-progress"] + (["--patch-size", args.patch_size] if args.patch_size else [])
            record["seconds"]["plan"] = run_command(plan, env, log)
            preprocess = ["preprocess", "-d", str(DATASET_ID), "-c", "finetune", "--no-progress"]
            record["seconds"]["preprocess"] = run_command(preprocess, env, log)
            record["commands"].update({"plan": plan, "preprocess": preprocess})
            info_file.write_text(json.dumps({"settings": settings, "cases": cases}, indent=2) + "\n")
        finetune = ["finetune", "-d", str(DATASET_ID), "--backbone", "none", "--head", "adapter", "--pct", "100",
                    "--fold", "0", "--iters", str(args.finetune_iters), "--lr", f"{args.finetune_lr:g}",
                    "--val-every", str(args.finetune_iters), "--save-every", str(max(1, min(50, args.finetune_iters))),
                    "--num-workers", "1", "--precision", args.precision, "--run", run.name, "--no-progress"]
        finetune += ["--batch-size", str(args.finetune_batch)] if args.finetune_batch else []
        print(f"finetuning {args.finetune_iters} iterations (output in {log})", flush=True)
        record["seconds"]["finetune"] = run_command(finetune, env, log)
        record["commands"]["finetune"] = finetune
    info_file = work / "dataset_info.json"
    if info_file.is_file():
        record["dataset"] = json.loads(info_file.read_text())
    record.update(run_summary(run))
    return run, record


def run_summary(run: Path) -> dict[str, Any]:
    """Iterations, batch, lr, patch and validation Dice of a finetune run folder (model.json, validation.json)."""
    card = json.loads((run / "model.json").read_text())
    summary: dict[str, Any] = {"patch_size": card.get("patch_size"), "best_iteration": card.get("best_iteration"),
                               "best_metric": card.get("best_metric")}
    options = json.loads((run / "run.json").read_text()).get("options", {}) if (run / "run.json").is_file() else {}
    summary.update({k: options.get(k) for k in ("iters", "batch_size", "lr", "precision", "preset", "train_ids",
                                               "val_ids")})
    validation = run / "validation.json"
    if validation.is_file():
        data = json.loads(validation.read_text())
        latest = data.get("latest") or {}
        summary.update({"iterations_done": data.get("iterations_done"), "finished": data.get("finished"),
                        "final_val_dice": latest.get("mean_dice"), "final_val_dice_per_class": latest.get("per_class")})
    return summary


# --------------------------------------------------------------------------- the comparison


def test_case(work: Path, args: argparse.Namespace, spacing: tuple[float, float, float]) -> tuple[Path, Path, dict]:
    """The test case (its own folder, predict's input) and its ground truth; reused from ``--work-dir`` when the
    same settings made it."""
    case_dir, truth = work / "case", work / "realsize_truth.nii.gz"
    info_file = work / "case_info.json"
    settings = {"shape": list(args.shape), "spacing": list(spacing), "seed": args.seed, "body_area": args.body_area}
    if info_file.is_file() and truth.is_file() and json.loads(info_file.read_text()).get("settings") == settings:
        print(f"reusing the test case in {case_dir}", flush=True)
        return case_dir, truth, json.loads(info_file.read_text())["info"]
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    info = write_case(case_dir / "realsize_ct.nii.gz", truth, args.seed * 1000 + 999, args.shape, spacing, 0,
                      args.shape[2], args.body_area)
    info["process_peak_rss_before_gib"] = rss_before / GIB
    info["process_peak_rss_after_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    info_file.write_text(json.dumps({"settings": settings, "info": info}, indent=2) + "\n")
    print(f"test case {'x'.join(map(str, args.shape))} at {spacing} mm written in {info['seconds']:.0f} s; body "
          f"{info['body_area_share_mean']:.3f} of the field's area ({info['body_width_share_middle_slice']:.2f} of "
          f"its width, {info['body_depth_share_middle_slice']:.2f} of its depth)", flush=True)
    return case_dir, truth, info


def named(dice: dict[str, float]) -> dict[str, float]:
    """Dice per label value -> per structure name."""
    return {NAMES.get(int(v), f"label_{v}"): d for v, d in dice.items()}


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """``label_agreement`` with structure names, the mean Dice and the structures under the Dice target."""
    result = label_agreement(a, b)
    dice = named(result["dice_per_label"])
    return {**result, "dice_per_label": dice, "mean_dice": float(np.mean(list(dice.values()))) if dice else 1.0,
            "under_target": sorted(n for n, d in dice.items() if d < DICE_TARGET)}


def compare(work: Path, case_dir: Path, truth_path: Path, run: Path, args: argparse.Namespace,
            precision: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ours (and ``--coarse``) against MONAI, alternating; Dice between them and against the ground truth."""
    model = load_run(run)
    card = model.card
    start = time.perf_counter()
    prepared = prepare_case(discover_cases(case_dir, 1)[0], card.preprocessing())
    data = torch.from_numpy(prepared.data)[None]
    prepared.data = None
    prepare_s = time.perf_counter() - start
    patch = tuple(int(p) for p in model.patch_size)
    print(f"preprocessed by prepare_case in {prepare_s:.0f} s (untimed): {tuple(data.shape[2:])}, window {patch}, "
          f"overlap {args.overlap}, {precision}", flush=True)
    restore_s: list[float] = []

    def monai() -> tuple[float, np.ndarray]:
        keep: list[torch.Tensor] = []
        seconds = run_monai(model.network, data, patch, args.overlap, precision, softmax=not args.monai_logits,
                            keep=keep)
        begin = time.perf_counter()
        labels = restore_labels(keep.pop()[0], prepared.properties, output=card.output, values=card.output_values())
        restore_s.append(time.perf_counter() - begin)
        return seconds, labels

    extras = {"ours": ()} | ({"ours_coarse": ("--coarse",)} if args.coarse_side else {})
    sides, labels = side_by_side(work, case_dir, run, extras, args, others={"monai": monai})
    sides["monai"].update({"restore_labels_s": restore_s, "preprocess_untimed_s": prepare_s,
                           "blends": "logits" if args.monai_logits else "softmax probabilities",
                           "preprocessed_shape": list(data.shape[2:])})
    truth = read_image(truth_path)[0]
    ratios = [o / m for o, m in zip(sides["ours"]["wall_s"], sides["monai"]["wall_s"], strict=True)]
    result: dict[str, Any] = {"patch": list(patch), "overlap": args.overlap, "precision": precision, **sides,
                              "ratio_per_repeat": ratios, "ratio": median(ratios), "ratio_target": TIME_TARGET,
                              "windows": coarse_windows(sides["ours"]["windows"]) | sides["ours"]["windows"]}
    dice = {"ours_vs_monai": agreement(labels["ours"], labels["monai"]),
            "ours_vs_truth": agreement(labels["ours"], truth), "monai_vs_truth": agreement(labels["monai"], truth)}
    if args.coarse_side:
        coarse_ratios = [o / m for o, m in zip(sides["ours_coarse"]["wall_s"], sides["monai"]["wall_s"], strict=True)]
        result.update({"coarse_ratio_per_repeat": coarse_ratios, "coarse_ratio": median(coarse_ratios),
                       "coarse_windows": coarse_windows(sides["ours_coarse"]["windows"])})
        dice.update({"coarse_vs_monai": agreement(labels["ours_coarse"], labels["monai"]),
                     "coarse_vs_ours": agreement(labels["ours_coarse"], labels["ours"]),
                     "coarse_vs_truth": agreement(labels["ours_coarse"], truth)})
    return result, dice


def memory(work: Path, case_dir: Path, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS and PSS of the process tree of one more ``3dino predict`` at its defaults (memory-sampled)."""
    print("memory run: 3dino predict at its defaults, sampled", flush=True)
    m, stages = run_ours(case_dir, work / "out_memory", run, args.overlap, args.precision, sample_memory=True)
    return {"measurement": m.to_dict(), "stages_s": stages, "peak_rss_gib": m.peak_rss / GIB,
            "peak_pss_gib": m.peak_pss / GIB, "target_gib": MEMORY_TARGET_GIB}


# --------------------------------------------------------------------------- main


def tables(results: dict[str, Any]) -> str:
    """The summary table and the Dice per structure."""
    c, dice = results["comparison"], results["dice"]
    w = c["windows"]
    rows = [["ours (predict defaults) / MONAI", f"{c['ours']['median_s']:.1f} s / {c['monai']['median_s']:.1f} s",
             f"{c['ratio']:.3f} (" + ", ".join(f"{r:.3f}" for r in c["ratio_per_repeat"]) + ")",
             f"<= {TIME_TARGET:g}", "met" if c["ratio"] <= TIME_TARGET else "missed"],
            ["ours' windows", f"{w['total']} total, {w['skipped']} skipped as air"
             + (f" ({w['skip_off']})" if w.get("skip_off") else ""), f"{w['fraction_run']:.3f} run", "", ""]]
    if "coarse_ratio" in c:
        cw = c["ours_coarse"]["windows"]
        run = c["coarse_windows"]
        rows.append(["ours --coarse / MONAI", f"{c['ours_coarse']['median_s']:.1f} s / {c['monai']['median_s']:.1f} s",
                     f"{c['coarse_ratio']:.3f}; {run['fraction_with_coarse_pass']:.3f} of the windows run "
                     f"({run['full_run']} full + {run['coarse_run']} coarse)"
                     + (f" ({cw['coarse_off']})" if cw.get("coarse_off") else ""),
                     f"<= {TIME_TARGET:g}", "met" if c["coarse_ratio"] <= TIME_TARGET else "missed"])
    for key, what in (("ours_vs_monai", "Dice ours vs MONAI"), ("coarse_vs_monai", "Dice --coarse vs MONAI")):
        if key in dice:
            d = dice[key]
            rows.append([what, f"min {d['min_dice']:.4f}, mean {d['mean_dice']:.4f}"
                         + (", equal" if d["equal"] else ""), ", ".join(d["under_target"]) or "all >= target",
                         f">= {DICE_TARGET:g}", "met" if d["min_dice"] >= DICE_TARGET else "missed"])
    for key, what in (("ours_vs_truth", "Dice ours vs truth"), ("monai_vs_truth", "Dice MONAI vs truth")):
        d = dice[key]
        rows.append([what, f"min {d['min_dice']:.4f}, mean {d['mean_dice']:.4f}", "", "(information)", ""])
    if "memory" in results:
        mem = results["memory"]
        rows.append(["peak memory (predict defaults)", f"RSS {mem['peak_rss_gib']:.2f} GiB, PSS "
                     f"{mem['peak_pss_gib']:.2f} GiB", f"{mem['measurement']['wall_s']:.0f} s",
                     f"<= {MEMORY_TARGET_GIB:g} GiB", "met" if mem["peak_rss_gib"] <= MEMORY_TARGET_GIB else "missed"])
    text = format_table(["what", "measured", "ratio / detail", "target", ""], rows)
    keys = [k for k in ("ours_vs_monai", "coarse_vs_monai", "ours_vs_truth", "monai_vs_truth", "coarse_vs_truth")
            if k in dice]
    per = [[name] + [f"{dice[k]['dice_per_label'][name]:.4f}" if name in dice[k]["dice_per_label"] else "absent"
                     for k in keys] for name in LABELS if name != "background"]
    return (text + "\n\nDice per structure (absent: in neither label map)\n"
            + format_table(["structure", *keys], per))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = invocation(argv)
    precision, info = cpu_setup(args.precision)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="predict_realsize_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        run, results["finetune"] = finetuned_model(work, args)
        card = load_run(run).card
        spacing = tuple(float(s) for s in card.plans.configurations.finetune.spacing)
        case_spacing = field_spacing(args.shape)
        if any(abs(s - c) > 1e-3 for s, c in zip(spacing, case_spacing, strict=True)):
            print(f"warning: the plans' spacing {spacing} is not the cases' {case_spacing}: predict resamples",
                  flush=True)
        case_dir, truth, results["test_case"] = test_case(work, args, case_spacing)
        results["test_case"].update({"plans_spacing": list(spacing), "spacing": list(case_spacing)})
        results["comparison"], results["dice"] = compare(work, case_dir, truth, run, args, precision)
        if not args.skip_memory:
            results["memory"] = memory(work, case_dir, run, args)
    finally:
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(tables(results))
    f = results["finetune"]
    print(f"\nfinetune run {f['run_name']} ({'reused' if f['reused'] else 'trained here'}): "
          f"{f.get('iterations_done')} iterations, final validation Dice {f.get('final_val_dice')}; body "
          f"{results['test_case']['body_area_share_mean']:.3f} of the field's area")
    if "memory" in results:
        mem = results["memory"]["measurement"]
        print(f"memory run: peak {mem['peak_processes']} processes, {mem['peak_rss'] / MIB:.0f} MiB RSS")
    info["load_average_at_end"] = os.getloadavg()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"command": command, "machine": info, "settings": settings, "labels": LABELS,
                          "targets": {"time_ratio": TIME_TARGET, "dice": DICE_TARGET, "memory_gib": MEMORY_TARGET_GIB},
                          **results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    openmp_like_3dino()
    sys.exit(main())
