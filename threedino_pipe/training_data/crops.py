"""3D RandomResizedCrop: draw a box in a volume, read only that box, resize it to a cube.

Axis convention: volumes are ``C x X x Y x Z`` (voxels, index order i, j, k) with the
cross-slice axis LAST (preprocessing moves it there; for an isotropic volume the last axis
plays that role). The in-plane box (X, Y) follows torchvision's 2D RandomResizedCrop rule
(scale = fraction of the in-plane AREA, aspect X/Y log-uniform in ``ratio``, 10 attempts, then
a centred fallback); the cross-slice length is drawn independently (scale = fraction of the
LENGTH). The box always lies inside the volume; a box smaller than the output is upsampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

GLOBAL_INPLANE_SCALE = (0.48, 1.0)
GLOBAL_CROSSSLICE_SCALE = (0.5, 1.0)
LOCAL_INPLANE_SCALE = (0.16, 0.48)
LOCAL_CROSSSLICE_SCALE = (0.2, 0.5)
DEFAULT_RATIO = (0.9, 1 / 0.9)

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""Half-open voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` in the volume's spatial axes."""


def _inplane_box(rng: np.random.Generator, sx: int, sy: int, scale: tuple[float, float],
                 ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """In-plane box ``(x0, wx, y0, wy)`` by torchvision's area/aspect rule (aspect = wx / wy).

    Up to 10 draws of (area fraction, log-uniform aspect) at a random position; if none fits,
    torchvision's fallback: the centred, whole plane trimmed to the nearest allowed aspect.
    """
    area = sx * sy
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        wx = int(round(math.sqrt(target_area * aspect)))
        wy = int(round(math.sqrt(target_area / aspect)))
        if 0 < wx <= sx and 0 < wy <= sy:
            return int(rng.integers(0, sx - wx + 1)), wx, int(rng.integers(0, sy - wy + 1)), wy
    in_ratio = sx / sy
    if in_ratio < min(ratio):
        wx = sx
        wy = int(round(wx / min(ratio)))
    elif in_ratio > max(ratio):
        wy = sy
        wx = int(round(wy * max(ratio)))
    else:
        wx, wy = sx, sy
    wx, wy = max(1, min(wx, sx)), max(1, min(wy, sy))
    return (sx - wx) // 2, wx, (sy - wy) // 2, wy


@dataclass(frozen=True)
class RandomResizedCrop3D:
    """Draws crop boxes for a ``size``^3 output.

    Args:
        size: output edge length (voxels) the box is resized to by :func:`crop_and_resize`.
        inplane_scale: range of the box's fraction of the in-plane (X x Y) AREA.
        crossslice_scale: range of the box's fraction of the cross-slice (Z) LENGTH.
        ratio: range of the in-plane aspect ratio (box X / box Y), drawn log-uniformly.
    """

    size: int
    inplane_scale: tuple[float, float]
    crossslice_scale: tuple[float, float]
    ratio: tuple[float, float] = DEFAULT_RATIO

    def __post_init__(self) -> None:
        for name in ("inplane_scale", "crossslice_scale", "ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi or (name != "ratio" and hi > 1):
                raise ValueError(f"{name} must satisfy 0 < low <= high (<= 1 for scales), got {(lo, hi)}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")

    def draw(self, shape: tuple[int, int, int] | Any, rng: np.random.Generator) -> Box:
        """A random box inside a volume of spatial ``shape`` (X, Y, Z) voxels, cross-slice axis last."""
        sx, sy, sz = (int(s) for s in shape)
        if min(sx, sy, sz) < 1:
            raise ValueError(f"cannot crop an empty volume of shape {(sx, sy, sz)}")
        x0, wx, y0, wy = _inplane_box(rng, sx, sy, self.inplane_scale, self.ratio)
        wz = max(1, min(int(round(sz * rng.uniform(*self.crossslice_scale))), sz))
        z0 = int(rng.integers(0, sz - wz + 1))
        return (x0, x0 + wx), (y0, y0 + wy), (z0, z0 + wz)

    def __call__(self, volume: Any, rng: np.random.Generator) -> torch.Tensor:
        """Draw a box in ``volume`` (``C x X x Y x Z``) and return it resized: ``C x size x size x size``."""
        return crop_and_resize(volume, self.draw(tuple(volume.shape[1:]), rng), self.size)


def crop_and_resize(volume: Any, box: Box, size: int) -> torch.Tensor:
    """Read ``box`` of ``volume`` and resize it trilinearly (align_corners=False) to a cube.

    Args:
        volume: ``C x X x Y x Z`` torch tensor, numpy array or blosc2 NDArray. A blosc2 array is
            sliced, so only the chunks overlapping the box are read and decompressed.
        box: half-open voxel ranges per spatial axis, from :meth:`RandomResizedCrop3D.draw`.
        size: output edge length (voxels).

    Returns:
        float32 tensor ``C x size x size x size``.
    """
    (x0, x1), (y0, y1), (z0, z1) = box
    patch = volume[:, x0:x1, y0:y1, z0:z1]
    patch = torch.as_tensor(np.ascontiguousarray(patch) if not isinstance(patch, torch.Tensor) else patch)
    patch = patch.to(torch.float32)
    if tuple(patch.shape[1:]) == (size, size, size):
        return patch.contiguous()
    out = F.interpolate(patch.unsqueeze(0), size=(size, size, size), mode="trilinear", align_corners=False)
    return out.squeeze(0)
