"""Intensity clean-up and normalisation of single channels (``X x Y x Z`` arrays).

Schemes (one plans entry per channel, docs/schemas.md):

- ``volume_percentile``: this volume's ``lower_pct``/``upper_pct`` percentiles over all voxels;
- ``dataset_percentile``: the plan's fixed ``lower``/``upper`` intensities;

both map ``lower -> range[0]`` and ``upper -> range[1]`` linearly and clip when ``clip`` is set.
"""

from __future__ import annotations

import numpy as np

from threedino_pipe.artifacts import ChannelNormalization, Normalization

SCHEMES = ("volume_percentile", "dataset_percentile")
PAD_VALUE = -1.0  # the bottom of every planned range: what training patches and sliding windows are padded with


def replace_nonfinite(channel: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace NaN/Inf voxels by the mean of the finite voxels (0 if none is finite).

    Returns:
        (float32 array, number of voxels replaced).
    """
    channel = np.asarray(channel, dtype=np.float32)
    bad = ~np.isfinite(channel)
    count = int(bad.sum())
    if not count:
        return channel, 0
    finite = channel[~bad]
    fill = float(finite.mean(dtype=np.float64)) if finite.size else 0.0
    channel = channel.copy()
    channel[bad] = fill
    return channel, count


def _bounds(channel: np.ndarray, entry: Normalization) -> tuple[float, float]:
    if entry.scheme == "volume_percentile":
        lower, upper = np.percentile(channel, [float(entry.lower_pct), float(entry.upper_pct)])
        return float(lower), float(upper)
    return float(entry.lower), float(entry.upper)


def normalize_channel(channel: np.ndarray, entry: Normalization, nan_replaced: int = 0
                      ) -> tuple[np.ndarray, ChannelNormalization]:
    """Map one channel to ``entry['range']`` as its plans entry says.

    Args:
        channel: ``X x Y x Z`` finite intensities.
        entry: a plans ``normalization`` entry (scheme, percentiles or values, range, clip).
        nan_replaced: the NaN/Inf voxels replaced before (recorded).

    Returns:
        (float32 array, record with ``scheme``, ``lower`` and ``upper`` used). When
        ``upper <= lower`` (a constant volume) voxels above ``lower`` map to ``range[1]`` and the
        others to ``range[0]``.
    """
    lower, upper = _bounds(channel, entry)
    r0, r1 = (float(v) for v in entry.range)
    if upper > lower:
        scale = np.float32((r1 - r0) / (upper - lower))
        out = (channel.astype(np.float32) - np.float32(lower)) * scale + np.float32(r0)
        if entry.clip:
            np.clip(out, r0, r1, out=out)
    else:
        out = np.where(channel > lower, np.float32(r1), np.float32(r0)).astype(np.float32)
    return out, ChannelNormalization(scheme=entry.scheme, lower=lower, upper=upper, nan_replaced=nan_replaced)
