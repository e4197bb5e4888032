"""Schedules, parameter groups, EMA teacher update and gradient clipping, against hand-computed values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from threedino_pipe.ssl import (
    CosineSchedule,
    apply_schedules,
    build_param_groups,
    clip_gradients,
    make_schedules,
    schedule_values,
    update_teacher,
)

# --- schedules ------------------------------------------------------------------------------------------------


def test_cosine_schedule_layout():
    s = CosineSchedule(1.0, 0.0, 10, warmup_iters=2, start_warmup=0.5, freeze_iters=3)
    # 3 zeros, warm-up 0.5 -> 1.0 (both included), then cosine over 5 iterations from 1.0
    expected = [0, 0, 0, 0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    assert [s[i] for i in range(10)] == pytest.approx(expected)
    assert len(s) == 10 and s[10] == 0.0 and s[10_000] == 0.0
    with pytest.raises(ValueError):
        CosineSchedule(1.0, 0.0, 5, warmup_iters=6)


def test_make_schedules_values():
    s = make_schedules(1000, 256)  # paper defaults, 1000 iterations, total batch 256
    peak = 0.002 * math.sqrt(256 / 1024)
    assert peak == pytest.approx(0.001)
    lr = s["lr"]
    assert lr[0] == 0.0
    assert lr[50] == pytest.approx(peak * 50 / 99)  # linear warm-up over 100 iterations (10 %)
    assert lr[99] == pytest.approx(peak)  # warm-up end
    assert lr[100] == pytest.approx(peak)  # cosine start
    assert lr[550] == pytest.approx((0.001 + 1e-6) / 2)  # middle of the cosine
    assert lr[999] == pytest.approx(1e-6 + 0.5 * (0.001 - 1e-6) * (1 + math.cos(math.pi * 899 / 900)))
    assert lr[1000] == 1e-6
    wd = s["wd"]
    assert (wd[0], wd[500], wd[1000]) == pytest.approx((0.04, 0.22, 0.4))
    mom = s["momentum"]
    assert (mom[0], mom[500], mom[1000]) == pytest.approx((0.992, 0.996, 1.0))
    assert mom[999] == pytest.approx(1.0, abs=1e-7)
    temp = s["teacher_temp"]  # linear 0.04 -> 0.07 over 300 iterations (30 %), then constant
    assert temp[0] == pytest.approx(0.04)
    assert temp[150] == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert temp[299] == pytest.approx(0.07)
    assert temp[300] == 0.07 and temp[999] == 0.07
    last = s["last_layer_lr"]  # frozen during the first 1 % (10 iterations), then the lr schedule
    assert all(last[i] == 0.0 for i in range(10))
    assert last[10] == pytest.approx(lr[10]) and last[10] > 0
    assert last[550] == pytest.approx(lr[550])
    assert schedule_values(s, 300) == pytest.approx(
        {"lr": lr[300], "wd": wd[300], "momentum": mom[300], "teacher_temp": 0.07, "last_layer_lr": lr[300]})


def test_make_schedules_compress_to_adapt_highres_length():
    s = make_schedules(125, 256, base_lr=0.001)  # the same shapes, compressed
    peak = 0.001 * math.sqrt(256 / 1024)
    assert s["lr"][11] == pytest.approx(peak) and s["lr"][12] == pytest.approx(peak)  # 12 warm-up iterations
    assert s["lr"][10] < peak
    assert s["teacher_temp"][int(round(0.3 * 125)) - 1] == pytest.approx(0.07)
    assert s["last_layer_lr"][0] == 0.0 and s["last_layer_lr"][1] > 0.0  # round(1.25) = 1 frozen iteration
    tiny = make_schedules(20, 2)  # a smoke-test run: everything defined and finite
    assert all(math.isfinite(v) for name in tiny for v in (tiny[name][i] for i in range(21)))


# --- parameter groups -----------------------------------------------------------------------------------------

class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))


class _Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), _Attention(dim), _LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim), _Mlp(dim), _LayerScale(dim)


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(1, dim, 2, 2)


class _StandInViT(nn.Module):
    """Parameter names of VisionTransformer3D, no forward."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 9, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = _PatchEmbed(dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)


class _StandInHead(nn.Module):
    """Parameter names of DINOHead: an MLP and a weight-normalised last layer with a frozen gain."""

    def __init__(self, dim: int = 8, prototypes: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, 4))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)


def _groups_by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: group for group in groups for name in group["names"]}


def test_param_groups_weight_decay_and_multipliers():
    vit, dino_head, ibot_head = _StandInViT(depth=3), _StandInHead(), _StandInHead()
    heads = [*dino_head.named_parameters(prefix="dino_head"), *ibot_head.named_parameters(prefix="ibot_head")]
    groups = build_param_groups(vit.named_parameters(), heads)
    by_name = _groups_by_name(groups)

    no_wd = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(3):
        no_wd |= {f"blocks.{i}.{p}" for p in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                               "ls1.gamma", "ls2.gamma", "attn.qkv.bias", "attn.proj.bias",
                                               "mlp.fc1.bias", "mlp.fc2.bias")}
    no_wd |= {f"{h}.mlp.{i}.bias" for h in ("dino_head", "ibot_head") for i in (0, 2)}
    assert {n for n, g in by_name.items() if g["wd_multiplier"] == 0.0} == no_wd
    assert by_name["blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["patch_embed.proj.weight"]["wd_multiplier"] == 1.0
    assert by_name["dino_head.last_layer.parametrizations.weight.original1"]["wd_multiplier"] == 1.0

    # layer-wise decay 0.9 ** (depth + 1 - layer_id), depth 3: tokens/patch embed 0, block i -> i + 1
    assert by_name["cls_token"]["lr_multiplier"] == pytest.approx(0.9 ** 4)
    assert by_name["pos_embed"]["lr_multiplier"] == pytest.approx(0.6561)
    assert by_name["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.6561 * 0.2)
    assert by_name["blocks.0.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.729)  # first block
    assert by_name["blocks.2.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9)  # last block
    assert by_name["norm.weight"]["lr_multiplier"] == pytest.approx(1.0)
    assert by_name["ibot_head.mlp.0.weight"]["lr_multiplier"] == 1.0  # heads undecayed

    last = {n for n, g in by_name.items() if g["is_last_layer"]}
    assert last == {"dino_head.last_layer.parametrizations.weight.original1",
                    "ibot_head.last_layer.parametrizations.weight.original1"}  # frozen gains skipped
    n_trainable = sum(1 for m in (vit, dino_head, ibot_head) for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))  # fused: one group per setting


def test_param_groups_ignore_wrapper_prefixes_and_apply_schedules():
    vit = _StandInViT(depth=2)
    wrapped = [(f"module._orig_mod.{n}", p) for n, p in vit.named_parameters()]
    head = _StandInHead()
    groups = build_param_groups(wrapped, head.named_parameters(), layer_decay=0.5)
    by_name = _groups_by_name(groups)
    assert by_name["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.25)  # 0.5 ** (2 + 1 - 1)
    assert by_name["cls_token"]["wd_multiplier"] == 0.0

    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    apply_schedules(optimizer, lr=0.01, wd=0.1, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_multiplier"])
        expected_lr = 0.0 if group["is_last_layer"] else 0.01 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
    # a step during the freeze leaves the last layer untouched
    before = head.last_layer.parametrizations.weight.original1.detach().clone()
    qkv_before = vit.blocks[0].attn.qkv.weight.detach().clone()
    for p in [*vit.parameters(), *head.parameters()]:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.equal(head.last_layer.parametrizations.weight.original1, before)
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, qkv_before)


# --- EMA and clipping -----------------------------------------------------------------------------------------

def test_update_teacher_equals_formula():
    student = nn.ModuleDict({"backbone": _StandInViT(depth=2), "dino_head": _StandInHead()})
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
    update_teacher(student, teacher, 0.9)
    for p in teacher.parameters():  # 0.9 * 1 + 0.1 * 3
        torch.testing.assert_close(p, torch.full_like(p, 1.2))

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*student.parameters(), *teacher.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen))
    old = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    update_teacher(student, teacher, 0.992)
    s_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.992 * old[name] + 0.008 * s_params[name])
    update_teacher(student, teacher, 1.0)  # momentum 1: teacher frozen
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.992 * old[name] + 0.008 * s_params[name])
    with pytest.raises(ValueError, match="differ"):
        update_teacher(student, nn.ModuleDict({"backbone": _StandInViT(depth=3)}), 0.9)


def test_clip_gradients_to_max_norm():
    module = nn.Linear(3, 1, bias=False)
    module.weight.grad = torch.tensor([[3.0, 4.0, 12.0]])  # norm 13
    norm = clip_gradients(module, max_norm=3.0)
    assert norm.item() == pytest.approx(13.0)
    torch.testing.assert_close(module.weight.grad, torch.tensor([[3.0, 4.0, 12.0]]) * 3.0 / 13.0, rtol=1e-5,
                               atol=1e-6)
    assert clip_gradients(module, max_norm=3.0).item() == pytest.approx(3.0, rel=1e-5)  # already within
