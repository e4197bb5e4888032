"""The PCA view of patch features (DINOv2's figure, in 3D), on the patch grid.

Rules (docs/visualize.md):

1. **Foreground**: the first principal component of all patch features (centred), divided by its
   standard deviation over the patches, is thresholded (default 0, the mean patch): patches above
   the threshold are foreground.
2. **Sign**: a principal component's sign is arbitrary. The first component's sign is chosen so
   that the patches of the grid's outermost layer (the volume's border, where the air or table
   around the anatomy lies) have a **negative** mean: the foreground is the side that is not the
   border.
3. **RGB**: with ``rgb_from="foreground"`` (DINOv2's procedure) a second PCA is fitted on the
   foreground patches only and its first three components become red, green and blue; with
   ``"all"``, components 2-4 of the first PCA are used. Each colour channel is min-max scaled to
   [0, 1] over the foreground patches; background patches are 0 (black). Colour signs follow
   scikit-learn's ``svd_flip`` rule (the largest loading of each component is positive), so a
   rerun gives the same colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RGB_FROM = ("foreground", "all")


@dataclass
class PCAMaps:
    """PCA maps on the patch grid ``(gx, gy, gz)``.

    Attributes:
        first: signed first-component score in standard deviations, ``gx x gy x gz`` float32.
        foreground: ``first > threshold``, bool.
        threshold: the foreground threshold (standard deviations of the first component).
        rgb: ``3 x gx x gy x gz`` float32 in [0, 1], 0 on background patches.
        explained_first: fraction of the variance of all patches along the first component.
        explained_rgb: fraction of the variance of the fitted patches along each colour component.
        flipped: True when the first component's sign was flipped by the border rule.
        border_mean: mean first-component score of the border patches after the sign rule (< 0 unless
            every patch is on the border).
    """

    first: np.ndarray
    foreground: np.ndarray
    threshold: float
    rgb: np.ndarray
    explained_first: float
    explained_rgb: list[float]
    flipped: bool
    border_mean: float


def principal_components(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``[N, k']`` and explained-variance ratios ``[k']`` of the first ``k' = min(k, N - 1, D)``
    components of ``features [N, D]`` (centred; signs: largest loading positive)."""
    x = np.asarray(features, dtype=np.float64)
    k = max(0, min(int(k), x.shape[0] - 1, x.shape[1]))
    if k == 0:
        return np.zeros((x.shape[0], 0)), np.zeros(0)
    x = x - x.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    vt = vt[:k]
    signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
    vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    total = float((singular ** 2).sum())
    ratios = (singular[:k] ** 2) / total if total > 0 else np.zeros(k)
    return x @ vt.T, ratios


def border_mask(grid: tuple[int, int, int]) -> np.ndarray:
    """True on the outermost layer of patches of a ``grid``."""
    inner = tuple(slice(1, -1) if n > 2 else slice(0, 0) for n in grid)
    mask = np.ones(grid, bool)
    mask[inner] = False
    return mask


def _scale_01(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5)


def pca_maps(features: np.ndarray, grid: tuple[int, int, int], *, threshold: float = 0.0,
             rgb_from: str = "foreground") -> PCAMaps:
    """The PCA maps (module docstring) of patch features ``[N, D]`` laid out W-major on ``grid``."""
    if rgb_from not in RGB_FROM:
        raise ValueError(f"rgb_from must be one of {RGB_FROM}, not {rgb_from!r}")
    grid = tuple(int(g) for g in grid)
    n = int(np.prod(grid))
    if features.shape[0] != n:
        raise ValueError(f"{features.shape[0]} patch features for a grid of {n} patches")
    scores, ratios = principal_components(features, 4 if rgb_from == "all" else 1)
    if scores.shape[1] == 0:  # a single patch: nothing to split
        first = np.zeros(n)
    else:
        std = scores[:, 0].std()
        first = scores[:, 0] / std if std > 0 else np.zeros(n)
    border = border_mask(grid).reshape(-1)
    flipped = bool(first[border].mean() > 0)
    if flipped:
        first = -first
    foreground = first > threshold
    rgb = np.zeros((3, n), np.float64)
    if rgb_from == "all":
        colours, explained = scores[foreground, 1:4], ratios[1:4]
    else:
        colours, explained = principal_components(features[foreground], 3)
    for c in range(colours.shape[1] if colours.shape[0] else 0):
        rgb[c, foreground] = _scale_01(colours[:, c])
    explained_rgb = [float(v) for v in explained]
    return PCAMaps(first=first.reshape(grid).astype(np.float32), foreground=foreground.reshape(grid),
                   threshold=float(threshold), rgb=rgb.reshape(3, *grid).astype(np.float32),
                   explained_first=float(ratios[0]) if len(ratios) else 0.0, explained_rgb=explained_rgb,
                   flipped=flipped, border_mean=float(first[border].mean()))
