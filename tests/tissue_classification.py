"""A small real-scan classification dataset: crops of the MNI152 brain, "grey" vs "white" matter dominated.

Each case is a 40^3-voxel crop (1.3-1.6 mm spacing, so a 52-64 mm cube, rotated up to 15 degrees
about z) of nilearn's MNI152 T1 template (:func:`threedino_pipe.demo.examples.mni_images`),
centred on a random tissue voxel, with a random intensity scale and noise like ``mni_case``.
Class ``white`` when white matter outweighs grey matter in the crop by at least 5 % of the tissue,
``grey`` when grey matter outweighs white matter by at least 15 %; crops with less than 70 %
tissue are rejected, so neither class is told apart by how much background it shows. Classes
alternate, so the dataset is balanced. The grey/white rule comes from the template's tissue
probability maps, not from the intensities the model sees.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from threedino_pipe.demo.examples import _rotation_z, mni_images

CLASS_NAMES = ["grey", "white"]
SIZE = 40
MIN_TISSUE = 0.5
WHITE_MIN = 0.1    # (white - grey) / tissue of a "white" crop, at least
GREY_MAX = -0.25   # ... of a "grey" crop, at most


def _crop(t1: sitk.Image, label: sitk.Image, tissue_voxels: np.ndarray, rng: np.random.Generator
          ) -> tuple[sitk.Image, np.ndarray]:
    point = tissue_voxels[rng.integers(len(tissue_voxels))][::-1]
    centre = np.asarray(t1.TransformIndexToPhysicalPoint([int(v) for v in point]))
    spacing = rng.uniform(1.0, 1.2, 3)
    direction = np.asarray(t1.GetDirection()).reshape(3, 3) @ _rotation_z(rng.uniform(-15, 15))
    ref = sitk.Image([SIZE] * 3, sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(direction.flatten().tolist())
    ref.SetOrigin((centre - direction @ ((SIZE - 1) / 2 * spacing)).tolist())
    image = sitk.Resample(t1, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    seg = sitk.GetArrayFromImage(sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                               sitk.sitkUInt8))
    return image, seg


def _class_of(seg: np.ndarray) -> int | None:
    grey, white = float((seg == 1).mean()), float((seg == 2).mean())
    tissue = grey + white
    if tissue < MIN_TISSUE:
        return None
    balance = (white - grey) / tissue
    return 1 if balance >= WHITE_MIN else 0 if balance <= GREY_MAX else None


def tissue_cases(num_cases: int, seed: int = 0) -> list[tuple[sitk.Image, int]]:
    """``num_cases`` (image, class) pairs, classes alternating grey, white, grey, ..."""
    t1, label = mni_images()
    tissue_voxels = np.argwhere(sitk.GetArrayFromImage(label) > 0)
    rng = np.random.default_rng(seed)
    cases: list[tuple[sitk.Image, int]] = []
    while len(cases) < num_cases:
        image, seg = _crop(t1, label, tissue_voxels, rng)
        if _class_of(seg) != len(cases) % 2:
            continue
        arr = sitk.GetArrayFromImage(image) / 255.0
        arr = arr * rng.uniform(600, 1400) + rng.uniform(-50, 50) + rng.normal(0, 8, arr.shape)
        out = sitk.GetImageFromArray(arr.astype(np.float32))
        out.CopyInformation(image)
        cases.append((out, len(cases) % 2))
    return cases


def build_tissue_dataset(raw_root: Path, dataset_id: int = 995, num_cases: int = 19, seed: int = 0) -> Path:
    """Write the classification raw dataset ``Dataset{id}_MNITissueContent`` (imagesTr/, labelsTr.csv)."""
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_MNITissueContent"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (image, cls) in enumerate(tissue_cases(num_cases, seed)):
        case = f"crop_{index:03d}"
        sitk.WriteImage(image, str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        rows.append((case, CLASS_NAMES[cls]))
    with (folder / "labelsTr.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("case_id", "label"), *rows])
    (folder / "dataset.json").write_text(json.dumps({
        "name": folder.name, "task": "classification", "channel_names": {"0": "T1"}, "class_names": CLASS_NAMES,
        "numTraining": num_cases, "file_ending": ".nii.gz"}, indent=2) + "\n")
    return folder
