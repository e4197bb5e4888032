"""Optimiser parameter groups: weight-decay exemptions, layer-wise lr decay, patch-embed and last-layer flags."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from threedino_pipe.ssl.schedules import CosineSchedule, schedule_values

#: wrapper components that DDP, FSDP, activation checkpointing and torch.compile insert into names
_WRAPPER = re.compile(r"(^|\.)(?:module|_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
#: layer 0 of the layer-wise decay, and exempt from weight decay
_TOKENS = ("cls_token", "pos_embed", "mask_token", "register_tokens")
#: ``blocks.{i}.`` (the unchunked layout of our backbone)
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def clean_name(name: str) -> str:
    """Drop DDP / FSDP / checkpoint / compile wrapper components from a parameter name."""
    while (cleaned := _WRAPPER.sub(r"\1", name)) != name:
        name = cleaned
    return name


def layer_id(name: str, num_layers: int) -> int:
    """Layer index of a backbone parameter: tokens and patch embedding 0, block i -> i + 1, rest num_layers + 1."""
    parts = name.split(".")
    if any(token in parts for token in _TOKENS) or "patch_embed" in parts:
        return 0
    match = _BLOCK.search(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def weight_decay_exempt(name: str) -> bool:
    """True for biases, norm layers, LayerScale gammas and the tokens / position embedding."""
    parts = name.split(".")
    return (parts[-1] == "bias" or parts[-1] == "gamma" or parts[-1] in _TOKENS
            or any("norm" in part for part in parts[:-1]))


def _describe(name: str, num_layers: int, backbone: bool, layer_decay: float,
              patch_embed_lr_mult: float) -> tuple[float, float, bool]:
    lr_mult = layer_decay ** (num_layers + 1 - layer_id(name, num_layers)) if backbone else 1.0
    if "patch_embed" in name.split("."):
        lr_mult *= patch_embed_lr_mult
    wd_mult = 0.0 if weight_decay_exempt(name) else 1.0
    return lr_mult, wd_mult, "last_layer" in name.split(".")


def build_param_groups(backbone: Iterable[tuple[str, nn.Parameter]],
                       heads: Iterable[tuple[str, nn.Parameter]] = (), *, num_layers: int | None = None,
                       layer_decay: float = 0.9, patch_embed_lr_mult: float = 0.2) -> list[dict]:
    """DINOv2-style optimiser groups, fused by identical (lr, wd, last-layer) settings.

    Backbone parameter ``name`` gets ``lr_multiplier = layer_decay ** (num_layers + 1 - layer_id)``
    (see :func:`layer_id`: tokens/patch embedding 0, block i -> i + 1, final norm num_layers + 1 -> 1.0),
    times ``patch_embed_lr_mult`` for ``patch_embed.*``. Head parameters get lr multiplier 1. Every
    parameter gets ``wd_multiplier`` 0 when :func:`weight_decay_exempt`, else 1; names containing a
    ``last_layer`` component are flagged ``is_last_layer`` (frozen during the first 1 %). Parameters
    with ``requires_grad=False`` (e.g. a frozen weight-norm gain) and repeats are skipped.

    Args:
        backbone: ``backbone.named_parameters()`` (names like ``blocks.3.attn.qkv.weight``).
        heads: named parameters of the heads, e.g. ``chain(dino_head.named_parameters(prefix="dino_head"),
            ibot_head.named_parameters(prefix="ibot_head"))``.
        num_layers: backbone depth; inferred from the largest block index when None.
        layer_decay: layer-wise lr decay rate (0.9).
        patch_embed_lr_mult: extra lr multiplier of the patch embedding (0.2).

    Returns:
        ``[{"params": [...], "names": [...], "lr_multiplier": float, "wd_multiplier": float,
        "is_last_layer": bool}, ...]`` for ``torch.optim.AdamW``; set lr / weight decay each step with
        :func:`apply_schedules`.
    """
    seen: set[int] = set()
    entries: list[tuple[str, nn.Parameter, bool]] = []
    for is_backbone, named in ((True, backbone), (False, heads)):
        for raw_name, param in named:
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            entries.append((clean_name(raw_name), param, is_backbone))
    if num_layers is None:
        blocks = [int(m.group(1)) for name, _, is_bb in entries if is_bb and (m := _BLOCK.search(name))]
        num_layers = max(blocks) + 1 if blocks else 0

    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param, is_backbone in entries:
        key = _describe(name, num_layers, is_backbone, layer_decay, patch_embed_lr_mult)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_multiplier": key[0],
                                        "wd_multiplier": key[1], "is_last_layer": key[2]})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's ``lr`` (``last_layer_lr`` for last-layer groups) x ``lr_multiplier`` and
    ``weight_decay = wd x wd_multiplier``; call before every optimiser step."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
        group["lr"] = (last_layer_lr if group.get("is_last_layer", False) else lr) * group.get("lr_multiplier", 1.0)


def step_schedules(optimizer: torch.optim.Optimizer, schedules: dict[str, CosineSchedule],
                   iteration: int) -> dict[str, float]:
    """Every schedule's value at ``iteration``, applied to ``optimizer`` (:func:`apply_schedules`); returned for
    log.csv. Call before the iteration's optimiser step."""
    values = schedule_values(schedules, iteration)
    apply_schedules(optimizer, values["lr"], values["wd"], values["last_layer_lr"])
    return values
