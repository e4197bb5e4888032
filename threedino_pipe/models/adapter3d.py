"""3D ViT-Adapter: a convolutional spatial prior interacting with a (frozen) 3D ViT.

Widths: backbone ``D``, adapter ``d = D / 4`` (256 for ViT-L); the deformable attentions'
value and output projections map between the two. Pyramid (input side ``S`` per axis, a
multiple of 16):

* the spatial prior module (3D convs) gives a stem map at ``S/2`` (``d/4`` channels) and the
  adapter queries at ``S/4``, ``S/8``, ``S/16`` (``d`` channels, plus a learned level embedding);
* the ViT's blocks are split into 4 interaction blocks; before each, the **injector**
  (deformable attention: ViT patch tokens attend to the 3 query levels) adds
  ``gamma * output`` to the ViT tokens (``gamma`` per channel, initialised at 0); after each,
  the **extractor** (the query tokens attend to the ViT's 1/16 grid) updates the queries, then
  a conv feed-forward (Linear, depthwise 3x3x3 conv per level, GELU, Linear);
* output, coarsest first: ``[S/16, S/8, S/4, S/2]`` with channels ``[d, d, d, d/4]``; level
  ``S/(2^(k+1))`` adds the ViT tokens after interaction block ``4 - k`` (1x1 conv to the level's
  width, trilinear resize), the ``S/2`` level is the stem map plus a transposed conv of the
  ``S/4`` queries; each level is instance-normalised.

Multi-channel input: the backbone runs once per channel (channels folded into the batch); the
per-channel ViT tokens are averaged over channels before the injector and the extractor, and
the injector's output is added to every channel; the ViT outputs that join the pyramid are
mixed per patch (``Linear(C*D -> D)`` + GELU). The spatial prior sees all channels.
Gradients flow through every ViT block even when its parameters are frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threedino_pipe.models.channel_mixing import ChannelMixing, average_channels, repeat_channels
from threedino_pipe.models.decoders import UNetDecoder, default_decoder_sizes, tokens_to_volume
from threedino_pipe.models.deformable_attention import MSDeformAttn3D, multilevel_reference_points, reference_points
from threedino_pipe.models.vit3d import VisionTransformer3D


def _conv_norm_act(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.InstanceNorm3d(cout, affine=True), nn.ReLU(inplace=True))


class SpatialPriorModule(nn.Module):
    """3D conv stem: ``[B, C, S]`` -> stem map ``[B, stem, S/2]`` and maps at S/4, S/8, S/16 with ``dim`` channels.

    Stem: conv s2 (-> S/2), conv (the stem map), max-pool s2 (-> S/4); then conv s2 twice
    (S/8 with 2*stem channels, S/16 with 4*stem); 1x1x1 convs project S/4, S/8, S/16 to ``dim``.
    """

    def __init__(self, in_channels: int, stem: int, dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_norm_act(in_channels, stem, 2), _conv_norm_act(stem, stem, 1))
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.down8 = _conv_norm_act(stem, 2 * stem, 2)
        self.down16 = _conv_norm_act(2 * stem, 4 * stem, 2)
        self.proj = nn.ModuleList(nn.Conv3d(c, dim, 1) for c in (stem, 2 * stem, 4 * stem))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        s2 = self.stem(x)
        s4 = self.pool(s2)
        s8 = self.down8(s4)
        s16 = self.down16(s8)
        return s2, [proj(m) for proj, m in zip(self.proj, (s4, s8, s16), strict=True)]


class Injector(nn.Module):
    """ViT tokens ``[B, N, D]`` attend to the adapter queries ``[B, Nc, d]``; returns ``gamma * update``
    ``[B, N, D]``."""

    def __init__(self, vit_dim: int, dim: int, *, heads: int, points: int, levels: int) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(vit_dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn3D(dim, heads=heads, levels=levels, points=points, query_dim=vit_dim,
                                   value_dim=dim, out_dim=vit_dim)
        self.gamma = nn.Parameter(torch.zeros(vit_dim))

    def forward(self, x: Tensor, reference: Tensor, c: Tensor, shapes: Sequence[Sequence[int]]) -> Tensor:
        return self.gamma * self.attn(self.query_norm(x), reference, self.feat_norm(c), shapes)


class ConvFFN(nn.Module):
    """Per-level conv feed-forward on multi-level tokens ``[B, Nc, d]``: Linear, depthwise 3x3x3, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, c: Tensor, shapes: Sequence[Sequence[int]]) -> Tensor:
        h = self.fc1(c)
        parts = [self.dwconv(tokens_to_volume(t, s)).flatten(2).transpose(1, 2)
                 for t, s in zip(h.split([a * b * e for a, b, e in shapes], dim=1), shapes, strict=True)]
        return self.fc2(self.act(torch.cat(parts, dim=1)))


class Extractor(nn.Module):
    """Adapter queries ``[B, Nc, d]`` attend to the ViT grid ``[B, N, D]``, then a conv feed-forward;
    returns the new queries."""

    def __init__(self, vit_dim: int, dim: int, *, heads: int, points: int, ffn_ratio: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(vit_dim, eps=1e-6)
        self.attn = MSDeformAttn3D(dim, heads=heads, levels=1, points=points, value_dim=vit_dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, max(int(dim * ffn_ratio), 1))

    def forward(self, c: Tensor, reference: Tensor, x: Tensor, grid: Sequence[int],
                shapes: Sequence[Sequence[int]]) -> Tensor:
        c = c + self.attn(self.query_norm(c), reference, self.feat_norm(x), [grid])
        return c + self.ffn(self.ffn_norm(c), shapes)


def split_blocks(depth: int, parts: int = 4) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` block ranges covering ``range(depth)`` (``depth/parts`` each)."""
    if depth < parts:
        raise ValueError(f"a backbone of depth {depth} cannot be split into {parts} interaction blocks")
    edges = [round(depth * i / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class ViTAdapter3D(nn.Module):
    """The adapter around a :class:`VisionTransformer3D` (which it does not own).

    ``forward(backbone, vit_input, image)``: ``vit_input`` ``[B*C, 1, S]`` (channels folded) or
    ``[B, C, S]`` for a C-channel backbone, ``image`` ``[B, C, S]``; returns the pyramid
    ``[S/16, S/8, S/4, S/2]`` (see the module docstring), channels :attr:`pyramid_channels`.
    """

    def __init__(self, vit_dim: int, depth: int, image_channels: int, vit_channels: int, *, dim: int,
                 heads: int = 8, points: int = 4, ffn_ratio: float = 0.25, stem: int | None = None) -> None:
        super().__init__()
        self.blocks = split_blocks(depth)
        self.vit_channels = vit_channels
        stem = stem or max(dim // 4, 8)
        self.pyramid_channels = [dim, dim, dim, stem]
        self.spm = SpatialPriorModule(image_channels, stem, dim)
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        nn.init.normal_(self.level_embed, std=0.02)
        self.injectors = nn.ModuleList(Injector(vit_dim, dim, heads=heads, points=points, levels=3)
                                       for _ in self.blocks)
        self.extractors = nn.ModuleList(Extractor(vit_dim, dim, heads=heads, points=points, ffn_ratio=ffn_ratio)
                                        for _ in self.blocks)
        self.mixers = nn.ModuleList(ChannelMixing(vit_channels, vit_dim) for _ in self.blocks)
        self.vit_proj = nn.ModuleList(nn.Conv3d(vit_dim, c, 1) for c in self.pyramid_channels)
        self.up2 = nn.ConvTranspose3d(dim, stem, kernel_size=2, stride=2)
        self.norms = nn.ModuleList(nn.InstanceNorm3d(c, affine=True) for c in self.pyramid_channels)

    def forward(self, backbone: VisionTransformer3D, vit_input: Tensor, image: Tensor) -> list[Tensor]:
        grid = backbone.patch_grid(image.shape[2:])
        stem_map, maps = self.spm(image)
        shapes = [tuple(m.shape[2:]) for m in maps]
        c = torch.cat([m.flatten(2).transpose(1, 2) + e for m, e in zip(maps, self.level_embed, strict=True)], dim=1)
        ref_vit = reference_points(grid, device=image.device).unsqueeze(0)
        ref_c = multilevel_reference_points(shapes, device=image.device).unsqueeze(0)

        tokens = backbone.prepare_tokens(vit_input)
        outs = []
        for (start, stop), injector, extractor, mixer in zip(self.blocks, self.injectors, self.extractors,
                                                             self.mixers, strict=True):
            patch = average_channels(tokens[:, 1:], self.vit_channels)
            update = repeat_channels(injector(patch, ref_vit, c, shapes), self.vit_channels)
            tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + update], dim=1)
            for block in backbone.blocks[start:stop]:
                tokens = backbone._run_block(block, tokens)
            c = extractor(c, ref_c, average_channels(tokens[:, 1:], self.vit_channels), grid, shapes)
            outs.append(tokens_to_volume(mixer(tokens[:, 1:]), grid))

        c4, c8, c16 = (tokens_to_volume(t, s) for t, s in zip(c.split([a * b * e for a, b, e in shapes], dim=1),
                                                               shapes, strict=True))
        levels = [c16, c8, c4, stem_map + self.up2(c4)]
        pyramid = []
        for level, vit, proj, norm in zip(levels, reversed(outs), self.vit_proj, self.norms, strict=True):
            v = proj(vit)
            if v.shape[2:] != level.shape[2:]:
                v = F.interpolate(v, size=level.shape[2:], mode="trilinear", align_corners=False)
            pyramid.append(norm(level + v))
        return pyramid


class AdapterSegmentationHead(nn.Module):
    """ViT-Adapter + UNet-like decoder: ``forward(backbone, vit_input, image) -> [B, num_outputs, S]``.

    Options (recorded in ``model_args``): ``adapter_dim`` (default backbone width / 4),
    ``heads`` 8, ``points`` 4, ``ffn_ratio`` 0.25, ``decoder_sizes`` (default
    :func:`~threedino_pipe.models.decoders.default_decoder_sizes` of the adapter width).
    """

    def __init__(self, vit_dim: int, depth: int, image_channels: int, vit_channels: int, num_outputs: int, *,
                 adapter_dim: int | None = None, heads: int = 8, points: int = 4, ffn_ratio: float = 0.25,
                 decoder_sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        if adapter_dim is None:  # a quarter of the backbone width, rounded to a multiple of the heads
            adapter_dim = max(heads, round(vit_dim / 4 / heads) * heads)
        if adapter_dim % heads:
            raise ValueError(f"adapter_dim {adapter_dim} is not divisible by {heads} heads")
        sizes = [int(s) for s in (decoder_sizes or default_decoder_sizes(adapter_dim))]
        self.options = {"adapter_dim": adapter_dim, "heads": heads, "points": points, "ffn_ratio": ffn_ratio,
                        "decoder_sizes": sizes}
        self.adapter = ViTAdapter3D(vit_dim, depth, image_channels, vit_channels, dim=adapter_dim, heads=heads,
                                    points=points, ffn_ratio=ffn_ratio)
        self.decoder = UNetDecoder(self.adapter.pyramid_channels, image_channels, num_outputs, sizes=sizes)

    def forward(self, backbone: VisionTransformer3D, vit_input: Tensor, image: Tensor) -> Tensor:
        return self.decoder(self.adapter(backbone, vit_input, image), image)
