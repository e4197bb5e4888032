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

On a CPU the chosen crops of each step are processed one by one, in place on views, and on a GPU
all at once (:data:`CROP_BY_CROP_DEVICES`); the blur is a block-banded matrix product per axis.
How this is fast, and the throughput against MONAI: docs/augmentation.md.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from threedino_pipe.training_data.augment_params import PARAMS, AugmentParams

SPATIAL = (2, 3, 4)
PLANES = ((2, 3), (2, 4), (3, 4))  # MONAI's spatial_axes (0, 1), (0, 2), (1, 2) of a B x C x S x S x S batch
TRUNCATE = 4.0  # Gaussian kernels end at 4 sigma (MONAI's GaussianFilter default)
# Device types augmented crop by crop, reading small values on the host (a CPU: no kernel launches to
# save, and one crop's passes stay in its cache); the others (GPUs) take all chosen crops of a step at once.
CROP_BY_CROP_DEVICES: tuple[str, ...] = ("cpu",)
BLOCK = 16      # output rows per matrix product of the banded blur (fastest of 12-48 at 96^3, one CPU thread)


def _uniform(n: int, low: float | torch.Tensor, high: float | torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=g.device)


def _chosen(mask: torch.Tensor) -> torch.Tensor:
    """Row indices where ``mask`` (``[B]`` bool) is set."""
    return mask.nonzero().flatten()


def _crop_by_crop(x: torch.Tensor) -> bool:
    """Whether ``x``'s device takes the crop-by-crop path (:data:`CROP_BY_CROP_DEVICES`)."""
    return x.device.type in CROP_BY_CROP_DEVICES


def _apply(x: torch.Tensor, rows: torch.Tensor, fn) -> None:
    """``x[rows] = fn(x[rows], rows)`` in place (nothing when no row is chosen); ``fn`` may work in place.

    On a CPU crop by crop on views of ``x``: no gather and scatter copies, and each crop's passes
    stay in the cache. Elsewhere (a GPU) on all chosen rows at once, one kernel per step
    (:data:`CROP_BY_CROP_DEVICES`)."""
    if not rows.numel():
        return
    if not _crop_by_crop(x):
        x[rows] = fn(x[rows], rows)
        return
    for j, row in enumerate(rows.tolist()):
        view = x[row:row + 1]
        out = fn(view, rows[j:j + 1])
        if out is not view:
            view.copy_(out)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """``[n]`` -> ``[n, 1, 1, 1, 1]`` for broadcasting over a crop."""
    return values.view(-1, 1, 1, 1, 1)


def _orientation(flips: list[bool], turns: list[int]) -> tuple[list[int], list[int]]:
    """The spatial axes permutation and the flipped output axes equal to flipping the chosen axes, then
    ``turns[i]`` quarter turns in plane ``PLANES[i]`` (``torch.rot90``: k 1 = flip the plane's second
    axis then swap the two, k 2 = flip both, k 3 = flip the first then swap)."""
    axes, flipped = [0, 1, 2], list(flips)
    for (a, b), k in zip(((0, 1), (0, 2), (1, 2)), turns, strict=True):
        if k in (1, 2):
            flipped[b] = not flipped[b]
        if k in (2, 3):
            flipped[a] = not flipped[a]
        if k in (1, 3):
            axes[a], axes[b] = axes[b], axes[a]
            flipped[a], flipped[b] = flipped[b], flipped[a]
    return axes, [d for d in range(3) if flipped[d]]


def flips_and_rotations(x: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """MONAI's ``RandFlip`` per axis (p ``flip_prob``), then ``RandRotate90(max_k=3)`` per plane (p
    ``rotate_prob``, k uniform in 1..3 quarter turns) of ``x`` ``[B, C, S, S, S]``: a new tensor (or ``out``).

    The steps of each crop are composed into one axes permutation and one flip, so every crop is
    copied once (twice when flipped) instead of once per step."""
    n = x.shape[0]
    flips = [torch.rand(n, generator=g, device=g.device) < p.flip_prob for _ in SPATIAL]
    turns = []
    for _ in PLANES:
        do = torch.rand(n, generator=g, device=g.device) < p.rotate_prob
        quarter_turns = torch.randint(1, 4, (n,), generator=g, device=g.device)
        turns.append(torch.where(do, quarter_turns, 0))
    crops = []
    for i, (crop_flips, crop_turns) in enumerate(zip(torch.stack(flips, 1).tolist(), torch.stack(turns, 1).tolist(),
                                                     strict=True)):
        axes, flipped = _orientation(crop_flips, crop_turns)
        crop = x[i].permute(0, *(1 + a for a in axes))
        crops.append(crop.flip([1 + d for d in flipped]) if flipped else crop)
    if not crops:  # no crop at all
        return x.clone() if out is None else out
    return torch.stack(crops, out=out)


def _min_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop minimum and max - min over all channels and voxels, ``[n, 1, 1, 1, 1]`` each."""
    if x.shape[0] == 1:  # one crop (the CPU path): the whole-tensor reduction is many times faster
        low, high = (v.view(1) for v in torch.aminmax(x))
    else:
        low, high = x.flatten(1).amin(1), x.flatten(1).amax(1)
    return _per_sample(low), _per_sample(high - low)


def _contrast_(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """:func:`adjust_contrast` in place on ``x``."""
    low, span = _min_range(x)
    exponent = float(gamma) if _crop_by_crop(x) and gamma.numel() == 1 else _per_sample(gamma)
    return x.sub_(low).div_(span + 1e-7).pow_(exponent).mul_(span).add_(low)  # a scalar power is faster


def adjust_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's ``AdjustContrast`` per crop: ``((x - min) / (range + 1e-7)) ** gamma * range + min``."""
    return _contrast_(x.clone(), gamma)


def histogram_points(n: int, points: int, g: torch.Generator) -> torch.Tensor:
    """``[n, points]`` floating control points of MONAI's ``RandHistogramShift`` on [0, 1]: the ends
    fixed, point i drawn uniformly between the new point i - 1 and the old (evenly spaced) point i + 1."""
    reference = torch.linspace(0, 1, points, device=g.device)
    floating = reference.repeat(n, 1)
    for i in range(1, points - 1):
        floating[:, i] = _uniform(n, floating[:, i - 1], reference[i + 1], g)
    return floating


def _histogram_shift_(x: torch.Tensor, floating: torch.Tensor) -> torch.Tensor:
    """:func:`histogram_shift` in place on ``x``.

    With ``t`` the position on the crop's min-max range in segments (0..points - 1), the map on
    segment j is the line ``start[j] + slope[j] * t`` (both already scaled to the crop's range and
    offset by its minimum), so each voxel needs one segment index and two gathers. A constant crop
    has a zero range, hence slope 0 and start = its value: it comes back unchanged."""
    low, span = _min_range(x)
    segments = floating.shape[1] - 1
    t = x.sub_(low).div_(torch.where(span > 0, span, torch.ones_like(span))).clamp_(0, 1).mul_(segments)
    index = t.to(torch.int64).clamp_(max=segments - 1).flatten(1)
    floating = floating.to(x.dtype)
    slope = floating.diff(dim=1)
    start = floating[:, :-1] - slope * torch.arange(segments, device=x.device, dtype=x.dtype)
    scale = span.view(-1, 1)
    slope, start = slope * scale, start * scale + low.view(-1, 1)
    return t.mul_(slope.gather(1, index).view_as(x)).add_(start.gather(1, index).view_as(x))


def histogram_shift(x: torch.Tensor, floating: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear intensity map per crop: evenly spaced points of the crop's min-max range go to
    ``floating`` (``[n, points]`` on [0, 1], scaled to that range); a constant crop is returned unchanged."""
    return _histogram_shift_(x.clone(), floating)


def _noise_(x: torch.Tensor, std: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise of per-crop ``std`` ``[n]`` added to ``x`` in place."""
    noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype)
    return x.add_(noise.mul_(_per_sample(std)))


def intensity(x: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS) -> torch.Tensor:
    """One of gamma contrast / Gaussian noise / histogram shift (equal odds), applied with p
    ``intensity_prob`` (MONAI's ``OneOf`` whose members each have that probability), in place."""
    n = x.shape[0]
    choice = torch.randint(0, 3, (n,), generator=g, device=g.device)
    do = torch.rand(n, generator=g, device=g.device) < p.intensity_prob
    gamma = _uniform(n, *p.gamma, g)
    noise_std = _uniform(n, 0.0, p.noise_std, g)
    floating = histogram_points(n, p.histogram_points, g)
    _apply(x, _chosen(do & (choice == 0)), lambda crops, rows: _contrast_(crops, gamma[rows]))
    _apply(x, _chosen(do & (choice == 1)), lambda crops, rows: _noise_(crops, noise_std[rows], g))
    _apply(x, _chosen(do & (choice == 2)), lambda crops, rows: _histogram_shift_(crops, floating[rows]))
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
    taps, inside = _band_layout(size, kernels.shape[1] // 2, kernels.device)
    return kernels[:, taps] * inside


@functools.lru_cache(maxsize=64)
def _band_layout(size: int, tail: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[size, size]`` tap index ``j - i + T`` (clamped) of each matrix entry and whether it is in the band."""
    positions = torch.arange(size, device=device)
    offsets = positions.view(1, -1) - positions.view(-1, 1) + tail
    return offsets.clamp(0, 2 * tail), (offsets >= 0) & (offsets <= 2 * tail)


def _banded_product(x: torch.Tensor, matrices: torch.Tensor, tail: int) -> torch.Tensor:
    """``(matrices @ x)`` transposed: ``x`` ``[b, A, R]``, ``matrices`` ``[b, A, A]`` banded (half-width
    ``tail``) -> ``[b, R, A]``. Computed ``BLOCK`` output rows at a time from the ``BLOCK + 2 tail``
    input rows they depend on, so the band's zeros are mostly skipped; the transposed result puts
    the blurred axis last, ready for the next axis's product to take the new leading axis."""
    b, size, rest = x.shape
    out = torch.empty(b, rest, size, dtype=x.dtype, device=x.device)
    for first in range(0, size, BLOCK):
        last = min(size, first + BLOCK)
        low, high = max(0, first - tail), min(size, last + tail)
        torch.matmul(x[:, low:high].mT, matrices[:, first:last, low:high].mT, out=out[:, :, first:last])
    return out


def _trimmed(kernels: torch.Tensor) -> torch.Tensor:
    """``kernels`` ``[n, 2T + 1]`` without the outer taps that are zero in every kernel (both ends alike,
    so they stay centred): the products then skip them. Reads the kernels on the host (CPU use)."""
    used = kernels.ne(0).any(0).nonzero().flatten().tolist()
    lead = min(used[0], kernels.shape[1] - 1 - used[-1]) if used else 0
    return kernels[:, lead: kernels.shape[1] - lead]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``[n, C, S0, S1, S2]`` with per-crop, per-axis ``sigma`` ``[n, 3]``
    (voxels, at most ``max_sigma``), zero padding.

    Each axis is a batched product with a banded matrix (:func:`band_matrices`, :func:`_banded_product`):
    dense matrix products run near the CPU's peak while depthwise 3D convolutions do not
    (benchmarks/augment_throughput.py). Each product takes the leading spatial axis and puts it last,
    so after three the axes are back in order and no transpose is ever copied."""
    n, c, *sizes = x.shape
    all_kernels = erf_kernels(sigma.reshape(-1), max_sigma).to(x.dtype).view(n, 3, -1)
    out = x.reshape(n * c, -1)
    for axis in range(3):
        kernels = _trimmed(all_kernels[:, axis]) if _crop_by_crop(x) else all_kernels[:, axis]
        matrices = band_matrices(kernels, sizes[axis])
        if c > 1:
            matrices = matrices.repeat_interleave(c, 0)
        out = _banded_product(out.reshape(n * c, sizes[axis], -1), matrices, kernels.shape[1] // 2)
    return out.view_as(x)


def _sigmas(n: int, low: float | torch.Tensor, high: float | torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` per-axis sigmas drawn uniformly in [low, high] (``low``/``high`` scalars or ``[n, 3]``)."""
    return low + (high - low) * torch.rand(n, 3, generator=g, device=g.device)


def blur(x: torch.Tensor, g: torch.Generator, prob: float, p: AugmentParams = PARAMS) -> torch.Tensor:
    """MONAI's ``RandGaussianSmooth`` (sigma per axis in ``blur_sigma``) with probability ``prob``, in place."""
    n = x.shape[0]
    do = torch.rand(n, generator=g, device=g.device) < prob
    sigma = _sigmas(n, *p.blur_sigma, g)
    _apply(x, _chosen(do), lambda crops, rows: gaussian_blur(crops, sigma[rows], p.blur_sigma[1]))
    return x


def sharpen(x: torch.Tensor, sigma1: torch.Tensor, sigma2: torch.Tensor, alpha: torch.Tensor,
            max_sigma: float) -> torch.Tensor:
    """MONAI's ``GaussianSharpen`` per crop: ``b = blur(x, sigma1)``, ``b + alpha * (b - blur(b, sigma2))``."""
    blurred = gaussian_blur(x, sigma1, max_sigma)
    detail = gaussian_blur(blurred, sigma2, max_sigma).neg_().add_(blurred)  # blurred - blur(blurred)
    return blurred.add_(detail.mul_(_per_sample(alpha)))


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
    max_sharpen_sigma = max(p.sharpen_sigma1[1], p.sharpen_sigma2)
    _apply(x, _chosen(do & (choice == 0)), lambda crops, rows: gaussian_blur(crops, sigma[rows], p.blur_sigma[1]))
    _apply(x, _chosen(do & (choice == 1)), lambda crops, rows: sharpen(crops, sigma1[rows], sigma2[rows],
                                                                       alpha[rows], max_sharpen_sigma))
    return x


@functools.lru_cache(maxsize=16)
def _gibbs_distances(shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S0, S1, S2 // 2 + 1]`` float64 distances, in the real FFT's frequency order, of frequency f and
    of -f from MONAI's centre ``(S - 1) / 2`` of the shifted spectrum (summed as MONAI sums them)."""
    coords = [torch.fft.ifftshift(torch.arange(s, device=device, dtype=torch.float64) - (s - 1) / 2) for s in shape]
    mirrored = [torch.roll(c.flip(0), 1) for c in coords]  # the coordinate of -f at each f

    def distance(c: list[torch.Tensor]) -> torch.Tensor:
        return torch.sqrt(c[0].view(-1, 1, 1) ** 2 + c[1].view(1, -1, 1) ** 2
                          + c[2][: shape[2] // 2 + 1].view(1, 1, -1) ** 2)

    return distance(coords), distance(mirrored)


def gibbs_masks(shape: tuple[int, int, int], alpha: torch.Tensor) -> torch.Tensor:
    """``[n, S0, S1, S2 // 2 + 1]`` real-FFT masks equal to MONAI's ``GibbsNoise``: MONAI keeps the shifted
    spectrum within ``(1 - alpha) * max(S) * sqrt(2) / 2`` of ``(S - 1) / 2`` and takes the real part
    of the inverse; the real part equals the inverse of the mask's Hermitian-symmetric half
    ``(M(f) + M(-f)) / 2``, which the real FFT can use."""
    forward, backward = _gibbs_distances(tuple(shape), alpha.device)
    radius = ((1 - alpha.to(torch.float64)) * max(shape) * math.sqrt(2) / 2).view(-1, 1, 1, 1)
    return ((forward <= radius).to(torch.float32) + (backward <= radius).to(torch.float32)) / 2


def gibbs_noise(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """MONAI's ``GibbsNoise`` per crop (``alpha`` ``[n]`` in [0, 1]; 0 = identity): low-pass in k-space."""
    shape = tuple(x.shape[2:])
    spectrum = torch.fft.rfftn(x, dim=SPATIAL)
    spectrum.mul_(gibbs_masks(shape, alpha).unsqueeze(1))
    return torch.fft.irfftn(spectrum, s=shape, dim=SPATIAL).to(x.dtype)


def gibbs(x: torch.Tensor, g: torch.Generator, prob: float, p: AugmentParams = PARAMS) -> torch.Tensor:
    """MONAI's ``RandGibbsNoise`` (alpha in ``gibbs_alpha``) with probability ``prob``, in place."""
    n = x.shape[0]
    do = torch.rand(n, generator=g, device=g.device) < prob
    alpha = _uniform(n, *p.gibbs_alpha, g)
    _apply(x, _chosen(do), lambda crops, rows: gibbs_noise(crops, alpha[rows]))
    return x


def _prepared(crops: torch.Tensor) -> torch.Tensor:
    if crops.dim() != 5 or not crops.shape[2] == crops.shape[3] == crops.shape[4]:
        raise ValueError(f"expected cubic crops B x C x S x S x S, got {tuple(crops.shape)}")
    return crops.to(torch.float32)  # no copy here: flips_and_rotations makes a new tensor


def global_view_1(crops: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """First global crops ``[B, C, S, S, S]``: flips, rotations, intensity, then blur or sharpen (p 1.0).
    The result is written to ``out`` (float32, the crops' shape) when given."""
    x = intensity(flips_and_rotations(_prepared(crops), g, p, out), g, p)
    return blur_or_sharpen(x, g, p.global1_blur_sharpen_prob, p)


def global_view_2(crops: torch.Tensor, g: torch.Generator, p: AugmentParams = PARAMS,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Second global crops: flips, rotations, intensity, blur or sharpen (p 0.1), Gibbs ringing (p 0.2);
    written to ``out`` when given."""
    x = intensity(flips_and_rotations(_prepared(crops), g, p, out), g, p)
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
        out_global = torch.empty(global_crops.shape, dtype=torch.float32, device=global_crops.device)
        global_view_1(global_crops[:half], generator, self.params, out=out_global[:half])
        global_view_2(global_crops[half:], generator, self.params, out=out_global[half:])
        out_local = local_view(local_crops, generator, self.params) if local_crops.shape[0] else local_crops
        return out_global, out_local
