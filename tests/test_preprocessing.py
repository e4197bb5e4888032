"""`3dino preprocess` on real files: pretrain/finetune arrays, crops, resampling, labels, NaNs, transpose.

Plans are built by hand following docs/schemas.md (the same fields `3dino plan` writes), so
each test states exactly what it asks preprocessing to do. References are computed here with
nibabel + numpy, independently of the SimpleITK reading path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_3dino

from threedino_pipe.artifacts import Plans
from threedino_pipe.demo.examples import build_synthetic_dataset
from threedino_pipe.preprocessing.arrays import chunks_and_blocks, open_array
from threedino_pipe.preprocessing.class_locations import sample_class_locations
from threedino_pipe.preprocessing.pipeline import preprocess_case
from threedino_pipe.raw_data.image_io import read_image
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import preprocess

VOLUME = {"scheme": "volume_percentile", "lower_pct": 0.05, "upper_pct": 99.95, "range": [-1, 1], "clip": True}


def make_plans(name: str, *, task: str = "segmentation", labels: dict | None = None, transpose=(0, 1, 2),
               finetune_spacing=None, finetune_norm: dict | None = None, channels: int = 1,
               interpolation: str = "bspline3", patch=(32, 32, 16)) -> dict:
    """A plans.json per docs/schemas.md (pretrain always; finetune when a spacing is given)."""
    configurations = {
        "pretrain": {"resample": False, "spacing": None, "normalization": [VOLUME] * channels,
                     "crop": "foreground_after_normalization", "global_crop": 96, "local_crop": 48,
                     "num_local_crops": 8, "min_axis": 24, "preset": "tiny", "batch_size": 2, "reasons": {}},
    }
    if finetune_spacing is not None:
        norm = finetune_norm or {"scheme": "volume_percentile", "lower_pct": 0.5, "upper_pct": 99.5,
                                 "range": [-1, 1], "clip": True}
        configurations["finetune"] = {
            "resample": True, "spacing": list(finetune_spacing), "normalization": [norm] * channels,
            "crop": "nonzero", "image_interpolation": interpolation, "label_interpolation": "linear_per_class",
            "patch_size": list(patch), "batch_size": 2, "preset": "tiny", "median_shape": [32, 32, 16],
            "reasons": {}}
    return {"kind": "plans", "schema_version": 1, "version": "0.1.0", "dataset": name, "task": task,
            "channel_names": {str(c): "CT" for c in range(channels)}, "labels": labels or {},
            "regions_class_order": None, "class_names": [], "memory_target_gb": 8.0, "options": {},
            "transpose": list(transpose), "decisions": {}, "configurations": configurations}


def preprocess_with(monkeypatch: pytest.MonkeyPatch, raw_root: Path, out_root: Path, raw: Path, plans: dict,
                    **kwargs) -> Path:
    """Write plans.json and run the preprocess stage; returns the preprocessed dataset folder."""
    monkeypatch.setenv("THREEDINO_RAW", str(raw_root))
    monkeypatch.setenv("THREEDINO_PREPROCESSED", str(out_root))
    folder = out_root / raw.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    preprocess.run(raw.name, **kwargs)
    return folder


def case_json(folder: Path, configuration: str, case: str) -> dict:
    return json.loads((folder / configuration / f"{case}.json").read_text())


def load(folder: Path, configuration: str, name: str) -> np.ndarray:
    return open_array(folder / configuration / f"{name}.b2nd")[:]


def reference_pretrain(channels: list[np.ndarray], transpose) -> tuple[np.ndarray, list[list[int]]]:
    """NaN -> mean, 0.05/99.95 percentiles -> [-1, 1] clipped, transpose, crop to > -1 (transposed order)."""
    out = []
    for a in channels:
        a = np.asarray(a, np.float64).copy()
        bad = ~np.isfinite(a)
        a[bad] = a[~bad].mean()
        lo, hi = np.percentile(a, [0.05, 99.95])
        out.append(np.clip((a - lo) / (hi - lo) * 2 - 1, -1, 1))
    x = np.stack(out).transpose(0, *(t + 1 for t in transpose))
    where = np.argwhere((x > -1).any(0))
    box = [[int(lo), int(hi) + 1] for lo, hi in zip(where.min(0), where.max(0), strict=True)]
    return x[(slice(None), *(slice(a, b) for a, b in box))], box


def nib_array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def to_original(box, transpose):
    out = [None] * 3
    for axis, original in enumerate(transpose):
        out[original] = box[axis]
    return out


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_out(synthetic_raw, tmp_path_factory) -> tuple[Path, Path, dict]:
    raw = next(synthetic_raw.glob("Dataset991_*"))
    plans = make_plans(raw.name, labels={"background": 0, "body": 1, "lesion": 2}, finetune_spacing=(1.1, 1.1, 2.5),
                       finetune_norm={"scheme": "dataset_percentile", "lower": -1000.0, "upper": 150.0,
                                      "lower_pct": 0.5, "upper_pct": 99.5, "range": [-1, 1], "clip": True})
    with pytest.MonkeyPatch.context() as mp:
        folder = preprocess_with(mp, synthetic_raw, tmp_path_factory.mktemp("pre_syn"), raw, plans, num_processes=2)
    return raw, folder, plans


def test_pretrain_arrays_match_reference_and_crop_box(synthetic_out):
    raw, folder, _ = synthetic_out
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").iterdir())
    assert len(cases) == 6
    for case in cases:
        info = case_json(folder, "pretrain", case)
        arr = load(folder, "pretrain", case)
        assert arr.dtype == np.float32 and arr.ndim == 4 and arr.shape[0] == 1
        assert arr.min() >= -1 and arr.max() <= 1 and arr.max() == 1
        expected, box = reference_pretrain([nib_array(raw / "imagesTr" / f"{case}_0000.nii.gz")], (0, 1, 2))
        assert info["crop_box"] == box
        assert list(arr.shape[1:]) == info["shape"] == [b - a for a, b in box]
        np.testing.assert_allclose(arr, expected, atol=2e-5)
        assert info["spacing"] == pytest.approx(info["original_geometry"]["spacing"])
        assert info["kind"] == "case" and info["schema_version"] == 1 and info["configuration"] == "pretrain"
        assert not (folder / "pretrain" / f"{case}_seg.b2nd").exists()  # pretraining stores no labels


def test_finetune_spacing_shape_labels_and_class_locations(synthetic_out):
    raw, folder, plans = synthetic_out
    target = plans["configurations"]["finetune"]["spacing"]
    for json_file in sorted((folder / "finetune").glob("*.json")):
        info = json.loads(json_file.read_text())
        case = info["case_id"]
        arr, seg = load(folder, "finetune", case), load(folder, "finetune", f"{case}_seg")
        assert info["spacing"] == target
        expected_shape = np.round(np.array(info["shape_after_crop"]) * info["original_geometry"]["spacing"]
                                  / np.array(target)).astype(int).tolist()
        assert list(arr.shape[1:]) == list(seg.shape[1:]) == info["shape"] == expected_shape
        assert arr.min() >= -1 and arr.max() <= 1
        assert info["normalization"][0] == {"scheme": "dataset_percentile", "lower": -1000.0, "upper": 150.0,
                                            "nan_replaced": 0}
        assert seg.dtype == np.uint8 and seg.shape[0] == 1
        raw_label = read_image(raw / "labelsTr" / f"{case}.nii.gz")[0]
        assert set(np.unique(seg)) <= {0, 1, 2}
        assert set(np.unique(seg)) == set(np.unique(raw_label))  # per-class resampling keeps every class
        for value, coords in info["class_locations"].items():
            coords = np.array(coords)
            assert len(coords) == min(10_000, int((seg[0] == int(value)).sum())) > 0
            assert (seg[0][tuple(coords.T)] == int(value)).all()
        # body (label 1, about 0 HU) is brighter than air (-1000 HU) in the stored image
        assert arr[0][seg[0] == 1].mean() > arr[0][seg[0] == 0].mean() + 1.0


def test_splits_written_and_rerun_skips_finished_cases(synthetic_out, tmp_path, monkeypatch):
    raw, folder, plans = synthetic_out
    splits = json.loads((folder / "splits.json").read_text())
    assert splits["kind"] == "splits"
    assert sorted([*splits["folds"][0]["train"], *splits["folds"][0]["val"], *splits["test"]]) == \
        [f"case_{i:03d}" for i in range(6)]
    copy = tmp_path / "pre"
    shutil.copytree(folder, copy / raw.name)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (copy / raw.name).rglob("*") if p.is_file()}
    plans2 = json.loads(json.dumps(plans))
    plans2["configurations"]["finetune"]["batch_size"] = 7  # does not change preprocessing
    preprocess_with(monkeypatch, raw.parent, copy, raw, plans2, num_processes=1)
    for path, (mtime, data) in before.items():
        if path.name != "plans.json":
            assert path.read_bytes() == data
            if path.name != "splits.json":
                assert path.stat().st_mtime_ns == mtime, f"{path.name} was rewritten"
    plans2["configurations"]["finetune"]["spacing"] = [1.6, 1.6, 3.0]  # changes finetune only
    preprocess_with(monkeypatch, raw.parent, copy, raw, plans2, configurations=["finetune"], num_processes=1)
    info = case_json(copy / raw.name, "finetune", "case_000")
    assert info["spacing"] == [1.6, 1.6, 3.0]
    pre_json = copy / raw.name / "pretrain" / "case_000.json"
    assert pre_json.stat().st_mtime_ns == before[pre_json][0]


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mni_out(mni_raw, tmp_path_factory) -> tuple[Path, Path, dict]:
    raw = next(mni_raw.glob("Dataset990_*"))
    plans = make_plans(raw.name, labels={"background": 0, "grey_matter": 1, "white_matter": 2},
                       finetune_spacing=(3.0, 3.0, 3.5), patch=(48, 48, 48))
    plans["channel_names"] = {"0": "T1"}
    with pytest.MonkeyPatch.context() as mp:
        folder = preprocess_with(mp, mni_raw, tmp_path_factory.mktemp("pre_mni"), raw, plans,
                                 configurations=["finetune"], num_processes=1)
    return raw, folder, plans


def test_mni_finetune_keeps_classes_and_anatomy(mni_out):
    raw, folder, plans = mni_out
    assert not (folder / "pretrain").exists()  # -c finetune only
    infos = [json.loads(p.read_text()) for p in sorted((folder / "finetune").glob("*.json"))]
    assert len(infos) == 8
    for info in infos:
        case = info["case_id"]
        arr, seg = load(folder, "finetune", case), load(folder, "finetune", f"{case}_seg")
        assert info["spacing"] == [3.0, 3.0, 3.5]
        assert list(arr.shape[1:]) == np.round(np.array(info["shape_after_crop"]) * info["original_geometry"]
                                               ["spacing"] / [3.0, 3.0, 3.5]).astype(int).tolist()
        assert arr.min() >= -1 and arr.max() <= 1 and info["normalization"][0]["scheme"] == "volume_percentile"
        assert set(np.unique(seg)) == {0, 1, 2}
        # T1 contrast survives and labels stay on the image: white matter brighter than grey matter
        assert arr[0][seg[0] == 2].mean() > arr[0][seg[0] == 1].mean()


def test_mni_resampled_grid_follows_the_documented_convention(mni_out):
    """Stored voxel m sits at input index (m - (n_out-1)/2) * t/s + (n_in-1)/2 of the cropped raw grid."""
    raw, folder, _ = mni_out
    info = case_json(folder, "finetune", "mni_003")
    seg = load(folder, "finetune", "mni_003_seg")[0]
    raw_label = nib_array(raw / "labelsTr" / "mni_003.nii.gz").astype(np.uint8)
    box = info["crop_box"]
    raw_label = raw_label[tuple(slice(a, b) for a, b in box)]
    n_in, n_out = np.array(raw_label.shape), np.array(seg.shape)
    scale = np.array(info["spacing"]) / np.array(info["original_geometry"]["spacing"])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in n_out], indexing="ij"), -1)
    src = np.clip(np.rint((grid - (n_out - 1) / 2) * scale + (n_in - 1) / 2).astype(int), 0, n_in - 1)
    nearest = raw_label[src[..., 0], src[..., 1], src[..., 2]]
    for value in (1, 2):
        a, b = seg == value, nearest == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.75


def test_preprocess_case_in_memory_matches_written_files(mni_out):
    raw, folder, plans = mni_out
    from threedino_pipe.preprocessing.class_locations import case_seed
    image, geometry = read_image(raw / "imagesTr" / "mni_001_0000.nii.gz")
    label = read_image(raw / "labelsTr" / "mni_001.nii.gz")[0]
    recipe = Plans.model_validate(plans).preprocessing("finetune")
    arr, seg, props = preprocess_case([image], geometry, recipe, label, seed=case_seed("mni_001", "finetune"))
    np.testing.assert_array_equal(arr, load(folder, "finetune", "mni_001"))
    np.testing.assert_array_equal(seg, load(folder, "finetune", "mni_001_seg"))
    written = case_json(folder, "finetune", "mni_001")
    for key, value in props.model_dump(mode="json").items():
        assert value == written[key], key
    arr2, seg2, props2 = preprocess_case([image], geometry, recipe)  # predict: no label
    np.testing.assert_array_equal(arr2, arr)
    assert seg2 is None and props2.class_locations == {}


# --------------------------------------------------------------------------------------------
def _nifti(path: Path, array: np.ndarray, spacing) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def test_nan_inf_replaced_by_mean_and_nonzero_crop(tmp_path, monkeypatch):
    raw = tmp_path / "raw" / "Dataset993_NanBlob"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(3)
    spacing = (1.0, 1.2, 1.5)
    nan_counts = {}
    for index in range(2):
        image = np.zeros((20, 24, 18), np.float32)
        image[3:17, 4:21, 3:15] = rng.uniform(10, 100, (14, 17, 12))
        label = np.zeros(image.shape, np.uint8)
        label[6:12, 8:15, 5:10] = 1
        image[label == 1] += 300
        image[5, 6, 7], image[10, 10, 10], image[12, 5, 4] = np.nan, np.nan, np.inf
        _nifti(raw / "imagesTr" / f"blob_{index}_0000.nii.gz", image, spacing)
        _nifti(raw / "labelsTr" / f"blob_{index}.nii.gz", label, spacing)
        nan_counts[f"blob_{index}"] = 3
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0,
                                      "blob": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))
    plans = make_plans(raw.name, labels={"background": 0, "blob": 1}, finetune_spacing=(1.5, 1.5, 1.5))
    folder = preprocess_with(monkeypatch, raw.parent, tmp_path / "pre", raw, plans, num_processes=1)
    for case, count in nan_counts.items():
        source = nib_array(raw / "imagesTr" / f"{case}_0000.nii.gz")
        assert int((~np.isfinite(source)).sum()) == count
        expected, box = reference_pretrain([source], (0, 1, 2))
        info = case_json(folder, "pretrain", case)
        assert info["normalization"][0]["nan_replaced"] == count
        assert info["crop_box"] == box
        arr = load(folder, "pretrain", case)
        np.testing.assert_allclose(arr, expected, atol=2e-5)
        mean = np.nanmean(np.where(np.isfinite(source), source, np.nan))
        lo, hi = info["normalization"][0]["lower"], info["normalization"][0]["upper"]
        stored = arr[0][5 - box[0][0], 6 - box[1][0], 7 - box[2][0]]
        assert stored == pytest.approx(np.clip((mean - lo) / (hi - lo) * 2 - 1, -1, 1), abs=1e-5)
        fine = case_json(folder, "finetune", case)
        assert fine["crop_box"] == [[3, 17], [4, 21], [3, 15]]  # nonzero box of the raw image
        assert fine["normalization"][0]["nan_replaced"] == count
        assert np.isfinite(load(folder, "finetune", case)).all()


def test_transpose_moves_cross_slice_axis_last(tmp_path, monkeypatch):
    raw = build_synthetic_dataset(tmp_path / "raw", 994, 2, shape=(10, 32, 28), spacing=(3.0, 0.8, 0.8),
                                  seed=4, name="SliceFirst")
    transpose = (1, 2, 0)
    plans = make_plans(raw.name, labels={"background": 0, "body": 1, "lesion": 2}, transpose=transpose,
                       finetune_spacing=(1.0, 1.0, 3.0), interpolation="linear")
    folder = preprocess_with(monkeypatch, raw.parent, tmp_path / "pre", raw, plans, num_processes=1)
    for case in ("case_000", "case_001"):
        source = nib_array(raw / "imagesTr" / f"{case}_0000.nii.gz")
        assert source.shape == (10, 32, 28)
        expected, box = reference_pretrain([source], transpose)
        info = case_json(folder, "pretrain", case)
        assert info["transpose"] == list(transpose)
        assert info["crop_box"] == to_original(box, transpose)  # original index order
        np.testing.assert_allclose(load(folder, "pretrain", case), expected, atol=2e-5)
        fine = case_json(folder, "finetune", case)
        spacing_t = [info["original_geometry"]["spacing"][a] for a in transpose]
        assert fine["shape_after_crop"] == [32, 28, 10]
        assert fine["shape"] == np.round(np.array([32, 28, 10]) * spacing_t / np.array([1.0, 1.0, 3.0])).astype(
            int).tolist()
        seg = load(folder, "finetune", f"{case}_seg")[0]
        label = nib_array(raw / "labelsTr" / f"{case}.nii.gz").transpose(transpose)
        assert set(np.unique(seg)) == set(np.unique(label))


def test_classification_and_unlabeled_datasets(tmp_path, monkeypatch):
    base = build_synthetic_dataset(tmp_path / "raw", 995, 4, shape=(24, 24, 8), seed=5, name="Cls")
    shutil.rmtree(base / "labelsTr")
    spec = json.loads((base / "dataset.json").read_text())
    spec.pop("labels")
    unl = base.parent / "Dataset996_Unl"
    shutil.copytree(base, unl)
    (unl / "dataset.json").write_text(json.dumps({**spec, "task": "unlabeled"}))
    (base / "dataset.json").write_text(json.dumps({**spec, "task": "classification", "class_names": ["a", "b"]}))
    (base / "labelsTr.csv").write_text("case_id,label\ncase_000,a\ncase_001,b\ncase_002,1\ncase_003,0\n")
    folder = preprocess_with(monkeypatch, base.parent, tmp_path / "pre", base,
                             make_plans(base.name, task="classification", finetune_spacing=(1.0, 1.0, 3.0)),
                             num_processes=1)
    assert [case_json(folder, "finetune", f"case_{i:03d}")["class_label"] for i in range(4)] == [0, 1, 1, 0]
    assert case_json(folder, "pretrain", "case_001")["class_label"] == 1
    assert not list(folder.rglob("*_seg.b2nd")) and (folder / "splits.json").is_file()
    (base / "labelsTr.csv").write_text("case_id,label\ncase_000,b\ncase_001,b\ncase_002,1\ncase_003,0\n")
    preprocess.run(base.name, configurations=["finetune"], num_processes=1)  # a changed class label is redone
    assert case_json(folder, "finetune", "case_000")["class_label"] == 1
    folder = preprocess_with(monkeypatch, base.parent, tmp_path / "pre", unl, make_plans(unl.name, task="unlabeled"),
                             num_processes=1)
    assert sorted(p.name for p in folder.iterdir()) == ["plans.json", "pretrain"]
    assert len(list((folder / "pretrain").glob("*.b2nd"))) == 4
    assert not list(folder.rglob("*_seg.b2nd"))


def test_missing_or_foreign_plans_and_unknown_configuration(synthetic_raw, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("THREEDINO_RAW", str(synthetic_raw))
    result = run_3dino("preprocess", "-d", "991", "-np", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "plans.json" in result.stderr and "3dino plan -d 991" in result.stderr
    folder = folders["preprocessed"] / "Dataset991_Ellipsoids"
    folder.mkdir()
    plans = make_plans("Dataset991_Ellipsoids", labels={"background": 0, "body": 1, "lesion": 2})
    (folder / "plans.json").write_text(json.dumps({**plans, "schema_version": 99}))
    with pytest.raises(UserError, match="schema_version 99"):
        preprocess.run("991")
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(UserError, match="finetune"):
        preprocess.run("991", configurations=["finetune"])
    bad = json.loads(json.dumps(plans))
    bad["configurations"]["pretrain"]["normalization"] = [{"scheme": "zscore"}]
    (folder / "plans.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="zscore") as info:
        preprocess.run("991")
    assert info.value.file.endswith("plans.json")
    assert sorted(p.name for p in folder.iterdir()) == ["plans.json"]  # nothing written


def test_undeclared_label_value_is_a_user_error_naming_the_file(tmp_path, monkeypatch):
    raw = build_synthetic_dataset(tmp_path / "raw", 997, 1, shape=(16, 16, 6), seed=6, name="BadLabel")
    plans = make_plans(raw.name, labels={"background": 0, "body": 1}, finetune_spacing=(1.0, 1.0, 3.0))
    with pytest.raises(UserError, match=r"label values \[2\]") as info:
        preprocess_with(monkeypatch, raw.parent, tmp_path / "pre", raw, plans, configurations=["finetune"],
                        num_processes=1)
    assert info.value.file.endswith("labelsTr/case_000.nii.gz")
    assert not list((tmp_path / "pre").rglob("*.b2nd")) and not list((tmp_path / "pre").rglob("case_*.json"))


def test_class_locations_are_capped_seeded_and_chunks_fit_the_crop():
    seg = np.zeros((40, 40, 20), np.uint8)
    seg[5:35, 5:35, 2:18] = 1
    a = sample_class_locations(seg, [1, 2], seed=7, max_per_class=500)
    assert len(a["1"]) == 500 and a["2"] == []
    assert a == sample_class_locations(seg, [1, 2], seed=7, max_per_class=500)
    assert a != sample_class_locations(seg, [1, 2], seed=8, max_per_class=500)
    assert all(seg[tuple(c)] == 1 for c in a["1"])
    chunks, blocks = chunks_and_blocks((2, 200, 180, 60), (112, 112, 112), 4)
    assert chunks == (1, 56, 56, 56) and blocks[0] == 1
    assert np.prod(blocks) * 4 <= 32 * 1024 and all(c % b == 0 or b <= c for c, b in zip(chunks, blocks, strict=True))
    assert chunks_and_blocks((1, 30, 20, 10), (96, 96, 96), 4)[0] == (1, 30, 20, 10)


def test_separable_bspline_equals_scipy_3d_cubic_spline_and_linear_labels_keep_values():
    from scipy.ndimage import gaussian_filter, map_coordinates

    from threedino_pipe.preprocessing.resampling import resample_image, resample_label, target_shape
    rng = np.random.default_rng(1)
    image = (gaussian_filter(rng.normal(size=(30, 26, 12)), 1.5) * 100).astype(np.float32)
    spacing, target = (0.7, 0.9, 3.0), (1.0, 0.6, 2.0)
    shape = target_shape(image.shape, spacing, target)
    assert shape == (21, 39, 18)
    ours = resample_image(image, spacing, target, interpolation="bspline3")
    coords = [np.clip((np.arange(m) - (m - 1) / 2) * t / s + (n - 1) / 2, 0, n - 1)
              for n, s, m, t in zip(image.shape, spacing, shape, target, strict=True)]
    reference = map_coordinates(image.astype(np.float64), np.meshgrid(*coords, indexing="ij"), order=3,
                                mode="mirror")
    np.testing.assert_allclose(ours, reference, atol=1e-3)
    linear = resample_image(image, spacing, target, interpolation="linear")  # SimpleITK, same grid
    assert np.corrcoef(linear.ravel(), ours.ravel())[0, 1] > 0.99
    label = np.zeros((30, 26, 12), np.uint8)
    label[5:25, 4:20, 2:10], label[10:12, 10:12, 5:6] = 3, 7  # a 2x2x1 class survives 1.4x downsampling
    resampled = resample_label(label, (1.0, 1.0, 1.0), (1.4, 1.4, 1.0))
    assert set(np.unique(resampled)) == {0, 3, 7} and resampled.dtype == np.uint8


@pytest.mark.e2e
def test_cli_plan_then_preprocess_on_the_oblique_anisotropic_dataset(synthetic_raw, folders):
    env = {"THREEDINO_RAW": str(synthetic_raw)}
    result = run_3dino("plan", "-d", "991", "-np", "1", env=env)
    assert result.returncode == 0, result.stderr
    result = run_3dino("preprocess", "-d", "991", "-np", "2", env=env)
    assert result.returncode == 0, result.stderr
    folder = folders["preprocessed"] / "Dataset991_Ellipsoids"
    plans = json.loads((folder / "plans.json").read_text())
    assert set(plans["configurations"]) >= {"pretrain", "finetune"}
    # 16 slices: no case passes pretrain_highres's min_axis of 48, so preprocess skips it with a note
    assert "pretrain_highres skipped: 0 of 6 cases" in result.stderr and not (folder / "pretrain_highres").exists()
    for name, config in plans["configurations"].items():
        if name == "pretrain_highres":
            continue
        infos = [json.loads(p.read_text()) for p in sorted((folder / name).glob("*.json"))]
        assert len(infos) == 6
        for info in infos:
            arr = load(folder, name, info["case_id"])
            assert arr.min() >= -1 and arr.max() <= 1 and list(arr.shape[1:]) == info["shape"]
            assert info["transpose"] == plans["transpose"]
            if config["resample"]:
                spacing_t = np.array(info["original_geometry"]["spacing"])[plans["transpose"]]
                assert info["spacing"] == config["spacing"]
                assert info["shape"] == np.round(np.array(info["shape_after_crop"]) * spacing_t
                                                 / np.array(config["spacing"])).astype(int).tolist()
                seg = load(folder, name, f"{info['case_id']}_seg")
                assert set(np.unique(seg)) <= {0, 1, 2} and seg.shape[1:] == arr.shape[1:]
    assert (folder / "splits.json").is_file()
