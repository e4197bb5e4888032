"""Unit tests of predict's inputs, model zips and the way back to the input geometry.

The geometry tests use an "oracle": the one-hot of the label that ``preprocess_case`` produced
(exactly what a perfect network would output on the preprocessed grid) is restored with
predict's code and must give back the original label image voxel for voxel.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from threedino_pipe.artifacts import CasePreprocessing, Normalization
from threedino_pipe.demo.examples import oblique_direction
from threedino_pipe.evaluation.segmentation_metrics import dice
from threedino_pipe.inference import geometry
from threedino_pipe.inference.input_cases import discover_cases, group_cases, list_entries
from threedino_pipe.inference.model_zip import check_members, unpack_model_zip
from threedino_pipe.preprocessing.pipeline import preprocess_case
from threedino_pipe.raw_data.image_io import Geometry
from threedino_pipe.runtime.errors import UserError


def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        (folder / name).write_bytes(b"")
        paths.append(folder / name)
    return paths


# ----- grouping rule ------------------------------------------------------------------------
def test_raw_convention_groups_channels(tmp_path):
    _touch(tmp_path, "b_0001.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz")
    cases = discover_cases(tmp_path, 2)
    assert [c.case_id for c in cases] == ["a", "b"]
    assert [p.name for p in cases[0].files] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert cases[1].output_name == "b.nii.gz"


def test_single_channel_suffix_groups_when_every_group_is_channel_0(tmp_path):
    _touch(tmp_path, "a_0000.nrrd", "b_0000.nrrd")
    cases = discover_cases(tmp_path, 1)
    assert [(c.case_id, c.output_name) for c in cases] == [("a", "a.nrrd"), ("b", "b.nrrd")]


def test_numbered_patients_are_cases_named_by_their_whole_stem(tmp_path):
    _touch(tmp_path, "patient_0012.nii.gz", "patient_0013.nii.gz", "notes.txt")
    cases = discover_cases(tmp_path, 1)
    assert [c.case_id for c in cases] == ["patient_0012", "patient_0013"]
    assert cases[0].output_name == "patient_0012.nii.gz"


def test_complete_channel_groups_larger_than_one_channel_are_refused(tmp_path):
    _touch(tmp_path, "case_0000.nii.gz", "case_0001.nii.gz")
    with pytest.raises(UserError) as err:
        discover_cases(tmp_path, 1)
    text = err.value.render()
    assert "channel groups of 2 channel(s)" in text and "the model takes 1 channel(s)" in text
    assert "case 'case': 2 channel(s) (case_0000.nii.gz, case_0001.nii.gz)" in text
    assert "case_0001_0000.nii.gz" in text  # the fix for separate scans
    _touch(tmp_path, "case_0001_0000.nii.gz", "case_0000_0000.nii.gz")
    (tmp_path / "case_0000.nii.gz").unlink()
    (tmp_path / "case_0001.nii.gz").unlink()
    assert [c.case_id for c in discover_cases(tmp_path, 1)] == ["case_0000", "case_0001"]


def test_mixed_names_fall_back_to_whole_stems_for_one_channel(tmp_path):
    _touch(tmp_path, "a_0000.mha", "scan.nii")
    assert [(c.case_id, c.output_name) for c in discover_cases(tmp_path, 1)] == [("a_0000", "a_0000.mha"),
                                                                                 ("scan", "scan.nii")]


def test_multichannel_model_refuses_incomplete_groups_and_lists_them(tmp_path):
    _touch(tmp_path, "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c_0000.nii.gz", "c_0001.nii.gz",
           "c_0002.nii.gz")
    with pytest.raises(UserError) as err:
        discover_cases(tmp_path, 2)
    text = err.value.render()
    assert "case 'b' (b_0000.nii.gz): missing channel(s) 0001" in text
    assert "case 'c'" in text and "unexpected channel(s) 0002" in text
    assert "case 'a'" not in text


def test_multichannel_model_refuses_plain_files(tmp_path):
    _touch(tmp_path, "scan.nii.gz", "other.nii.gz")
    with pytest.raises(UserError, match="scan.nii.gz: no _XXXX channel suffix"):
        discover_cases(tmp_path, 2)


def test_two_files_with_one_stem_are_refused(tmp_path):
    _touch(tmp_path, "a.nii.gz", "a.nrrd")
    with pytest.raises(UserError, match="share the name 'a'"):
        discover_cases(tmp_path, 1)


def test_dicom_folders_are_cases_written_as_nifti(tmp_path):
    (tmp_path / "ct_001").mkdir()
    (tmp_path / "mr_0000").mkdir()
    (tmp_path / "mr_0001").mkdir()
    cases = group_cases(list_entries(tmp_path), 1)
    assert [(c.case_id, c.output_name) for c in cases] == [("ct_001", "ct_001.nii.gz"), ("mr_0000", "mr_0000.nii.gz"),
                                                           ("mr_0001", "mr_0001.nii.gz")]
    with pytest.raises(UserError, match="ct_001: no _XXXX channel suffix"):
        group_cases(list_entries(tmp_path), 2)
    (tmp_path / "ct_001").rmdir()
    (case,) = group_cases(list_entries(tmp_path), 2)
    assert (case.case_id, [p.name for p in case.files], case.output_name) == ("mr", ["mr_0000", "mr_0001"],
                                                                              "mr.nii.gz")


def test_output_folder_inside_the_input_folder_is_not_a_case(tmp_path):
    _touch(tmp_path, "a.nii.gz")
    _touch(tmp_path / "predictions", "a.nii.gz", "predict_args.json")
    assert [c.case_id for c in discover_cases(tmp_path, 1, exclude=tmp_path / "predictions")] == ["a"]


def test_list_file_paths_are_relative_to_the_list(tmp_path):
    _touch(tmp_path / "scans", "x.nii.gz", "y.nii.gz")
    listing = tmp_path / "cases.txt"
    listing.write_text(f"# two scans\nscans/x.nii.gz\n\n{tmp_path / 'scans' / 'y.nii.gz'}\n")
    cases = discover_cases(listing, 1)
    assert [c.case_id for c in cases] == ["x", "y"]
    assert cases[0].files[0] == tmp_path / "scans" / "x.nii.gz"


def test_empty_inputs_are_refused(tmp_path):
    _touch(tmp_path / "empty", "readme.md")
    with pytest.raises(UserError, match="no image file"):
        discover_cases(tmp_path / "empty", 1)
    with pytest.raises(UserError, match="not found"):
        discover_cases(tmp_path / "missing", 1)


# ----- model zips -----------------------------------------------------------------------------
def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("member", ["../evil", "sub/../../evil", "/tmp/evil_abs", "C:/evil"])
def test_zip_with_escaping_member_is_refused_before_anything_is_written(tmp_path, member):
    path = _zip(tmp_path / "model.zip", {"model.json": b"{}", "checkpoint_best.pt": b"x", member: b"evil"})
    target = tmp_path / "unpack" / "inner"
    target.mkdir(parents=True)
    with pytest.raises(UserError, match="refused to unpack") as err:
        unpack_model_zip(path, target)
    assert member in err.value.render()
    assert list(target.iterdir()) == [] and not (tmp_path / "unpack" / "evil").exists()
    assert not Path("/tmp/evil_abs").exists()


def test_zip_with_a_link_or_without_model_json_is_refused(tmp_path):
    with pytest.raises(UserError, match="symbolic link"):
        check_members(_zip(tmp_path / "a.zip", {"model.json": b"{}"}, link="checkpoint_best.pt"))
    with pytest.raises(UserError, match="no top-level model.json"):
        check_members(_zip(tmp_path / "b.zip", {"sub/model.json": b"{}"}))
    (tmp_path / "c.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable zip"):
        check_members(tmp_path / "c.zip")


def test_good_zip_unpacks(tmp_path):
    path = _zip(tmp_path / "m.zip", {"model.json": b"{}", "checkpoint_best.pt": b"weights"})
    out = unpack_model_zip(path, tmp_path / "t")
    assert (out / "checkpoint_best.pt").read_bytes() == b"weights"


# ----- back to the input geometry: the oracle ------------------------------------------------
LABELS = {"background": 0, "body": 1, "lesion": 2}


def _plans(spacing_t: list[float], transpose: list[int]) -> CasePreprocessing:
    """A finetune configuration as `3dino plan` writes it (per-volume normalisation, crop to nonzero)."""
    values = sorted({0, *(v for v in LABELS.values() if isinstance(v, int))})
    return CasePreprocessing(
        configuration="finetune", transpose=transpose, resample=True, spacing=spacing_t, crop="nonzero",
        normalization=[Normalization(scheme="volume_percentile", lower_pct=0.5, upper_pct=99.5, range=[-1, 1],
                                     clip=True)],
        image_interpolation="bspline3", label_interpolation="linear_per_class", label_values=values)


def _case(size=(30, 9, 26), spacing=(0.9, 3.0, 0.8), seed=0) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A body (label 1) with a lesion (label 2) inside a zero border (so cropping crops), oblique, anisotropic."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).astype(float)
    centre = np.array([13.0, 4.0, 12.0])
    body = (((grid - centre) / [9.5, 3.2, 9.0]) ** 2).sum(-1) <= 1
    lesion = body & ((((grid - centre - [2, 0, 1]) / [3.5, 1.6, 3.0]) ** 2).sum(-1) <= 1)
    label = body.astype(np.uint8) + lesion.astype(np.uint8)
    image = np.where(body, 300.0 + 200.0 * lesion + rng.normal(0, 20, size), 0.0).astype(np.float32)
    geo = Geometry(size=size, spacing=spacing, origin=(-31.7, 12.25, 88.1), direction=oblique_direction(25.0))
    return image, label, geo


def _one_hot(seg: np.ndarray, values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([seg == v for v in values]).astype(np.float16))


@pytest.mark.parametrize("slab_voxels", [None, 300])
def test_oracle_softmax_restores_the_label_exactly(monkeypatch, slab_voxels):
    """Transpose (j moved last), crop, exact 2x upsampling across slices: the round trip is exact."""
    if slab_voxels:
        monkeypatch.setattr(geometry, "SLAB_VOXELS", slab_voxels)
    image, label, geo = _case()
    plans = _plans([0.9, 0.8, 1.5], [0, 2, 1])
    data, seg, props = preprocess_case([image], geo, plans, label=label)
    assert props.transpose == [0, 2, 1]
    assert props.shape == [props.shape_after_crop[0], props.shape_after_crop[1],
                              2 * props.shape_after_crop[2]]
    assert props.crop_box != [[0, n] for n in geo.size], "the zero border must be cropped"
    restored = geometry.restore_labels(_one_hot(seg[0], [0, 1, 2]), props, output="softmax", values=[0, 1, 2])
    assert restored.shape == label.shape and restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, label)
    for value in (1, 2):
        assert dice(label == value, restored == value) == 1.0


def test_oracle_regions_follow_regions_class_order():
    """Sigmoid regions (whole = 1|2, core = 2) thresholded and written in regions_class_order."""
    image, label, geo = _case(seed=1)
    data, seg, props = preprocess_case([image], geo, _plans([0.9, 0.8, 1.5], [0, 2, 1]), label=label)
    regions = torch.from_numpy(np.stack([seg[0] >= 1, seg[0] == 2]).astype(np.float16))
    restored = geometry.restore_labels(regions, props, output="sigmoid", values=[1, 2])
    np.testing.assert_array_equal(restored, label)


def test_oracle_with_non_integer_resampling_stays_aligned():
    """Spacing ratios that are not integers lose detail, but the restored label stays on the input's grid."""
    image, label, geo = _case(size=(34, 10, 30), seed=2)
    data, seg, props = preprocess_case([image], geo, _plans([1.3, 1.1, 2.2], [0, 2, 1]), label=label)
    restored = geometry.restore_labels(_one_hot(seg[0], [0, 1, 2]), props, output="softmax", values=[0, 1, 2])
    assert dice(label >= 1, restored >= 1) > 0.95
    centre = np.argwhere(label >= 1).mean(0)
    assert np.abs(np.argwhere(restored >= 1).mean(0) - centre).max() < 0.2  # voxels


def test_slabs_equal_the_whole_volume(monkeypatch):
    image, label, geo = _case(seed=3)
    data, seg, props = preprocess_case([image], geo, _plans([1.2, 1.0, 2.0], [0, 2, 1]), label=label)
    channel = torch.from_numpy(data[0].astype(np.float16))
    whole = geometry.resample_rows(channel, props, 0, 0, props.shape_after_crop[0])
    parts = np.concatenate([geometry.resample_rows(channel, props, 0, lo, hi)
                            for lo, hi in geometry.slabs(props.shape_after_crop[0], 1, 4)])
    np.testing.assert_allclose(parts, whole, atol=1e-5)
    along_1 = np.concatenate([geometry.resample_rows(channel, props, 1, lo, hi)
                              for lo, hi in geometry.slabs(props.shape_after_crop[1], 1, 3)], axis=1)
    np.testing.assert_allclose(along_1, whole, atol=1e-5)


def test_probabilities_file_on_the_input_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(geometry, "SLAB_VOXELS", 500)
    image, label, geo = _case(seed=4)
    data, seg, props = preprocess_case([image], geo, _plans([0.9, 0.8, 1.5], [0, 2, 1]), label=label)
    path = tmp_path / "c_probabilities.npz"
    geometry.write_probabilities(_one_hot(seg[0], [0, 1, 2]), props, path, output="softmax",
                                 names=["background", "body", "lesion"])
    with np.load(path) as saved:
        probs, names = saved["probabilities"], saved["names"]
    assert probs.shape == (3, *geo.size) and probs.dtype == np.float16
    assert names.tolist() == ["background", "body", "lesion"]
    np.testing.assert_array_equal(probs.argmax(0), label)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
    assert [p.name for p in tmp_path.iterdir()] == ["c_probabilities.npz"]


def test_implicit_background_gives_the_same_labels_and_probabilities(tmp_path):
    """Predict keeps softmax channels 1..K-1 only; the background derived as 1 - their sum changes nothing."""
    image, label, geo = _case(seed=5)
    data, seg, props = preprocess_case([image], geo, _plans([1.2, 1.0, 2.0], [0, 2, 1]), label=label)
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(_one_hot(seg[0], [0, 1, 2]).numpy() * 4
                                           + rng.normal(0, 1, (3, *seg.shape[1:]))), 0)
    full = probs.to(torch.float16)
    implicit = geometry.Channels(full[1:], implicit_background=True)
    assert len(implicit) == 3
    np.testing.assert_allclose(implicit[0][:, :, :].numpy(), full[0].float().numpy(), atol=2e-3)
    a = geometry.restore_labels(full, props, output="softmax", values=[0, 1, 2])
    b = geometry.restore_labels(implicit, props, output="softmax", values=[0, 1, 2])
    assert (a == b).mean() > 0.999
    geometry.write_probabilities(implicit, props, tmp_path / "p.npz", output="softmax", names=["a", "b", "c"])
    geometry.write_probabilities(full, props, tmp_path / "q.npz", output="softmax", names=["a", "b", "c"])
    with np.load(tmp_path / "p.npz") as p, np.load(tmp_path / "q.npz") as q:
        np.testing.assert_allclose(p["probabilities"].astype(float), q["probabilities"].astype(float), atol=3e-3)
