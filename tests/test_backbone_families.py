"""Backbone families: one protocol for finetune, predict, embed and visualize; missing capabilities are clear errors.

The second family here is made for the test: the 3D ViT declared without its CLS token and CLS
attention (what a Swin encoder lacks). ``predict`` runs a model of it exactly as any other (no
per-family code), while ``embed`` and ``visualize``, which need what it lacks, stop with a
``UserError`` naming the model and the capability. A family the code does not know stops predict
naming model.json.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from threedino_pipe.artifacts import BackboneRecord, ModelCard, Plans
from threedino_pipe.models import backbones
from threedino_pipe.models.backbones import Backbone, BackboneFamily, get_family
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.segmentation import build_segmentation_model
from threedino_pipe.models.vit3d import VisionTransformer3D
from threedino_pipe.models.weight_files import save_backbone
from threedino_pipe.runtime.checkpoints import save_checkpoint
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import embed, predict, visualize

VOLUME = {"scheme": "volume_percentile", "lower_pct": 0.5, "upper_pct": 99.5, "range": [-1, 1], "clip": True}
PRETRAIN = {"resample": False, "spacing": None, "normalization": [VOLUME], "crop": "foreground_after_normalization",
            "global_crop": 32, "local_crop": 16, "num_local_crops": 2, "min_axis": 8, "preset": "tiny",
            "batch_size": 2}
FINETUNE = {"resample": True, "spacing": [2.0, 2.0, 2.0], "normalization": [VOLUME], "crop": "nonzero",
            "image_interpolation": "linear", "label_interpolation": "linear_per_class", "patch_size": [32, 32, 32],
            "batch_size": 2, "preset": "tiny", "median_shape": [32, 32, 32]}
PLANS = {"dataset": "Dataset996_Families", "task": "segmentation", "channel_names": {"0": "MR"},
         "labels": {"background": 0, "organ": 1}, "memory_target_gb": 8.0, "options": {}, "transpose": [0, 1, 2],
         "decisions": {}, "configurations": {"pretrain": PRETRAIN, "finetune": FINETUNE}}


class ClsFreeViT(VisionTransformer3D):
    """A 3D ViT declared as a family with none of the optional capabilities (a Swin encoder has no CLS token)."""

    family = "nocls"


def _build_cls_free(dims: str | dict) -> ClsFreeViT:
    return ClsFreeViT(**{k: v for k, v in build_backbone(dims).dims.items() if k != "layerscale"})


NOCLS = BackboneFamily("nocls", _build_cls_free, lambda path, expect=None: pytest.fail("not loaded here"),
                       frozenset())


@pytest.fixture
def nocls(monkeypatch):
    monkeypatch.setitem(backbones.FAMILIES, "nocls", NOCLS)
    return NOCLS


def _run_folder(folder, family: str):
    """A finetune run folder (model.json + checkpoint_best.pt) of a linear head on a tiny ``family`` backbone."""
    torch.manual_seed(0)
    net = build_segmentation_model("linear", "tiny", 1, 2, backbone_family=family)
    save_checkpoint({"model": net.state_dict()}, folder / "checkpoint_best.pt")
    ModelCard(task="segmentation", dataset=PLANS["dataset"], plans=Plans.model_validate(PLANS),
              channel_names={"0": "MR"}, labels={"background": 0, "organ": 1}, head="linear",
              model_args=net.model_args(), backbone=BackboneRecord(tag="none", source="none", frozen=True,
                                                                   family=family),
              in_channels=1, num_outputs=2, output="softmax", patch_size=[32, 32, 32], fold=0, pct=100.0,
              seed=0).write(ModelCard.in_folder(folder))
    return folder


def _scan(path) -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((40, 36, 30), np.float32)
    image[8:30, 6:28, 5:25] = 100 + rng.normal(0, 10, (22, 22, 20))
    out = sitk.GetImageFromArray(image.transpose(2, 1, 0))
    out.SetSpacing((2.0, 2.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(path))


def test_the_vit_family_builds_loads_strictly_and_satisfies_the_protocol(tmp_path):
    family = get_family("vit3d")
    assert get_family(None) is family and {"cls_token", "cls_attention", "token_blocks"} <= family.capabilities
    net = family.build("tiny")
    assert isinstance(net, Backbone) and net.family == "vit3d" and net.input_size == 96
    feats = net.get_intermediate_layers(torch.zeros(1, 1, 32, 32, 32), 2)
    assert [tuple(f.shape) for f in feats] == [(1, 8, 96), (1, 8, 96)]  # the decoders' multi-scale features
    save_backbone(net, tmp_path / "b.pt", preset="tiny")
    loaded, info = family.load(tmp_path / "b.pt", expect="tiny")
    assert info["preset"] == "tiny" and all(torch.equal(a, b) for a, b in
                                            zip(net.state_dict().values(), loaded.state_dict().values(), strict=True))
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    del state["backbone"]["norm.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(UserError, match="norm.weight"):
        family.load(tmp_path / "broken.pt")
    with pytest.raises(UserError, match="backbone family 'swin3d' is not one"):
        get_family("swin3d")


def test_model_card_and_model_args_record_the_family_and_heads_check_capabilities(tmp_path, nocls):
    folder = _run_folder(tmp_path / "run", "nocls")
    card = ModelCard.read(ModelCard.in_folder(folder))
    assert card.backbone.family == "nocls" and card.model_args["backbone_family"] == "nocls"
    with pytest.raises(ValueError, match="lacks"):
        build_segmentation_model("adapter", "tiny", 1, 2, backbone_family="nocls")
    with pytest.raises(UserError) as err:
        nocls.require("token_blocks", "--head adapter cannot be built", file="backbone.pt")
    assert err.value.problem == ("--head adapter cannot be built: the nocls backbone has no token sequence "
                                 "through indexed blocks: no ViT-Adapter head (`--head adapter`)")
    assert err.value.file == "backbone.pt" and "vit3d" in err.value.fix


def test_predict_runs_any_family_and_embed_visualize_name_the_missing_capability(tmp_path, nocls):
    run = _run_folder(tmp_path / "run", "nocls")
    _scan(tmp_path / "scans" / "case_0000.nii.gz")
    assert predict.run(tmp_path / "scans", tmp_path / "out", [run], device="cpu", precision="fp32") == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz")))
    assert labels.shape == (30, 36, 40)
    with pytest.raises(UserError) as err:
        embed.run(run, tmp_path / "scans", tmp_path / "features.csv", device="cpu")
    assert "3dino embed writes CLS-token features: the nocls backbone has no global (CLS) token" in err.value.problem
    assert err.value.file == str(run) and "vit3d" in err.value.fix
    with pytest.raises(UserError) as err:
        visualize.run(run, tmp_path / "scans" / "case_0000.nii.gz", tmp_path / "maps", device="cpu")
    assert "CLS attention map: the nocls backbone has no attention of a global token" in err.value.problem
    assert not (tmp_path / "maps").exists() and not (tmp_path / "features.csv").exists()


def test_a_family_this_version_does_not_know_stops_predict_naming_model_json(tmp_path):
    run = _run_folder(tmp_path / "run", "vit3d")
    card = ModelCard.read(ModelCard.in_folder(run))
    card.model_args = {**card.model_args, "backbone_family": "swin3d"}
    card.write(ModelCard.in_folder(run))
    _scan(tmp_path / "scans" / "case_0000.nii.gz")
    with pytest.raises(UserError) as err:
        predict.run(tmp_path / "scans", tmp_path / "out", [run], device="cpu")
    assert "backbone family 'swin3d'" in err.value.problem and err.value.file.endswith("model.json")
