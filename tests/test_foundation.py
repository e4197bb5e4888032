"""Folders, dataset ids, atomic writes, image io geometry and the CLI shell."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_3dino

from threedino_pipe.artifacts import Plans, Splits
from threedino_pipe.demo.examples import oblique_direction
from threedino_pipe.raw_data.image_io import (
    Geometry,
    read_image,
    read_image_with_nonfinite,
    write_image,
)
from threedino_pipe.runtime import paths
from threedino_pipe.runtime.atomic_files import atomic_path, write_json
from threedino_pipe.runtime.errors import UserError

STAGES = ["verify", "plan", "preprocess", "pretrain", "adapt-highres", "finetune", "predict", "evaluate",
          "export", "visualize", "demo"]


def test_folder_env_vars_and_nnunet_fallback(tmp_path, monkeypatch):
    for name in ("THREEDINO_RAW", "THREEDINO_PREPROCESSED", "THREEDINO_RESULTS", "nnUNet_raw"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.raw_root() == tmp_path / "3dino_data" / "raw"
    assert any("THREEDINO_RAW is not set" in line for line in paths.describe_defaults())
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nn"))
    assert paths.raw_root() == tmp_path / "nn"
    monkeypatch.setenv("THREEDINO_RAW", str(tmp_path / "mine"))
    assert paths.raw_root() == tmp_path / "mine"
    monkeypatch.setenv("THREEDINO_RESULTS", str(tmp_path / "res"))
    assert paths.results_root() == tmp_path / "res"


def test_dataset_ids_resolve_and_errors_list_what_exists(tmp_path):
    for name in ("Dataset501_Liver", "Dataset502_Lung", "Dataset0502_Other", "notes"):
        (tmp_path / name).mkdir()
    assert paths.resolve_dataset(501, tmp_path).name == "Dataset501_Liver"
    assert paths.resolve_dataset("Dataset502_Lung", tmp_path).name == "Dataset502_Lung"
    with pytest.raises(UserError) as missing:
        paths.resolve_dataset(503, tmp_path)
    assert "Dataset501_Liver" in missing.value.render() and "Dataset502_Lung" in missing.value.render()
    with pytest.raises(UserError) as ambiguous:
        paths.resolve_dataset("502", tmp_path)
    assert "ambiguous" in ambiguous.value.render()


def test_missing_preprocessed_dataset_names_the_preprocessed_folder(tmp_path, monkeypatch):
    (tmp_path / "Dataset501_Liver").mkdir()
    monkeypatch.setenv("THREEDINO_PREPROCESSED", str(tmp_path))
    assert paths.resolve_preprocessed("501") == tmp_path / "Dataset501_Liver"
    with pytest.raises(UserError) as missing:
        paths.resolve_preprocessed("503")
    text = missing.value.render()
    assert "preprocessed folder" in text and "raw folder" not in text and "Dataset501_Liver" in text
    assert "3dino preprocess -d 503" in text and "THREEDINO_PREPROCESSED" in text and "THREEDINO_RAW" not in text


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os
    write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_artifact_read_refuses_other_kind_or_version_naming_the_command(tmp_path):
    write_json(tmp_path / "plans.json", {"kind": "plans", "schema_version": 99})
    with pytest.raises(UserError) as err:
        Plans.read(tmp_path / "plans.json", rerun="3dino plan -d 1")
    assert "3dino plan -d 1" in err.value.render()
    with pytest.raises(UserError):
        Splits.read(tmp_path / "plans.json", rerun="x")


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_image_round_trip_keeps_axis_order_and_oblique_geometry(tmp_path, ending):
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)  # X x Y x Z
    geometry = Geometry(size=(5, 6, 7), spacing=(0.8, 0.9, 3.0), origin=(10.0, -20.0, 30.5),
                        direction=oblique_direction(20.0))
    write_image(array, geometry, tmp_path / f"img{ending}")
    back, geo = read_image(tmp_path / f"img{ending}")
    np.testing.assert_array_equal(back, array)
    assert geo.size == (5, 6, 7)
    np.testing.assert_allclose(geo.spacing, geometry.spacing, atol=1e-6)
    np.testing.assert_allclose(geo.origin, geometry.origin, atol=1e-5)
    np.testing.assert_allclose(geo.direction, geometry.direction, atol=1e-6)
    # voxel (i, j, k) of our array is SimpleITK's index (i, j, k)
    image = sitk.ReadImage(str(tmp_path / f"img{ending}"))
    assert image.GetPixel(4, 1, 2) == array[4, 1, 2]


def test_nan_in_nifti_is_seen_although_simpleitk_reads_zero(tmp_path):
    import nibabel as nib
    data = np.ones((6, 6, 6), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    plain, _ = read_image(tmp_path / "nan.nii.gz")
    assert np.isfinite(plain).all()  # the SimpleITK trap
    seen, _ = read_image_with_nonfinite(tmp_path / "nan.nii.gz")
    assert np.isnan(seen[1, 2, 3]) and np.isinf(seen[0, 0, 0])


def test_unreadable_image_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserError) as err:
        read_image(bad)
    assert "bad.nii.gz" in err.value.render()


def test_cli_lists_every_stage_and_errors_without_traceback(folders):
    result = run_3dino("--help")
    assert result.returncode == 0
    for stage in STAGES:
        assert stage in result.stdout
    missing = run_3dino("plan", "-d", "777")
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr and "no dataset '777'" in missing.stderr


def test_truncated_nifti_is_refused_although_simpleitk_reads_it(tmp_path):
    geometry = Geometry(size=(20, 20, 20), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(0)
    for ending in (".nii.gz", ".nii"):
        path = tmp_path / f"img{ending}"
        write_image(rng.normal(size=(20, 20, 20)).astype(np.float32), geometry, path)
        assert read_image(path)[0].shape == (20, 20, 20)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(UserError) as err:
            read_image(path)
        assert "truncated" in err.value.render() and path.name in err.value.render()


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_makes_idle_openmp_threads_sleep_unless_the_user_chose(preset, expected):
    """`3dino` sets OMP_WAIT_POLICY=PASSIVE before torch loads; a value the user set wins."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, sys; sys.argv = ['3dino', '--version']; from threedino_pipe import cli\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "import torch; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == [expected, "True"]


def test_a_message_in_a_batch_log_stays_on_one_line_however_long_its_path():
    """stderr piped to a log (not a terminal): rich would wrap at 80 columns and split the path."""
    import subprocess
    import sys
    path = "/data/" + "a_long_folder_name/" * 12 + "case_0001.nii.gz"
    code = ("from threedino_pipe.runtime.progress import stderr_console; "
            f"stderr_console().print('wrote {path} (2 labels)')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"wrote {path} (2 labels)"]
