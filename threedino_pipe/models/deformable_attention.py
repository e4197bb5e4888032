"""3D multi-scale deformable attention (Deformable-DETR style) with trilinear ``grid_sample``.

Coordinates. Volumes are ``[.., W, H, D]`` (first, middle, last spatial axis); tokens of a level
are flattened W-major (W slowest, D fastest). Sampling locations and reference points are
normalised per axis to ``[0, 1]`` and given in that same (first, middle, last) order; voxel ``i``
of an axis of size ``n`` has its centre at ``(i + 0.5) / n``. ``grid_sample`` wants
``2 * loc - 1`` in the reversed (last, middle, first) order and is called with
``align_corners=False``, so the location ``(i + 0.5) / n`` samples voxel ``i`` exactly and an
offset of ``k`` voxels is ``k / n`` in normalised units. Outside the volume values are zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shape3 = tuple[int, int, int]


def reference_points(shape: Sequence[int], *, device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Voxel centres of a ``w x h x d`` grid, ``[w*h*d, 3]`` normalised to (0, 1), W-major order."""
    axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def multilevel_reference_points(shapes: Sequence[Sequence[int]], *, device: torch.device | None = None,
                                dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference points of several levels concatenated in level order, ``[sum(w*h*d), 3]``."""
    return torch.cat([reference_points(s, device=device, dtype=dtype) for s in shapes], dim=0)


def deformable_sample(value: Tensor, shapes: Sequence[Sequence[int]], locations: Tensor,
                      weights: Tensor) -> Tensor:
    """Weighted sum of trilinear samples of multi-level values.

    Args:
        value: ``[B, Nv, heads, head_dim]``, the levels' tokens concatenated (``Nv = sum w*h*d``).
        shapes: ``(w, h, d)`` per level.
        locations: ``[B, Nq, heads, levels, points, 3]`` in normalised (first, middle, last) order.
        weights: ``[B, Nq, heads, levels, points]``.
    Returns:
        ``[B, Nq, heads * head_dim]``.
    """
    b, nv, heads, hd = value.shape
    nq, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    sizes = [int(w) * int(h) * int(d) for w, h, d in shapes]
    if sum(sizes) != nv or len(sizes) != levels:
        raise ValueError(f"value holds {nv} tokens, level shapes {list(shapes)} give {sum(sizes)}")
    # grid_sample: coordinates in [-1, 1], ordered (last, middle, first) spatial axis
    grids = (2.0 * locations - 1.0).flip(-1).permute(0, 2, 1, 3, 4, 5).reshape(b * heads, nq, levels, points, 3)
    samples = []
    for lvl, (tokens, shape) in enumerate(zip(value.split(sizes, dim=1), shapes, strict=True)):
        volume = tokens.permute(0, 2, 3, 1).reshape(b * heads, hd, *shape)
        grid = grids[:, :, lvl].unsqueeze(3).to(volume.dtype)  # [B*heads, Nq, points, 1, 3]
        out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        samples.append(out.squeeze(-1))  # [B*heads, hd, Nq, points]
    stacked = torch.stack(samples, dim=3).flatten(3)  # [B*heads, hd, Nq, levels*points]
    w = weights.permute(0, 2, 1, 3, 4).reshape(b * heads, 1, nq, levels * points).to(stacked.dtype)
    out = (stacked * w).sum(-1)  # [B*heads, hd, Nq]
    return out.reshape(b, heads * hd, nq).transpose(1, 2)


def octant_directions(heads: int) -> Tensor:
    """``[heads, 3]`` unit-step directions (+-1, +-1, +-1): head h gets octant h mod 8
    (bit 2 of h -> first axis, bit 1 -> middle, bit 0 -> last; a set bit means negative)."""
    h = torch.arange(heads) % 8
    bits = torch.stack([(h >> 2) & 1, (h >> 1) & 1, h & 1], dim=-1)
    return 1.0 - 2.0 * bits.float()


class MSDeformAttn3D(nn.Module):
    """Multi-scale deformable attention over 3D feature levels.

    Each query predicts, per head, ``levels x points`` offsets (in voxels of each level) from
    its reference point and attention weights softmaxed over ``levels x points``; values are the
    trilinear samples at those locations. Initially (zero offset weights) head h's point p sits
    ``p + 1`` voxels along the diagonal of octant h (:func:`octant_directions`), and the
    attention weights are uniform.

    Args:
        dim: attention width (``heads`` divides it).
        query_dim, value_dim, out_dim: widths of the queries, the values and the output
            (default ``dim``); ``value_proj`` and ``output_proj`` project between the widths.
    ``forward(query [B, Nq, query_dim], reference [B or 1, Nq, 3], value [B, Nv, value_dim],
    shapes)`` -> ``[B, Nq, out_dim]``.
    """

    def __init__(self, dim: int, *, heads: int = 8, levels: int = 1, points: int = 4, query_dim: int | None = None,
                 value_dim: int | None = None, out_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.levels, self.points = dim, heads, levels, points
        query_dim, value_dim, out_dim = query_dim or dim, value_dim or dim, out_dim or dim
        self.sampling_offsets = nn.Linear(query_dim, heads * levels * points * 3)
        self.attention_weights = nn.Linear(query_dim, heads * levels * points)
        self.value_proj = nn.Linear(value_dim, dim)
        self.output_proj = nn.Linear(dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        steps = torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = octant_directions(self.heads).view(self.heads, 1, 1, 3) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(self.heads, self.levels, self.points, 3).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def sampling_locations(self, query: Tensor, reference: Tensor, shapes: Sequence[Sequence[int]]) -> Tensor:
        """``[B, Nq, heads, levels, points, 3]`` normalised sampling locations."""
        b, nq = query.shape[:2]
        offsets = self.sampling_offsets(query).view(b, nq, self.heads, self.levels, self.points, 3)
        sizes = torch.tensor([list(s) for s in shapes], dtype=offsets.dtype, device=offsets.device)
        return reference[:, :, None, None, None, :] + offsets / sizes[None, None, None, :, None, :]

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, shapes: Sequence[Sequence[int]]) -> Tensor:
        if len(shapes) != self.levels:
            raise ValueError(f"expected {self.levels} value levels, got {len(shapes)}")
        b, nq = query.shape[:2]
        locations = self.sampling_locations(query, reference.to(query.dtype), shapes)
        weights = self.attention_weights(query).view(b, nq, self.heads, self.levels * self.points).softmax(-1)
        weights = weights.view(b, nq, self.heads, self.levels, self.points)
        v = self.value_proj(value).view(b, value.shape[1], self.heads, self.dim // self.heads)
        return self.output_proj(deformable_sample(v, shapes, locations, weights))
