"""Batched torch augmentations of the multi-crop views, equal in distribution to the MONAI pipelines.

The MONAI pipelines (:mod:`threedino_pipe.training_data.augmentations`) stay the reference; this
module applies the same steps, with the same probabilities, ranges and order
(:mod:`threedino_pipe.training_data.augment_params`), to a whole batch of crops
``B x C x S x S x S`` (float32, cubic) on whatever device it lives on, so a GPU can augment the
crops it is about to train on. Every sample draws its own parameters from one seeded
``torch.Generator`` on that device: the same seed on the same device gives the same batch (a CPU
and a GPU generator give different, equally distributed, streams).

Per-crop semantics follow MONAI's: the contrast (gamma) and the histogram shift work on each
crop's own min-max range (over all its channels); a constant crop passes the histogram shift
unchanged; blur kernels are MONAI's "erf" kernels truncated at 4 sigma with zero padding; Gibbs
ringing keeps the k-space ball of radius ``(1 - alpha) * S * sqrt(2) / 2`` around MONAI's centre
``(S - 1) / 2`` of the shifted spectrum and takes the real part. Imports only torch (the GPU
machines have no MONAI).
"""

from __future__ import annotations

import hashlib
import math

import torch

from threedino_pipe.training_data.augment_params import PARAMS, AugmentParams

SPATIAL = (2, 3, 4)
PLANES = ((2, 3), (2, 4), (3, 4))  # MONAI's spatial_axes (0, 1), (0, 2), (1, 2) of a B x C x S x S x S batch
TRUNCATE = 4.0  # Gaussian kernels end at 4 sigma (MONAI's GaussianFilter default)


def _uniform(n: int, low: float | torch.Tensor, high: float | torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=g.device)


def _chosen(mask: torch.Tensor) -> torch.Tensor:
    """Row indices where ``mask`` (``[B]`` bool) is set."""
    return mask.nonzero().flatten()


def _apply(x: torch.Tensor, rows: torch.Tensor, fn) -> None:
    """``x[rows] = fn(x[rows])`` in place (nothing when no row is chosen)."""
    if rows.numel():
        x[rows] = fn(x[rows])


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """``[n]`` -> ``[n, 1, 1, 1, 1]`` for broadcasting over a crop."""
    return values.view(-1, 1, 1, 1, 1)


def flips_and_rotations(x: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS) -> torch.Tensor:
    """MONAI's ``RandFlip`` per axis (p ``flip_prob``), then ``RandRotate90(max_k=3)`` per plane (p
    ``rotate_prob``, k uniform in 1..3 quarter turns), in place on ``x`` ``[B, C, S, S, S]``."""
    n = x.shape[0]
    for dim in SPATIAL:
        rows = _chosen(torch.rand(n, generator=g, device=g.device) < p.flip_prob)
        _apply(x, rows, lambda crops, dim=dim: crops.flip(dim))
    for plane in PLANES:
        do = torch.rand(n, generator=g, device=g.device) < p.rotate_prob
        quarter_turns = torch.randint(1, 4, (n,), generator=g, device=g.device)
        for k in (1, 2, 3):
            _apply(x, _chosen(do & (quarter_turns == k)), lambda crops, k=k, plane=plane: torch.rot90(crops, k, plane))
    return x


def _min_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop minimum and max - min over all channels and voxels, ``[n, 1, 1, 1, 1]`` each."""
    flat = x.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    return _per_sample(low), _per_sample(high - low)


def adjust_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's ``AdjustContrast`` per crop: ``((x - min) / (range + 1e-7)) ** gamma * range + min``."""
    low, span = _min_range(x)
    return ((x - low) / (span + 1e-7)) ** _per_sample(gamma) * span + low


def histogram_points(n: int, points: int, g: torch.Generator) -> torch.Tensor:
    """``[n, points]`` floating control points of MONAI's ``RandHistogramShift`` on [0, 1]: the ends
    fixed, point i drawn uniformly between the new point i - 1 and the old (evenly spaced) point i + 1."""
    reference = torch.linspace(0, 1, points, device=g.device)
    floating = reference.repeat(n, 1)
    for i in range(1, points - 1):
        floating[:, i] = _uniform(n, floating[:, i - 1], reference[i + 1], g)
    return floating


def histogram_shift(x: torch.Tensor, floating: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear intensity map per crop: evenly spaced points of the crop's min-max range go to
    ``floating`` (``[n, points]`` on [0, 1], scaled to that range); a constant crop is returned unchanged."""
    low, span = _min_range(x)
    segments = floating.shape[1] - 1
    safe = torch.where(span > 0, span, torch.ones_like(span))
    t = ((x - low) / safe).clamp(0, 1) * segments
    index = t.floor().clamp(max=segments - 1)
    flat_index = index.long().flatten(1)
    floating = floating.to(x.dtype)
    left = floating.gather(1, flat_index).view_as(x)
    right = floating.gather(1, flat_index + 1).view_as(x)
    mapped = (left + (t - index) * (right - left)) * span + low
    return torch.where(span > 0, mapped, x)


def intensity(x: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS) -> torch.Tensor:
    """One of gamma contrast / Gaussian noise / histogram shift (equal odds), applied with p
    ``intensity_prob`` (MONAI's ``OneOf`` whose members each have that probability), in place."""
    n = x.shape[0]
    choice = torch.randint(0, 3, (n,), generator=g, device=g.device)
    do = torch.rand(n, generator=g, device=g.device) < p.intensity_prob
    gamma = _uniform(n, *p.gamma, g)
    noise_std = _uniform(n, 0.0, p.noise_std, g)
    floating = histogram_points(n, p.histogram_points, g)
    rows = _chosen(do & (choice == 0))
    _apply(x, rows, lambda crops: adjust_contrast(crops, gamma[rows]))
    rows_noise = _chosen(do & (choice == 1))
    _apply(x, rows_noise, lambda crops: crops + _per_sample(noise_std[rows_noise]) * torch.randn(
        crops.shape, generator=g, device=g.device, dtype=crops.dtype))
    rows_shift = _chosen(do & (choice == 2))
    _apply(x, rows_shift, lambda crops: histogram_shift(crops, floating[rows_shift]))
    return x


def erf_kernels(sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """``[n, 2T + 1]`` MONAI "erf" Gaussian kernels for ``sigma`` ``[n]`` (voxels), each truncated at its own
    ``round(4 sigma)`` taps and zero beyond, all centred in ``2T + 1`` taps with T that of ``max_sigma``."""
    tail_max = int(max(max_sigma * TRUNCATE, 0.5) + 0.5)
    taps = torch.arange(-tail_max, tail_max + 1, dtype=torch.float32, device=sigma.device)
    sigma = sigma.to(torch.float32).view(-1, 1)
    t = 0.70710678 / sigma.abs()
    kernels = (0.5 * (torch.erf(t * (taps + 0.5)) - torch.erf(t * (taps - 0.5)))).clamp(min=0)
    tails = (torch.clamp(sigma * TRUNCATE, min=0.5) + 0.5).floor()
    return torch.where(taps.abs() <= tails, kernels, torch.zeros_like(kernels))


def band_matrices(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, size, size]`` matrices ``M`` with ``M @ v`` = the zero-padded correlation of ``v`` (length
    ``size``) with each of the ``[n, 2T + 1]`` centred ``kernels``: ``M[i, j] = k[j - i + T]``."""
    tail = kernels.shape[1] // 2
    positions = torch.arange(size, device=kernels.device)
    offsets = positions.view(1, -1) - positions.view(-1, 1) + tail     # [size, size]: j - i + T
    inside = (offsets >= 0) & (offsets <= 2 * tail)
    return kernels[:, offsets.clamp(0, 2 * tail)] * inside


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``[n, C, S0, S1, S2]`` with per-crop, per-axis ``sigma`` ``[n, 3]``
    (voxels, at most ``max_sigma``), zero padding.

    Each axis is one batched product with a banded matrix (:func:`band_matrices`): more arithmetic
    than a grouped convolution with the 2T + 1 taps, but dense matrix products run near the CPU's
    peak while depthwise 3D convolutions do not (benchmarks/augment_throughput.py)."""
    n, c, *sizes = x.shape
    out = x
    for axis in range(3):
        matrices = band_matrices(erf_kernels(sigma[:, axis], max_sigma).to(x.dtype), sizes[axis])
        if axis == 0:    # [n, C, S0, S1 * S2]: M @ x
            out = torch.matmul(matrices.unsqueeze(1), out.reshape(n, c, sizes[0], -1)).view_as(x)
        elif axis == 1:  # [n, C * S0, S1, S2]: M @ x per plane
            out = torch.matmul(matrices.unsqueeze(1), out.reshape(n, c * sizes[0], sizes[1], sizes[2])).view_as(x)
        else:            # [n, C * S0 * S1, S2]: x @ M^T
            out = torch.matmul(out.reshape(n, -1, sizes[2]), matrices.transpose(1, 2)).view_as(x)
    return out


def _sigmas(n: int, low: float | torch.Tensor, high: float | torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` per-axis sigmas drawn uniformly in [low, high] (``low``/``high`` scalars or ``[n, 3]``)."""
    return low + (high - low) * torch.rand(n, 3, generator=g, device=g.device)


def blur(x: torch.Tensor, g: torch.Generator, prob: float, p: AugmentParams = PARAMS) -> torch.Tensor:
    """MONAI's ``RandGaussianSmooth`` (sigma per axis in ``blur_sigma``) with probability ``prob``, in place."""
    n = x.shape[0]
    do = torch.rand(n, generator=g, device=g.device) < prob
    sigma = _sigmas(n, *p.blur_sigma, g)
    rows = _chosen(do)
    _apply(x, rows, lambda crops: gaussian_blur(crops, sigma[rows], p.blur_sigma[1]))
    return x


def sharpen(x: torch.Tensor, sigma1: torch.Tensor, sigma2: torch.Tensor, alpha: torch.Tensor,
            max_sigma: float) -> torch.Tensor:
    """MONAI's ``GaussianSharpen`` per crop: ``b = blur(x, sigma1)``, ``b + alpha * (b - blur(b, sigma2))``."""
    blurred = gaussian_blur(x, sigma1, max_sigma)
    return blurred + _per_sample(alpha) * (blurred - gaussian_blur(blurred, sigma2, max_sigma))


def blur_or_sharpen(x: torch.Tensor, g: torch.Generator, prob: float, p: AugmentParams = PARAMS) -> torch.Tensor:
    """Blur or sharpen (equal odds) with probability ``prob`` (MONAI's ``OneOf`` of the two), in place.

    Sharpening draws sigma1 per axis in ``sharpen_sigma1``, sigma2 per axis in [``sharpen_sigma2``,
    sigma1] and alpha in ``sharpen_alpha``."""
    n = x.shape[0]
    choice = torch.randint(0, 2, (n,), generator=g, device=g.device)
    do = torch.rand(n, generator=g, device=g.device) < prob
    sigma = _sigmas(n, *p.blur_sigma, g)
    sigma1 = _sigmas(n, *p.sharpen_sigma1, g)
    sigma2 = _sigmas(n, p.sharpen_sigma2, sigma1, g)
    alpha = _uniform(n, *p.sharpen_alpha, g)
    rows = _chosen(do & (choice == 0))
    _apply(x, rows, lambda crops: gaussian_blur(crops, sigma[rows], p.blur_sigma[1]))
    rows_sharp = _chosen(do & (choice == 1))
    _apply(x, rows_sharp, lambda crops: sharpen(crops, sigma1[rows_sharp], sigma2[rows_sharp], alpha[rows_sharp],
                                                max(p.sharpen_sigma1[1], p.sharpen_sigma2)))
    return x


def gibbs_masks(shape: tuple[int, int, int], alpha: torch.Tensor) -> torch.Tensor:
    """``[n, S0, S1, S2 // 2 + 1]`` real-FFT masks equal to MONAI's ``GibbsNoise``: MONAI keeps the shifted
    spectrum within ``(1 - alpha) * max(S) * sqrt(2) / 2`` of ``(S - 1) / 2`` and takes the real part
    of the inverse; the real part equals the inverse of the mask's Hermitian-symmetric half
    ``(M(f) + M(-f)) / 2``, which the real FFT can use."""
    grids = torch.meshgrid(*[torch.arange(s, device=alpha.device, dtype=torch.float64) - (s - 1) / 2
                             for s in shape], indexing="ij")
    distance = torch.sqrt(sum(grid ** 2 for grid in grids))
    radius = (1 - alpha.to(torch.float64)) * max(shape) * math.sqrt(2) / 2
    shifted = (distance.unsqueeze(0) <= radius.view(-1, 1, 1, 1)).to(torch.float32)
    mask = torch.fft.ifftshift(shifted, dim=(1, 2, 3))  # the mask in the unshifted frequency order
    mirrored = torch.roll(mask.flip(1, 2, 3), shifts=(1, 1, 1), dims=(1, 2, 3))  # M(-f)
    return ((mask + mirrored) / 2)[..., : shape[2] // 2 + 1]


def gibbs_noise(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """MONAI's ``GibbsNoise`` per crop (``alpha`` ``[n]`` in [0, 1]; 0 = identity): low-pass in k-space."""
    shape = tuple(x.shape[2:])
    spectrum = torch.fft.rfftn(x, dim=SPATIAL)
    spectrum = spectrum * gibbs_masks(shape, alpha).unsqueeze(1)
    return torch.fft.irfftn(spectrum, s=shape, dim=SPATIAL).to(x.dtype)


def gibbs(x: torch.Tensor, g: torch.Generator, prob: float, p: AugmentParams = PARAMS) -> torch.Tensor:
    """MONAI's ``RandGibbsNoise`` (alpha in ``gibbs_alpha``) with probability ``prob``, in place."""
    n = x.shape[0]
    do = torch.rand(n, generator=g, device=g.device) < prob
    alpha = _uniform(n, *p.gibbs_alpha, g)
    rows = _chosen(do)
    _apply(x, rows, lambda crops: gibbs_noise(crops, alpha[rows]))
    return x


def _prepared(crops: torch.Tensor) -> torch.Tensor:
    if crops.dim() != 5 or not crops.shape[2] == crops.shape[3] == crops.shape[4]:
        raise ValueError(f"expected cubic crops B x C x S x S x S, got {tuple(crops.shape)}")
    return crops.to(torch.float32, copy=True)


def global_view_1(crops: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS) -> torch.Tensor:
    """First global crops ``[B, C, S, S, S]``: flips, rotations, intensity, then blur or sharpen (p 1.0)."""
    x = intensity(flips_and_rotations(_prepared(crops), g, p), g, p)
    return blur_or_sharpen(x, g, p.global1_blur_sharpen_prob, p)


def global_view_2(crops: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS) -> torch.Tensor:
    """Second global crops: flips, rotations, intensity, blur or sharpen (p 0.1), Gibbs ringing (p 0.2)."""
    x = intensity(flips_and_rotations(_prepared(crops), g, p), g, p)
    return gibbs(blur_or_sharpen(x, g, p.global2_blur_sharpen_prob, p), g, p.global2_gibbs_prob, p)


def local_view(crops: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS) -> torch.Tensor:
    """Local crops: flips, rotations, intensity, then Gaussian blur (p 0.5)."""
    return blur(intensity(flips_and_rotations(_prepared(crops), g, p), g, p), g, p.local_blur_prob, p)


def batch_seed(seed: int, batch_index: int, rank: int = 0) -> int:
    """The generator seed of batch ``batch_index`` of a run seeded ``seed`` on ``rank`` (63 bits)."""
    digest = hashlib.blake2b(f"threedino-augment/{seed}/{batch_index}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class BatchAugmenter:
    """Augments a multi-crop batch where it lives (crop-major rows, as the pretraining loader makes them).

    Args:
        params: probabilities and ranges (default: the pipeline's, :data:`augment_params.PARAMS`).
    """

    def __init__(self, params: AugmentParams = PARAMS) -> None:
        self.params = params

    def __call__(self, global_crops: torch.Tensor, local_crops: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``global_crops`` ``[2B, C, g, g, g]`` (rows 0..B-1 first crops, B..2B-1 second crops) and
        ``local_crops`` ``[nB, C, l, l, l]``, augmented with a generator seeded ``seed`` on their device."""
        generator = torch.Generator(device=global_crops.device).manual_seed(int(seed))
        half = global_crops.shape[0] // 2
        out_global = torch.cat([global_view_1(global_crops[:half], generator, self.params),
                                global_view_2(global_crops[half:], generator, self.params)])
        out_local = local_view(local_crops, generator, self.params) if local_crops.shape[0] else local_crops
        return out_global, out_local
