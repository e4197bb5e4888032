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
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
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
    """Per-patch linear classifier on the last ``num_layers`` layers (docs/method.md, "Downstream: segmentation").

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

    def forward(self, features: Sequence[Tensor], spatial: Sequence[int],
                grid: Sequence[int] | None = None) -> Tensor:
        """``grid``: the backbone's token grid (default: ``spatial`` divided by the patch size)."""
        grid = list(grid) if grid is not None else [s // self.patch_size for s in spatial]
        mixed = torch.cat([mix(f) for mix, f in zip(self.mixers, features, strict=True)], dim=-1)
        logits = tokens_to_volume(self.classifier(mixed), grid)
        return F.interpolate(logits, size=tuple(spatial), mode="trilinear", align_corners=False)


class UNETRDecoder(nn.Module):
    """UNETR-style decoder on 4 evenly spaced layers, built from MONAI's UNETR blocks.

    Taps 0-based blocks :func:`evenly_spaced_layers` (1-based ``d/4, d/2, 3d/4, d``: 6/12/18/24
    for ViT-L), mixes each layer's channels, and decodes like MONAI's UNETR: the three shallower
    layers are upsampled by transposed convs to 1/8, 1/4 and 1/2 of the input (``UnetrPrUpBlock``),
    the deepest is upsampled step by step and concatenated with them (``UnetrUpBlock``), down to
    a full-resolution skip of the raw image (``UnetrBasicBlock``); ``UnetOutBlock`` gives logits.
    Widths ``feature_size * (8, 4, 2, 1)``. Needs patch size 16 (four 2x upsamplings).

    ``forward(features, image)``: ``features`` one ``[B*C, N, dim]`` per tapped layer, ``image``
    ``[B, image_channels, X, Y, Z]``; returns ``[B, num_outputs, X, Y, Z]``.
    """

    def __init__(self, embed_dim: int, depth: int, in_channels: int, num_outputs: int, *, image_channels: int,
                 patch_size: int = 16, feature_size: int = 16, norm_name: str = "instance",
                 res_block: bool = True) -> None:
        super().__init__()
        if patch_size != 16:
            raise ValueError(f"the unetr head needs patch size 16, got {patch_size}")
        self.layers = evenly_spaced_layers(depth)
        self.patch_size = patch_size
        self.options = {"feature_size": feature_size, "norm_name": norm_name, "res_block": res_block}
        f, common = feature_size, {"spatial_dims": 3, "norm_name": norm_name, "res_block": res_block}
        self.mixers = nn.ModuleList(ChannelMixing(in_channels, embed_dim) for _ in self.layers)
        self.encoder1 = UnetrBasicBlock(in_channels=image_channels, out_channels=f, kernel_size=3, stride=1,
                                        **common)
        self.encoder2 = UnetrPrUpBlock(in_channels=embed_dim, out_channels=2 * f, num_layer=2, kernel_size=3,
                                       stride=1, upsample_kernel_size=2, conv_block=True, **common)
        self.encoder3 = UnetrPrUpBlock(in_channels=embed_dim, out_channels=4 * f, num_layer=1, kernel_size=3,
                                       stride=1, upsample_kernel_size=2, conv_block=True, **common)
        self.encoder4 = UnetrPrUpBlock(in_channels=embed_dim, out_channels=8 * f, num_layer=0, kernel_size=3,
                                       stride=1, upsample_kernel_size=2, conv_block=True, **common)
        self.decoder5 = UnetrUpBlock(in_channels=embed_dim, out_channels=8 * f, kernel_size=3,
                                     upsample_kernel_size=2, **common)
        self.decoder4 = UnetrUpBlock(in_channels=8 * f, out_channels=4 * f, kernel_size=3, upsample_kernel_size=2,
                                     **common)
        self.decoder3 = UnetrUpBlock(in_channels=4 * f, out_channels=2 * f, kernel_size=3, upsample_kernel_size=2,
                                     **common)
        self.decoder2 = UnetrUpBlock(in_channels=2 * f, out_channels=f, kernel_size=3, upsample_kernel_size=2,
                                     **common)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=num_outputs)

    def forward(self, features: Sequence[Tensor], image: Tensor) -> Tensor:
        grid = [s // self.patch_size for s in image.shape[2:]]
        z3, z6, z9, z12 = (tokens_to_volume(mix(f), grid) for mix, f in zip(self.mixers, features, strict=True))
        d = self.decoder5(z12, self.encoder4(z9))
        d = self.decoder4(d, self.encoder3(z6))
        d = self.decoder3(d, self.encoder2(z3))
        return self.out(self.decoder2(d, self.encoder1(image)))


def default_decoder_sizes(adapter_dim: int, minimum: int = 8) -> list[int]:
    """UNet decoder widths tied to the adapter width: ``adapter_dim / (1, 2, 4, 8)``, at least
    ``minimum`` each; (256, 128, 64, 32) for ViT-L's 256-wide adapter."""
    return [max(adapter_dim // 2 ** i, minimum) for i in range(4)]


class UNetDecoder(nn.Module):
    """UNet-like decoder on a 4-level pyramid at strides 16, 8, 4, 2 (coarsest first).

    The stride-16 level goes through a conv block to ``sizes[0]``; each finer level is projected
    by a 1x1x1 conv to ``sizes[i]`` and joined by a ``UnetrUpBlock`` (transposed conv x2, concat,
    residual conv block) to ``sizes[i]``; a last ``UnetrUpBlock`` to full resolution takes a
    conv block of the raw image as its skip (width ``sizes[3]``); ``UnetOutBlock`` gives logits.

    ``forward(pyramid, image)``: ``pyramid`` = ``[p16, p8, p4, p2]`` with ``level_channels``
    channels and sides input/16, /8, /4, /2; ``image`` ``[B, image_channels, X, Y, Z]``.
    """

    def __init__(self, level_channels: Sequence[int], image_channels: int, num_outputs: int, *,
                 sizes: Sequence[int], norm_name: str = "instance") -> None:
        super().__init__()
        if len(level_channels) != 4 or len(sizes) != 4:
            raise ValueError("the UNet decoder takes 4 pyramid levels and 4 feature sizes")
        common = {"spatial_dims": 3, "norm_name": norm_name, "res_block": True}
        self.bottom = UnetrBasicBlock(in_channels=level_channels[0], out_channels=sizes[0], kernel_size=3,
                                      stride=1, **common)
        self.skips = nn.ModuleList(nn.Conv3d(c, s, kernel_size=1)
                                   for c, s in zip(level_channels[1:], sizes[1:], strict=True))
        self.ups = nn.ModuleList(
            UnetrUpBlock(in_channels=sizes[i], out_channels=sizes[i + 1], kernel_size=3, upsample_kernel_size=2,
                         **common) for i in range(3))
        self.image_skip = UnetrBasicBlock(in_channels=image_channels, out_channels=sizes[3], kernel_size=3,
                                          stride=1, **common)
        self.final_up = UnetrUpBlock(in_channels=sizes[3], out_channels=sizes[3], kernel_size=3,
                                     upsample_kernel_size=2, **common)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=sizes[3], out_channels=num_outputs)

    def forward(self, pyramid: Sequence[Tensor], image: Tensor) -> Tensor:
        d = self.bottom(pyramid[0])
        for up, skip, level in zip(self.ups, self.skips, pyramid[1:], strict=True):
            d = up(d, skip(level))
        return self.out(self.final_up(d, self.image_skip(image)))
