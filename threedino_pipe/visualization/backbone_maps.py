"""A backbone's last layer on a whole volume, and patch maps back onto the scan's grid.

The network input is the whole preprocessed volume (``X' x Y' x Z'``, transposed order) resized
trilinearly by one factor so that its longest side is ``size`` voxels, each side then rounded to
the nearest multiple of the patch size (so the aspect ratio holds within half a patch per side
and every patch holds scan data, no padding). One forward pass gives, for the last block:

- the patch tokens after the final LayerNorm, ``[N, dim]`` (W-major on the patch grid);
- the attention weights of the CLS query over the patch tokens, per head, divided by their mean
  over the patches (1 = the weight of the average patch; the CLS token's weight on itself is
  left out).

A map on the patch grid corresponds to the whole preprocessed volume, so
:func:`to_preprocessed_grid` is one trilinear resize (``align_corners=False``: each patch value
sits at its patch's centre), and :func:`restore_to_input` inverts the preprocessing as
``predict`` does (:mod:`threedino_pipe.inference.geometry`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threedino_pipe.artifacts import PreprocessedCase
from threedino_pipe.inference import geometry
from threedino_pipe.models.backbones import Backbone


def network_shape(shape: Sequence[int], size: int, patch: int) -> tuple[int, int, int]:
    """Network input sides for a volume of ``shape`` voxels (module docstring); ``size`` 0 keeps the scale."""
    factor = 1.0 if size <= 0 else float(size) / max(int(n) for n in shape)
    return tuple(max(patch, int(round(int(n) * factor / patch)) * patch) for n in shape)


def network_input(volume: np.ndarray, shape: Sequence[int]) -> Tensor:
    """``X' x Y' x Z'`` float32 -> ``[1, 1, *shape]`` (trilinear, align_corners=False)."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if tuple(tensor.shape[2:]) == tuple(shape):
        return tensor
    return F.interpolate(tensor, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)


def last_layer(backbone: Backbone, x: Tensor, advance: Callable[[], None] | None = None) -> tuple[Tensor, Tensor]:
    """Patch tokens ``[N, dim]`` (after the final norm) and CLS attention ``[heads, N]`` of the last block
    for one volume ``x [1, C, W, H, D]`` on the backbone's device (results: float32 on the CPU);
    ``advance`` is called after each block. Needs the ``cls_attention`` capability of the backbone's family."""
    return backbone.last_layer_maps(x, advance)


def to_preprocessed_grid(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Patch-grid maps ``[K, gx, gy, gz]`` -> ``[K, *shape]`` float32 on the preprocessed grid (trilinear)."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    out = F.interpolate(tensor, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)
    return out[0].numpy()


def restore_to_input(volume: np.ndarray, properties: PreprocessedCase) -> np.ndarray:
    """A ``X' x Y' x Z'`` map on the preprocessed grid -> ``X x Y x Z`` float32 on the input grid.

    Linear resampling back to the cropped grid (one slab of rows at a time), the transpose undone,
    pasted into zeros outside the crop box (``predict``'s inverse of the preprocessing).
    """
    shape = [int(n) for n in properties.shape_after_crop]
    cropped = np.empty(shape, np.float32)
    source = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    for lo, hi in geometry.slabs(shape[0], shape[1] * shape[2]):
        cropped[lo:hi] = geometry.resample_rows(source, properties, 0, lo, hi)
    return geometry.paste_into_input(cropped, properties)
