"""MONAI augmentation pipelines of 3DINO's multi-crop views (docs/augmentation.md).

Each function returns a MONAI :class:`~monai.transforms.Compose` of array transforms for one
channel-first crop ``C x S x S x S`` (cubic, values normalised to about [-1, 1]). Seed a pipeline
with ``compose.set_random_state(seed=...)``: the seed propagates to every random transform.
Ranges not fixed by the method are chosen for [-1, 1] intensities and 48-112 voxel cubes and
documented in ``docs/augmentation.md``; the values live in
:mod:`threedino_pipe.training_data.augment_params`, shared with the batched torch implementation.
Outputs are not clipped (noise, sharpening and Gibbs ringing may overshoot [-1, 1] slightly).
"""

from __future__ import annotations

from monai.transforms import (
    Compose,
    OneOf,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSharpen,
    RandGaussianSmooth,
    RandGibbsNoise,
    RandHistogramShift,
    RandRotate90,
)

from threedino_pipe.training_data.augment_params import (
    BLUR_SIGMA,
    FLIP_PROB,
    GAMMA_RANGE,
    GIBBS_ALPHA,
    GLOBAL1_BLUR_SHARPEN_PROB,
    GLOBAL2_BLUR_SHARPEN_PROB,
    GLOBAL2_GIBBS_PROB,
    HISTOGRAM_POINTS,
    INTENSITY_PROB,
    LOCAL_BLUR_PROB,
    NOISE_STD,
    ROTATE_PROB,
    SHARPEN_ALPHA,
    SHARPEN_SIGMA1,
    SHARPEN_SIGMA2,
)


def _geometric() -> list:
    """Flips (p 0.3 per axis) then 90-degree rotations (p 0.3 per plane, k in 1..3)."""
    flips = [RandFlip(prob=FLIP_PROB, spatial_axis=axis) for axis in range(3)]
    rotations = [RandRotate90(prob=ROTATE_PROB, max_k=3, spatial_axes=plane) for plane in ((0, 1), (0, 2), (1, 2))]
    return flips + rotations


def _intensity(prob: float = INTENSITY_PROB) -> OneOf:
    """One of gamma / Gaussian noise / histogram shift, the chosen one applied with ``prob`` (the method: 0.8).

    A uniform choice followed by a p-0.8 application is the same as "apply one of them with
    p 0.8", so no extra random-apply wrapper is needed.
    """
    return OneOf([
        RandAdjustContrast(prob=prob, gamma=GAMMA_RANGE),
        RandGaussianNoise(prob=prob, mean=0.0, std=NOISE_STD),
        RandHistogramShift(num_control_points=HISTOGRAM_POINTS, prob=prob),
    ])


def _blur(prob: float) -> RandGaussianSmooth:
    return RandGaussianSmooth(sigma_x=BLUR_SIGMA, sigma_y=BLUR_SIGMA, sigma_z=BLUR_SIGMA, prob=prob)


def _blur_or_sharpen(prob: float) -> OneOf:
    """Gaussian blur or Gaussian sharpening (equal odds), applied with probability ``prob``."""
    sharpen = RandGaussianSharpen(sigma1_x=SHARPEN_SIGMA1, sigma1_y=SHARPEN_SIGMA1, sigma1_z=SHARPEN_SIGMA1,
                                  sigma2_x=SHARPEN_SIGMA2, sigma2_y=SHARPEN_SIGMA2, sigma2_z=SHARPEN_SIGMA2,
                                  alpha=SHARPEN_ALPHA, prob=prob)
    return OneOf([_blur(prob), sharpen])


def global_transform_1(intensity_prob: float = INTENSITY_PROB) -> Compose:
    """First global crop: geometric, intensity (p ``intensity_prob``, 0.8), then blur or sharpen (p 1.0)."""
    return Compose([*_geometric(), _intensity(intensity_prob), _blur_or_sharpen(GLOBAL1_BLUR_SHARPEN_PROB)])


def global_transform_2(intensity_prob: float = INTENSITY_PROB) -> Compose:
    """Second global crop: geometric, intensity (p ``intensity_prob``), blur or sharpen (p 0.1), Gibbs (p 0.2)."""
    return Compose([*_geometric(), _intensity(intensity_prob), _blur_or_sharpen(GLOBAL2_BLUR_SHARPEN_PROB),
                    RandGibbsNoise(prob=GLOBAL2_GIBBS_PROB, alpha=GIBBS_ALPHA)])


def geometric_transform() -> Compose:
    """SimMIM's crop: the geometric part alone (flips, 90-degree rotations); the target is the crop itself."""
    return Compose(_geometric())


def local_transform(intensity_prob: float = INTENSITY_PROB) -> Compose:
    """Local crops: geometric, intensity (p ``intensity_prob``), then Gaussian blur (p 0.5)."""
    return Compose([*_geometric(), _intensity(intensity_prob), _blur(LOCAL_BLUR_PROB)])
