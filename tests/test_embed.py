"""`3dino embed`: frozen features of a folder of real scans, one CSV row per case."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import run_3dino

from threedino_pipe.models.classification import frozen_tokens, probe_input
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.weight_files import save_backbone
from threedino_pipe.raw_data.image_io import read_image
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import embed

DIM = 96  # tiny preset width


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny backbone file (pos_grid 6: the bare-checkpoint view is 96^3) and the module."""
    torch.manual_seed(0)
    net = build_backbone("tiny").eval()
    path = tmp_path_factory.mktemp("embed_backbone") / "tiny_random.pt"
    save_backbone(net, path, preset="tiny")
    return path, net


def _rows(path):
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


def _documented_features(image_path, net) -> np.ndarray:
    """The bare-checkpoint rule written out independently: per-volume 0.05/99.95 percentiles -> [-1, 1]
    (clipped), crop to the box of voxels > -1, whole volume resized to 96^3, last 4 CLS + mean patch token."""
    array, _ = read_image(image_path)
    lo, hi = np.percentile(array, [0.05, 99.95])
    norm = np.clip((array - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0).astype(np.float32)
    nz = np.argwhere(norm > -1)
    (x0, y0, z0), (x1, y1, z1) = nz.min(0), nz.max(0) + 1
    crop = torch.from_numpy(np.ascontiguousarray(norm[x0:x1, y0:y1, z0:z1]))[None, None]
    view = F.interpolate(crop, size=(96, 96, 96), mode="trilinear", align_corners=False)
    with torch.no_grad():
        cls, mean = frozen_tokens(net, view, 4)
    return probe_input(cls, mean, 4, True)[0].numpy()


@pytest.mark.e2e
def test_embed_bare_checkpoint_one_row_per_real_scan(mni_raw, tiny, tmp_path):
    path, net = tiny
    images = mni_raw / "Dataset990_MNITissue" / "imagesTr"
    out = tmp_path / "features.csv"
    result = run_3dino("embed", "-m", str(path), "-i", str(images), "-o", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    header, rows = _rows(out)
    assert len(header) == 1 + (4 + 1) * 1 * DIM
    assert header[:2] == ["case_id", "cls0_c0_0"] and header[1 + 4 * DIM] == "avg_c0_0" and header[-1] == "avg_c0_95"
    assert [r[0] for r in rows] == [f"mni_{i:03d}" for i in range(8)]
    values = np.array([[float(v) for v in r[1:]] for r in rows])
    assert np.isfinite(values).all()
    assert np.unique(values[:, 4 * DIM:].round(4), axis=0).shape[0] == 8  # the mean patch token differs per scan
    np.testing.assert_allclose(values[3], _documented_features(images / "mni_003_0000.nii.gz", net),
                               rtol=1e-4, atol=1e-5)
    args = json.loads(out.with_suffix(".json").read_text())
    assert args["view_size"] == [96, 96, 96] and args["columns"] == 5 * DIM and args["cases"] == 8
    assert args["preprocessing"]["normalization"][0]["lower_pct"] == 0.05

    # a pretrain run folder (its backbone.pt) is the same backbone
    run_dir = tmp_path / "pretrain_run"
    run_dir.mkdir()
    shutil.copy(path, run_dir / "backbone.pt")
    again = embed.run(run_dir, images / "mni_003_0000.nii.gz", tmp_path / "one", device="cpu")
    assert again == tmp_path / "one" / "features.csv"
    _, one = _rows(again)
    assert one[0][0] == "mni_003" and one[0][1:] == rows[3][1:]


@pytest.mark.e2e
def test_embed_multichannel_last_layer_without_avgpool(mni_raw, tiny, tmp_path):
    """Two-channel cases: each channel through the backbone, features concatenated channel-major."""
    path, net = tiny
    images = tmp_path / "two_channel"
    images.mkdir()
    source = mni_raw / "Dataset990_MNITissue" / "imagesTr"
    for case in ("mni_000", "mni_001"):
        t1 = sitk.ReadImage(str(source / f"{case}_0000.nii.gz"))
        sitk.WriteImage(t1, str(images / f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.InvertIntensity(t1, maximum=1500.0), str(images / f"{case}_0001.nii.gz"))
    out = tmp_path / "two.csv"
    result = run_3dino("embed", "-m", str(path), "-i", str(images), "-o", str(out), "--layers", "1",
                       "--no-avgpool", "--no-progress")
    assert result.returncode == 0, result.stderr
    header, rows = _rows(out)
    assert len(header) == 1 + 1 * 2 * DIM and len(rows) == 2
    assert header[1] == "cls3_c0_0" and header[1 + DIM] == "cls3_c1_0"
    # channel 0's block equals the single-channel embedding of channel 0 alone
    single = embed.run(path, images / "mni_000_0000.nii.gz", tmp_path / "single.csv", layers=1, avgpool=False,
                       device="cpu")
    _, alone = _rows(single)
    np.testing.assert_allclose(np.array(rows[0][1:1 + DIM], float), np.array(alone[0][1:], float), rtol=1e-5)
    assert not np.allclose(np.array(rows[0][1:1 + DIM], float), np.array(rows[0][1 + DIM:], float))


def test_embed_refuses_bad_options_and_writes_nothing(mni_raw, tiny, tmp_path):
    path, _ = tiny
    images = mni_raw / "Dataset990_MNITissue" / "imagesTs"
    with pytest.raises(UserError, match="--layers 3"):
        embed.run(path, images, tmp_path / "a.csv", layers=3)
    with pytest.raises(UserError, match="model not found"):
        embed.run(tmp_path / "missing.pt", images, tmp_path / "b.csv")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="does not end in .csv"):
        embed.run(path, images, tmp_path / "file.txt")
    result = run_3dino("embed", "-m", str(path), "-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "c.csv"))
    assert result.returncode != 0 and "Traceback" not in result.stderr and "input not found" in result.stderr
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob(".*partial*"))
