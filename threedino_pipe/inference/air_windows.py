"""Sliding windows that hold only air outside the body: which ones need not run (docs/predict.md, *Skipping air*).

A conservative **body mask** of the preprocessed case (``C x X x Y x Z`` normalised intensities):

- a voxel is body when any channel is above its **air threshold**: for a channel normalised with the
  dataset's fixed intensities (``dataset_percentile``, the planner's choice for CT) the bottom of the
  range (``PAD_VALUE``, -1): the planned ``lower`` is the 0.5th percentile of the dataset's labelled
  voxels, so every voxel above it may belong to a structure and only what lies at or below it
  (air, clipped to -1) is air. For a channel normalised per volume (``volume_percentile``: MR, PET,
  other modalities) the background is what lies at or below the channel's Otsu threshold
  (``skimage.filters.threshold_otsu`` on every 2nd voxel per axis), with mean ``m`` and spread ``s``;
  a voxel above ``high = max(Otsu, m + 6 s)`` is body, and so is one above ``low = m + 3 s`` (dim
  tissue, partial volume at the skin) where it touches such voxels (hysteresis, computed on the
  blocks below): background noise alone, isolated specks above ``low``, does not make body;
- on blocks of ``BLOCK`` voxels per axis (a block is body when any voxel in it is), its
  enclosed holes filled (``scipy.ndimage.binary_fill_holes``: lungs, bowel gas, ventricles are
  never "air outside the body"), then dilated by the **margin** (``MARGIN_MM`` mm per axis, at
  least ``MIN_MARGIN_VOXELS`` voxels, rounded up to whole blocks).

The mask is **not trusted** (nothing is skipped) when a channel's normalisation is unknown, when no
voxel is above the air threshold (a blank case) or when the body covers more than
``MAX_BORDER_BODY`` of the field's six faces (the body fills the field: no air to skip, and a
per-volume threshold would split tissue instead of air from body).

A window whose box meets no block of the dilated mask is skipped; its contribution to the blend is
its gaussian weight times pure background (every blended channel 0: softmax models blend the
foreground classes only, sigmoid models their regions), which is what the full computation adds
wherever the network predicts background with certainty. The first window that could be skipped
(the **probe**) runs anyway: if the network does not predict background in every voxel of it, no
window of the case is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from torch import Tensor

from threedino_pipe.artifacts import PreprocessedCase
from threedino_pipe.preprocessing.normalization import PAD_VALUE

BLOCK = 4  # voxels per axis of a block of the mask grid
MARGIN_MM = 10.0  # dilation of the body mask, per axis
MIN_MARGIN_VOXELS = 2  # the margin in voxels at least (coarse spacings)
MAX_BORDER_BODY = 0.5  # the mask is trusted when at most this share of the field's faces is body
NOISE_SIGMAS = 6.0  # per-volume channels: "clearly body" lies this many background spreads above its mean


@dataclass(frozen=True)
class AirRule:
    """What the body mask of a preprocessed case needs: each channel's normalisation scheme and the
    preprocessed spacing (mm per axis, the array's order)."""

    schemes: tuple[str, ...]
    spacing: tuple[float, ...]

    @classmethod
    def of(cls, properties: PreprocessedCase) -> AirRule:
        """The rule of a preprocessed case's record."""
        return cls(tuple(n.scheme for n in properties.normalization), tuple(float(s) for s in properties.spacing))


def air_thresholds(channel: np.ndarray, scheme: str) -> tuple[float, float] | None:
    """``(low, high)`` normalised intensities of ``channel`` (``X x Y x Z``): above ``high`` a voxel is
    body; above ``low`` it is body when connected to such voxels (hysteresis; background noise is not).
    None for a scheme without an air rule."""
    if scheme == "dataset_percentile":
        return PAD_VALUE, PAD_VALUE
    if scheme != "volume_percentile":
        return None
    sample = np.asarray(channel[::2, ::2, ::2], dtype=np.float32).ravel()
    if sample.size == 0 or float(sample.min()) == float(sample.max()):
        top = float(sample.max()) if sample.size else PAD_VALUE
        return top, top
    otsu = float(threshold_otsu(sample, nbins=256))
    background = sample[sample <= otsu]
    mean, spread = float(background.mean()), float(background.std())
    high = max(otsu, mean + NOISE_SIGMAS * spread)
    return min(mean + NOISE_SIGMAS / 2 * spread, high), high


def margin_voxels(spacing: Sequence[float], margin_mm: float = MARGIN_MM) -> tuple[int, ...]:
    """The margin per axis in voxels: ``margin_mm`` / spacing rounded up, at least ``MIN_MARGIN_VOXELS``."""
    return tuple(max(MIN_MARGIN_VOXELS, math.ceil(margin_mm / float(s) - 1e-9)) for s in spacing)


@dataclass(frozen=True)
class BodyMask:
    """The dilated body of a case on a grid of ``block``-voxel blocks, or why skipping is off.

    ``blocks``: bool ``ceil(X/b) x ceil(Y/b) x ceil(Z/b)``, True where a block may hold body (within the
    margin); None when the mask is not trusted (``reason`` says why).
    """

    blocks: np.ndarray | None
    block: int = BLOCK
    reason: str = ""

    @property
    def trusted(self) -> bool:
        return self.blocks is not None

    def holds_body(self, box: Sequence[slice]) -> bool:
        """Whether the voxel box (case coordinates, clipped to the case) meets the dilated body; always
        True when the mask is not trusted."""
        if self.blocks is None:
            return True
        b = self.block
        index = tuple(slice(s.start // b, -(-s.stop // b)) for s in box)
        return bool(self.blocks[index].any())


def _block_any(mask: np.ndarray, block: int) -> np.ndarray:
    """``mask`` reduced to blocks of ``block`` voxels per axis (True where any voxel is), padded with False."""
    shape = [-(-n // block) * block for n in mask.shape]
    padded = np.zeros(shape, bool)
    padded[tuple(slice(0, n) for n in mask.shape)] = mask
    grouped = padded.reshape(shape[0] // block, block, shape[1] // block, block, shape[2] // block, block)
    return grouped.any(axis=(1, 3, 5))


def _border_share(blocks: np.ndarray) -> float:
    """Share of the blocks on the grid's six faces that are True."""
    faces = [blocks[index] for axis in range(3) for index in
             (tuple(0 if a == axis else slice(None) for a in range(3)),
              tuple(-1 if a == axis else slice(None) for a in range(3)))]
    return float(sum(f.sum() for f in faces)) / float(sum(f.size for f in faces))


def body_blocks(data: np.ndarray, schemes: Sequence[str], block: int = BLOCK) -> np.ndarray | None:
    """Blocks of ``block`` voxels per axis that may hold body (``C x X x Y x Z`` -> bool block grid): any
    voxel above ``high`` of any channel, or above ``low`` in a block connected to such blocks (6-connected
    runs of blocks above ``low``); None when a channel's scheme has no air rule."""
    body = None
    for channel, scheme in zip(data, schemes, strict=True):
        bounds = air_thresholds(channel, scheme)
        if bounds is None:
            return None
        low = _block_any(channel > bounds[0], block)
        high = low if bounds[1] == bounds[0] else _block_any(channel > bounds[1], block)
        if high is not low:
            runs, _ = ndimage.label(low)
            low = np.isin(runs, np.unique(runs[high & low])) & low
        body = low if body is None else body | low
    return body


def body_mask(data: np.ndarray | Tensor, rule: AirRule, *, margin_mm: float = MARGIN_MM,
              block: int = BLOCK) -> BodyMask:
    """The dilated body mask of a preprocessed case ``data`` (``C x X x Y x Z``, normalised as ``rule`` says)."""
    array = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
    if len(rule.schemes) != array.shape[0]:
        return BodyMask(None, block, f"{len(rule.schemes)} normalisation schemes for {array.shape[0]} channels")
    body = body_blocks(array, rule.schemes, block)
    if body is None:
        return BodyMask(None, block, f"a channel's normalisation ({', '.join(rule.schemes)}) has no air rule")
    if not body.any():
        return BodyMask(None, block, "no voxel above the air threshold")
    blocks = ndimage.binary_fill_holes(body)
    share = _border_share(blocks)
    if share > MAX_BORDER_BODY:
        return BodyMask(None, block, f"the body covers {share:.0%} of the field's faces (more than "
                                     f"{MAX_BORDER_BODY:.0%}): no air outside it to skip")
    reach = [2 * (-(-m // block)) + 1 for m in margin_voxels(rule.spacing, margin_mm)]
    return BodyMask(ndimage.maximum_filter(blocks, size=reach, mode="constant", cval=False), block)


def all_background(probabilities: Tensor, activation: str) -> bool:
    """Whether blended-channel ``probabilities`` (``K x ...``) give background in every voxel: softmax (the
    background channel left out, it is 1 minus the others' sum) when no class beats it, sigmoid when no
    region passes 0.5 (the label rules of ``inference/geometry``)."""
    if activation == "sigmoid":
        return bool((probabilities <= 0.5).all())
    background = 1.0 - probabilities.sum(0)
    return bool((probabilities.amax(0) <= background).all())


@dataclass
class WindowCounts:
    """Windows of a case (all window sizes): how many there were and how many were skipped; ``note``: why
    none was (empty when skipping was on, or not asked for). ``coarse``: with the coarse pass, ``total`` is
    the windows the coarse pass ran, ``skipped`` the full windows its mask skipped (beyond the air rule's)."""

    total: int = 0
    skipped: int = 0
    note: str = ""
    coarse: WindowCounts | None = None  # the coarse pass (inference/coarse_windows), when asked for


@dataclass
class WindowSkip:
    """Which windows of one case (one window size) run: those meeting the body ``mask``, and the probe.

    ``is_background``: a window's ``K x *patch`` probabilities -> whether the network predicted pure
    background in it. ``skipped``: the start (padded coordinates) of each skipped window, in order.
    """

    mask: BodyMask
    is_background: Callable[[Tensor], bool]
    counts: WindowCounts = field(default_factory=WindowCounts)
    skipped: list[tuple[int, ...]] = field(default_factory=list)
    state: str = "probe"  # probe (no window run yet that could be skipped), on, off
    probe_note: str = "the network predicted foreground in a window of air (the probe)"

    def __post_init__(self) -> None:
        if not self.mask.trusted:
            self.state, self.counts.note = "off", self.mask.reason

    def decide(self, start: tuple[int, ...], box: Sequence[slice]) -> str:
        """``run``, ``skip`` or ``probe`` (run, then :meth:`probed`) for the window at ``start`` over ``box``."""
        if self.state == "off" or self.mask.holds_body(box):
            return "run"
        if self.state == "probe":
            return "probe"
        self.skipped.append(tuple(start))
        self.counts.skipped += 1
        return "skip"

    def probed(self, probabilities: Tensor) -> None:
        """The probe's probabilities: skipping goes on only if they are background throughout."""
        if self.is_background(probabilities):
            self.state = "on"
        else:
            self.state = "off"
            self.counts.note = self.probe_note

