"""Segmentation decoders on 3D ViT features.

* :class:`LinearDecoder`: last 4 layers' patch tokens -> concatenated -> one Linear per patch ->
  trilinear upsampling to the input size.
* :class:`UNETRDecoder`: UNETR-style decoder on 4 evenly spaced layers (MONAI's UNETR blocks).
* :class:`UNetDecoder`: UNet-like decoder on the ViT-Adapter's 4-level pyramid.

Layer-tapping decoders receive the per-channel patch tokens ``[B*C, N, dim]`` of their layers
(channels folded into the batch, see :mod:`threedino_pipe.models.channel_mixing`) and mix the
channels themselves, one :class:`ChannelMixing` per tapped layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threedino_pipe.models.channel_mixing import ChannelMixing


def tokens_to_volume(tokens: Tensor, grid: Sequence[int]) -> Tensor:
    """``[B, N, dim]`` (W-major patch order) -> ``[B, dim, gw, gh, gd]``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def evenly_spaced_layers(depth: int, count: int = 4) -> list[int]:
    """0-based block indices of ``count`` evenly spaced layers ending at the last block:
    1-based layers ``depth/4, depth/2, 3*depth/4, depth`` for ``count == 4`` (3/6/9/12 at depth 12)."""
    if depth < count:
        raise ValueError(f"backbone depth {depth} has fewer than {count} blocks to tap")
    return [round(depth * (i + 1) / count) - 1 for i in range(count)]


class LinearDecoder(nn.Module):
    """Per-patch linear classifier on the last ``num_layers`` layers (METHOD.md's linear decoder).

    ``forward(features, spatial)``: ``features`` is one ``[B*C, N, dim]`` tensor per tapped layer;
    returns logits ``[B, num_outputs, *spatial]``, the per-patch logits upsampled trilinearly
    (align_corners False) from the patch grid to ``spatial`` voxels.
    """

    def __init__(self, embed_dim: int, depth: int, in_channels: int, num_outputs: int, *,
                 patch_size: int = 16, num_layers: int = 4) -> None:
        super().__init__()
        if not 1 <= num_layers <= depth:
            raise ValueError(f"num_layers must be in 1..{depth}, got {num_layers}")
        self.layers = list(range(depth - num_layers, depth))
        self.patch_size = patch_size
        self.options = {"num_layers": num_layers}
        self.mixers = nn.ModuleList(ChannelMixing(in_channels, embed_dim) for _ in self.layers)
        self.classifier = nn.Linear(num_layers * embed_dim, num_outputs)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[Tensor], spatial: Sequence[int]) -> Tensor:
        grid = [s // self.patch_size for s in spatial]
        mixed = torch.cat([mix(f) for mix, f in zip(self.mixers, features, strict=True)], dim=-1)
        logits = tokens_to_volume(self.classifier(mixed), grid)
        return F.interpolate(logits, size=tuple(spatial), mode="trilinear", align_corners=False)


class UNETRDecoder(nn.Module):
    """UNETR-style decoder (filled in below)."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError("the unetr head is not implemented yet")


class UNetDecoder(nn.Module):
    """UNet-like decoder on the adapter pyramid (filled in below)."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError("the adapter decoder is not implemented yet")
