"""The 3D ViT backbone: shapes, position-embedding interpolation, attention, masking, drop path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from threedino_pipe.models.heads import DINOHead
from threedino_pipe.models.presets import PRESETS, build_backbone, default_num_heads, param_count
from threedino_pipe.models.vit3d import (
    VisionTransformer3D,
    interpolate_pos_embed,
    layer_id,
    resize_stored_pos_embed,
)


def small_vit(**kw) -> VisionTransformer3D:
    """A 32-wide ViT over 8^3 patches, stored grid 4^3 (so 32^3 inputs use it untouched)."""
    torch.manual_seed(0)
    args = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "pos_grid": 4}
    args.update(kw)
    return VisionTransformer3D(**args).eval()


def test_non_cubic_shapes_and_intermediate_layers():
    model = small_vit()
    x = torch.randn(2, 1, 16, 24, 40)
    out = model.forward_features(x)
    assert out["cls"].shape == (2, 32)
    assert out["patch"].shape == (2, 2 * 3 * 5, 32)
    assert out["prenorm"].shape == (2, 1 + 30, 32)
    assert out["masks"] is None
    assert torch.equal(model(x), out["cls"])
    layers = model.get_intermediate_layers(x, 4)
    assert len(layers) == 4 and torch.allclose(layers[-1], out["patch"], atol=1e-6)
    picked = model.get_intermediate_layers(x, [0, 2], return_cls=True, reshape=True)
    assert [p.shape for p, _ in picked] == [(2, 32, 2, 3, 5)] * 2
    assert picked[1][1].shape == (2, 32)
    # reshape keeps W-major order: token (a, b, c) -> flat index (a * 3 + b) * 5 + c
    assert torch.equal(picked[1][0][:, :, 1, 2, 3], layers[2][:, (1 * 3 + 2) * 5 + 3])
    raw = model.get_intermediate_layers(x, [3], norm=False)[0]
    assert torch.allclose(raw, out["prenorm"][:, 1:], atol=1e-6)
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, [4])
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 16, 20, 16))  # 20 is not a multiple of the 8-voxel patch


def test_patch_tokens_are_w_major():
    """Token order is W slowest, D fastest: a patch-sized blob lands on the expected token."""
    model = small_vit()
    x = torch.zeros(1, 1, 16, 24, 32)
    base = model.patch_embed(x)
    x[0, 0, 8:16, 16:24, 0:8] = 1.0  # patch (1, 2, 0) of a 2 x 3 x 4 grid
    changed = (model.patch_embed(x) - base).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [(1 * 3 + 2) * 4 + 0]


def test_pos_embed_identity_on_stored_grid():
    pos = torch.randn(1, 6 ** 3 + 1, 8)
    assert interpolate_pos_embed(pos, (6, 6, 6)) is pos
    model = small_vit()
    tokens = model.prepare_tokens(torch.zeros(1, 1, 32, 32, 32))
    expected = model.cls_token + model.pos_embed[:, :1]
    assert torch.equal(tokens[:, :1], expected)
    assert torch.allclose(tokens[:, 1:], model.patch_embed.proj.bias + model.pos_embed[:, 1:], atol=1e-6)


def _trilinear_by_hand(cube: np.ndarray, grid, n: int) -> np.ndarray:
    """Independent trilinear resampling with the reference rule: scale (g + 0.1) / n,
    source coordinate (dst + 0.5) / scale - 0.5, clamped at 0 (align_corners False)."""
    axes = []
    for g in grid:
        scale = (g + 0.1) / n
        src = np.maximum((np.arange(g) + 0.5) / scale - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n - 1)
        hi = np.minimum(lo + 1, n - 1)
        axes.append((lo, hi, src - lo))
    out = np.zeros((*grid, cube.shape[-1]))
    for a in range(grid[0]):
        for b in range(grid[1]):
            for c in range(grid[2]):
                value = 0.0
                for ia, wa in ((axes[0][0][a], 1 - axes[0][2][a]), (axes[0][1][a], axes[0][2][a])):
                    for ib, wb in ((axes[1][0][b], 1 - axes[1][2][b]), (axes[1][1][b], axes[1][2][b])):
                        for ic, wc in ((axes[2][0][c], 1 - axes[2][2][c]), (axes[2][1][c], axes[2][2][c])):
                            value = value + wa * wb * wc * cube[ia, ib, ic]
                out[a, b, c] = value
    return out


def test_pos_embed_interpolation_follows_the_reference_rule():
    n, dim, grid = 4, 3, (3, 5, 2)
    pos = torch.randn(1, n ** 3 + 1, dim, dtype=torch.float64)
    out = interpolate_pos_embed(pos, grid)
    assert out.shape == (1, 3 * 5 * 2 + 1, dim) and out.dtype == torch.float64
    assert torch.equal(out[:, 0], pos[:, 0])
    expected = _trilinear_by_hand(pos[0, 1:].reshape(n, n, n, dim).numpy(), grid, n)
    np.testing.assert_allclose(out[0, 1:].reshape(*grid, dim).numpy(), expected, atol=1e-6)


def test_resize_stored_pos_embed_6_to_7():
    pos = torch.randn(1, 217, 16)
    resized = resize_stored_pos_embed(pos, 7)
    assert resized.shape == (1, 344, 16)
    assert torch.equal(resized[:, 0], pos[:, 0])
    model = small_vit(pos_grid=6)
    model.interpolate_pos_embed_to(7)
    assert model.pos_embed.shape == (1, 344, 32) and model.pos_grid == 7
    assert isinstance(model.pos_embed, torch.nn.Parameter) and model.pos_embed.requires_grad
    assert interpolate_pos_embed(model.pos_embed, (7, 7, 7)) is model.pos_embed
    assert model(torch.randn(1, 1, 56, 56, 56)).shape == (1, 32)


def test_sdpa_attention_equals_manual_softmax():
    model = small_vit()
    attn = model.blocks[1].attn
    x = torch.randn(2, 9, 32)
    b, n, d, h = 2, 9, 32, 2
    qkv = attn.qkv(x).reshape(b, n, 3, h, d // h)  # rows q|k|v, head-major
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    weights = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1)
    manual = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))
    assert torch.allclose(attn(x), manual, atol=1e-6)
    cls = attn.cls_weights(x)  # row 0 of the softmax over the patches, divided by its mean
    assert torch.allclose(cls, weights[:, :, 0, 1:] / weights[:, :, 0, 1:].mean(-1, keepdim=True), atol=1e-5)
    tokens, maps = model.last_layer_maps(torch.randn(1, 1, 16, 24, 32))
    assert tokens.shape == (24, 32) and maps.shape == (2, 24)
    assert torch.allclose(maps.mean(-1), torch.ones(2), atol=1e-5)


def test_masks_replace_patch_embeddings_before_position():
    model = small_vit()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 1, 32, 32, 16)
    masks = torch.zeros(2, 4 * 4 * 2, dtype=torch.bool)
    masks[0, [0, 5, 31]] = True
    masks[1, 7] = True
    plain = model.prepare_tokens(x)
    tokens = model.prepare_tokens(x, masks)
    pos = interpolate_pos_embed(model.pos_embed, (4, 4, 2))[0, 1:]
    expected = model.mask_token[0] + pos
    assert torch.allclose(tokens[:, 1:][masks], expected[masks.nonzero()[:, 1]], atol=1e-6)
    assert torch.equal(tokens[:, 1:][~masks], plain[:, 1:][~masks])
    assert torch.equal(tokens[:, 0], plain[:, 0])
    out = model.forward_features(x, masks)
    assert out["masks"] is masks and out["patch"].shape == (2, 32, 32)


def test_drop_path_only_in_training():
    torch.manual_seed(1)
    dropping = small_vit(drop_path_rate=0.5)
    plain = small_vit()
    plain.load_state_dict(dropping.state_dict())
    with torch.no_grad():  # make the residual branches matter
        for block in dropping.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
        plain.load_state_dict(dropping.state_dict())
    x = torch.randn(8, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(dropping.eval()(x), plain(x))
        dropping.train()
        first, second = dropping(x), dropping(x)
    assert not torch.allclose(first, second)


def test_grad_checkpointing_gives_the_same_gradients():
    model = small_vit().train()
    x = torch.randn(2, 1, 16, 16, 16)
    model(x).square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for k, p in model.named_parameters():
        if k in grads:
            assert torch.allclose(p.grad, grads[k], atol=1e-6), k


def test_bf16_autocast_runs():
    model = small_vit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features(torch.randn(1, 1, 16, 24, 32))
    assert torch.isfinite(out["patch"].float()).all()


def test_presets_and_parameter_counts():
    assert PRESETS["small"] == {"embed_dim": 384, "depth": 12, "num_heads": 6}
    assert PRESETS["large"] == {"embed_dim": 1024, "depth": 24, "num_heads": 16}
    assert all(p["depth"] % 4 == 0 for p in PRESETS.values())
    with torch.device("meta"):
        large = build_backbone("large")
    assert 300e6 < param_count(large) < 312e6  # "about 307 M" (docs/method.md, Backbone)
    tiny = build_backbone("tiny", drop_path_rate=0.1)
    assert tiny.dims == {"embed_dim": 96, "depth": 4, "num_heads": 3, "patch_size": 16, "in_chans": 1,
                         "mlp_ratio": 4.0, "layerscale": True, "pos_grid": 6}
    rebuilt = build_backbone(tiny.dims)
    assert rebuilt.state_dict().keys() == tiny.state_dict().keys()
    no_ls = build_backbone({**tiny.dims, "layerscale": False})
    assert not any("ls1" in k for k in no_ls.state_dict())
    assert default_num_heads(96) == 3 and default_num_heads(1024) == 16 and default_num_heads(512) == 8
    with pytest.raises(ValueError):
        build_backbone("huge")
    assert layer_id("backbone.pos_embed", 4) == 0 and layer_id("blocks.3.mlp.fc1.weight", 4) == 4
    assert layer_id("norm.weight", 4) == 5


def test_dino_head_shapes_and_weight_norm():
    torch.manual_seed(0)
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                       "mlp.4.weight", "mlp.4.bias",
                                       "last_layer.parametrizations.weight.original0",
                                       "last_layer.parametrizations.weight.original1"]
    assert torch.equal(head.last_layer.parametrizations.weight.original0, torch.ones(64, 1))
    # every prototype has norm 1 and the bottleneck is unit-length, so logits are cosines
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 64) and out.abs().max() <= 1 + 1e-5
    v = head.last_layer.parametrizations.weight.original1
    bottleneck = F.normalize(head.mlp(torch.ones(1, 32)), dim=-1)
    assert torch.allclose(head(torch.ones(1, 32)), bottleneck @ F.normalize(v, dim=1).T, atol=1e-6)
    released = {"last_layer.weight_g" if k.endswith("original0") else
                "last_layer.weight_v" if k.endswith("original1") else k: v for k, v in head.state_dict().items()}
    other = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    other.load_state_dict(released, strict=True)
    assert torch.equal(other(torch.ones(2, 32)), head(torch.ones(2, 32)))
    assert len(DINOHead(32, 8, nlayers=1).mlp) == 1
