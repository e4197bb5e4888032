"""Example raw datasets built from real and generated scans (for the demo and the tests).

- :func:`build_mni_dataset`: real anatomy from nilearn's bundled MNI152 T1 template and its grey/
  white matter probability maps (installed with nilearn from the package index, never
  downloaded at run time). Each case is a different resampling of the template: spacing,
  oblique rotation, crop, flips and intensity vary, so cases are distinct, but they all come
  from one brain: a smoke test, not evidence.
- :func:`build_synthetic_dataset`: generated ellipsoids on anisotropic (e.g. 0.8 x 0.8 x 3 mm)
  grids with an oblique direction matrix.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from threedino_pipe.artifacts import DatasetJson
from threedino_pipe.runtime.errors import UserError

MNI_LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}


def _nilearn_data_dir() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise UserError("the package nilearn is not installed (its bundled MNI152 template is the example scan)",
                        fix="pip install nilearn")
    return Path(spec.origin).parent / "datasets" / "data"


def mni_images() -> tuple[sitk.Image, sitk.Image]:
    """The MNI152 T1 (float32) and a tissue label image (0 background, 1 grey, 2 white matter)."""
    data = _nilearn_data_dir()
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    t1 = sitk.Cast(sitk.ReadImage(str(data / name.format("t1"))), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(data / name.format("gm")))).astype(np.float32)
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(data / name.format("wm")))).astype(np.float32)
    label = np.zeros(gm.shape, np.uint8)
    tissue = (gm + wm) > 0.5 * 255
    label[tissue & (gm >= wm)] = 1
    label[tissue & (wm > gm)] = 2
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(t1)
    return t1, label_image


def _rotation_z(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _write_dataset_json(folder: Path, channel_names: dict, labels: dict | None, num_training: int,
                        extra: dict | None = None) -> None:
    spec = {"name": folder.name, "channel_names": channel_names, "numTraining": num_training,
            "file_ending": ".nii.gz"}
    if labels is not None:
        spec["labels"] = labels
    spec.update(extra or {})
    DatasetJson.from_data(spec, folder / DatasetJson.FILE).write(folder / DatasetJson.FILE)


def mni_case(t1: sitk.Image, label: sitk.Image, rng: np.random.Generator,
             max_size: int = 64, spacing_scale: float = 1.0) -> tuple[sitk.Image, sitk.Image]:
    """One distinct case: resampled on a random grid (spacing ~2.6-3.6 mm times ``spacing_scale``, rotation,
    crop, flip, intensity)."""
    spacing = rng.uniform(2.6, 3.6, size=3)
    spacing[2] = rng.uniform(3.0, 4.0)
    spacing = spacing * spacing_scale
    rotation = _rotation_z(rng.uniform(-12, 12))
    flips = np.where(rng.random(3) < 0.25, -1.0, 1.0)
    direction = np.asarray(t1.GetDirection()).reshape(3, 3) @ rotation @ np.diag(flips)
    extent_mm = np.array(t1.GetSize()) * np.array(t1.GetSpacing()) * rng.uniform(0.8, 0.95, size=3)
    size = np.minimum(np.round(extent_mm / spacing).astype(int), max_size)
    center = np.asarray(t1.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in t1.GetSize()]))
    center = center + rng.uniform(-6, 6, size=3)
    origin = center - direction @ ((size - 1) / 2 * spacing)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(direction.flatten().tolist())
    ref.SetOrigin(origin.tolist())
    image = sitk.Resample(t1, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    seg = sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    arr = sitk.GetArrayFromImage(image) / 255.0
    arr = np.clip(arr, 0, None) ** rng.uniform(0.8, 1.25)
    arr = arr * rng.uniform(600, 1400) + rng.uniform(-50, 50) + rng.normal(0, 8, arr.shape)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(image)
    return out, seg


def build_mni_dataset(raw_root: str | Path, dataset_id: int = 990, num_cases: int = 8, *, seed: int = 0,
                      max_size: int = 64, num_test: int = 0, name: str = "MNITissue",
                      spacing_scale: float = 1.0) -> Path:
    """Write a segmentation dataset (grey/white matter) of distinct MNI152 resamplings.

    Args:
        raw_root: the raw folder; the dataset goes to ``raw_root/Dataset{id}_{name}``.
        num_cases: training cases (``imagesTr`` + ``labelsTr``).
        seed: fixes every random choice.
        max_size: largest voxel count per axis.
        spacing_scale: multiplies the drawn spacings (0.375: 1.0-1.5 mm, at least 96 voxels per axis).
        num_test: extra cases written to ``imagesTs`` (with their labels in ``labelsTs``).

    Returns:
        The dataset folder.
    """
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    t1, label = mni_images()
    rng = np.random.default_rng(seed)
    for index in range(num_cases + num_test):
        image, seg = mni_case(t1, label, rng, max_size, spacing_scale)
        split = "Tr" if index < num_cases else "Ts"
        case = f"mni_{index:03d}"
        sitk.WriteImage(image, str(folder / f"images{split}" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(seg, str(folder / f"labels{split}" / f"{case}.nii.gz"))
    _write_dataset_json(folder, {"0": "T1"}, MNI_LABELS, num_cases)
    return folder


def ellipsoid_case(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator,
                   num_channels: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """Generated ``X x Y x Z`` volumes: a body ellipsoid (label 1) holding a lesion (label 2), in mm space."""
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)],
                                indexing="ij"), axis=-1)
    half = np.array(shape) * np.array(spacing) / 2
    radii = half * rng.uniform(0.55, 0.8, size=3)
    body = ((grid / radii) ** 2).sum(-1) <= 1
    centre = rng.uniform(-0.3, 0.3, size=3) * radii
    lesion = (((grid - centre) / (radii * rng.uniform(0.2, 0.35))) ** 2).sum(-1) <= 1
    label = np.zeros(shape, np.uint8)
    label[body] = 1
    label[lesion & body] = 2
    images = []
    for c in range(num_channels):
        base = -1000.0 + 1040.0 * body + (60.0 + 40 * c) * (lesion & body)
        images.append((base + rng.normal(0, 15, shape)).astype(np.float32))
    return images, label


def oblique_direction(angle_deg: float = 20.0) -> tuple[float, ...]:
    """A direction matrix rotated about two axes (row-major, 9 floats)."""
    a = math.radians(angle_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return tuple((_rotation_z(angle_deg / 2) @ rx).flatten().tolist())


def build_synthetic_dataset(raw_root: str | Path, dataset_id: int = 991, num_cases: int = 6, *,
                            shape: tuple[int, int, int] = (48, 48, 16),
                            spacing: tuple[float, float, float] = (0.8, 0.8, 3.0),
                            oblique: bool = True, num_channels: int = 1, seed: int = 0,
                            spacing_jitter: float = 0.0, name: str = "Ellipsoids",
                            file_ending: str = ".nii.gz") -> Path:
    """Write a segmentation dataset of generated anisotropic, oblique cases.

    Shapes are ``X x Y x Z`` voxels (i, j, k) and spacings mm in the same order; with
    ``spacing_jitter`` each case's spacing is scaled by a factor in [1 - j, 1 + j].
    """
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    from threedino_pipe.raw_data.image_io import Geometry, from_array
    for index in range(num_cases):
        case_spacing = tuple(float(s * rng.uniform(1 - spacing_jitter, 1 + spacing_jitter)) for s in spacing)
        geometry = Geometry(size=shape, spacing=case_spacing,
                            origin=tuple(rng.uniform(-100, 100, size=3).round(3).tolist()),
                            direction=oblique_direction(20.0) if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1))
        images, label = ellipsoid_case(shape, case_spacing, rng, num_channels)
        case = f"case_{index:03d}"
        for c, image in enumerate(images):
            sitk.WriteImage(from_array(image, geometry), str(folder / "imagesTr" / f"{case}_{c:04d}{file_ending}"))
        sitk.WriteImage(from_array(label, geometry), str(folder / "labelsTr" / f"{case}{file_ending}"))
    channel_names = {str(c): ("CT" if c == 0 else f"CT{c}") for c in range(num_channels)}
    _write_dataset_json(folder, channel_names, {"background": 0, "body": 1, "lesion": 2}, num_cases,
                        {"file_ending": file_ending})
    return folder
