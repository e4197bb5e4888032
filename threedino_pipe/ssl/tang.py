"""Tang et al.'s self-supervision (Tang et al. 2022, "Self-supervised pre-training of Swin transformers for 3D
medical image analysis"): masked-volume inpainting, rotation prediction and contrastive coding.

For each volume two sub-volumes (crops) are drawn; each is rotated by 0, 90, 180 or 270 degrees about one
axis (the rotation is the class to predict) and has random inner cuboids replaced by noise (the network
reconstructs the rotated crop without them). The total loss is ``w_inpaint * L1 + w_rot * CE + w_contrast *
NT-Xent`` with all weights 1 (docs/method.md, "Tang et al.'s self-supervision").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from torch import Tensor

N_ROTATIONS = 4  # 0, 90, 180, 270 degrees
ROTATION_PLANE = (2, 3)  # the crops' first two spatial axes of [B, C, W, H, D]: rotation about the D axis
TEMPERATURE = 0.5  # the contrastive loss's temperature (Tang et al.'s released code)
MAX_DROP, MAX_BOX, MAX_BOXES = 0.3, 0.25, 64  # cutout: up to 30 % of a crop, boxes up to a quarter edge
LOSS_WEIGHTS = {"inpaint": 1.0, "rotation": 1.0, "contrast": 1.0}  # Tang et al.: lambda1 = lambda2 = lambda3 = 1


def draw_rotations(n_crops: int, generator: torch.Generator | None = None) -> Tensor:
    """Each crop's rotation class, uniform in 0..3 (k quarter turns): int64 ``[n_crops]``."""
    return torch.randint(0, N_ROTATIONS, (n_crops,), generator=generator)


def rotate_crops(crops: Tensor, rotations: Tensor) -> Tensor:
    """Rotate crop i of ``crops`` ``[B, C, S, S, S]`` by ``rotations[i]`` quarter turns in :data:`ROTATION_PLANE`."""
    if crops.shape[0] != rotations.shape[0]:
        raise ValueError(f"{crops.shape[0]} crops but {rotations.shape[0]} rotations")
    turned = [torch.rot90(crop, int(k), dims=(ROTATION_PLANE[0] - 1, ROTATION_PLANE[1] - 1))
              for crop, k in zip(crops, rotations.tolist(), strict=True)]
    return torch.stack(turned) if turned else crops


def _one_cutout(size: int, generator: torch.Generator | None) -> Tensor:
    """bool ``[S, S, S]``: cuboids (edges 2..MAX_BOX*S voxels, anywhere inside) added until their summed volume
    reaches a fraction drawn uniformly in [0, MAX_DROP) of the crop (at most MAX_BOXES boxes)."""
    mask = torch.zeros(size, size, size, dtype=torch.bool)
    target = float(torch.rand((), generator=generator)) * MAX_DROP * size ** 3
    longest = max(2, int(MAX_BOX * size))
    dropped, boxes = 0, 0
    while dropped < target and boxes < MAX_BOXES:
        edges = torch.randint(2, longest + 1, (3,), generator=generator).tolist()
        start = [int(torch.randint(0, size - e + 1, (), generator=generator)) for e in edges]
        mask[start[0]:start[0] + edges[0], start[1]:start[1] + edges[1], start[2]:start[2] + edges[2]] = True
        dropped += edges[0] * edges[1] * edges[2]
        boxes += 1
    return mask


def cutout_masks(n_crops: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Inner-cutout masks of ``n_crops`` cubic crops of edge ``size`` voxels: bool ``[n_crops, 1, S, S, S]``,
    True = voxel replaced by noise (:func:`_one_cutout`; every crop keeps at least 70 % of its voxels)."""
    return torch.stack([_one_cutout(size, generator) for _ in range(n_crops)]).unsqueeze(1)


def apply_cutout(crops: Tensor, masks: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``crops`` ``[B, C, S, S, S]`` with the voxels under ``masks`` replaced by Gaussian noise rescaled to
    [-1, 1] (the normalised intensity range), as Tang et al. fill the cutout with rescaled noise."""
    noise = torch.randn(crops.shape, generator=generator)
    low, high = noise.amin(), noise.amax()
    noise = (2 * (noise - low) / (high - low).clamp_min(1e-6) - 1).to(crops.device, crops.dtype)
    return torch.where(masks.to(crops.device), noise, crops)


def inpainting_l1(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Tang et al.'s inpainting loss: the mean absolute error over every voxel of the crop (cut-out or not),
    ``reconstruction`` and ``target`` ``[B, C, S, S, S]`` (the target is the rotated crop before the cutout)."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"shapes differ: {list(reconstruction.shape)} and {list(target.shape)}")
    return F.l1_loss(reconstruction, target)


def rotation_loss(logits: Tensor, rotations: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` ``[B, 4]`` against the rotation classes ``[B]``, averaged over the crops."""
    return F.cross_entropy(logits, rotations)


def contrastive_loss(first: Tensor, second: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """MONAI's NT-Xent (:class:`monai.losses.ContrastiveLoss`) between the projections ``[B, F]`` of the two crops
    of each volume: crop 1 of volume b and crop 2 of volume b are the positive pair, the other 2B - 2 crops of
    the batch the negatives; the mean over the 2B crops of ``-log(exp(cos+/t) / sum_{j != i} exp(cos_ij/t))``."""
    return ContrastiveLoss(temperature=temperature)(first, second)


def tang_loss(terms: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """The weighted sum of the ``inpaint``, ``rotation`` and ``contrast`` terms (weights: :data:`LOSS_WEIGHTS`)."""
    weights = LOSS_WEIGHTS if weights is None else weights
    return sum(weights[name] * terms[name] for name in LOSS_WEIGHTS)
