"""Probabilities and ranges of the pretraining augmentations, shared by both implementations.

The MONAI pipelines (:mod:`threedino_pipe.training_data.augmentations`, the reference) and the
batched torch ones (:mod:`threedino_pipe.training_data.torch_augmentations`) read these values, so
they cannot drift apart. Sigmas in voxels of the output cube; intensities normalised to about
[-1, 1]. Plain Python: importable without MONAI (the GPU machines have only torch).
"""

from __future__ import annotations

from dataclasses import dataclass

FLIP_PROB = 0.3
ROTATE_PROB = 0.3
INTENSITY_PROB = 0.8
GAMMA_RANGE = (0.5, 2.0)
NOISE_STD = 0.002
HISTOGRAM_POINTS = 10
BLUR_SIGMA = (0.25, 1.5)            # voxels, drawn per axis (MONAI's default range)
SHARPEN_SIGMA1 = (0.5, 1.0)         # voxels, first blur (MONAI's default range)
SHARPEN_SIGMA2 = 0.5                # second blur drawn in [0.5, sigma1] (MONAI's rule)
SHARPEN_ALPHA = (1.0, 5.0)          # MONAI's default (10, 30) overshoots [-1, 1] up to about +-4
GIBBS_ALPHA = (0.0, 0.8)            # alpha near 1 removes almost all of k-space (a blank crop)
GLOBAL1_BLUR_SHARPEN_PROB = 1.0
GLOBAL2_BLUR_SHARPEN_PROB = 0.1
GLOBAL2_GIBBS_PROB = 0.2
LOCAL_BLUR_PROB = 0.5


@dataclass(frozen=True)
class AugmentParams:
    """The values above as one object (the torch implementation takes one, so a test can change a range)."""

    flip_prob: float = FLIP_PROB
    rotate_prob: float = ROTATE_PROB
    intensity_prob: float = INTENSITY_PROB
    gamma: tuple[float, float] = GAMMA_RANGE
    noise_std: float = NOISE_STD
    histogram_points: int = HISTOGRAM_POINTS
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    sharpen_sigma1: tuple[float, float] = SHARPEN_SIGMA1
    sharpen_sigma2: float = SHARPEN_SIGMA2
    sharpen_alpha: tuple[float, float] = SHARPEN_ALPHA
    gibbs_alpha: tuple[float, float] = GIBBS_ALPHA
    global1_blur_sharpen_prob: float = GLOBAL1_BLUR_SHARPEN_PROB
    global2_blur_sharpen_prob: float = GLOBAL2_BLUR_SHARPEN_PROB
    global2_gibbs_prob: float = GLOBAL2_GIBBS_PROB
    local_blur_prob: float = LOCAL_BLUR_PROB


PARAMS = AugmentParams()
