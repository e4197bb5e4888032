"""Generate the broken-dataset corpus: one tiny raw dataset per fault (deterministic).

Run ``python tests/data/make_broken_corpus.py`` from the repository root: it rewrites
``tests/data/broken/<fault>/Dataset9NN_<Fault>/`` (a few KB each; the files are committed).
Every dataset has two cases: ``case_000`` is correct, ``case_001`` (or dataset.json) carries the
fault, so a test can check that the fault is found and nothing else is reported as an error.
Volumes are 8 x 8 x 6 voxels (i, j, k), 1 x 1 x 2 mm.
"""

from __future__ import annotations

import argparse
import json
import locale
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SIZE = (8, 8, 6)  # voxels, i, j, k
SPACING = (1.0, 1.0, 2.0)  # mm
ORIGIN = (-4.0, 3.5, 10.0)  # mm
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
LABELS = {"background": 0, "organ": 1, "lesion": 2}
OUT = Path(__file__).resolve().parent / "broken"


def make_image(array_xyz: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=IDENTITY) -> sitk.Image:
    """A SimpleITK image from an X x Y x Z array (i, j, k) and its geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def volume(seed: int, dtype=np.int16, size=SIZE) -> np.ndarray:
    """Deterministic CT-like voxels: background -1000 HU, a brighter block."""
    rng = np.random.default_rng(seed)
    arr = np.full(size, -1000.0) + rng.normal(0, 10, size).round()
    arr[2:6, 2:6, 1:5] = 40 + rng.normal(0, 10, (4, 4, 4)).round()
    return arr.astype(dtype)


def label(size=SIZE) -> np.ndarray:
    seg = np.zeros(size, np.uint8)
    seg[2:6, 2:6, 1:5] = 1
    seg[3:5, 3:5, 2:4] = 2
    return seg


def write(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_dicom_series(array_xyz: np.ndarray, folder: Path, series_uid: str, *, spacing=SPACING, origin=ORIGIN,
                       direction=IDENTITY, skip_slices: tuple[int, ...] = ()) -> None:
    """Write an X x Y x Z volume as a DICOM series (int16, one file per k slice) with SimpleITK.

    UIDs and dates are fixed so the files are reproducible; ``skip_slices`` leaves slices out
    (a series with a gap). Slice spacing (0018|0088) is set explicitly: GDCM otherwise writes it
    from the second file a process writes on, not in the first. GDCM's writer also sets the
    process locale to "C" (text files would then default to ASCII): it is restored afterwards.
    """
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(array_xyz, folder, series_uid, spacing, origin, direction, skip_slices)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_dicom_slices(array_xyz, folder, series_uid, spacing, origin, direction, skip_slices) -> None:
    image = sitk.Cast(make_image(array_xyz, spacing, origin, direction), sitk.sitkInt16)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = direction
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    common = {"0008|0008": "DERIVED\\SECONDARY", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
              "0008|0020": "20260101", "0008|0021": "20260101", "0008|0030": "120000", "0008|0031": "120000",
              "0008|0060": "CT", "0008|103e": "threedino-pipe test series", "0010|0010": "ANONYMOUS",
              "0010|0020": "0", "0020|000d": series_uid + ".0", "0020|000e": series_uid, "0020|0037": orientation,
              "0018|0050": f"{spacing[2]:g}", "0018|0088": f"{spacing[2]:g}", "0028|1052": "0", "0028|1053": "1"}
    for k in range(image.GetSize()[2]):
        if k in skip_slices:
            continue
        slice_k = image[:, :, k:k + 1]  # one slice, kept 3D
        for tag, value in common.items():
            slice_k.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_k.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        slice_k.SetMetaData("0020|0013", str(k + 1))
        slice_k.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        slice_k.SetMetaData("0008|0012", "20260101")
        slice_k.SetMetaData("0008|0013", "120000")
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(slice_k)


def dataset_json(folder: Path, *, channels: int = 1, num_training: int = 2, extra: dict | None = None) -> None:
    names = {"0": "CT"} if channels == 1 else {str(c): f"MR{c}" for c in range(channels)}
    spec = {"name": folder.name, "description": "threedino-pipe broken-dataset corpus", "channel_names": names,
            "labels": LABELS, "numTraining": num_training, "file_ending": ".nii.gz"}
    spec.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")


def good_case(folder: Path, case: str, seed: int, channels: int = 1) -> None:
    for c in range(channels):
        write(make_image(volume(seed + 10 * c)), folder / "imagesTr" / f"{case}_{c:04d}.nii.gz")
    write(make_image(label()), folder / "labelsTr" / f"{case}.nii.gz")


def base(folder: Path, channels: int = 1) -> None:
    """dataset.json and two good cases; each fault then breaks case_001."""
    dataset_json(folder, channels=channels)
    good_case(folder, "case_000", 0, channels)
    good_case(folder, "case_001", 1, channels)


def _rotated(angle_deg: float) -> tuple[float, ...]:
    a = math.radians(angle_deg)
    return (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)


def missing_channel(f: Path) -> None:
    base(f, channels=2)
    (f / "imagesTr" / "case_001_0001.nii.gz").unlink()


def extra_channel(f: Path) -> None:
    base(f)
    write(make_image(volume(5)), f / "imagesTr" / "case_001_0001.nii.gz")


def shape_mismatch(f: Path) -> None:
    base(f)
    write(make_image(label((8, 8, 5))), f / "labelsTr" / "case_001.nii.gz")


def spacing_mismatch(f: Path) -> None:
    base(f)
    write(make_image(label(), spacing=(1.0, 1.0, 2.5)), f / "labelsTr" / "case_001.nii.gz")


def origin_mismatch(f: Path) -> None:
    base(f)
    write(make_image(label(), origin=(-4.0, 3.5, 15.0)), f / "labelsTr" / "case_001.nii.gz")


def direction_mismatch(f: Path) -> None:
    base(f)
    write(make_image(label(), direction=_rotated(10.0)), f / "labelsTr" / "case_001.nii.gz")


def channel_spacing_mismatch(f: Path) -> None:
    base(f, channels=2)
    write(make_image(volume(21), spacing=(1.2, 1.2, 2.0)), f / "imagesTr" / "case_001_0001.nii.gz")


def undeclared_label(f: Path) -> None:
    base(f)
    seg = label()
    seg[0, 0, 0], seg[7, 7, 5] = 3, 7
    write(make_image(seg), f / "labelsTr" / "case_001.nii.gz")


def non_integer_label(f: Path) -> None:
    base(f)
    seg = label().astype(np.float32)
    seg[3, 3, 3] = 1.5
    write(make_image(seg), f / "labelsTr" / "case_001.nii.gz")


def _nonfinite(f: Path, values: list[float]) -> None:
    base(f)
    arr = volume(1, np.float32)
    for index, value in enumerate(values):
        arr[index, 0, 0] = value
    path = f / "imagesTr" / "case_001_0000.nii.gz"
    write(make_image(arr), path)
    import nibabel as nib  # SimpleITK reads NaN/Inf of NIfTI as 0: confirm they are on disk
    data = np.asanyarray(nib.load(str(path)).dataobj)
    assert int(np.isnan(data).sum()) == sum(math.isnan(v) for v in values)
    assert int(np.isinf(data).sum()) == sum(math.isinf(v) for v in values)


def nan_voxels(f: Path) -> None:
    _nonfinite(f, [math.nan] * 3)


def inf_voxels(f: Path) -> None:
    _nonfinite(f, [math.inf, math.inf, -math.inf])


def four_d_image(f: Path) -> None:
    base(f)
    image = sitk.JoinSeries([make_image(volume(1)), make_image(volume(2))])  # 8 x 8 x 6 x 2
    write(image, f / "imagesTr" / "case_001_0000.nii.gz")
    assert sitk.ReadImage(str(f / "imagesTr" / "case_001_0000.nii.gz")).GetDimension() == 4


def two_d_image(f: Path) -> None:
    base(f)
    image = sitk.GetImageFromArray(volume(1)[:, :, 0].T.copy())
    write(image, f / "imagesTr" / "case_001_0000.nii.gz")


def multi_component(f: Path) -> None:
    base(f)
    rgb = np.stack([volume(1), volume(2), volume(3)], axis=-1).transpose(2, 1, 0, 3)  # Z, Y, X, 3
    image = sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    write(image, f / "imagesTr" / "case_001_0000.nii.gz")


def truncated_file(f: Path) -> None:
    base(f)
    path = f / "imagesTr" / "case_001_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def unreadable_file(f: Path) -> None:
    base(f)
    garbage = np.random.default_rng(7).integers(0, 256, 1500, dtype=np.uint8).tobytes()
    (f / "imagesTr" / "case_001_0000.nii.gz").write_bytes(garbage)


def num_training_mismatch(f: Path) -> None:
    base(f)
    dataset_json(f, num_training=3)


def missing_label(f: Path) -> None:
    base(f)
    (f / "labelsTr" / "case_001.nii.gz").unlink()


def missing_dataset_json(f: Path) -> None:
    base(f)
    (f / "dataset.json").unlink()


def malformed_dataset_json(f: Path) -> None:
    base(f)
    text = (f / "dataset.json").read_text()
    (f / "dataset.json").write_text(text.replace('"numTraining": 2', '"numTraining": 2,,'))


def _dicom_base(f: Path) -> None:
    dataset_json(f)
    for index, case in enumerate(("case_000", "case_001")):
        write_dicom_series(volume(index), f / "imagesTr" / f"{case}_0000", f"2.25.9001{index}")
        write(make_image(label()), f / "labelsTr" / f"{case}.nii.gz")


def dicom_two_series(f: Path) -> None:
    _dicom_base(f)
    second = f / "imagesTr" / "case_001_0000" / "second"
    write_dicom_series(volume(9), second, "2.25.90099")
    for path in sorted(second.iterdir()):
        path.rename(path.parent.parent / f"b_{path.name}")
    second.rmdir()


def dicom_no_series(f: Path) -> None:
    _dicom_base(f)
    folder = f / "imagesTr" / "case_001_0000"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "README.txt").write_text("the slices of this case were never exported\n")


def dicom_missing_slice(f: Path) -> None:
    _dicom_base(f)
    folder = f / "imagesTr" / "case_001_0000"
    shutil.rmtree(folder)
    write_dicom_series(volume(1), folder, "2.25.90011", skip_slices=(3,))


def wrong_file_ending(f: Path) -> None:
    base(f)
    (f / "imagesTr" / "case_001_0000.nii.gz").unlink()
    write(make_image(volume(1)), f / "imagesTr" / "case_001_0000.nii")


def wrong_label_ending(f: Path) -> None:
    base(f)
    (f / "labelsTr" / "case_001.nii.gz").unlink()
    write(make_image(label()), f / "labelsTr" / "case_001.mha")


def no_cases(f: Path) -> None:
    """imagesTr/ holds no image at all (the scans were left in an archive); dataset.json without numTraining."""
    base(f)
    spec = json.loads((f / "dataset.json").read_text())
    del spec["numTraining"]
    (f / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    for path in sorted((f / "imagesTr").iterdir()):
        path.unlink()
    (f / "imagesTr" / "scans.zip").write_bytes(b"PK\x05\x06" + bytes(18))


def classification_labels_from_1(f: Path) -> None:
    """nnU-Net-style classification (labels map, labelsTr.csv, no labelsTr/, no task) numbering classes from 1."""
    dataset_json(f, extra={"labels": {"benign": 1, "malignant": 2}})
    for index, case in enumerate(("case_000", "case_001")):
        write(make_image(volume(index)), f / "imagesTr" / f"{case}_0000.nii.gz")
    (f / "labelsTr.csv").write_text("case_id,label\ncase_000,benign\ncase_001,malignant\n")


def case_groups_unknown_case(f: Path) -> None:
    base(f)
    dataset_json(f, extra={"case_groups": {"patient_1": ["case_000", "case_009"]}})


FAULTS: dict[str, Callable[[Path], None]] = {fn.__name__: fn for fn in (
    missing_channel, extra_channel, shape_mismatch, spacing_mismatch, origin_mismatch, direction_mismatch,
    channel_spacing_mismatch, undeclared_label, non_integer_label, nan_voxels, inf_voxels, four_d_image,
    two_d_image, multi_component, truncated_file, unreadable_file, num_training_mismatch, missing_label,
    missing_dataset_json, malformed_dataset_json, dicom_two_series, dicom_no_series, dicom_missing_slice,
    wrong_file_ending, wrong_label_ending, no_cases, classification_labels_from_1,
    case_groups_unknown_case)}


def dataset_name(index: int, fault: str) -> str:
    return f"Dataset{901 + index}_" + "".join(part.capitalize() for part in fault.split("_"))


def generate(out: Path = OUT) -> dict[str, Path]:
    """Write every fault's dataset under ``out``; returns fault -> dataset folder."""
    if out.exists():
        shutil.rmtree(out)
    folders = {}
    for index, (fault, build) in enumerate(FAULTS.items()):
        folder = out / fault / dataset_name(index, fault)
        folder.mkdir(parents=True)
        build(folder)
        folders[fault] = folder
    return folders


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"corpus folder (default: {OUT})")
    for fault, folder in generate(parser.parse_args().out).items():
        print(f"{fault:28s} {folder}")
