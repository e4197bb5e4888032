"""A natural-image 2D backbone (a local Hugging Face folder) used slice by slice: the ``hf2d`` family.

Tiny ``Dinov2Model`` and ``DINOv3ViTModel`` (hidden 32, 2 blocks, random weights) are saved with
``save_pretrained`` once per session; each loads strictly, its features are the 2D model's on each
slice, it finetunes the linear head and the classification probe through the real command, and
``3dino predict`` rebuilds it from the run alone (the folder deleted) and writes labels in the
input geometry. Broken or foreign folders, and a missing transformers, are named errors.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import HELD_OUT, HF_KINDS, HF_MEAN, HF_STD, REPO
from typer.testing import CliRunner

from threedino_pipe.cli import app
from threedino_pipe.models.backbone_choice import file_sha256, resolve_backbone
from threedino_pipe.models.backbones import Backbone
from threedino_pipe.models.segmentation import build_segmentation_model
from threedino_pipe.runtime.errors import UserError

transformers = pytest.importorskip("transformers")

DATASET = "Dataset990_MNITissue"



@pytest.mark.parametrize("method", list(HF_KINDS))
def test_slice_features_are_the_2d_model_on_each_slice(hf_folders, tmp_path, method):
    choice = resolve_backbone(str(hf_folders[method]), tmp_path)
    net = choice.model
    assert isinstance(net, Backbone) and choice.family == net.family == "hf2d" and choice.method == method
    assert choice.tag == f"hf2d-{method}-{method}" and choice.source == str(hf_folders[method].resolve())
    assert choice.sha256 == file_sha256(hf_folders[method] / "model.safetensors")
    mean, std = (HF_MEAN, HF_STD) if method == "dinov3" else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert np.allclose(net.dims["pixel_mean"], mean) and np.allclose(net.dims["pixel_std"], std)
    p = net.patch_size
    x = torch.randn(2, 1, 32, 24, 5)
    assert net.patch_grid(x.shape[2:]) == (round(32 / p), round(24 / p), 5)
    (patch, cls), = net.get_intermediate_layers(x, [1], return_cls=True, reshape=True)
    assert patch.shape == (2, 32, round(32 / p), round(24 / p), 5) and cls.shape == (2, 32)
    hf = net.model
    for b, z in ((0, 0), (1, 3)):  # slice z of case b through the 2D model alone: the same tokens
        pixels = ((x[b:b + 1, :, :, :, z] + 3) / 6).clamp(0, 1).expand(-1, 3, -1, -1)
        pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            tokens = hf(pixels, output_hidden_states=True).last_hidden_state[0]
        prefix = 1 + hf.config.to_dict().get("num_register_tokens", 0)
        expected = tokens[prefix:].reshape(round(32 / p), round(24 / p), 32).permute(2, 0, 1)
        assert torch.allclose(patch[b, :, :, :, z], expected, atol=1e-5)
    with torch.no_grad():
        first = hf(net.slice_images(x[:1]), output_hidden_states=True).last_hidden_state[:, 0]
    assert torch.allclose(cls[0], first.mean(dim=0), atol=1e-5)  # the volume's CLS: the slices' mean


def test_unfrozen_every_trainable_parameter_gets_a_gradient(hf_folders, tmp_path):
    """``--unfreeze``: the linear head trains the 2D model too, and every trainable parameter (the mask
    token, which only pretraining uses, stays frozen) gets a gradient, as DDP needs."""
    choice = resolve_backbone(str(hf_folders["dinov3"]), tmp_path)
    net = build_segmentation_model("linear", choice.dims, 2, 3, freeze_backbone=False, backbone_family="hf2d")
    net.backbone.load_state_dict(choice.model.state_dict(), strict=True)
    net.train()
    logits = net(torch.randn(1, 2, 32, 32, 8))
    assert logits.shape == (1, 3, 32, 32, 8) and net.model_args()["num_layers"] == 2
    logits.square().mean().backward()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert "backbone.model.embeddings.mask_token" not in trainable
    assert any(n.startswith("backbone.model.") for n in trainable)
    assert all(p.grad is not None for p in trainable.values()), [n for n, p in trainable.items() if p.grad is None]


def test_broken_or_foreign_folders_are_named_errors(hf_folders, tmp_path):
    def refused(folder: Path, *words: str, **kwargs) -> UserError:
        with pytest.raises(UserError) as err:
            resolve_backbone(str(folder), tmp_path, **kwargs)
        text = f"{err.value.file} {err.value.problem}"
        assert all(word in text for word in words), text
        return err.value

    broken = shutil.copytree(hf_folders["dinov2"], tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "dinov2", "hidden_size": ')
    refused(broken, "config.json", "not a Hugging Face model config")
    bert = shutil.copytree(hf_folders["dinov2"], tmp_path / "bert")
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "Dinov2Model" in refused(bert, "'bert'", "dinov2, dinov3_vit").fix
    wider = shutil.copytree(hf_folders["dinov2"], tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    refused(wider, "model.safetensors")
    no_weights = shutil.copytree(hf_folders["dinov2"], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    refused(no_weights, "no_weights", "no weights file (model.safetensors")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "empty", "no backbone.pt", "no config.json")
    refused(hf_folders["dinov2"], "--preset tiny", expect="tiny")


def test_without_transformers_the_package_imports_and_names_the_extra(hf_folders):
    """transformers hidden from the import system: every module of the package imports (transformers is
    imported only when a Hugging Face folder is read) and reading one says how to install it."""
    script = f"""
import sys
class NoTransformers:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'transformers':
            raise ImportError('no transformers')
sys.meta_path.insert(0, NoTransformers())
import threedino_pipe.cli, threedino_pipe.stages.finetune, threedino_pipe.stages.predict
from threedino_pipe.models.backbone_choice import resolve_backbone
from threedino_pipe.runtime.errors import UserError
assert 'transformers' not in sys.modules
try:
    resolve_backbone({str(hf_folders['dinov2'])!r}, '.')
except UserError as exc:
    print(exc.problem, '|', exc.fix)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs the transformers package" in done.stdout and "pip install threedino-pipe[natural]" in done.stdout


def _invoke(args: list[str], env: dict) -> str:
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.mark.e2e
def test_each_kind_finetunes_the_linear_head_and_predicts_without_its_folder(hf_folders, mni_preprocessed,
                                                                             mni_raw, tmp_path):
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "results")}
    common = ["finetune", "-d", "990", "--pct", "50", "--iters", "2", "--val-every", "2", "--batch-size", "1",
              "--num-workers", "0", "--precision", "fp32", "--no-progress"]
    scans = mni_raw / DATASET / "imagesTs"
    for method, folder in hf_folders.items():
        moved = shutil.copytree(folder, tmp_path / f"{method}_model")
        for head, lacks in (("adapter", "no token sequence"), ("unetr", "no grid of cubic 16-voxel patches")):
            refused = CliRunner().invoke(app, [*common, "--backbone", str(moved), "--head", head], env=env)
            assert refused.exit_code != 0 and f"the hf2d backbone has {lacks}" in str(refused.exception)
        _invoke([*common, "--backbone", str(moved)], env)  # --head left out: linear for this family
        run = tmp_path / "results" / DATASET / f"finetune__linear__hf2d-{method}-{method}_model__pct50__fold0__seed0"
        card = json.loads((run / "model.json").read_text())
        assert card["backbone"] == {"tag": f"hf2d-{method}-{method}_model", "source": str(moved.resolve()),
                                    "sha256": file_sha256(moved / "model.safetensors"), "frozen": True,
                                    "preset": None, "family": "hf2d", "method": method}
        assert card["model_args"]["backbone_family"] == "hf2d"
        assert card["model_args"]["backbone_dims"]["hf_config"]["hidden_size"] == 32
        weights = torch.load(run / "checkpoint_best.pt", weights_only=True)["model"]
        frozen = {k: v for k, v in weights.items() if k.startswith("backbone.model.")}
        assert all(torch.equal(v, resolve_backbone(str(moved), tmp_path).model.state_dict()[k[9:]])
                   for k, v in frozen.items()) and frozen
        shutil.rmtree(moved)  # model.json and the checkpoint rebuild the network on their own
        out = tmp_path / f"labels_{method}"
        _invoke(["predict", "-i", str(scans), "-o", str(out), "-m", str(run), "--device", "cpu", "--no-progress"],
                env)
        for image in sorted(scans.glob("*_0000.nii.gz")):
            source, labels = sitk.ReadImage(str(image)), sitk.ReadImage(str(out / image.name.replace("_0000", "")))
            assert labels.GetSize() == source.GetSize() and np.allclose(labels.GetSpacing(), source.GetSpacing())
            assert np.allclose(labels.GetOrigin(), source.GetOrigin())
            assert np.allclose(labels.GetDirection(), source.GetDirection())
            assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 2}


@pytest.mark.e2e
def test_each_kind_trains_the_classification_probe_and_embeds(hf_folders, tissue, tmp_path):
    env = {**tissue["env"], "THREEDINO_RESULTS": str(tmp_path / "results")}
    for method, folder in hf_folders.items():
        _invoke(["finetune", "-d", "995", "--head", "probe", "--pct", "100", "--backbone", str(folder), "--iters",
                 "20", "--device", "cpu", "--no-progress"], env)
        name = f"finetune__probe__hf2d-{method}-{method}__pct100__fold0__seed0"
        run = tmp_path / "results" / "Dataset995_MNITissueContent" / name
        card = json.loads((run / "model.json").read_text())
        assert (card["backbone"]["family"], card["backbone"]["method"]) == ("hf2d", method)
        validation = json.loads((run / "validation.json").read_text())
        assert np.isfinite(validation["metrics"]["accuracy"]["all"])
        # `3dino embed` writes the probe's input (the slices' mean CLS tokens ...) for fresh scans
        out = tmp_path / f"embed_{method}.csv"
        _invoke(["embed", "-m", str(run), "-i", str(tissue["held_out"]), "-o", str(out), "--layers",
                 str(card["probe"]["layers"]), "--avgpool" if card["probe"]["avgpool"] else "--no-avgpool",
                 "--device", "cpu", "--no-progress"], env)
        rows = list(csv.DictReader(out.open()))
        width = (card["probe"]["layers"] + card["probe"]["avgpool"]) * 32
        assert len(rows) == HELD_OUT and all(len(r) == 1 + width for r in rows)
        assert all(np.isfinite(float(v)) for r in rows for k, v in r.items() if k != "case_id")
