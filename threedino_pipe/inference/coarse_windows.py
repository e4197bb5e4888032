"""The coarse pass of predict: which full-resolution windows lie far from any structure (docs/predict.md,
*Coarse pass*).

Before the full-resolution sliding window, the same model runs its own sliding window (same window
size, overlap, air rule) on the case **downsampled** by an integer ``FACTOR`` per axis (block means of
``FACTOR^3`` voxels, :func:`downsample`): about ``FACTOR^3`` times fewer windows. Its probabilities
give a conservative **could-hold-foreground** mask (:func:`foreground_grid`): a coarse voxel counts when
any foreground channel (softmax: every class but the background; sigmoid: every region) is above
``THRESHOLD``, far below the 0.5 or argmax that makes a label, so a structure the coarse network is
unsure of still counts. The mask is **dilated by** ``MARGIN_MM`` mm per axis (at least
``MIN_MARGIN_VOXELS`` coarse voxels; :func:`coarse_mask`): one coarse voxel for a structure's edge
lost to the block means (partial volume), one more for the coarse network's boundary at half the
resolution it was trained on, and millimetres beyond that for the full network's uncertain rim around
a structure. A coarse voxel is a block of ``FACTOR`` full-resolution voxels per axis, so the mask is a
:class:`~threedino_pipe.inference.air_windows.BodyMask` with ``block = FACTOR``: a full window whose box
meets no block of it is skipped and blends as certain background, as an air-skipped window does.

When in doubt the window runs: the mask is **not trusted** (nothing skipped by it) when the coarse
pass finds no foreground at all (a missed structure is the failure that matters; an empty coarse
result is more likely a structure too small for the coarse grid than a case without any), and a
**probe** (the first window the mask would skip) runs anyway and must come out background, as the
air rule's probe does.

Limit: a structure thinner than about one coarse voxel along every axis, in a part of the case with
no other foreground, can fade below ``THRESHOLD`` in the block means; this is why ``--coarse`` is off
until measured on real cases (docs/predict.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from threedino_pipe.inference.air_windows import BodyMask, WindowSkip

FACTOR = 2  # downsampling of the coarse pass, per axis
THRESHOLD = 0.05  # a coarse voxel may hold foreground when any foreground probability is above this
MARGIN_MM = 10.0  # dilation of the coarse mask, per axis
MIN_MARGIN_VOXELS = 2  # coarse voxels at least
READ_ROWS = 16  # coarse rows read at a time
PROBE_NOTE = "the network predicted foreground in a window the coarse pass found empty (the probe)"
EMPTY_NOTE = "the coarse pass found no foreground anywhere"


def downsample(data: Tensor, factor: int = FACTOR) -> Tensor:
    """``C x X x Y x Z`` -> ``C x ceil(X/f) x ceil(Y/f) x ceil(Z/f)``: means of blocks of ``f`` voxels per axis
    (the case's last voxels repeated to fill the last blocks), so coarse voxel ``i`` is full voxels
    ``[i f, (i + 1) f)``."""
    pads = [(-n) % factor for n in data.shape[1:]]
    x = data[None].float()
    if any(pads):
        x = F.pad(x, [v for p in reversed(pads) for v in (0, p)], mode="replicate")
    return F.avg_pool3d(x, factor, factor)[0]


def foreground_grid(stored, softmax_background_stored: bool, threshold: float = THRESHOLD) -> np.ndarray:
    """Where any foreground channel of ``stored`` (``K x X x Y x Z``, a tensor or a row source read a block of
    rows at a time) is above ``threshold``: bool ``X x Y x Z``. ``softmax_background_stored``: channel 0 is
    the background (a softmax whose background was not left out) and does not count."""
    shape = tuple(int(n) for n in stored.shape[1:])
    found = np.zeros(shape, bool)
    first = int(softmax_background_stored)
    for lo in range(0, shape[0], READ_ROWS):
        hi = min(shape[0], lo + READ_ROWS)
        block = stored.rows(lo, hi) if hasattr(stored, "rows") else stored[:, lo:hi]
        found[lo:hi] = (block[first:].float() > threshold).any(0).numpy()
    return found


def margin_voxels(spacing: Sequence[float], factor: int = FACTOR, margin_mm: float = MARGIN_MM) -> tuple[int, ...]:
    """The margin in coarse voxels per axis (full ``spacing`` in mm times ``factor``), rounded up, at least
    ``MIN_MARGIN_VOXELS``."""
    return tuple(max(MIN_MARGIN_VOXELS, math.ceil(margin_mm / (float(s) * factor) - 1e-9)) for s in spacing)


def coarse_mask(found: np.ndarray, spacing: Sequence[float], factor: int = FACTOR,
                margin_mm: float = MARGIN_MM) -> BodyMask:
    """The dilated could-hold-foreground mask (coarse grid ``found``, full ``spacing`` in mm) as blocks of
    ``factor`` full voxels; not trusted when ``found`` is empty."""
    if not found.any():
        return BodyMask(None, factor, EMPTY_NOTE)
    reach = [2 * m + 1 for m in margin_voxels(spacing, factor, margin_mm)]
    return BodyMask(ndimage.maximum_filter(found, size=reach, mode="constant", cval=False), factor)


@dataclass
class CombinedSkip:
    """The air rule and the coarse mask together (either may be None): a window runs when neither would
    skip it; its decision and probe go to the rule that made them (``WindowSkip``'s interface)."""

    air: WindowSkip | None
    coarse: WindowSkip | None
    probing: list[WindowSkip] = field(default_factory=list)

    def decide(self, start: tuple[int, ...], box: Sequence[slice]) -> str:
        for rule in (self.air, self.coarse):
            decision = "run" if rule is None else rule.decide(start, box)
            if decision == "probe":
                self.probing.append(rule)
            if decision != "run":
                return decision
        return "run"

    def probed(self, probabilities: Tensor) -> None:
        self.probing.pop(0).probed(probabilities)
