"""SimMIM's objective in 3D (Xie et al. 2022; Chen et al. 2023 for volumes): masked patches' voxels, L1.

A fraction ``mask_ratio`` of a crop's patch tokens is replaced by the backbone's learnt mask token;
a linear head maps every output patch token to the ``C * p^3`` voxels of its patch, and the loss is
the mean absolute error over the voxels of the masked patches only (docs/method.md, "SimMIM").
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_token_masks(n_crops: int, n_patches: int, mask_ratio: float, *,
                       generator: torch.Generator | None = None) -> Tensor:
    """Masks with exactly ``round(mask_ratio * n_patches)`` masked patches per crop, chosen uniformly.

    Args:
        n_crops: crops in the batch.
        n_patches: patch tokens per crop.
        mask_ratio: fraction of masked patches, in (0, 1).
        generator: torch.Generator for reproducible draws (the global RNG when None).

    Returns:
        bool ``[n_crops, n_patches]``, True = masked; at least one patch is masked and one kept.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
    if n_crops < 0 or n_patches < 2:
        raise ValueError(f"need n_crops >= 0 and at least 2 patches, got {n_crops} crops, {n_patches} patches")
    n_masked = min(max(int(round(mask_ratio * n_patches)), 1), n_patches - 1)
    scores = torch.rand(n_crops, n_patches, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)  # a uniform random permutation per crop
    return rank < n_masked


def patchify(volumes: Tensor, patch: int) -> Tensor:
    """The voxels of each patch, in the backbone's token order.

    Args:
        volumes: ``[B, C, W, H, D]`` with W, H, D multiples of ``patch``.
        patch: patch edge in voxels.

    Returns:
        ``[B, n_patches, C * patch^3]``, patches W-major (W slowest, D fastest) as the ViT's patch
        embedding flattens them; within a patch, channel then the patch's own W, H, D voxels.
    """
    b, c, *spatial = volumes.shape
    if len(spatial) != 3 or any(s % patch for s in spatial):
        raise ValueError(f"volume {list(volumes.shape)} is not [B, C, W, H, D] with sides divisible by {patch}")
    w, h, d = (s // patch for s in spatial)
    x = volumes.reshape(b, c, w, patch, h, patch, d, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # B, w, h, d, C, p, p, p
    return x.reshape(b, w * h * d, c * patch ** 3)


def masked_l1(prediction: Tensor, target: Tensor, masks: Tensor) -> Tensor:
    """Mean absolute error over the voxels of the masked patches (SimMIM's loss).

    Args:
        prediction, target: ``[B, n_patches, V]`` voxels per patch (:func:`patchify`).
        masks: bool ``[B, n_patches]``, True = masked.

    Returns:
        scalar: ``sum over masked patches and their V voxels of |prediction - target|`` divided by
        ``(masked patches) * V``; 0 when nothing is masked.
    """
    if prediction.shape != target.shape or prediction.shape[:2] != masks.shape:
        raise ValueError(f"shapes differ: prediction {list(prediction.shape)}, target {list(target.shape)}, "
                         f"masks {list(masks.shape)}")
    weights = masks.to(prediction.dtype).unsqueeze(-1)
    total = ((prediction - target).abs() * weights).sum()
    count = weights.sum() * prediction.shape[-1]
    return total / count.clamp_min(1.0)
