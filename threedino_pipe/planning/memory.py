"""A coarse, documented GPU memory model of the ViT presets, used by the planner.

It estimates the training memory of one process (one GPU) as ``fixed + batch * per_sample``
bytes and picks the largest batch that fits a stated memory target. It is a planning rule, not
a measurement: it must give the same answer on every machine, so it never looks at the machine
running ``plan``. Assumptions (docs/plan.md repeats them):

- bf16/fp16 autocast and memory-efficient attention (PyTorch SDPA): a transformer block stores
  about 34 bytes per token and unit of width for backward (Korthikanti et al. 2022, without
  the attention-map term);
- trained weights cost 16 bytes per parameter (fp32 weight, gradient, two AdamW moments), a
  frozen or EMA copy 4 bytes;
- the adapter + UNet-like decoder of segmentation finetuning store about 1 KiB per input voxel
  per sample and have 0.15 x the backbone's parameters + 5 M;
- 80 % of the target is usable (CUDA context, allocator fragmentation and workspaces take the rest).
GB means 2**30 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

GIB = 2**30
PATCH = 16
USABLE_FRACTION = 0.8
ACT_BYTES = 34
DECODER_BYTES_PER_VOXEL = 1024
TRAINED_BYTES_PER_PARAM = 16
FROZEN_BYTES_PER_PARAM = 4
LOGIT_BYTES = 12            # fp32 logits, probabilities and their gradient, per prototype
HEAD_HIDDEN, HEAD_BOTTLENECK = 2048, 256
MASKED_FRACTION = 0.5 * (0.2 + 0.75) / 2   # half the global crops masked, ratio uniform in [0.2, 0.75]


@dataclass(frozen=True)
class Preset:
    """ViT size: width, blocks, attention heads (as models/presets.py) and the prototypes assumed for its
    DINO/iBOT heads (an assumption of this model only)."""

    name: str
    dim: int
    depth: int
    heads: int
    prototypes: int


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", 96, 4, 3, 4096),         # CPU tests and demo (models/presets.py)
    Preset("small", 384, 12, 6, 16384),     # DINOv2 ViT-S
    Preset("base", 768, 12, 12, 32768),     # DINOv2 ViT-B
    Preset("large", 1024, 24, 16, 65536),   # the paper's ViT-L/16
)}


@dataclass(frozen=True)
class Estimate:
    """Memory of one training process: ``fixed`` bytes plus ``per_sample`` bytes per batch element."""

    fixed: int
    per_sample: int

    def total(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample

    def describe(self, batch: int) -> str:
        return (f"{self.total(batch) / GIB:.1f} GB at batch {batch} ({self.fixed / GIB:.2f} GB weights and "
                f"optimiser + {self.per_sample / 2**20:.0f} MB per sample)")


def tokens(crop: int | Sequence[int]) -> int:
    """Tokens of a crop (voxels per axis): patches of 16^3 plus the CLS token."""
    sizes = [crop] * 3 if isinstance(crop, int) else list(crop)
    return math.prod(max(1, s // PATCH) for s in sizes) + 1


def backbone_params(preset: Preset) -> int:
    """Parameters of the ViT: 12 dim^2 per block, the 16^3 patch embedding and a 7^3 position grid."""
    return preset.depth * 12 * preset.dim ** 2 + PATCH ** 3 * preset.dim + (7 ** 3 + 1) * preset.dim


def head_params(preset: Preset) -> int:
    """Parameters of one DINO (or iBOT) head: 3-layer MLP, bottleneck, prototype layer."""
    return (preset.dim * HEAD_HIDDEN + HEAD_HIDDEN ** 2 + HEAD_HIDDEN * HEAD_BOTTLENECK
            + HEAD_BOTTLENECK * preset.prototypes)


def pretrain_estimate(preset: Preset, global_crop: int, local_crop: int, num_local: int = 8) -> Estimate:
    """Pretraining: student (trained) and teacher (EMA) backbones with two heads each.

    Per sample the student sees 2 global and ``num_local`` local crops; the heads produce logits
    for every CLS token and for the masked patches of the global crops (student and teacher).
    """
    params = backbone_params(preset) + 2 * head_params(preset)
    fixed = params * (TRAINED_BYTES_PER_PARAM + FROZEN_BYTES_PER_PARAM)
    student_tokens = 2 * tokens(global_crop) + num_local * tokens(local_crop)
    activations = student_tokens * preset.dim * ACT_BYTES * preset.depth
    masked = MASKED_FRACTION * 2 * (tokens(global_crop) - 1)
    logit_rows = (2 + num_local) + 2 + 2 * masked
    return Estimate(fixed=int(fixed), per_sample=int(activations + logit_rows * preset.prototypes * LOGIT_BYTES))


def finetune_estimate(preset: Preset, patch: Sequence[int], channels: int, task: str) -> Estimate:
    """Finetuning with a frozen backbone.

    Segmentation: gradients flow through every block (the adapter's injector feeds them), so the
    backbone's activations are stored, plus the adapter/decoder's per-voxel activations.
    Classification: a probe on frozen features; the backbone runs without gradients.
    """
    frozen = backbone_params(preset) * FROZEN_BYTES_PER_PARAM
    n = tokens(patch)
    if task == "classification":
        return Estimate(fixed=int(frozen), per_sample=int(channels * n * preset.dim * ACT_BYTES))
    head = 0.15 * backbone_params(preset) + 5_000_000
    activations = channels * n * preset.dim * ACT_BYTES * preset.depth + math.prod(patch) * DECODER_BYTES_PER_VOXEL
    return Estimate(fixed=int(frozen + head * TRAINED_BYTES_PER_PARAM), per_sample=int(activations))


def usable_bytes(memory_gb: float) -> int:
    return int(memory_gb * GIB * USABLE_FRACTION)


def fit_batch(estimate: Estimate, memory_gb: float, cap: int) -> int:
    """Largest batch in [1, cap] whose estimate fits the target; 0 when even batch 1 does not fit."""
    free = usable_bytes(memory_gb) - estimate.fixed
    if free < estimate.per_sample:
        return 0
    return int(min(cap, free // estimate.per_sample))
