"""The networks of ``3dino pretrain --method tang``: an encoder (our 3D ViT, or MONAI's Swin encoder) with Tang et
al.'s three heads, and the Swin encoder's ``backbone.pt`` in Tang et al.'s released layout.

Heads (Tang et al. 2022 and their released SSL head, SwinUNETR/Pretrain in Project-MONAI/research-contributions):
a rotation head (one linear layer to 4 classes), a contrastive projection (one linear layer to 512 features)
and a reconstruction head (five, for the ViT four, blocks of 3^3 convolution + instance norm + LeakyReLU +
trilinear x2 upsampling halving the channels each time, then a 1^3 convolution to the input channels).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.swin import SwinEncoder
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

CONTRASTIVE_DIM = 512  # Tang et al.'s contrastive projection width
SWIN_FEATURE_SIZE = {"tiny": 12, "small": 24, "base": 48, "large": 96}  # base = Tang et al.'s 48
SWIN_DEPTHS, SWIN_HEADS, SWIN_PATCH, SWIN_WINDOW = (2, 2, 2, 2), (3, 6, 12, 24), 2, 7  # MONAI's = Tang et al.'s
# tiny (ours, CPU-sized): 4^3 windows and one head in the first stage; the attention of 96^3 crops in 7^3 windows
# with 3 heads is about 17 times larger and takes minutes per step on a CPU
TINY_HEADS, TINY_WINDOW = (1, 2, 4, 8), 4
SWIN_STRIDE = 32  # the Swin encoder's last stage is 1/32 of the crop


def swin_dims(preset: str, in_channels: int) -> dict:
    """The Swin encoder's dims for ``preset`` (the contract's keys: MONAI's SwinUNETR arguments)."""
    tiny = preset == "tiny"
    return {"feature_size": SWIN_FEATURE_SIZE[preset], "depths": list(SWIN_DEPTHS),
            "num_heads": list(TINY_HEADS if tiny else SWIN_HEADS), "in_channels": in_channels,
            "patch_size": SWIN_PATCH, "window_size": TINY_WINDOW if tiny else SWIN_WINDOW}


def build_swin_encoder(dims: dict, drop_path: float = 0.0) -> nn.Module:
    """The Swin family's encoder of ``dims`` (:class:`threedino_pipe.models.swin.SwinEncoder`: MONAI's
    ``SwinUNETR(...).swinViT``, the same parameter names), stochastic depth ``drop_path``."""
    return SwinEncoder(**dims, drop_path_rate=drop_path)


class ReconstructionHead(nn.Module):
    """``n_up`` blocks of conv 3^3 + InstanceNorm + LeakyReLU + x2 trilinear upsampling (channels halved each
    time), then a 1^3 convolution to ``out_channels``: ``[B, dim, s, s, s]`` -> ``[B, out, s*2^n, ...]`` (the
    1^3 convolution runs before the last upsampling, which gives the same values at a sixth of the cost)."""

    def __init__(self, dim: int, n_up: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = dim
        for _ in range(n_up):
            nxt = max(channels // 2, 1)
            layers += [nn.Conv3d(channels, nxt, 3, padding=1), nn.InstanceNorm3d(nxt), nn.LeakyReLU(),
                       nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
            channels = nxt
        # the 1^3 convolution and the last trilinear upsampling commute (both linear, the upsampling's weights sum
        # to 1): convolving first upsamples out_channels instead of `channels` maps, with the same output
        layers.insert(len(layers) - 1 if n_up else len(layers), nn.Conv3d(channels, out_channels, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TangNetwork(nn.Module):
    """An encoder with Tang et al.'s heads; ``forward`` gives rotation logits ``[B, 4]``, contrastive projections
    ``[B, 512]`` and the reconstruction ``[B, C, S, S, S]`` of crops ``[B, C, S, S, S]``.

    ``arch`` ``vit``: the heads read the ViT's class token, the reconstruction its patch-token grid (1/16).
    ``arch`` ``swin``: as Tang et al., the rotation head reads token 0 and the projection token 1 of the
    encoder's last stage (1/32, normalised as SwinUNETR normalises it), the reconstruction that stage.
    """

    def __init__(self, arch: str, encoder: nn.Module, dim: int, stride: int, in_channels: int, crop: int) -> None:
        super().__init__()
        self.arch, self.backbone = arch, encoder
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, CONTRASTIVE_DIM)
        self.reconstruction_head = ReconstructionHead(dim, int(round(math.log2(stride))), in_channels)
        self.grid = crop // stride

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.arch == "vit":
            out = self.backbone.forward_features(crops)
            b, n, d = out["patch"].shape
            grid = out["patch"].transpose(1, 2).reshape(b, d, self.grid, self.grid, self.grid)
            rot_token = contrast_token = out["cls"]
        else:
            grid = self.backbone(crops, normalize=True)[-1]  # [B, 16 * feature_size, S/32, S/32, S/32]
            tokens = grid.flatten(2).transpose(1, 2)
            rot_token, contrast_token = tokens[:, 0], tokens[:, 1]
        return (self.rotation_head(rot_token), self.contrastive_head(contrast_token),
                self.reconstruction_head(grid))


def build_tang_network(arch: str, preset: str, crop: int, in_channels: int, drop_path: float) -> TangNetwork:
    """A freshly initialised :class:`TangNetwork` (call under the run's seed); ``crop`` the cube edge in voxels."""
    if arch == "vit":
        backbone = build_backbone(preset, in_chans=in_channels, drop_path_rate=drop_path, pos_grid=crop // 16,
                                  layerscale_init=None)  # MONAI's ViT, Tang et al.'s baseline, has no LayerScale
        return TangNetwork("vit", backbone, backbone.embed_dim, backbone.patch_size, in_channels, crop)
    if crop % SWIN_STRIDE:
        raise UserError(f"--arch swin needs crops whose edge is a multiple of {SWIN_STRIDE} voxels; the plans' "
                        f"global crop is {crop}", fix="plan the datasets again with a global crop that is a "
                        "multiple of 32 (e.g. 96, Tang et al.'s), or pass --arch vit")
    dims = swin_dims(preset, in_channels)
    encoder = build_swin_encoder(dims, drop_path)
    return TangNetwork("swin", encoder, 16 * dims["feature_size"], SWIN_STRIDE, in_channels, crop)


def save_swin_backbone(encoder: nn.Module, path: Path, dims: dict, meta: dict) -> None:
    """``backbone.pt`` of a Swin encoder in Tang et al.'s released layout (``state_dict`` with ``module.`` keys) plus
    our metadata under ``threedino_pipe`` (family ``swin``, method ``tang``, ``dims``), written atomically."""
    state = {f"module.{k}": v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state,
                    "threedino_pipe": {**meta, "family": "swin", "method": "tang", "dims": dict(dims)}}, tmp)
