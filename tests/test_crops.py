"""3D RandomResizedCrop: scale and aspect ranges, boxes inside the volume, reading only the box."""

from __future__ import annotations

import blosc2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from threedino_pipe.training_data.crops import (
    GLOBAL_CROSSSLICE_SCALE,
    GLOBAL_INPLANE_SCALE,
    LOCAL_CROSSSLICE_SCALE,
    LOCAL_INPLANE_SCALE,
    RandomResizedCrop3D,
    crop_and_resize,
)

RATIO = (0.9, 1 / 0.9)


def _draw_many(crop: RandomResizedCrop3D, shape, n: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([[s for axis in crop.draw(shape, rng) for s in axis] for _ in range(n)])


@pytest.mark.parametrize("inplane, crossslice", [(GLOBAL_INPLANE_SCALE, GLOBAL_CROSSSLICE_SCALE),
                                                 (LOCAL_INPLANE_SCALE, LOCAL_CROSSSLICE_SCALE)],
                         ids=["global", "local"])
def test_scale_and_aspect_ranges_over_many_draws(inplane, crossslice):
    shape = (200, 184, 60)  # large in-plane grid: rounding moves the area fraction by < 1.5 %
    boxes = _draw_many(RandomResizedCrop3D(96, inplane, crossslice), shape)
    wx, wy, wz = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2], boxes[:, 5] - boxes[:, 4]
    area = wx * wy / (shape[0] * shape[1])
    length = wz / shape[2]
    aspect = wx / wy
    assert area.min() >= inplane[0] - 0.015 and area.max() <= min(inplane[1] + 0.015, 1.0)
    assert length.min() >= crossslice[0] - 0.5 / shape[2] and length.max() <= crossslice[1] + 0.5 / shape[2]
    assert aspect.min() >= RATIO[0] - 0.015 and aspect.max() <= RATIO[1] + 0.015
    # the draws cover their ranges (uniform area / length fraction, log-uniform aspect)
    assert area.min() < inplane[0] + 0.03 and area.max() > inplane[1] - 0.05
    assert length.min() < crossslice[0] + 0.03 and length.max() > crossslice[1] - 0.03
    assert np.quantile(aspect, 0.02) < 0.93 and np.quantile(aspect, 0.98) > 1.07
    if inplane[1] < 1:  # (near area 1, boxes of aspect != 1 do not fit and are redrawn, as in torchvision)
        assert abs(np.median(area) - np.mean(inplane)) < 0.02  # uniform in area, not in edge length
    # cross-slice length is drawn independently of the in-plane area
    assert abs(np.corrcoef(area, length)[0, 1]) < 0.1
    # positions cover the whole volume
    assert boxes[:, 0].min() == 0 and boxes[:, 1].max() == shape[0]
    assert boxes[:, 4].min() == 0 and boxes[:, 5].max() == shape[2]


@pytest.mark.parametrize("shape", [(64, 64, 24), (5, 3, 2), (1, 1, 1), (100, 10, 4), (10, 100, 30), (7, 40, 1)])
def test_boxes_lie_inside_any_volume(shape):
    for crop in (RandomResizedCrop3D(96, GLOBAL_INPLANE_SCALE, GLOBAL_CROSSSLICE_SCALE),
                 RandomResizedCrop3D(48, LOCAL_INPLANE_SCALE, LOCAL_CROSSSLICE_SCALE)):
        boxes = _draw_many(crop, shape, n=300)
        for axis in range(3):
            lo, hi = boxes[:, 2 * axis], boxes[:, 2 * axis + 1]
            assert (lo >= 0).all() and (hi <= shape[axis]).all() and (hi - lo >= 1).all()


def test_fallback_is_centred_and_keeps_the_aspect_range():
    # a 100 x 10 plane: no box with area >= 16 % and aspect near 1 fits, so torchvision's fallback applies
    crop = RandomResizedCrop3D(48, LOCAL_INPLANE_SCALE, LOCAL_CROSSSLICE_SCALE)
    boxes = _draw_many(crop, (100, 10, 20), n=50)
    assert (boxes[:, 0:4] == [44, 55, 0, 10]).all()  # 11 x 10 (aspect 1/0.9), centred
    assert len(set(boxes[:, 4])) > 1  # the cross-slice position stays random


def test_draws_are_deterministic_for_a_seed():
    crop = RandomResizedCrop3D(96, GLOBAL_INPLANE_SCALE, GLOBAL_CROSSSLICE_SCALE)
    a, b = _draw_many(crop, (64, 60, 30), 20, seed=7), _draw_many(crop, (64, 60, 30), 20, seed=7)
    c = _draw_many(crop, (64, 60, 30), 20, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_invalid_scales_are_refused():
    with pytest.raises(ValueError):
        RandomResizedCrop3D(96, (0.5, 1.2), (0.5, 1.0))
    with pytest.raises(ValueError):
        RandomResizedCrop3D(96, (0.6, 0.5), (0.5, 1.0))


class _RecordingArray:
    """The real blosc2 array, with a record of every slice asked of it."""

    def __init__(self, array):
        self.array, self.keys = array, []
        self.shape = array.shape

    def __getitem__(self, key):
        self.keys.append(key)
        return self.array[key]


def test_crop_reads_only_the_box_from_blosc2_and_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.uniform(-1, 1, size=(2, 64, 56, 40)).astype(np.float32)
    path = tmp_path / "case.b2nd"
    blosc2.asarray(full, urlpath=str(path), mode="w", chunks=(1, 32, 28, 20), blocks=(1, 16, 14, 10))
    array = _RecordingArray(blosc2.open(str(path), mode="r"))
    box = ((5, 37), (10, 50), (3, 21))
    out = crop_and_resize(array, box, 24)
    assert out.shape == (2, 24, 24, 24) and out.dtype == torch.float32
    # exactly one read, of exactly the box (blosc2 decompresses only the chunks it overlaps)
    assert array.keys == [(slice(None), slice(5, 37), slice(10, 50), slice(3, 21))]
    expected = F.interpolate(torch.from_numpy(full[None, :, 5:37, 10:50, 3:21]), size=(24, 24, 24),
                             mode="trilinear", align_corners=False)[0]
    assert torch.allclose(out, expected, atol=1e-6)
    # the same from a tensor and a numpy array
    assert torch.allclose(crop_and_resize(torch.from_numpy(full), box, 24), expected, atol=1e-6)
    assert torch.allclose(crop_and_resize(full, box, 24), expected, atol=1e-6)


def test_box_of_the_output_size_is_copied_exactly_and_small_volumes_are_upsampled():
    volume = torch.randn(1, 40, 40, 40)
    out = crop_and_resize(volume, ((3, 19), (0, 16), (24, 40)), 16)
    assert torch.equal(out, volume[:, 3:19, 0:16, 24:40])
    small = torch.arange(10 * 8 * 3, dtype=torch.float32).reshape(1, 10, 8, 3)
    crop = RandomResizedCrop3D(48, GLOBAL_INPLANE_SCALE, GLOBAL_CROSSSLICE_SCALE)
    up = crop(small, np.random.default_rng(1))
    assert up.shape == (1, 48, 48, 48) and torch.isfinite(up).all()
    assert small.min() <= up.min() and up.max() <= small.max()  # trilinear: no overshoot
