"""``3dino visualize``: PCA view and CLS attention of a backbone, PNG planes and NIfTI maps in the scan's geometry.

Why the PCA foreground overlaps the anatomy here even for a (nearly) untrained backbone: with
LayerScale initialised to 1e-5 the blocks barely change the tokens, so a last-layer patch token
is essentially the patch embedding (a linear map of the patch's voxels) plus its position
embedding, after LayerNorm. On a normalised scan the largest variation between patches is air
(-1 after normalisation) against tissue, so the first principal component separates them and 0
(the mean patch) lies between the two groups; the border rule then picks the tissue side. These
tests therefore check that the PCA, threshold, sign rule and the geometry restoration put the
foreground on the anatomy (measured Dice with the brain mask: 0.91-0.95 on the MNI test scans),
not that a short pretraining learned anatomy.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_3dino
from PIL import Image
from scipy import ndimage

from threedino_pipe.demo.examples import oblique_direction
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.weight_files import export_3dino, save_backbone
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import visualize
from threedino_pipe.visualization import backbone_maps, planes
from threedino_pipe.visualization.pca import border_mask, pca_maps

DATASET = "Dataset990_MNITissue"
NIFTIS = ("pca_rgb", "pca_foreground", "attention")
FAST_PRETRAIN = ("--preset", "tiny", "--batch-size", "1", "--num-workers", "0", "--precision", "fp32",
                 "--no-progress", "--snapshot-every", "0")  # no checkpoint_<N>.pt: ~20 MB each, not read here


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def _random_backbone_file(path: Path, released: bool = False) -> Path:
    torch.manual_seed(0)
    net = build_backbone("tiny")
    if released:
        export_3dino(net, None, path)
    else:
        save_backbone(net, path, preset="tiny")
    return path


def _assert_geometry(path: Path, scan: Path, components: int = 1) -> None:
    """The NIfTI at ``path`` has the scan's size, spacing, origin and direction (1e-6)."""
    out, ref = sitk.ReadImage(str(path)), sitk.ReadImage(str(scan))
    assert out.GetSize() == ref.GetSize(), path.name
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), rtol=0, atol=1e-6)
    assert out.GetNumberOfComponentsPerPixel() == components, path.name


def _assert_png(path: Path, rows: int) -> None:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        image.load()
        assert image.size == planes.png_size(rows), path.name


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ----- units ---------------------------------------------------------------------------------
def _two_group_features(sign: float) -> tuple[np.ndarray, np.ndarray]:
    """Features on a 6^3 grid: a centre block (truth) of one kind, the rest (incl. the border) another."""
    rng = np.random.default_rng(0)
    grid = (6, 6, 6)
    truth = np.zeros(grid, bool)
    truth[1:5, 2:5, 1:4] = True
    tissue, air = rng.normal(size=16), rng.normal(size=16)
    feats = np.where(truth.reshape(-1, 1), tissue, air) + rng.normal(scale=0.05, size=(216, 16))
    return sign * feats, truth


def test_pca_foreground_sign_rule_whatever_the_component_sign():
    flipped = []
    for sign in (1.0, -1.0):  # negated features negate the first component's scores
        feats, truth = _two_group_features(sign)
        maps = pca_maps(feats, truth.shape)
        assert np.array_equal(maps.foreground, truth)
        assert maps.border_mean < 0 and maps.explained_first > 0.9
        assert maps.rgb.shape == (3, *truth.shape) and maps.rgb[:, ~truth].max() == 0
        assert 0 <= maps.rgb.min() and maps.rgb.max() <= 1
        flipped.append(maps.flipped)
    assert sorted(flipped) == [False, True]  # exactly one of the two needed the border rule's flip
    assert border_mask((3, 4, 5)).sum() == 3 * 4 * 5 - 1 * 2 * 3


def test_pca_rgb_modes_and_threshold():
    feats, truth = _two_group_features(1.0)
    for rgb_from in ("foreground", "all"):
        maps = pca_maps(feats, truth.shape, rgb_from=rgb_from)
        assert len(maps.explained_rgb) == 3 and maps.rgb[:, truth].max() == pytest.approx(1.0)
    assert not pca_maps(feats, truth.shape, threshold=10.0).foreground.any()
    with pytest.raises(ValueError):
        pca_maps(feats, truth.shape, rgb_from="middle")


def _full_attention(net, x: torch.Tensor) -> torch.Tensor:
    """The last block's whole softmax attention ``[B, heads, 1 + N, 1 + N]``, computed by hand."""
    h = net.prepare_tokens(x)
    for block in net.blocks[:-1]:
        h = block(h)
    attn, y = net.blocks[-1].attn, net.blocks[-1].norm1(h)
    b, n, d = y.shape
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, d // attn.num_heads)
    q, k = (qkv[:, :, i].transpose(1, 2) for i in range(2))
    return torch.softmax(q @ k.transpose(-2, -1) * (d // attn.num_heads) ** -0.5, dim=-1)


def test_cls_attention_and_tokens_match_the_backbone():
    torch.manual_seed(0)
    net = build_backbone("tiny").eval()
    x = torch.randn(1, 1, 32, 48, 32)
    tokens, attention = backbone_maps.last_layer(net, x)
    with torch.no_grad():
        reference = _full_attention(net, x)[0, :, 0, 1:]  # row 0 (the CLS query) of the whole matrix
        features = net.forward_features(x)["patch"][0]
    torch.testing.assert_close(attention, reference / reference.mean(-1, keepdim=True), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tokens, features, rtol=1e-4, atol=1e-5)
    assert attention.shape == (3, 2 * 3 * 2) and attention.mean(-1).sub(1).abs().max() < 1e-5


def test_network_shape_keeps_aspect_in_whole_patches():
    assert backbone_maps.network_shape((50, 64, 53), 192, 16) == (144, 192, 160)
    assert backbone_maps.network_shape((50, 64, 53), 0, 16) == (48, 64, 48)
    assert backbone_maps.network_shape((3, 200, 7), 96, 16) == (16, 96, 16)


# ----- command line --------------------------------------------------------------------------
def test_visualize_oblique_scan_released_layout(synthetic_raw, tmp_path):
    """Released 3DINO layout, an oblique anisotropic scan, the default output folder."""
    model = _random_backbone_file(tmp_path / "released.pth", released=True)
    scan = synthetic_raw / "Dataset991_Ellipsoids" / "imagesTr" / "case_000_0000.nii.gz"
    assert np.allclose(sitk.ReadImage(str(scan)).GetDirection(), oblique_direction(20.0), atol=1e-6)
    result = run_3dino("visualize", "-m", str(model), "-i", str(scan), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "visualize" / "case_000_0000"
    for name in NIFTIS:
        _assert_geometry(out / f"{name}.nii.gz", scan, components=3 if name == "pca_rgb" else 1)
    for name in ("pca_rgb", "attention"):
        _assert_png(out / f"{name}.png", rows=2)
    record = json.loads((out / "visualize.json").read_text())
    assert record["configuration"] == "embed" and record["network_input_shape"] == [192, 192, 64]
    assert record["patch_grid"] == [12, 12, 4] and record["model"]["kind"] == "backbone checkpoint"
    # the ellipsoid body (label > 0) against the PCA foreground: measured 0.78 (16-voxel patches of a
    # 48 x 48 x 16 scan upsampled 4x are 3.2 x 3.5 x 11 mm: coarse along the 3 mm axis)
    label = _array(synthetic_raw / "Dataset991_Ellipsoids" / "labelsTr" / "case_000.nii.gz") > 0
    assert dice(_array(out / "pca_foreground.nii.gz") > 0, label) > 0.65
    rgb = _array(out / "pca_rgb.nii.gz")
    assert rgb.dtype == np.uint8 and rgb[_array(out / "pca_foreground.nii.gz") == 0].max() == 0


def test_visualize_user_errors_write_nothing(mni_raw, tmp_path):
    model = _random_backbone_file(tmp_path / "tiny.pt")
    scan = mni_raw / DATASET / "imagesTs" / "mni_008_0000.nii.gz"
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not an image")
    out = tmp_path / "out"
    cases = {
        "not a backbone": (tmp_path / "notes.pt", scan, {}),
        "missing model": (tmp_path / "none.pt", scan, {}),
        "a folder without a model": (mni_raw, scan, {}),
        "missing scan": (model, tmp_path / "missing.nii.gz", {}),
        "unreadable scan": (model, tmp_path / "broken.nii.gz", {}),
        "two scans": (model, mni_raw / DATASET / "imagesTs", {}),
        "bad colours": (model, scan, {"rgb_from": "rainbow"}),
        "channel of a single-channel model": (model, scan, {"channel": 1}),
    }
    for what, (model_path, scan_path, options) in cases.items():
        with pytest.raises(UserError):
            visualize.run(model_path, scan_path, out, **options)
        assert not out.exists(), what
    # the command line: message without traceback, non-zero exit, nothing written
    result = run_3dino("visualize", "-m", str(tmp_path / "notes.pt"), "-i", str(scan), "-o", str(out), "--no-progress")
    assert result.returncode != 0 and "error:" in result.stderr and "notes.pt" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


# ----- end to end on the real-scan dataset ---------------------------------------------------
def _brain_mask(mni_raw: Path, case: str) -> np.ndarray:
    """Grey + white matter of the MNI tissue maps, enclosed CSF (ventricles) filled: the brain."""
    return ndimage.binary_fill_holes(_array(mni_raw / DATASET / "labelsTs" / f"{case}.nii.gz") > 0)


def dice_ok(value: float) -> bool:
    """The PCA foreground against the brain mask (measured 0.91-0.95 on the MNI test scans)."""
    return value > 0.85


def _check_real_scan_output(out: Path, scan: Path, brain: np.ndarray) -> float:
    for name in NIFTIS:
        _assert_geometry(out / f"{name}.nii.gz", scan, components=3 if name == "pca_rgb" else 1)
    foreground = _array(out / "pca_foreground.nii.gz") > 0
    assert dice(~foreground, brain) < 0.1  # the sign rule did not pick the air
    return dice(foreground, brain)


@pytest.mark.e2e
def test_visualize_pretrain_run_on_real_scan(mni_raw, mni_preprocessed, tmp_path):
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "results")}
    trained = run_3dino("pretrain", "-d", "990", *FAST_PRETRAIN, "--iters", "2", "--run", "viz", env=env)
    assert trained.returncode == 0, trained.stderr
    run_dir = tmp_path / "results" / "pretrain" / "viz"
    scan = mni_raw / DATASET / "imagesTs" / "mni_008_0000.nii.gz"
    out = tmp_path / "maps"
    result = run_3dino("visualize", "-m", str(run_dir), "-i", str(scan), "-o", str(out), "--per-head",
                       "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    assert dice_ok(_check_real_scan_output(out, scan, _brain_mask(mni_raw, "mni_008")))
    _assert_png(out / "pca_rgb.png", rows=2)
    _assert_png(out / "attention.png", rows=2)
    _assert_png(out / "attention_heads.png", rows=1 + 3)  # tiny: 3 heads
    for h in range(3):
        _assert_geometry(out / f"attention_head{h}.nii.gz", scan)
    attention = _array(out / "attention.nii.gz")
    inside = _array(out / "pca_foreground.nii.gz") > 0
    assert attention.dtype == np.float32 and attention[inside].mean() > 0
    record = json.loads((out / "visualize.json").read_text())
    assert record["model"]["source"] == str((run_dir / "backbone.pt").resolve())
    assert record["pca"]["foreground_patches"] < record["pca"]["patches"]


@pytest.mark.e2e
def test_visualize_finetune_run_preprocesses_as_finetuning(mni_raw, mni_preprocessed, tmp_path):
    """A finetune run folder: the scan is resampled to the plans' spacing, cropped and normalised as in
    finetuning; the maps still come back on the scan's own grid."""
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "results")}
    trained = run_3dino("finetune", "-d", "990", "--preset", "tiny", "--pct", "50", "--num-workers", "0",
                        "--precision", "fp32", "--no-progress", "--backbone", "none", "--head", "linear",
                        "--iters", "1", "--val-every", "1", env=env)
    assert trained.returncode == 0, trained.stderr
    run_dir = next((tmp_path / "results" / DATASET).glob("finetune__linear__none__*"))
    scan = mni_raw / DATASET / "imagesTs" / "mni_009_0000.nii.gz"
    out = tmp_path / "maps"
    result = run_3dino("visualize", "-m", str(run_dir), "-i", str(scan), "-o", str(out), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    assert dice_ok(_check_real_scan_output(out, scan, _brain_mask(mni_raw, "mni_009")))
    record = json.loads((out / "visualize.json").read_text())
    assert record["configuration"] == "finetune" and record["preprocessing"]["resample"] is True
    assert record["model"]["kind"] == "finetune run"
