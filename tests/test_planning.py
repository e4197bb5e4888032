"""`3dino plan`: fingerprint and plans.json on real (MNI152) and generated anisotropic, oblique data.

Numbers in the files are checked against values computed here, independently, from the raw
files read with SimpleITK; the command runs for real in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import THREEDINO, invoke_3dino, run_3dino

from threedino_pipe.artifacts import DatasetJson, Fingerprint
from threedino_pipe.artifacts.fingerprint import CaseGeometry, ChannelStatistics, IntensityStatistics
from threedino_pipe.demo.examples import build_synthetic_dataset
from threedino_pipe.planning import memory
from threedino_pipe.planning.fingerprint import cross_slice_axis, guess_modality
from threedino_pipe.planning.planner import PlanOptions, make_plans, patch_size, target_spacing
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import plan

CONFIG_FIELDS = ("spacing", "normalization", "crop", "preset", "batch_size")


def read_raw(folder: Path) -> list[dict]:
    """Every case of a raw dataset read with SimpleITK: spacing, array (i,j,k), label, direction."""
    cases = []
    for image_path in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        case = image_path.name[: -len("_0000.nii.gz")]
        image = sitk.ReadImage(str(image_path))
        label_path = folder / "labelsTr" / f"{case}.nii.gz"
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).T if label_path.exists() else None
        cases.append({"case": case, "spacing": np.array(image.GetSpacing()), "image": sitk.GetArrayFromImage(image).T,
                      "label": label, "direction": np.array(image.GetDirection()).reshape(3, 3)})
    return cases


def orientation_code(direction: np.ndarray) -> str:
    """LPS-convention code: per index axis, the patient direction its column points to."""
    letters = ""
    for column in direction.T:
        axis = int(np.argmax(np.abs(column)))
        letters += ("LPS" if column[axis] > 0 else "RAI")[axis]
    return letters


def check_foreground_stats(stats: dict, population: np.ndarray) -> None:
    """Sampled statistics agree with the full foreground population within sampling tolerance."""
    scale = np.percentile(population, 99.5) - np.percentile(population, 0.5)
    for key, pct, tol in (("p0.5", 0.5, 0.03), ("p50", 50, 0.02), ("p99.5", 99.5, 0.03), ("p0.05", 0.05, 0.08),
                          ("p99.95", 99.95, 0.08)):
        assert abs(stats[key] - np.percentile(population, pct)) <= tol * scale, key
    assert abs(stats["mean"] - population.mean()) <= 0.02 * scale
    assert abs(stats["std"] - population.std()) <= 0.03 * population.std()
    assert population.min() <= stats["min"] <= stats["p0.05"] and stats["p99.95"] <= stats["max"] <= population.max()


def load_outputs(preprocessed: Path, name: str) -> tuple[dict, dict]:
    folder = preprocessed / name
    return (json.loads((folder / "dataset_fingerprint.json").read_text()),
            json.loads((folder / "plans.json").read_text()))


def assert_clean_failure(result, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in result.stderr, result.stderr


# ---------------------------------------------------------------- rules (in-process)

@pytest.mark.parametrize("spacing, expected", [
    ((0.8, 0.8, 3.0), (2, True)),
    ((3.0, 0.8, 0.8), (0, True)),
    ((0.8, 3.0, 0.9), (1, True)),
    ((0.7, 0.9, 3.0), (2, True)),        # anisotropic in all three axes: i,j agree best
    ((0.5, 2.9, 3.0), (0, True)),        # j,k agree: i differs most from the other two
    ((1.0, 1.1, 1.2), (2, False)),       # isotropic: the last axis plays the cross-slice role
])
def test_cross_slice_axis(spacing, expected):
    assert cross_slice_axis(spacing) == expected


def test_modality_guess_from_name_then_intensities():
    assert guess_modality("CT", [], None)[0] == "CT"
    assert guess_modality("T1c", [], None)[0] == "MR"
    assert guess_modality("flair", [], None)[0] == "MR"
    assert guess_modality("PET_SUV", [], None)[0] == "PET"
    assert guess_modality("scan", [-1024.0, -1000.0, -3024.0], _stats(-100.0, 400.0)) == (
        "CT", "intensities: median volume minimum -1024 (air) and foreground within [-1100, 3100] HU")
    assert guess_modality("scan", [0.0, 3.0], _stats(10.0, 900.0))[0] == "other"


def _stats(p0_5: float, p99_5: float) -> IntensityStatistics:
    return IntensityStatistics(p0_05=None, p0_5=p0_5, p50=None, p99_5=p99_5, p99_95=None, mean=None, std=None,
                               min=None, max=None)


def _fingerprint(spacings, shape=(64, 64, 40)) -> Fingerprint:
    cases = {f"c{i}": CaseGeometry(spacing=list(s), shape=list(shape), shape_after_crop=list(shape),
                                   orientation="RAI", direction=[1, 0, 0, 0, 1, 0, 0, 0, 1], origin=[0, 0, 0])
             for i, s in enumerate(spacings)}
    median = [float(v) for v in np.median(np.array(spacings), axis=0)]
    axis, aniso = cross_slice_axis(median)
    channel = ChannelStatistics(name="CT", modality_guess="CT", modality_reason="name",
                                foreground=_stats(-50.0, 300.0), num_samples=100)
    return Fingerprint(dataset="Dataset999_X", task="segmentation", num_cases=len(cases), cases=cases,
                       median_spacing=median, median_shape=list(shape), cross_slice_axis=axis, anisotropic=aniso,
                       channels={"0": channel})


def test_target_spacing_median_and_anisotropy_rule():
    iso = [(1.0, 1.0, 1.2), (1.1, 1.0, 1.4), (0.9, 1.0, 1.3)]
    assert target_spacing(_fingerprint(iso))[0] == [1.0, 1.0, 1.3]
    z = [2.5, 3.0, 5.0, 5.0, 5.0]
    aniso = [(0.8, 0.8, s) for s in z]
    spacing, reason = target_spacing(_fingerprint(aniso))
    assert spacing == [0.8, 0.8, pytest.approx(np.percentile(z, 10))] and "10th-percentile" in reason


def test_patch_size_rule():
    assert patch_size([48, 48, 17]) == [48, 48, 16]
    assert patch_size([300, 130, 10]) == [112, 112, 16]
    assert patch_size([40, 47, 111]) == [32, 32, 96]


def test_memory_model_presets_match_the_backbone_presets_and_grow_with_memory():
    from threedino_pipe.models.presets import PRESETS
    assert {n: (p.dim, p.depth, p.heads) for n, p in memory.PRESETS.items()} == {
        n: (d["embed_dim"], d["depth"], d["num_heads"]) for n, d in PRESETS.items()}
    spec = DatasetJson(channel_names={0: "CT"}, labels={"background": 0, "x": 1}, task="segmentation",
                       file_ending=".nii.gz", num_training=3)
    fp = _fingerprint([(0.8, 0.8, 3.0)] * 3, shape=(200, 200, 80))
    chosen = [make_plans(fp, spec, PlanOptions(), gb).configurations.finetune.preset for gb in (8, 16, 40)]
    assert chosen == ["small", "base", "large"]
    plans = make_plans(fp, spec, PlanOptions(), 8.0)
    assert plans == make_plans(fp, spec, PlanOptions(), 8.0)
    for name in plans.configuration_names():
        config = plans.configuration(name)
        estimate = (memory.finetune_estimate(memory.PRESETS["small"], config.patch_size, 1, "segmentation")
                    if name == "finetune" else
                    memory.pretrain_estimate(memory.PRESETS["small"], config.global_crop, config.local_crop))
        assert estimate.total(config.batch_size) <= memory.usable_bytes(8.0)


# ---------------------------------------------------------------- the real command

@pytest.mark.e2e
def test_plan_on_real_mni_scans(mni_raw, folders):
    result = run_3dino("plan", "-d", "990", "-np", "1", env={"THREEDINO_RAW": str(mni_raw)})
    assert result.returncode == 0, result.stderr
    assert "plans.json" in result.stdout and "transpose" in result.stdout
    fp, plans = load_outputs(folders["preprocessed"], "Dataset990_MNITissue")
    raw = read_raw(mni_raw / "Dataset990_MNITissue")
    assert fp["kind"] == "fingerprint" and fp["schema_version"] == 1 and fp["num_cases"] == len(raw) == 8
    for case in raw:
        record = fp["cases"][case["case"]]
        assert record["spacing"] == pytest.approx(case["spacing"].tolist())
        assert record["shape"] == list(case["image"].shape)
        nonzero = np.argwhere(case["image"] != 0)
        assert record["shape_after_crop"] == (nonzero.max(0) - nonzero.min(0) + 1).tolist()
        assert record["orientation"] == orientation_code(case["direction"])
    spacings = np.array([c["spacing"] for c in raw])
    assert fp["median_spacing"] == pytest.approx(np.median(spacings, axis=0).tolist())
    channel = fp["channels"]["0"]
    assert channel["name"] == "T1" and channel["modality_guess"] == "MR"
    assert channel["num_samples"] <= 10_000 * len(raw)
    check_foreground_stats(channel["foreground"], np.concatenate([c["image"][c["label"] > 0] for c in raw]))

    assert plans["kind"] == "plans" and plans["schema_version"] == 1 and plans["memory_target_gb"] == 8.0
    assert plans["transpose"] == [0, 1, 2] and plans["labels"] == {"background": 0, "grey_matter": 1,
                                                                   "white_matter": 2}
    pre, high, tune = (plans["configurations"][n] for n in ("pretrain", "pretrain_highres", "finetune"))
    assert (pre["global_crop"], pre["local_crop"], pre["num_local_crops"], pre["min_axis"]) == (96, 48, 8, 24)
    assert (high["global_crop"], high["local_crop"], high["min_axis"]) == (112, 64, 48)
    assert pre["normalization"] == [{"scheme": "volume_percentile", "lower_pct": 0.05, "upper_pct": 99.95,
                                     "range": [-1, 1], "clip": True}]
    assert pre["crop"] == "foreground_after_normalization" and pre["resample"] is False
    assert tune["spacing"] == pytest.approx(np.median(spacings, axis=0).tolist())    # ratio < 3: plain median
    assert tune["normalization"][0]["scheme"] == "volume_percentile"                 # MR
    resampled = np.median([np.array(c["image"].shape) * c["spacing"] / np.array(tune["spacing"]) for c in raw], 0)
    assert all(p % 16 == 0 and 16 <= p <= min(112, r) for p, r in zip(tune["patch_size"], resampled, strict=True))
    for config in plans["configurations"].values():
        assert set(CONFIG_FIELDS) <= set(config["reasons"]) and all(config["reasons"].values())
    assert all(isinstance(reason, str) and reason for reason in plans["decisions"].values())


@pytest.mark.e2e
def test_plan_anisotropic_oblique_is_deterministic(synthetic_raw, folders, tmp_path):
    env = {"THREEDINO_RAW": str(synthetic_raw)}
    first = run_3dino("plan", "-d", "991", "-np", "2", env=env)
    assert first.returncode == 0, first.stderr
    out = folders["preprocessed"] / "Dataset991_Ellipsoids"
    saved = {name: (out / name).read_bytes() for name in ("dataset_fingerprint.json", "plans.json")}
    second = run_3dino("plan", "-d", "991", "-np", "1", env={**env, "THREEDINO_PREPROCESSED": str(tmp_path)})
    assert second.returncode == 0, second.stderr
    for name, content in saved.items():
        assert (tmp_path / "Dataset991_Ellipsoids" / name).read_bytes() == content, name

    fp, plans = load_outputs(folders["preprocessed"], "Dataset991_Ellipsoids")
    raw = read_raw(synthetic_raw / "Dataset991_Ellipsoids")
    spacings = np.array([c["spacing"] for c in raw])
    assert fp["cross_slice_axis"] == 2 and fp["anisotropic"] is True and plans["transpose"] == [0, 1, 2]
    channel = fp["channels"]["0"]
    assert channel["modality_guess"] == "CT"
    check_foreground_stats(channel["foreground"], np.concatenate([c["image"][c["label"] > 0] for c in raw]))
    for case in raw:
        assert fp["cases"][case["case"]]["orientation"] == orientation_code(case["direction"])
    tune = plans["configurations"]["finetune"]
    median = np.median(spacings, axis=0)
    expected = [median[0], median[1], max(np.percentile(spacings[:, 2], 10), median[:2].max())]
    assert tune["spacing"] == pytest.approx(expected)
    assert "10th-percentile" in tune["reasons"]["spacing"]
    assert tune["image_interpolation"] == "linear" and tune["label_interpolation"] == "linear_per_class"
    norm = tune["normalization"][0]
    assert norm["scheme"] == "dataset_percentile"
    assert (norm["lower"], norm["upper"]) == (channel["foreground"]["p0.5"], channel["foreground"]["p99.5"])
    resampled = np.median([np.array(c["image"].shape) * c["spacing"] / np.array(expected) for c in raw], axis=0)
    assert all(p % 16 == 0 and p <= r for p, r in zip(tune["patch_size"], resampled, strict=True))
    assert tune["patch_size"] == [48, 48, 16]
    assert "0 of 6 cases pass" in plans["configurations"]["pretrain"]["reasons"]["min_axis"]


@pytest.mark.e2e
def test_transpose_crop_and_overrides_on_axis0_data(tmp_path, folders):
    raw = build_synthetic_dataset(folders["raw"], 993, 3, shape=(16, 48, 48), spacing=(3.0, 0.8, 0.8),
                                  name="AxisZero", seed=3)
    image_path = raw / "imagesTr" / "case_001_0000.nii.gz"          # zero a border: a smaller nonzero box
    image = sitk.ReadImage(str(image_path))
    array = sitk.GetArrayFromImage(image)                           # k, j, i
    array[:, :5, :] = 0
    array[40:, :, :] = 0
    zeroed = sitk.GetImageFromArray(array)
    zeroed.CopyInformation(image)
    sitk.WriteImage(zeroed, str(image_path))

    result = run_3dino("plan", "-d", "993", "-np", "1")
    assert result.returncode == 0, result.stderr
    fp, plans = load_outputs(folders["preprocessed"], raw.name)
    assert fp["cross_slice_axis"] == 0 and plans["transpose"] == [1, 2, 0]
    assert "moved last" in plans["decisions"]["transpose"]
    assert fp["cases"]["case_001"]["shape_after_crop"] == [16, 43, 40]
    assert fp["cases"]["case_000"]["shape_after_crop"] == [16, 48, 48]
    tune = plans["configurations"]["finetune"]
    assert tune["spacing"] == pytest.approx([0.8, 0.8, 3.0])       # transposed order
    assert tune["median_shape"] == [48, 48, 16] and tune["patch_size"] == [48, 48, 16]

    result = run_3dino("plan", "-d", "993", "-np", "1", "--preset", "tiny", "--norm", "volume", "--target-spacing",
                       "2.5,1,1", "--patch-size", "16,32,48", "--batch-size", "3", "--memory-gb", "16")
    assert result.returncode == 0, result.stderr
    _, plans = load_outputs(folders["preprocessed"], raw.name)
    tune = plans["configurations"]["finetune"]
    assert tune["spacing"] == [1.0, 1.0, 2.5] and tune["patch_size"] == [32, 48, 16]
    assert tune["batch_size"] == 3 and tune["normalization"][0]["scheme"] == "volume_percentile"
    assert all(c["preset"] == "tiny" for c in plans["configurations"].values())
    for field, flag in (("spacing", "--target-spacing"), ("patch_size", "--patch-size"),
                        ("batch_size", "--batch-size"), ("preset", "--preset")):
        assert tune["reasons"][field] == f"set by {flag}"
    assert "set by --norm" in tune["reasons"]["normalization"] and plans["decisions"]["preset"] == "set by --preset"
    assert plans["options"] == {"preset": "tiny", "norm": "volume", "target_spacing": [2.5, 1.0, 1.0],
                                "patch_size": [16, 32, 48], "batch_size": 3, "allow_nan": False,
                                "highres_min_axis": None, "test_fraction": None, "splits_from": None,
                                "memory_gb": 16.0}
    assert plans["memory_target_gb"] == 16.0


@pytest.mark.e2e
def test_bad_options_and_broken_dataset_write_nothing(synthetic_raw, folders, tmp_path):
    env = {"THREEDINO_RAW": str(synthetic_raw)}
    for flag, value in (("--patch-size", "100,112,64"), ("--target-spacing", "0.8,abc")):
        result = invoke_3dino("plan", "-d", "991", flag, value, env=env)
        assert_clean_failure(result, flag, "fix:")
    assert list(folders["preprocessed"].iterdir()) == []

    broken = folders["raw"] / "Dataset991_Ellipsoids"
    shutil.copytree(synthetic_raw / "Dataset991_Ellipsoids", broken)
    (broken / "labelsTr" / "case_002.nii.gz").unlink()
    result = run_3dino("plan", "-d", "991", "-np", "1")
    assert_clean_failure(result, "error(s)", "3dino verify -d 991")
    assert "labelsTr/case_002.nii.gz" in result.stdout
    assert list(folders["preprocessed"].iterdir()) == []


def test_unlabeled_and_classification_datasets(synthetic_raw, folders):
    source = synthetic_raw / "Dataset991_Ellipsoids"
    for dataset_id, task in ((994, "unlabeled"), (995, "classification")):
        folder = folders["raw"] / f"Dataset{dataset_id}_{task.title()}"
        shutil.copytree(source / "imagesTr", folder / "imagesTr")
        spec = {"channel_names": {"0": "scan"}, "numTraining": 6, "file_ending": ".nii.gz", "task": task}
        if task == "classification":
            spec["class_names"] = ["no", "yes"]
            with (folder / "labelsTr.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["case_id", "label"])
                writer.writerows([f"case_{i:03d}", i % 2] for i in range(6))
        (folder / "dataset.json").write_text(json.dumps(spec))
        plan.run(str(dataset_id), num_processes=1)
        fp, plans = load_outputs(folders["preprocessed"], folder.name)
        channel = fp["channels"]["0"]
        assert channel["modality_guess"] == "CT" and channel["modality_reason"].startswith("intensities")
        foreground = []
        for case in read_raw(folder):                       # foreground: above the volume's 0.05th percentile
            values = case["image"].ravel()
            foreground.append(values[values > np.percentile(values, 0.05)])
        check_foreground_stats(channel["foreground"], np.concatenate(foreground))
        if task == "unlabeled":
            assert sorted(plans["configurations"]) == ["pretrain", "pretrain_highres"]
            with pytest.raises(UserError, match="--patch-size"):
                plan.run(str(dataset_id), patch_size="32,32,16", num_processes=1)
        else:
            tune = plans["configurations"]["finetune"]
            assert tune["label_interpolation"] is None and tune["normalization"][0]["scheme"] == "dataset_percentile"
            assert plans["class_names"] == ["no", "yes"] and 1 <= tune["batch_size"] <= 32


def test_nonfinite_voxels_are_refused_or_left_out_of_the_statistics(synthetic_raw, folders):
    folder = folders["raw"] / "Dataset991_Ellipsoids"
    shutil.copytree(synthetic_raw / "Dataset991_Ellipsoids", folder)
    path = folder / "imagesTr" / "case_000_0000.nii.gz"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "case_000.nii.gz")))
    inside = np.argwhere(label > 0)[:50]
    array[tuple(inside.T)] = np.nan                  # NaN inside the foreground (SimpleITK reads them as 0)
    array[tuple(np.argwhere(label > 0)[50:60].T)] = np.inf
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(path))
    with pytest.raises(UserError, match="error"):
        plan.run("991", num_processes=1)
    assert list(folders["preprocessed"].iterdir()) == []

    plan.run("991", allow_nan=True, num_processes=1)
    fp, plans = load_outputs(folders["preprocessed"], folder.name)
    stats = fp["channels"]["0"]["foreground"]
    assert all(np.isfinite(v) for v in stats.values())
    others = [c["image"][c["label"] > 0] for c in read_raw(folder) if c["case"] != "case_000"]
    population = np.concatenate([array[(label > 0) & np.isfinite(array)], *others])   # NaN/Inf as written
    check_foreground_stats(stats, population)
    assert plans["options"]["allow_nan"] is True


@pytest.mark.e2e
@pytest.mark.parametrize("columns", ["120", None])
def test_plans_table_fits_120_columns_with_the_reasons_wrapped(synthetic_raw, folders, columns):
    """The printed plans table wraps its reasons: no line wider than COLUMNS=120, nor than 120 in a log (no
    COLUMNS, stdout not a terminal); every reason is still printed whole."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update({"THREEDINO_RAW": str(synthetic_raw), **({"COLUMNS": columns} if columns else {})})
    result = subprocess.run([*THREEDINO, "plan", "-d", "991", "-np", "1"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    widest = max(result.stdout.splitlines(), key=len)
    assert len(widest) <= 120, widest
    _, plans = load_outputs(folders["preprocessed"], "Dataset991_Ellipsoids")
    reason = plans["configurations"]["finetune"]["reasons"]["spacing"]
    assert len(reason) > 60  # long enough to need wrapping beside the other columns
    cells = "".join(line.split("│")[3].strip() for line in result.stdout.splitlines() if line.count("│") == 4)
    assert reason.replace(" ", "") in cells.replace(" ", "")


def test_series_rules_go_from_dataset_json_into_plans(synthetic_raw, folders):
    """dataset.json's series_rules (DICOM series per channel for predict) reach plans.json (and from there
    model.json); a pattern that does not compile stops plan, naming dataset.json and the channel."""
    folder = folders["raw"] / "Dataset991_Ellipsoids"
    shutil.copytree(synthetic_raw / "Dataset991_Ellipsoids", folder)
    spec = json.loads((folder / "dataset.json").read_text())
    channel = spec["channel_names"]["0"]
    spec["series_rules"] = {channel: "soft tissue|std"}
    (folder / "dataset.json").write_text(json.dumps(spec))
    plan.run("991", num_processes=1)
    _, plans = load_outputs(folders["preprocessed"], folder.name)
    assert plans["series_rules"] == {channel: "soft tissue|std"}

    spec["series_rules"] = {channel: "soft(|std"}
    (folder / "dataset.json").write_text(json.dumps(spec))
    result = run_3dino("plan", "-d", "991", "-np", "1")
    assert_clean_failure(result, "dataset.json", f"'series_rules' of channel '{channel}'", "does not compile",
                         '"series_rules": {"CT": "soft|std"}')
