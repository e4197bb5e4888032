"""Classification on a frozen backbone: frozen token features and the linear probe.

The method's numbers: docs/method.md, "Downstream: classification".

Features of one input ``[B, C, X, Y, Z]`` (each spatial side a multiple of the patch size):
a single-channel backbone runs once per channel (channels folded into the batch) and returns,
from its last ``num_layers`` blocks (final LayerNorm applied), the CLS tokens
``cls [B, L, C, dim]`` and the mean of the last block's patch tokens ``patch_mean [B, C, dim]``.

The probe input for ``(layers, avgpool)`` follows DINOv2's linear evaluation: the CLS tokens of
the last ``layers`` blocks concatenated (oldest block first), then, with ``avgpool``, the mean
patch token of the last block; within each token the channels are concatenated (channel-major).
Its width is ``(layers + avgpool) * C * dim`` (:func:`probe_input_dim`). ``3dino embed`` writes
the same vector, so a probe's ``head`` applies to embed's columns unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from threedino_pipe.models.backbones import DEFAULT_FAMILY, Backbone, get_family
from threedino_pipe.models.channel_mixing import fold_channels

MAX_LAYERS = 4


def frozen_tokens(backbone: Backbone, x: Tensor, num_layers: int = MAX_LAYERS) -> tuple[Tensor, Tensor]:
    """CLS tokens ``[B, L, C, dim]`` of the last ``L = num_layers`` blocks and the last block's mean
    patch token ``[B, C, dim]`` of ``x [B, C, X, Y, Z]`` (single-channel backbone: once per channel)."""
    if x.ndim != 5:
        raise ValueError(f"expected input [B, C, X, Y, Z], got {tuple(x.shape)}")
    b, c = x.shape[:2]
    if backbone.in_chans == 1:
        inputs, groups = fold_channels(x), c
    elif backbone.in_chans == c:
        inputs, groups = x, 1
    else:
        raise ValueError(f"a backbone with {backbone.in_chans} input channels cannot take {c} channels")
    outs = backbone.get_intermediate_layers(inputs, min(num_layers, backbone.depth), norm=True, return_cls=True)
    dim = backbone.embed_dim
    cls = torch.stack([token for _, token in outs], dim=1)            # [B*groups, L, dim]
    cls = cls.reshape(b, groups, len(outs), dim).transpose(1, 2)      # [B, L, groups, dim]
    patch_mean = outs[-1][0].mean(dim=1).reshape(b, groups, dim)      # [B, groups, dim]
    return cls, patch_mean


def probe_input(cls: Tensor, patch_mean: Tensor, layers: int, avgpool: bool) -> Tensor:
    """The probe's input ``[B, (layers + avgpool) * C * dim]`` from :func:`frozen_tokens`' outputs
    (``cls [B, L, C, dim]`` with ``L >= layers``, ``patch_mean [B, C, dim]``)."""
    if not 1 <= layers <= cls.shape[1]:
        raise ValueError(f"layers must be in 1..{cls.shape[1]}, got {layers}")
    parts = [cls[:, cls.shape[1] - layers:].flatten(1)]
    if avgpool:
        parts.append(patch_mean.flatten(1))
    return torch.cat(parts, dim=1)


def probe_input_dim(embed_dim: int, in_channels: int, layers: int, avgpool: bool) -> int:
    """Width of :func:`probe_input` for a single-channel backbone of width ``embed_dim``."""
    return (int(layers) + int(bool(avgpool))) * int(in_channels) * int(embed_dim)


class FrozenFeatures(nn.Module):
    """``forward(x [B, C, X, Y, Z]) -> (cls [B, L, C, dim], patch_mean [B, C, dim])`` of a frozen backbone.

    The backbone stays in eval mode with ``requires_grad=False``; forward runs without autograd.
    """

    def __init__(self, backbone: Backbone, num_layers: int = MAX_LAYERS) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_layers = min(int(num_layers), backbone.depth)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> FrozenFeatures:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return frozen_tokens(self.backbone, x, self.num_layers)


class ProbeClassifier(nn.Module):
    """Frozen backbone + ``Linear`` on :func:`probe_input`: ``forward(x [B, C, X, Y, Z]) -> logits [B, K]``.

    State dict keys: ``backbone.*`` (the ViT, also loadable by
    :func:`threedino_pipe.models.weight_files.load_backbone`) and ``head.weight`` / ``head.bias``.
    The backbone keeps ``requires_grad=False`` and eval mode; it runs without autograd.
    """

    def __init__(self, backbone: Backbone, in_channels: int, num_classes: int, layers: int,
                 avgpool: bool, backbone_spec: dict | None = None) -> None:
        super().__init__()
        if not 1 <= layers <= min(MAX_LAYERS, backbone.depth):
            raise ValueError(f"layers must be in 1..{min(MAX_LAYERS, backbone.depth)}, got {layers}")
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.layers, self.avgpool = int(layers), bool(avgpool)
        self._backbone_spec = dict(backbone_spec or backbone.dims)
        groups = in_channels if backbone.in_chans == 1 else 1
        self.head = nn.Linear(probe_input_dim(backbone.embed_dim, groups, layers, avgpool), num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.backbone.eval()

    def train(self, mode: bool = True) -> ProbeClassifier:
        super().train(mode)
        self.backbone.eval()
        return self

    def model_args(self) -> dict:
        """Keyword arguments of :func:`build_probe` that rebuild this architecture (JSON-able)."""
        return {"backbone_dims": dict(self._backbone_spec), "backbone_family": self.backbone.family,
                "in_channels": self.in_channels, "num_classes": self.num_classes, "layers": self.layers,
                "avgpool": self.avgpool}

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, X, Y, Z], got {tuple(x.shape)}")
        with torch.no_grad():
            cls, patch_mean = frozen_tokens(self.backbone, x, self.layers)
        return self.head(probe_input(cls, patch_mean, self.layers, self.avgpool))


def build_probe(backbone_dims: str | dict, in_channels: int, num_classes: int, layers: int,
                avgpool: bool, backbone_family: str = DEFAULT_FAMILY) -> ProbeClassifier:
    """A linear probe on a randomly initialised, frozen backbone (weights come from a checkpoint).

    Args:
        backbone_dims: a preset name or the backbone's ``dims``; ``backbone_family`` its family (it needs
            the ``cls_token`` capability).
        in_channels: input image channels C (a single-channel backbone runs once per channel).
        num_classes: K.
        layers: CLS tokens of the last 1..4 blocks.
        avgpool: also the last block's mean patch token.
    """
    family = get_family(backbone_family)
    if "cls_token" not in family.capabilities:
        raise ValueError(f"the probe reads CLS tokens, which a {family.name} backbone lacks")
    backbone = family.build(backbone_dims)
    spec = backbone.dims if isinstance(backbone_dims, str) else {**backbone.dims, **backbone_dims}
    return ProbeClassifier(backbone, in_channels, num_classes, layers, avgpool, backbone_spec=spec)
