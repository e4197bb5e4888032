"""Student and teacher networks of 3DINO and the loss of one step.

``SSLNetwork`` = backbone + DINO head + iBOT head. The student sees masked global crops and the
local crops; the teacher (an EMA copy, no gradients) sees the unmasked global crops. Crops are
crop-major: row ``k*B + b`` is crop k of image b (training_data/pretrain_loader.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from threedino_pipe.models.heads import DINOHead
from threedino_pipe.models.vit3d import VisionTransformer3D
from threedino_pipe.ssl import DINOLoss, PatchMasks, iBOTPatchLoss, koleo_per_chunk

# DINO/iBOT head sizes per preset: docs/method.md's 2048/256/65,536 for the paper's sizes, scaled down for tiny.
HEAD_DIMS = {
    "tiny": {"hidden_dim": 256, "bottleneck_dim": 64, "out_dim": 1024},
    "small": {"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 65536},
    "base": {"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 65536},
    "large": {"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 65536},
}


class SSLNetwork(nn.Module):
    """Backbone with its DINO (CLS) and iBOT (patch) projection heads."""

    def __init__(self, backbone: VisionTransformer3D, dino_head: DINOHead, ibot_head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: PatchMasks | None) -> dict[str, Tensor]:
        """Student pass.

        Args:
            global_crops: ``[2B, C, g, g, g]``; local_crops: ``[nB, C, l, l, l]`` or None.
            masks: the global crops' patch masks (None for the teacher).

        Returns:
            ``cls`` ``[2B, D]`` (normed global CLS tokens), ``dino_global`` ``[2B, K]``,
            ``dino_local`` ``[nB, K]`` or None, ``ibot`` ``[M, K]`` at the masked patches.
        """
        out = self.backbone.forward_features(global_crops, masks=None if masks is None else masks.masks)
        cls, patch = out["cls"], out["patch"]
        if local_crops is not None and local_crops.shape[0]:
            # one head call for global and local CLS tokens: its weight-normalised last layer
            # (up to 65,536 x 256) is normalised once, forward and backward
            local_cls = self.backbone.forward_features(local_crops)["cls"]
            dino_global, dino_local = self.dino_head(torch.cat([cls, local_cls])).split([len(cls), len(local_cls)])
        else:
            dino_global, dino_local = self.dino_head(cls), None
        indices = masks.mask_indices.to(patch.device) if masks is not None else None
        masked = patch.flatten(0, 1)[indices] if indices is not None else patch.new_zeros((0, patch.shape[-1]))
        return {"cls": cls, "dino_global": dino_global, "dino_local": dino_local, "ibot": self.ibot_head(masked)}

    @torch.no_grad()
    def teacher_outputs(self, global_crops: Tensor, masks: PatchMasks) -> dict[str, Tensor]:
        """Teacher pass on unmasked global crops.

        Returns:
            ``cls`` ``[2B, D]`` and ``patch`` ``[2B, n, D]`` (normed tokens), ``dino`` ``[2B, d]`` and
            ``ibot`` ``[M, d]``: the heads' L2-normalised bottleneck embeddings (of the CLS tokens and of
            the masked patches), which the centring turns into targets with the heads' prototypes.
        """
        out = self.backbone.forward_features(global_crops)
        masked = out["patch"].flatten(0, 1)[masks.mask_indices.to(out["patch"].device)]
        return {"cls": out["cls"], "patch": out["patch"], "dino": self.dino_head.embed(out["cls"]),
                "ibot": self.ibot_head.embed(masked)}


def build_ssl_network(backbone: VisionTransformer3D, head_dims: dict) -> SSLNetwork:
    """A student network; heads as ``head_dims`` (hidden_dim, bottleneck_dim, out_dim)."""
    dim = backbone.embed_dim
    return SSLNetwork(backbone, DINOHead(dim, **head_dims), DINOHead(dim, **head_dims))


def make_teacher(student: SSLNetwork) -> SSLNetwork:
    """A frozen copy of the student (drop path off), updated only by EMA."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for block in getattr(teacher.backbone, "blocks", []):
        if hasattr(block, "drop_path_rate"):
            block.drop_path_rate = 0.0
    return teacher.eval()


@dataclass
class SSLLosses:
    """The loss modules of one run and their weights (docs/method.md: DINO 1, iBOT 1, KoLeo 0.1)."""

    dino: DINOLoss
    ibot: iBOTPatchLoss
    koleo_weight: float = 0.1
    dino_weight: float = 1.0
    ibot_weight: float = 1.0

    def __call__(self, student: dict[str, Tensor], dino_probs: Tensor, ibot_probs: Tensor,
                 masks: PatchMasks) -> tuple[Tensor, dict[str, float]]:
        """Total loss and its terms for logging (``dino_global``, ``dino_local``, ``ibot``, ``koleo``).

        ``dino_probs`` ``[2B, K]`` and ``ibot_probs`` ``[M, K]`` are the centred teacher targets
        (:mod:`threedino_pipe.ssl.centering`).
        """
        dino_terms = self.dino.terms(student["dino_global"], student["dino_local"], dino_probs)
        dino = dino_terms["dino_global"] + dino_terms["dino_local"]
        ibot = self.ibot(student["ibot"], ibot_probs, masks.masks.to(student["ibot"].device),
                         masks.weights.to(student["ibot"].device))
        koleo = koleo_per_chunk(student["cls"].float(), 2) if self.koleo_weight else dino.new_zeros(())
        total = self.dino_weight * dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        terms = {"loss": total.item(), "dino_global": dino_terms["dino_global"].item(),
                 "dino_local": dino_terms["dino_local"].item(), "ibot": ibot.item(), "koleo": koleo.item()}
        return total, terms
