"""Uniform random patch masks for the iBOT objective (3DINO: random patches, not blockwise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from threedino_pipe.ssl.ibot_loss import masked_patch_weights


@dataclass(frozen=True)
class PatchMasks:
    """Masks of one batch of global crops (crop-major, ``N_crops = n_global_crops * B``).

    Attributes:
        masks: ``[N_crops, n_patches]`` bool, True = masked (replaced by the mask token); patches in
            the backbone's token order (W-major over the patch grid).
        mask_indices: ``[M]`` int64, ``masks.flatten().nonzero()``: rows of the flattened patch tokens.
        weights: ``[M]`` float32, ``1 / (masked patches of its crop)`` for each masked patch.
        n_masked: ``[N_crops]`` int64, masked patches per crop.
        ratios: ``[N_crops]`` float64, the mask ratio drawn for each crop (0 for unmasked crops);
            ``n_masked = floor(ratio * n_patches)``.
    """

    masks: torch.Tensor
    mask_indices: torch.Tensor
    weights: torch.Tensor
    n_masked: torch.Tensor
    ratios: torch.Tensor


def random_patch_masks(n_crops: int, grid: int | tuple[int, ...], *, generator: torch.Generator | None = None,
                       ratio_range: tuple[float, float] = (0.2, 0.75), mask_probability: float = 0.5) -> PatchMasks:
    """Draw DINOv2-style mask ratios and uniformly random masked patches for a batch of global crops.

    ``floor(n_crops * mask_probability)`` crops are masked. Their ratios are stratified over
    ``ratio_range``: with edges ``linspace(lo, hi, n_masked_crops + 1)``, masked crop i draws its ratio
    uniformly in ``[edge_i, edge_{i+1})``; the ratios are then assigned to randomly chosen crops. A
    crop with ratio r gets ``floor(r * n_patches)`` patches chosen uniformly without replacement.

    Args:
        n_crops: global crops in the batch (2 x B images).
        grid: the patch grid (any shape, non-cubic included) or the number of patches.
        generator: torch.Generator for reproducible draws (the global RNG when None).
        ratio_range: (lo, hi) mask ratios; 3DINO uses (0.2, 0.75).
        mask_probability: fraction of the crops that are masked (0.5).

    Returns:
        :class:`PatchMasks`.
    """
    n_patches = int(grid) if isinstance(grid, int) else math.prod(int(g) for g in grid)
    lo, hi = ratio_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= lo <= hi <= 1, got {ratio_range}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must lie in [0, 1], got {mask_probability}")
    if n_crops < 0 or n_patches < 1:
        raise ValueError(f"need n_crops >= 0 and at least one patch, got {n_crops} crops, grid {grid}")

    n_masked_crops = int(n_crops * mask_probability)
    edges = torch.linspace(lo, hi, n_masked_crops + 1, dtype=torch.float64)
    draws = torch.rand(n_masked_crops, generator=generator, dtype=torch.float64)
    drawn = edges[:-1] + draws * (edges[1:] - edges[:-1])
    ratios = torch.zeros(n_crops, dtype=torch.float64)
    ratios[:n_masked_crops] = drawn
    ratios = ratios[torch.randperm(n_crops, generator=generator)]
    n_masked = torch.floor(ratios * n_patches).long()

    scores = torch.rand(n_crops, n_patches, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)  # a uniform random permutation per crop
    masks = rank < n_masked.unsqueeze(1)
    return PatchMasks(masks=masks, mask_indices=masks.flatten().nonzero().flatten(),
                      weights=masked_patch_weights(masks), n_masked=n_masked, ratios=ratios)
