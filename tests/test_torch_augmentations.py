"""The batched torch augmentations against the MONAI pipelines (the reference): equal operations for
equal parameters, equal distributions over 2,048 crops with fixed seeds, a control that must be
caught, determinism, devices. Tolerances are in docs/augmentation.md ("The torch implementation")."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, Compose, GaussianSharpen, GaussianSmooth, GibbsNoise, RandHistogramShift
from scipy import stats

from threedino_pipe.training_data import torch_augmentations as T
from threedino_pipe.training_data.augment_params import PARAMS, AugmentParams
from threedino_pipe.training_data.augmentations import (
    _geometric,
    global_transform_1,
    global_transform_2,
    local_transform,
)
from threedino_pipe.training_data.crops import LOCAL_CROSSSLICE_SCALE, LOCAL_INPLANE_SCALE, RandomResizedCrop3D

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_CROPS = 2048
CROP = 16
GROUPS = 32             # batch means: 32 groups of 64 crops
Z_LIMIT = 4.0           # |mean paired group difference| / its standard error
KS_ALPHA = 1e-3         # two-sample Kolmogorov-Smirnov, per-crop statistics
CHI2_ALPHA = 1e-3       # orientation frequencies against the exact probabilities
QUANTILES = (5, 25, 50, 75, 95)
PIPELINES = {"global_1": (global_transform_1, T.global_view_1), "global_2": (global_transform_2, T.global_view_2),
             "local": (local_transform, T.local_view)}


def ct_like_volume(rng: np.random.Generator) -> np.ndarray:
    """``1 x 64 x 64 x 48`` on [-1, 1]: constant air (-1) around an ellipsoid body with smooth structure and noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (64, 64, 48)], indexing="ij"))
    body = grid[0] ** 2 / 0.8 + grid[1] ** 2 / 0.6 + grid[2] ** 2 / 1.2 < 1
    tissue = (0.2 * np.sin(6 * grid[0]) * np.cos(5 * grid[1]) + 0.3 * grid[2]
              + 0.05 * rng.standard_normal(body.shape))
    return np.clip(np.where(body, tissue, -1.0), -1, 1).astype(np.float32)[None]


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """2,048 unaugmented 16^3 crops (local-crop scales) of the volume, some all air: ``[N, 1, 16, 16, 16]``."""
    rng = np.random.default_rng(0)
    volume = ct_like_volume(rng)
    cropper = RandomResizedCrop3D(CROP, LOCAL_INPLANE_SCALE, LOCAL_CROSSSLICE_SCALE)
    return torch.stack([cropper(volume, rng) for _ in range(N_CROPS)])


def monai_outputs(make, crops: torch.Tensor, seed: int) -> torch.Tensor:
    transform = make()
    transform.set_random_state(seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image's intensity is a single value")
        return torch.stack([torch.as_tensor(transform(c)).float() for c in crops])


_MONAI_CACHE: dict[str, torch.Tensor] = {}


def reference(name: str, crops: torch.Tensor) -> torch.Tensor:
    """The MONAI pipeline's outputs for ``crops`` (seed 1), made once per module."""
    if name not in _MONAI_CACHE:
        _MONAI_CACHE[name] = monai_outputs(PIPELINES[name][0], crops, seed=1)
    return _MONAI_CACHE[name]


def torch_outputs(name: str, crops: torch.Tensor, seed: int = 1, params: AugmentParams = PARAMS) -> torch.Tensor:
    return PIPELINES[name][1](crops, torch.Generator().manual_seed(seed), params)


def _group_statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per group of crops (rows of ``x`` ``[GROUPS, voxels]``): mean, std and quantiles of the intensities."""
    quantiles = np.quantile(x, [q / 100 for q in QUANTILES], axis=1)
    return {"mean": x.mean(1), "std": x.std(1), **{f"q{q}": v for q, v in zip(QUANTILES, quantiles, strict=True)}}


def distribution_failures(monai: torch.Tensor, ours: torch.Tensor, inputs: torch.Tensor) -> list[str]:
    """The named statistics on which two sets of augmented crops (of the same ``inputs``) differ.

    - intensities of all crops: mean, std and the 5/25/50/75/95 % quantiles, by paired batch means:
      each statistic on 32 groups of 64 crops (the same crops in both sets), the mean of the 32
      paired differences against its standard error (std / sqrt(32)); fails beyond ``Z_LIMIT``.
    - per-crop mean, per-crop std and per-crop mean change from the input: two-sample KS test,
      fails below ``KS_ALPHA``.
    """
    failures = []
    a, b = (_group_statistics(x.reshape(GROUPS, -1).double().numpy()) for x in (monai, ours))
    for name in a:
        sa, sb = a[name], b[name]
        d = sa - sb
        z = float(d.mean() / max(float(d.std(ddof=1)) / GROUPS ** 0.5, 1e-9))
        if abs(z) > Z_LIMIT:
            failures.append(f"{name}: MONAI {float(sa.mean()):.4f}, torch {float(sb.mean()):.4f}, z {z:.1f}")
    base = inputs.flatten(1).double().mean(1)
    per_crop = {"crop mean": lambda x: x.flatten(1).double().mean(1),
                "crop std": lambda x: x.flatten(1).double().std(1),
                "crop mean change": lambda x: x.flatten(1).double().mean(1) - base}
    for name, f in per_crop.items():
        result = stats.ks_2samp(f(monai).numpy(), f(ours).numpy())
        if result.pvalue < KS_ALPHA:
            failures.append(f"{name}: KS D {result.statistic:.3f}, p {result.pvalue:.1e}")
    return failures


@pytest.mark.parametrize("name", list(PIPELINES))
def test_torch_pipeline_matches_monai_in_distribution(crops, name):
    ours = torch_outputs(name, crops)
    assert ours.shape == crops.shape and ours.dtype == torch.float32
    assert distribution_failures(reference(name, crops), ours, crops) == []


def test_control_with_a_wider_gamma_range_is_detected(crops):
    """The same comparison must catch gamma drawn in (0.3, 3.0) instead of the pipeline's (0.5, 2.0)."""
    changed = dataclasses.replace(PARAMS, gamma=(0.3, 3.0))
    failures = distribution_failures(reference("local", crops), torch_outputs("local", crops, params=changed), crops)
    assert failures, "the comparison did not notice a changed gamma range"


def _orientation_probabilities(cube: torch.Tensor) -> dict[bytes, float]:
    """Exact probability of each output of flips (p 0.3 per axis) then quarter turns (p 0.3 per plane, k 1..3)."""
    out: dict[bytes, float] = {}
    flip_p, turn_p = PARAMS.flip_prob, PARAMS.rotate_prob
    for flips in itertools.product((False, True), repeat=3):
        for turns in itertools.product((0, 1, 2, 3), repeat=3):
            x, prob = cube, 1.0
            for dim, flip in zip(T.SPATIAL, flips, strict=True):
                x, prob = (x.flip(dim), prob * flip_p) if flip else (x, prob * (1 - flip_p))
            for plane, k in zip(T.PLANES, turns, strict=True):
                x, prob = (torch.rot90(x, k, plane), prob * turn_p / 3) if k else (x, prob * (1 - turn_p))
            key = x.numpy().tobytes()
            out[key] = out.get(key, 0.0) + prob
    return out


def _chi2_pvalue(counts: dict[bytes, int], probabilities: dict[bytes, float], n: int) -> float:
    assert set(counts) <= set(probabilities), "an orientation the pipeline cannot make"
    observed = np.array([counts.get(k, 0) for k in probabilities])
    expected = np.array(list(probabilities.values())) * n
    return float(stats.chisquare(observed, expected).pvalue)


def test_flip_and_rotation_frequencies_match_the_exact_probabilities():
    """Both implementations' orientations of a cube of distinct values (48 possible) over 2,048 draws
    against the probabilities enumerated from the pipeline's rule: chi-square test."""
    cube = torch.arange(27, dtype=torch.float32).view(1, 1, 3, 3, 3)
    probabilities = _orientation_probabilities(cube)
    assert len(probabilities) == 48 and abs(sum(probabilities.values()) - 1) < 1e-9
    ours = T.flips_and_rotations(cube.repeat(N_CROPS, 1, 1, 1, 1), torch.Generator().manual_seed(5))
    torch_counts: dict[bytes, int] = {}
    for row in ours:
        key = row.unsqueeze(0).numpy().tobytes()
        torch_counts[key] = torch_counts.get(key, 0) + 1
    geometric = Compose(_geometric())
    geometric.set_random_state(seed=5)
    monai_counts: dict[bytes, int] = {}
    for _ in range(N_CROPS):
        key = torch.as_tensor(geometric(cube[0])).unsqueeze(0).numpy().tobytes()
        monai_counts[key] = monai_counts.get(key, 0) + 1
    assert _chi2_pvalue(torch_counts, probabilities, N_CROPS) > CHI2_ALPHA
    assert _chi2_pvalue(monai_counts, probabilities, N_CROPS) > CHI2_ALPHA
    identity = cube.numpy().tobytes()
    assert torch_counts[identity] / N_CROPS == pytest.approx(probabilities[identity], abs=0.03)


def test_each_operation_equals_monai_for_the_same_parameters():
    """Gamma, histogram shift, blur, sharpening and Gibbs ringing on crops of even and odd size."""
    torch.manual_seed(0)
    for size in (16, 17):
        x = torch.rand(3, 2, size, size, size) * 2 - 1
        gamma = torch.tensor([0.5, 1.3, 2.0])
        expected = torch.stack([torch.as_tensor(AdjustContrast(float(v))(x[i])) for i, v in enumerate(gamma)])
        torch.testing.assert_close(T.adjust_contrast(x, gamma), expected, atol=1e-6, rtol=0)
        sigma = torch.tensor([[0.25, 0.7, 1.5], [1.1, 0.3, 0.9], [0.5, 0.5, 0.5]])
        expected = torch.stack([torch.as_tensor(GaussianSmooth(sigma=sigma[i].tolist())(x[i])) for i in range(3)])
        torch.testing.assert_close(T.gaussian_blur(x, sigma, 1.5), expected, atol=1e-6, rtol=0)
        sigma1, alpha = sigma.clamp(0.5, 1.0), torch.tensor([1.0, 3.0, 5.0])
        sigma2 = 0.5 + 0.5 * (sigma1 - 0.5)
        expected = torch.stack([torch.as_tensor(GaussianSharpen(sigma1[i].tolist(), sigma2[i].tolist(),
                                                                float(alpha[i]))(x[i])) for i in range(3)])
        torch.testing.assert_close(T.sharpen(x, sigma1, sigma2, alpha, 1.0), expected, atol=1e-5, rtol=0)
        alphas = torch.tensor([0.0, 0.4, 0.8])
        expected = torch.stack([torch.as_tensor(GibbsNoise(float(v))(x[i])) for i, v in enumerate(alphas)])
        torch.testing.assert_close(T.gibbs_noise(x, alphas), expected, atol=1e-5, rtol=0)
        floating = T.histogram_points(3, PARAMS.histogram_points, torch.Generator().manual_seed(3))
        assert torch.all(floating.diff(dim=1) >= 0) and torch.all(floating[:, [0, -1]] == torch.tensor([0.0, 1.0]))
        expected = []
        for i in range(3):
            shift = RandHistogramShift(PARAMS.histogram_points, prob=1.0)
            shift.reference_control_points = np.linspace(0, 1, PARAMS.histogram_points)
            shift.floating_control_points = floating[i].double().numpy()
            expected.append(torch.as_tensor(shift(x[i], randomize=False)))
        torch.testing.assert_close(T.histogram_shift(x, floating), torch.stack(expected), atol=1e-5, rtol=0)
    constant = torch.full((1, 1, 4, 4, 4), 0.3)
    assert torch.equal(T.histogram_shift(constant, floating[:1]), constant)


def test_same_seed_same_batch_and_input_untouched(crops):
    batch = crops[:64].clone()
    global_crops, local_crops = batch[:8].clone(), batch[8:].clone()
    augment = T.BatchAugmenter()
    first = augment(global_crops, local_crops, seed=T.batch_seed(0, 3))
    second = augment(global_crops, local_crops, seed=T.batch_seed(0, 3))
    other = augment(global_crops, local_crops, seed=T.batch_seed(0, 4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    assert torch.equal(global_crops, batch[:8]) and torch.equal(local_crops, batch[8:])  # not augmented in place
    assert T.batch_seed(0, 3) != T.batch_seed(0, 3, rank=1) != T.batch_seed(1, 3)


def test_batch_layout_first_half_global_1_second_half_global_2(crops):
    """Rows 0..B-1 take the first global pipeline, B..2B-1 the second, then the local crops, one generator."""
    global_crops, local_crops = crops[:8], crops[8:40]
    out_global, out_local = T.BatchAugmenter()(global_crops, local_crops, seed=11)
    g = torch.Generator().manual_seed(11)
    torch.testing.assert_close(out_global, torch.cat([T.global_view_1(global_crops[:4], g),
                                                      T.global_view_2(global_crops[4:], g)]), atol=0, rtol=0)
    torch.testing.assert_close(out_local, T.local_view(local_crops, g), atol=0, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_runs_on_the_crops_device(crops, device):
    global_crops, local_crops = crops[:4].to(device), crops[4:20].to(device)
    out_global, out_local = T.BatchAugmenter()(global_crops, local_crops, seed=2)
    assert out_global.device.type == device and out_local.device.type == device
    assert out_global.shape == global_crops.shape and out_local.shape == local_crops.shape
    assert torch.isfinite(out_global).all() and torch.isfinite(out_local).all()


def test_refuses_crops_that_are_not_cubes():
    with pytest.raises(ValueError, match="cubic"):
        T.local_view(torch.zeros(2, 1, 8, 8, 6), torch.Generator().manual_seed(0))


def test_imports_without_monai():
    """The GPU machines have torch but no MONAI: the module (and its parameters) must import without it."""
    code = ("import sys; sys.modules['monai'] = None\n"
            "from threedino_pipe.training_data.torch_augmentations import BatchAugmenter\n"
            "import torch; out = BatchAugmenter()(torch.zeros(2, 1, 8, 8, 8), torch.zeros(0, 1, 4, 4, 4), seed=0)\n"
            "assert not [m for m in sys.modules if m.startswith('monai') and sys.modules[m] is not None]\n"
            "print(tuple(out[0].shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 1, 8, 8, 8)"


def test_blur_by_banded_matrices_equals_monai_on_a_box_shorter_than_the_kernel():
    """Per-axis sizes 5, 12 and 20 (the first shorter than the 13 taps of sigma 1.5), two channels."""
    torch.manual_seed(1)
    x = torch.rand(2, 2, 5, 12, 20) * 2 - 1
    sigma = torch.tensor([[1.5, 0.4, 1.0], [0.25, 1.5, 0.8]])
    expected = torch.stack([torch.as_tensor(GaussianSmooth(sigma=sigma[i].tolist())(x[i])) for i in range(2)])
    torch.testing.assert_close(T.gaussian_blur(x, sigma, 1.5), expected, atol=1e-6, rtol=0)
    matrix = T.band_matrices(torch.tensor([[1.0, 2.0, 3.0]]), 4)[0]
    assert matrix.tolist() == [[2, 3, 0, 0], [1, 2, 3, 0], [0, 1, 2, 3], [0, 0, 1, 2]]


def test_crop_by_crop_path_equals_the_batched_path(crops, monkeypatch):
    """The CPU takes the chosen crops of each step one by one (views, scalar powers, kernels trimmed to
    their own taps); GPUs take them all at once. Run here on the CPU both ways: the same crops (the
    same draws; float32 rounding apart) on 16^3 crops and on 33^3 crops (three blur blocks, one cut short)."""
    torch.manual_seed(4)
    for global_crops, local_crops in ((crops[:16], crops[16:80]), (torch.rand(6, 2, 33, 33, 33) * 2 - 1, crops[:8])):
        by_crop = T.BatchAugmenter()(global_crops, local_crops, seed=7)
        with monkeypatch.context() as patch:
            patch.setattr(T, "CROP_BY_CROP_DEVICES", ())
            batched = T.BatchAugmenter()(global_crops, local_crops, seed=7)
        for ours, theirs in zip(by_crop, batched, strict=True):
            torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
        assert not torch.equal(by_crop[0], global_crops)
