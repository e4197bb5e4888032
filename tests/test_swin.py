"""The Swin family and `--head swinunetr`: Tang et al.'s weights layout loaded strictly, named refusals, and
MONAI's SwinUNETR finetuned and predicting in the input geometry (the paper's Swin Random and Swin Transfer).

The Swin files are written here (small dims, random weights) in the layout shared with ``3dino pretrain
--method tang --arch swin``: ``{"state_dict": {"module." + k: v}, "threedino_pipe": {...}}`` of MONAI's
``SwinUNETR(...).swinViT``; the released ``model_swinvit.pt`` variant has no ``threedino_pipe`` entry and
names the MLP layers ``mlp.fc1`` / ``mlp.fc2``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import SimpleITK as sitk
import torch
from rich.console import Console
from typer.testing import CliRunner

from threedino_pipe.cli import app
from threedino_pipe.models.backbone_choice import resolve_backbone
from threedino_pipe.models.backbones import Backbone, get_family
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.segmentation import build_segmentation_model
from threedino_pipe.models.swin import SwinEncoder, build_swin, load_swin, repeat_channels
from threedino_pipe.models.weight_files import save_backbone
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import embed
from threedino_pipe.stages.finetune import head_patch_size

DATASET = "Dataset990_MNITissue"
# small dims: one block per stage, 3-voxel windows (the relative position tables stay small)
SMALL = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 3}
FAST = ("--pct", "50", "--num-workers", "0", "--precision", "fp32", "--no-progress", "--batch-size", "1")


def _tang_file(path: Path, encoder: SwinEncoder, *, released: bool = False, edit=None) -> Path:
    """``encoder`` saved in Tang et al.'s layout (ours with metadata, or the released variant); ``edit(state)``
    changes the ``module.*`` state dict before saving."""
    state = {"module." + k: v.clone() for k, v in encoder.state_dict().items()}
    if released:
        state = {k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
                 for k, v in state.items()}
    if edit is not None:
        edit(state)
    obj = {"state_dict": state}
    if not released:
        obj["threedino_pipe"] = {"family": "swin", "method": "tang", "dims": encoder.dims, "iteration": 3}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def encoder() -> SwinEncoder:
    torch.manual_seed(3)
    return build_swin(SMALL)


def test_a_swin_file_in_tangs_layout_loads_strictly_and_its_channels_are_repeated(encoder, tmp_path):
    ours = _tang_file(tmp_path / "swin_fd.pt", encoder)
    choice = resolve_backbone(str(ours), tmp_path)  # the family is read from the file's keys
    assert (choice.family, choice.method, choice.tag, len(choice.sha256)) == ("swin", "tang", "swin_fd", 16)
    assert isinstance(choice.model, Backbone) and choice.dims == {**SMALL, "in_channels": 1, "patch_size": 2}
    assert build_swin({**SMALL, "window_size": [3, 3, 3]}).dims == choice.dims  # MONAI takes either
    for key, value in encoder.state_dict().items():
        assert torch.equal(choice.model.state_dict()[key], value), key

    released = _tang_file(tmp_path / "model_swinvit.pt", encoder, released=True)
    model, info = load_swin(released)  # no metadata: dims from the shapes, fc1/fc2 read as linear1/linear2
    assert info["dims"] == choice.dims and info["meta"]["method"] == "tang" and "released" not in info["layout"]
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    # two input channels: SwinUNETR's encoder takes both; the same image in each gives the pretrained response
    net = build_segmentation_model("swinunetr", choice.dims, 2, 3, backbone_family="swin")
    net.backbone.load_state_dict(repeat_channels(choice.model.state_dict(), 2), strict=True)
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.backbone(x.repeat(1, 2, 1, 1, 1))[2], encoder.eval()(x)[2],
                                   rtol=1e-4, atol=1e-4)
        assert net.eval()(x.repeat(1, 2, 1, 1, 1)).shape == (1, 3, 32, 32, 64)
    assert net.model_args()["backbone_dims"]["in_channels"] == 2
    with pytest.raises(ValueError, match="multiple of 32"):
        net.check_input(torch.zeros(1, 2, 32, 48, 32))


def test_swin_file_mismatches_and_wrong_families_are_named_errors(encoder, tmp_path):
    block = "module.layers2.0.blocks.0."
    cases = {
        "missing": (lambda s: s.pop(block + "attn.qkv.weight"), "missing keys (1): layers2.0.blocks.0.attn.qkv.weight"),
        "extra": (lambda s: s.update({"module.rotation_head.weight": torch.zeros(4, 96)}),
                  "unexpected keys (1): rotation_head.weight"),
        "shape": (lambda s: s.update({block + "mlp.linear1.weight": torch.zeros(10, 24)}),
                  "layers2.0.blocks.0.mlp.linear1.weight [10, 24] vs [96, 24]"),
    }
    for name, (edit, message) in cases.items():
        path = _tang_file(tmp_path / f"{name}.pt", encoder, edit=edit)
        with pytest.raises(UserError) as err:
            load_swin(path)
        assert message in str(err.value) and str(path) in str(err.value), (name, str(err.value))
        assert "model_swinvit.pt" in err.value.fix
    vit = tmp_path / "vit.pt"
    save_backbone(build_backbone("tiny"), vit, preset="tiny")
    with pytest.raises(UserError, match="holds a vit3d backbone, where a swin backbone is needed"):
        resolve_backbone(str(vit), tmp_path, family="swin")
    with pytest.raises(UserError, match="is not a Swin encoder file"):
        load_swin(vit)
    with pytest.raises(UserError, match="expected size: feature_size 12 \\(expected 48\\)"):
        load_swin(_tang_file(tmp_path / "ok.pt", encoder), expect="base")
    assert get_family("swin").capabilities == frozenset()  # no CLS token, no token blocks: probe/embed/adapter refuse
    with pytest.raises(ValueError, match="needs a swin backbone"):
        build_segmentation_model("swinunetr", "tiny", 1, 2)
    with pytest.raises(ValueError, match="reads the patch tokens of a ViT"):
        build_segmentation_model("unetr", SMALL, 1, 2, backbone_family="swin")


def test_finetune_refuses_mismatched_files_and_head_backbone_pairs_by_name(encoder, mni_preprocessed, tmp_path):
    """The real command (in process): nothing is written for any refusal."""
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "results")}
    missing = _tang_file(tmp_path / "missing.pt", encoder,
                         edit=lambda s: s.pop("module.layers4.0.blocks.0.norm2.bias"))
    swin = _tang_file(tmp_path / "swin.pt", encoder)
    vit = tmp_path / "vit.pt"
    save_backbone(build_backbone("tiny"), vit, preset="tiny")
    cases = [(("--head", "swinunetr", "--backbone", str(missing)), "missing keys (1): layers4.0.blocks.0.norm2.bias",
              missing),
             (("--head", "swinunetr", "--backbone", str(vit)), "holds a vit3d backbone, where a swin backbone", vit),
             (("--head", "unetr", "--backbone", str(swin)), "--head unetr reads the patch tokens of a ViT", swin),
             (("--head", "swinunetr", "--backbone", "auto"), "found no pretrained Swin encoder", None)]
    runner = CliRunner()
    for args, message, file in cases:
        outcome = runner.invoke(app, ["finetune", "-d", "990", *FAST, "--iters", "1", *args], env=env)
        assert isinstance(outcome.exception, UserError), (args, outcome.output, outcome.exception)
        assert message in str(outcome.exception) and (file is None or str(file) in str(outcome.exception)), args
    assert not (tmp_path / "results" / DATASET).exists()


# ----- one tiny SwinUNETR run (Swin Transfer-FD from a run folder), shared -----------------------------------
@pytest.fixture(scope="module")
def swin_run(encoder, mni_preprocessed, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("swin_run")
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(root / "results")}
    (root / "swin_fd").mkdir()  # a `3dino pretrain --method tang --arch swin` run folder: its backbone.pt
    swin_file = _tang_file(root / "swin_fd" / "backbone.pt", encoder)
    outcome = CliRunner().invoke(app, ["finetune", "-d", "990", *FAST, "--backbone", str(swin_file.parent),
                                       "--iters", "3", "--val-every", "3", "--lr", "0.001"], env=env)
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    folder = root / "results" / DATASET / "finetune__swinunetr__swin_fd__pct50__fold0__seed0"
    yield {"env": env, "root": root, "file": swin_file, "folder": folder, "output": outcome.output}
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.e2e
def test_swinunetr_finetunes_from_a_swin_file_and_predicts_in_the_input_geometry(swin_run, encoder, mni_raw,
                                                                                 tmp_path):
    folder = swin_run["folder"]
    assert "[32, 64, 32] patches (plans.json's [48, 64, 48] rounded down" in " ".join(swin_run["output"].split())
    card = json.loads((folder / "model.json").read_text())
    assert card["head"] == "swinunetr" and card["patch_size"] == [32, 64, 32]
    assert card["backbone"]["family"] == "swin" and card["backbone"]["method"] == "tang"
    assert card["backbone"]["frozen"] is False and len(card["backbone"]["sha256"]) == 16
    assert card["model_args"] == {"head": "swinunetr", "backbone_family": "swin", "in_channels": 1, "num_outputs": 3,
                                  "freeze_backbone": False,
                                  "backbone_dims": {**SMALL, "in_channels": 1, "patch_size": 2}}
    options = json.loads((folder / "run.json").read_text())["options"]
    assert options["backbone_family"] == "swin" and options["backbone_method"] == "tang"
    weights = torch.load(folder / "checkpoint_final.pt", weights_only=True)["model"]
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(weights[f"swinViT.{k}"], v)]
    assert len(changed) > 50  # trained end to end: the encoder moved from the file's weights
    assert json.loads((folder / "validation.json").read_text())["finished"]

    scans = tmp_path / "scans"
    scans.mkdir()
    source = sorted((mni_raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0]
    shutil.copy(source, scans / source.name)
    outcome = CliRunner().invoke(app, ["predict", "-i", str(scans), "-o", str(tmp_path / "out"), "-m", str(folder),
                                       "--device", "cpu", "--no-progress"], env=swin_run["env"])
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    image = sitk.ReadImage(str(source))
    labels = sitk.ReadImage(str(tmp_path / "out" / source.name.replace("_0000", "")))
    assert labels.GetSize() == image.GetSize()
    assert labels.GetSpacing() == pytest.approx(image.GetSpacing(), abs=1e-5)
    assert labels.GetOrigin() == pytest.approx(image.GetOrigin(), abs=1e-4)
    assert labels.GetDirection() == pytest.approx(image.GetDirection(), abs=1e-6)
    values = set(sitk.GetArrayViewFromImage(labels).ravel().tolist())
    assert values <= {0, 1, 2}

    # no CLS token: embed refuses the run and the Swin file by the family's missing capability, naming them
    for model in (folder, swin_run["file"]):
        with pytest.raises(UserError, match="the swin backbone has no global \\(CLS\\) token") as err:
            embed.run(model, scans, tmp_path / "features", device="cpu")
        assert err.value.file is not None and str(model) in str(err.value)
    assert not (tmp_path / "features").exists()


@pytest.mark.e2e
def test_every_backbone_kind_trains_on_the_same_cases(swin_run, simmim_runs, tang_runs, hf_folders, tmp_path):
    """The same --pct --fold --seed for every kind of backbone finetune accepts: the same subset.json cases.

    Kinds: none (UNETR and SwinUNETR from scratch), a 3DINO file, SimMIM and Tang-ViT run folders (ViT), a
    Tang-Swin run folder (Swin Transfer), transformers' Dinov2Model and DINOv3ViTModel folders (hf2d)."""
    env = {**swin_run["env"], "THREEDINO_RESULTS": str(tmp_path / "results")}
    vit = tmp_path / "tiny_3dino.pt"
    save_backbone(build_backbone("tiny"), vit, preset="tiny", meta={"method": "dino"})
    kinds = {"unetr__none": ("--head", "unetr", "--backbone", "none", "--preset", "tiny"),
             "swinunetr__none": ("--head", "swinunetr", "--backbone", "none", "--preset", "tiny"),
             "linear__tiny_3dino": ("--head", "linear", "--backbone", str(vit)),
             "linear__simmim": ("--head", "linear", "--backbone", str(simmim_runs["run"])),
             "linear__tang_vit": ("--head", "linear", "--backbone", str(tang_runs["vit"])),
             "swinunetr__tang_swin": ("--head", "swinunetr", "--backbone", str(tang_runs["swin"])),
             **{f"linear__{m}": ("--head", "linear", "--backbone", str(f)) for m, f in hf_folders.items()}}
    runner = CliRunner()
    for name, args in kinds.items():
        outcome = runner.invoke(app, ["finetune", "-d", "990", *FAST, *args, "--iters", "100", "--stop-after", "1",
                                      "--run", name], env=env)
        assert outcome.exit_code == 0, (name, outcome.output, outcome.exception)
    folders = {name: tmp_path / "results" / DATASET / name for name in kinds}
    families = {name: json.loads((f / "run.json").read_text())["options"]["backbone_family"]
                for name, f in folders.items()}
    assert set(families.values()) >= {"vit3d", "swin", "hf2d"}, families
    subsets = {name: json.loads((f / "subset.json").read_text()) for name, f in folders.items()}
    first = subsets["unetr__none"]
    assert first["ids"] and not set(first["ids"]) & set(first["val_ids"])
    assert {name: (s["ids"], s["val_ids"]) for name, s in subsets.items()} == {
        name: (first["ids"], first["val_ids"]) for name in kinds}


def test_swinunetr_patch_is_rounded_down_to_multiples_of_32_and_a_side_under_32_is_refused(tmp_path):
    console = Console(stderr=True, quiet=True)
    plans = SimpleNamespace(patch_size=[48, 64, 96])
    assert head_patch_size("swinunetr", plans, tmp_path, "990", console) == [32, 64, 96]
    assert head_patch_size("unetr", plans, tmp_path, "990", console) == [48, 64, 96]
    with pytest.raises(UserError) as err:
        head_patch_size("swinunetr", SimpleNamespace(patch_size=[16, 64, 64]), tmp_path, "990", console)
    assert str(tmp_path / "plans.json") in str(err.value) and "3dino plan -d 990 --patch-size" in err.value.fix
