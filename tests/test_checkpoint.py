"""Checkpoint files: export in the released layout and reload, other layouts, and refusals."""

from __future__ import annotations

import argparse
import zipfile

import pytest
import torch

from threedino_pipe.models.heads import DINOHead
from threedino_pipe.models.vit3d import VisionTransformer3D
from threedino_pipe.models.weight_files import (
    export_3dino,
    load_backbone,
    load_backbone_state,
    load_heads,
    save_backbone,
)
from threedino_pipe.runtime.errors import UserError


@pytest.fixture
def model() -> VisionTransformer3D:
    """Depth 8 so the 4 chunks hold 2 blocks each; non-default gammas and tokens so nothing is at init."""
    torch.manual_seed(0)
    vit = VisionTransformer3D(embed_dim=40, depth=8, num_heads=5, patch_size=8, pos_grid=4)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith(("gamma", "mask_token", "cls_token")):
                p.normal_()
    return vit.eval()


@pytest.fixture
def heads() -> dict[str, DINOHead]:
    torch.manual_seed(1)
    return {name: DINOHead(40, 24, hidden_dim=32, bottleneck_dim=8).eval() for name in ("dino_head", "ibot_head")}


def _outputs(vit: VisionTransformer3D) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    x = torch.randn(2, 1, 32, 24, 16)
    masks = torch.rand(2, 4 * 3 * 2) < 0.4
    with torch.no_grad():
        out = vit.forward_features(x, masks)
        return {"cls": out["cls"], "patch": out["patch"], "last": vit.get_intermediate_layers(x, 2)[0]}


def _assert_same(a: VisionTransformer3D, b: VisionTransformer3D) -> None:
    theirs = _outputs(b)
    for key, value in _outputs(a).items():
        assert torch.equal(value, theirs[key]), key


def _released(tmp_path, model, heads=None):
    path = tmp_path / "teacher_checkpoint.pth"
    export_3dino(model, heads, path)
    return path


def _edit_teacher(src, dst, edit) -> None:
    obj = torch.load(src, weights_only=True)
    edit(obj["teacher"])
    torch.save(obj, dst)


def test_export_3dino_layout_and_reload_identical(tmp_path, model, heads):
    path = _released(tmp_path, model, heads)
    obj = torch.load(path, weights_only=True)
    teacher = obj["teacher"]
    assert "backbone.blocks.0.1.attn.qkv.weight" in teacher and "backbone.blocks.3.7.ls2.gamma" in teacher
    assert not any(k.startswith("backbone.blocks.1.0.") for k in teacher)
    assert teacher["backbone.pos_embed"].shape == (1, 65, 40)
    assert teacher["dino_head.last_layer.weight_g"].shape == (24, 1)
    assert teacher["ibot_head.last_layer.weight_v"].shape == (24, 8)
    assert obj["threedino_pipe"]["dims"]["num_heads"] == 5
    loaded, info = load_backbone(path)
    assert info["layout"] == "released (4 chunks)" and info["num_heads_source"] == "file metadata"
    assert info["depth"] == 8 and info["embed_dim"] == 40 and info["patch_size"] == 8 and info["pos_grid"] == 4
    _assert_same(model, loaded)
    reloaded_heads = load_heads(path)
    x = torch.randn(3, 40)
    for name, head in heads.items():
        assert torch.equal(head(x), reloaded_heads[name](x))
    assert not list(tmp_path.glob(".*partial*"))


def test_export_needs_depth_divisible_by_4(tmp_path):
    vit = VisionTransformer3D(embed_dim=16, depth=6, num_heads=2, patch_size=8, pos_grid=2)
    path = tmp_path / "out.pth"
    with pytest.raises(UserError, match="multiple of 4") as err:
        export_3dino(vit, None, path)
    assert str(path) in str(err.value) and not path.exists()


def test_our_backbone_file_round_trip(tmp_path, model):
    path = tmp_path / "backbone.pt"
    save_backbone(model, path, preset=None, meta={"run": "r1", "iteration": 20})
    loaded, info = load_backbone(path)
    assert info["layout"] == "threedino_pipe" and info["meta"] == {"run": "r1", "iteration": 20}
    assert info["num_heads"] == 5
    _assert_same(model, loaded)
    with pytest.raises(ValueError):
        save_backbone(model, tmp_path / "bad.pt", meta={"tensor": torch.zeros(1)})


@pytest.mark.parametrize("wrap", ["bare", "backbone_prefix_in_model", "ddp_in_state_dict"])
def test_unchunked_layouts_load(tmp_path, model, wrap):
    state = model.state_dict()
    obj = {"bare": state,
           "backbone_prefix_in_model": {"model": {f"backbone.{k}": v for k, v in state.items()}},
           "ddp_in_state_dict": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}}[wrap]
    path = tmp_path / "plain.pt"
    torch.save(obj, path)
    loaded, info = load_backbone(path, num_heads=5)
    assert info["layout"] == "unchunked" and info["num_heads_source"] == "argument"
    _assert_same(model, loaded)


def test_heads_rule_without_metadata(tmp_path):
    vit = VisionTransformer3D(embed_dim=128, depth=4, num_heads=2, patch_size=8, pos_grid=2)
    path = tmp_path / "plain.pt"
    torch.save(vit.state_dict(), path)
    state, dims = load_backbone_state(path)
    assert dims["num_heads"] == 2 and dims["num_heads_source"] == "preset rule"  # 128 // 64
    assert set(state) == set(vit.state_dict())


def _message(err) -> str:
    return str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="not found") as err:
        load_backbone(tmp_path / "nope.pth")
    assert "nope.pth" in _message(err)
    with pytest.raises(UserError, match="folder"):
        load_backbone(tmp_path)


def test_truncated_file(tmp_path, model):
    path = _released(tmp_path, model)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 0):
        bad = tmp_path / f"truncated_{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError, match="cannot be read|corrupted") as err:
            load_backbone(bad)
        assert str(bad) in _message(err)


def test_corrupted_tensor_bytes_fail_the_checksum(tmp_path, model):
    path = _released(tmp_path, model)
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(path.read_bytes())
    for i in range(start + 100, start + 132):
        data[i] ^= 0x5A
    bad = tmp_path / "corrupted.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted") as err:
        load_backbone(bad)
    assert str(bad) in _message(err) and info.filename.split("/", 1)[1] in _message(err)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(UserError, match="cannot be read") as err:
        load_backbone(text)
    assert str(text) in _message(err)
    other = tmp_path / "optimizer.pt"
    torch.save({"optimizer": {"lr": torch.tensor(0.1)}}, other)
    with pytest.raises(UserError, match="no 3D ViT backbone weights"):
        load_backbone(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=1.0), "teacher": {}}, pickled)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_backbone(pickled)


def test_missing_key_is_named(tmp_path, model):
    src = _released(tmp_path, model)
    bad = tmp_path / "missing.pth"
    _edit_teacher(src, bad, lambda t: t.pop("backbone.blocks.2.5.mlp.fc2.bias"))
    with pytest.raises(UserError, match="missing keys \\(1\\): blocks.5.mlp.fc2.bias") as err:
        load_backbone(bad)
    assert str(bad) in _message(err)
    extra = tmp_path / "extra.pth"
    _edit_teacher(src, extra, lambda t: t.update({"backbone.blocks.0.0.attn.q_norm.weight": torch.ones(8)}))
    with pytest.raises(UserError, match="unexpected keys \\(1\\): blocks.0.attn.q_norm.weight"):
        load_backbone(extra)


def test_missing_block_and_wrong_width_are_named(tmp_path, model):
    src = _released(tmp_path, model)
    no_block = tmp_path / "no_block.pth"
    _edit_teacher(src, no_block, lambda t: [t.pop(k) for k in list(t) if k.startswith("backbone.blocks.1.3.")])
    with pytest.raises(UserError, match=r"missing keys \(14\): blocks\.3\.norm1\.weight"):
        load_backbone(no_block)
    wide = tmp_path / "wide_pos.pth"
    _edit_teacher(src, wide, lambda t: t.update({"backbone.pos_embed": torch.zeros(1, 65, 48)}))
    mismatch = r"shape mismatches file vs model \(1\): pos_embed \[1, 65, 48\] vs \[1, 65, 40\]"
    with pytest.raises(UserError, match=mismatch):
        load_backbone(wide)


def test_expected_size_is_enforced(tmp_path, model):
    path = _released(tmp_path, model)
    with pytest.raises(UserError, match="embed_dim 40 \\(expected 384\\), depth 8 \\(expected 12\\)") as err:
        load_backbone(path, expect="small")
    assert str(path) in _message(err)
    loaded, _ = load_backbone(path, expect={"embed_dim": 40, "depth": 8})
    assert loaded.depth == 8


def test_non_finite_weights_are_refused(tmp_path, model):
    bad = tmp_path / "nan.pth"
    _edit_teacher(_released(tmp_path, model), bad,
                  lambda t: t["backbone.blocks.0.1.attn.proj.weight"].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(UserError, match="NaN or Inf.*blocks.1.attn.proj.weight"):
        load_backbone(bad)


def test_heads_absent_or_mismatched(tmp_path, model, heads):
    no_heads = _released(tmp_path, model)
    with pytest.raises(UserError, match="no projection heads"):
        load_heads(no_heads)
    src = tmp_path / "with_heads.pth"
    export_3dino(model, heads, src)
    bad = tmp_path / "bad_head.pth"
    _edit_teacher(src, bad, lambda t: t.pop("ibot_head.mlp.2.bias"))
    with pytest.raises(UserError, match="ibot_head weights .*missing keys \\(1\\): mlp.2.bias"):
        load_heads(bad)
