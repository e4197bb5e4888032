"""`3dino pretrain --method tang --arch vit|swin` (Tang et al.'s self-supervision: the paper's MONAI-ViT and Swin
Transfer-FD baselines): the losses by hand, the views, and the real command (one tiny run per encoder)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TANG, finetune_and_predict_from
from monai.networks.nets import SwinUNETR
from typer.testing import CliRunner

from threedino_pipe.cli import app
from threedino_pipe.models.weight_files import load_backbone
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.ssl.tang import (
    MAX_DROP,
    apply_cutout,
    contrastive_loss,
    cutout_masks,
    inpainting_l1,
    rotate_crops,
    rotation_loss,
    tang_loss,
)


# ----- unit: each loss by hand, the views ----------------------------------------------------------------------
def test_inpainting_l1_is_the_mean_over_every_voxel_of_the_crop():
    """One crop of 1 x 2 x 2 x 2 voxels: |errors| 1, 2, 0, 0, 0, 0, 0, 5 -> mean 8 / 8 = 1 (cut out or not, every
    voxel counts, as Tang et al.'s L1 on the whole reconstruction)."""
    target = torch.zeros(1, 1, 2, 2, 2)
    reconstruction = target.clone()
    reconstruction[0, 0, 0, 0, 0], reconstruction[0, 0, 0, 0, 1], reconstruction[0, 0, 1, 1, 1] = 1.0, -2.0, 5.0
    assert inpainting_l1(reconstruction, target).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        inpainting_l1(reconstruction, target[..., :1])


def test_rotation_cross_entropy_by_hand():
    """Logits log(1..4) give probabilities 0.1..0.4: class 3 costs -log 0.4; zero logits cost -log 0.25."""
    logits = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)], [0.0, 0.0, 0.0, 0.0]])
    expected = (-math.log(0.4) - math.log(0.25)) / 2
    assert rotation_loss(logits, torch.tensor([3, 0])).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_with_a_known_pair():
    """Two volumes, temperature 0.5. Matching pairs (cos 1 with the partner, 0 with the two others):
    each of the 4 crops costs -log(e^2 / (e^2 + 2)). Swapped pairs (cos 0 with the partner, 1 with the
    other volume's second crop): -log(1 / (2 + e^2)). Scaling a projection changes nothing (cosine)."""
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    matched = contrastive_loss(first, 3 * first).item()
    assert matched == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2)), rel=1e-6)
    swapped = contrastive_loss(first, first.flip(0)).item()
    assert swapped == pytest.approx(-math.log(1 / (2 + math.e ** 2)), rel=1e-6)
    assert tang_loss({"inpaint": torch.tensor(1.0), "rotation": torch.tensor(2.0),
                      "contrast": torch.tensor(matched)}).item() == pytest.approx(3 + matched)


def test_rotations_and_cutouts():
    """Quarter turns in the first two spatial axes (four undo themselves); cutouts cover at most about 30 % of a
    crop, fill it with noise in [-1, 1], leave the rest alone, and repeat by seed."""
    crops = torch.randn(4, 1, 8, 8, 8)
    turned = rotate_crops(crops, torch.tensor([0, 1, 2, 3]))
    for i in range(4):
        assert torch.equal(turned[i], torch.rot90(crops[i], i, dims=(1, 2)))
    assert torch.equal(rotate_crops(turned, torch.tensor([0, 3, 2, 1])), crops)

    def draw(seed: int) -> torch.Tensor:
        return cutout_masks(50, 32, torch.Generator().manual_seed(seed))

    masks = draw(0)
    assert masks.shape == (50, 1, 32, 32, 32) and masks.dtype == torch.bool
    fractions = masks.float().mean((1, 2, 3, 4))
    assert fractions.max() < MAX_DROP + 0.1 and fractions.mean() > 0.05 and torch.equal(masks, draw(0))
    assert not torch.equal(masks, draw(1))
    volume = torch.full((50, 1, 32, 32, 32), 7.0)
    out = apply_cutout(volume, masks, torch.Generator().manual_seed(0))
    assert torch.all(out[~masks] == 7.0) and out[masks].abs().max() <= 1.0 + 1e-6


def _log(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "log.csv").open()))


@pytest.mark.e2e
def test_tang_runs_log_each_finite_loss_term_and_record_method_and_arch(tang_runs):
    for arch, iters in (("vit", 20), ("swin", 1)):
        folder = tang_runs[arch]
        for name in ("run.json", "log.csv", "curves.png", "checkpoint_final.pt", "backbone.pt"):
            assert (folder / name).is_file(), (arch, name)
        rows = _log(folder)
        assert [int(r["iteration"]) for r in rows] == list(range(1, iters + 1))
        for row in rows:
            terms = [float(row[k]) for k in ("inpaint", "rotation", "contrast")]
            assert all(math.isfinite(v) and v > 0 for v in terms), row
            assert float(row["loss"]) == pytest.approx(sum(terms), rel=1e-5)
        record = json.loads((folder / "run.json").read_text())
        assert (record["options"]["method"], record["options"]["arch"]) == ("tang", arch)
        assert record["decisions"]["method"] == "tang" and record["decisions"]["arch"] == arch
        assert record["options"]["peak_lr"] == 4e-4 and record["options"]["weight_decay"] == 0.1
    assert "Tang et al. (inpainting, rotation, contrastive), encoder vit" in " ".join(tang_runs["stderr"][0].split())
    assert record["decisions"]["backbone_family"] == "swin"
    network = torch.load(tang_runs["vit"] / "checkpoint_final.pt", weights_only=True)["network"]
    assert network["rotation_head.weight"].shape == (4, 96) and network["contrastive_head.weight"].shape == (512, 96)
    backbone, info = load_backbone(tang_runs["vit"] / "backbone.pt")
    assert info["meta"]["method"] == "tang" and info["meta"]["family"] == "vit3d" and info["preset"] == "tiny"


@pytest.mark.e2e
def test_tang_resumes_bitwise_after_stop_after(tang_runs):
    whole, split = tang_runs["vit"], tang_runs["split"]
    assert "resuming" in tang_runs["stderr"][2]
    a = torch.load(whole / "checkpoint_final.pt", weights_only=True)["network"]
    b = torch.load(split / "checkpoint_final.pt", weights_only=True)["network"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in _log(whole)] == [r["loss"] for r in _log(split)]


@pytest.mark.e2e
def test_tang_swin_backbone_is_in_tang_et_al_layout(tang_runs):
    """The contract's file: ``state_dict`` with ``module.`` keys of MONAI's ``SwinUNETR(...).swinViT`` plus our
    metadata; a fresh encoder of the recorded dims takes it strictly. (MONAI's ``SwinUNETR.load_from`` does not: it
    reads the released file's ``mlp.fc1``/``mlp.fc2`` names, which MONAI's module now calls ``linear1``/``linear2``.)"""
    saved = torch.load(tang_runs["swin"] / "backbone.pt", weights_only=True)
    meta = saved["threedino_pipe"]
    assert (meta["family"], meta["method"]) == ("swin", "tang")
    dims = meta["dims"]
    assert dims == {"feature_size": 12, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "in_channels": 1,
                    "patch_size": 2, "window_size": 4}  # tiny: ours; Tang et al.'s base: 48, [3, 6, 12, 24], 7
    state = saved["state_dict"]
    assert "module.patch_embed.proj.weight" in state and "module.layers1.0.blocks.0.norm1.weight" in state
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=dims["feature_size"], depths=dims["depths"],
                      num_heads=dims["num_heads"], patch_size=dims["patch_size"], window_size=dims["window_size"])
    model.swinViT.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    trained = torch.load(tang_runs["swin"] / "checkpoint_final.pt", weights_only=True)["network"]
    torch.testing.assert_close(model.swinViT.patch_embed.proj.weight, trained["backbone.patch_embed.proj.weight"])


@pytest.mark.e2e
def test_tang_vit_backbone_finetunes_and_predicts(tang_runs, mni_raw, tmp_path):
    env, run = tang_runs["env"], tang_runs["vit"]
    folder, _ = finetune_and_predict_from(run, tang_runs["results"], mni_raw, tmp_path, env, "from_tang")
    card = json.loads((folder / "model.json").read_text())
    assert card["backbone"]["method"] == "tang" and card["backbone"]["family"] == "vit3d"


def test_tang_refusals(mni_preprocessed, tmp_path):
    """--arch swin without tang, SimMIM's and 3DINO's options under tang, an unknown --arch: named errors before
    anything is written."""
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "results")}
    cases = [((*TANG[:3], "--arch", "swin"), "--method dino trains the 3D ViT only"),
             ((*TANG, "--arch", "resnet"), "unknown --arch resnet"),
             ((*TANG, "--mask-ratio", "0.5"), "--mask-ratio is SimMIM's option (--method tang"),
             ((*TANG, "--koleo-weight", "0.2"), "--koleo-weight is a 3DINO option; --method tang"),
             ((*TANG, "--freeze-last-layer-iters", "10"), "--freeze-last-layer-iters is a 3DINO option; --method tang"),
             ((*TANG, "--layerscale-init", "0.1"), "--method tang trains encoders without LayerScale"),
             ((*TANG, "--augment-device", "torch"), "--method tang crops in the data-loading workers")]
    runner = CliRunner()
    for args, message in cases:
        outcome = runner.invoke(app, list(args), env=env)
        assert isinstance(outcome.exception, UserError), (args, outcome.output, outcome.exception)
        assert message in str(outcome.exception), (args, str(outcome.exception))
    assert not (tmp_path / "results").exists()
